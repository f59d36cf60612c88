"""Reading and writing images with their geometry.

NIfTI goes through nibabel (affine and header kept). PNG/JPG (ultrasound, X-ray) go through Pillow and get an
identity affine; their arrays are indexed ``(x, y)`` like MONAI's ``PILReader`` so both readers agree.
Writes are atomic: a file is written under a temporary name and renamed, so no half-written file has a final name.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageReadError(OSError):
    """An image could not be read. ``str(err)`` is ``"<file>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_image_file(path: str | Path) -> bool:
    """A file medseg reads as an image (NIfTI, PNG, JPG)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES + RASTER_SUFFIXES)


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an image without reading its voxels (cheap).

    Returns:
        ``(shape, affine)``; ``affine`` is ``(4, 4)`` (identity for PNG/JPG).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if is_nifti(path):
        try:
            img = nib.load(str(path))
        except Exception as err:  # nibabel raises many types for damaged headers
            raise ImageReadError(path, f"not a readable NIfTI file ({err})") from err
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    if path.suffix.lower() in RASTER_SUFFIXES:
        array, affine = read_image(path)
        return array.shape, affine
    raise ImageReadError(path, f"unsupported file type (use {', '.join(NIFTI_SUFFIXES + RASTER_SUFFIXES)})")


def read_image(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read all voxels of one image.

    Args:
        path: a ``.nii``/``.nii.gz``/``.png``/``.jpg`` file.
        dtype: numpy dtype of the returned array.

    Returns:
        ``(array, affine)``: NIfTI arrays keep their on-disk axes ``(X, Y[, Z][, C])``; PNG/JPG give ``(X, Y)``
        for grey and ``(X, Y, C)`` for colour. ``affine`` is the ``(4, 4)`` voxel-to-world matrix.

    Raises:
        ImageReadError: missing, truncated or unreadable file, naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if is_nifti(path):
        try:
            img = nib.load(str(path))
            array = np.asarray(img.dataobj, dtype=dtype)
        except Exception as err:  # EOFError, zlib.error, HeaderDataError, ValueError ...
            raise ImageReadError(path, f"unreadable or truncated NIfTI file ({type(err).__name__}: {err})") from err
        return array, np.asarray(img.affine, dtype=np.float64)
    if path.suffix.lower() in RASTER_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
                array = np.asarray(img, dtype=dtype)
        except Exception as err:
            raise ImageReadError(path, f"unreadable or truncated image ({type(err).__name__}: {err})") from err
        array = np.swapaxes(array, 0, 1)  # (H, W[, C]) -> (X, Y[, C]), as MONAI's PILReader
        return np.ascontiguousarray(array), np.eye(4)
    raise ImageReadError(path, f"unsupported file type (use {', '.join(NIFTI_SUFFIXES + RASTER_SUFFIXES)})")


def spacing_from_affine(affine: np.ndarray, spatial_dims: int = 3) -> np.ndarray:
    """Voxel size along each array axis (norm of the affine's columns), ``(spatial_dims,)``."""
    return np.linalg.norm(np.asarray(affine)[:3, :spatial_dims], axis=0)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype: type | None = None) -> Path:
    """Write ``array`` with ``affine`` (sform and qform both set, code 1 = scanner) atomically.

    Args:
        array: ``(X, Y[, Z][, C])`` voxels.
        affine: ``(4, 4)`` voxel-to-world matrix of the grid ``array`` lies on.
        path: destination ``.nii``/``.nii.gz``; parent folders are created.
        dtype: on-disk dtype (default: the array's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array if dtype is None else array.astype(dtype))
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` on success, removed on failure.

    The temporary name starts with a dot and keeps the suffix (``.nii.gz`` included), so readers that pick
    files by suffix can skip it and writers that pick a format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the final file gets open()'s usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write ``rows`` (dicts) as CSV atomically; ``columns`` default to the first row's keys."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
