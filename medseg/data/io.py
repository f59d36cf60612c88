"""Reading and writing images with their geometry.

NIfTI goes through nibabel (affine and header kept). PNG/JPG (ultrasound, X-ray) go through Pillow and get an
identity affine; their arrays are indexed ``(x, y)`` like MONAI's ``PILReader`` so both readers agree.
Writes are atomic: a file is written under a temporary name and renamed, so no half-written file has a final name.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_MAX_VOXELS = 1_000_000_000
"""The most voxels (all channels) an image header may claim before any voxel is read: 1e9 (4 GB as float32;
a 512x512x300 CT has 7.9e7). ``--max-voxels`` raises it for real images that are larger."""
GZIP_MAX_RATIO = 1032
"""Deflate cannot expand data by more than about 1032:1, so a ``.nii.gz`` of ``n`` bytes holds at most this
many times ``n`` bytes of voxels: a header that claims more is forged or the file is cut short."""


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


def read_header(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an image without reading its voxels (cheap), after :func:`check_claimed_size`; a
    folder is read as a DICOM series (:func:`medseg.data.dicom.read_series_header`).

    Returns:
        ``(shape, affine)``; ``affine`` is ``(4, 4)`` (identity for PNG/JPG).

    Raises:
        ImageReadError: missing or unreadable file, or a header whose claimed size cannot be trusted.
    """
    path = Path(path)
    if path.is_dir():  # a DICOM series folder (medseg.data.dicom)
        from medseg.data.dicom import read_series_header

        return read_series_header(path, max_voxels)
    if is_nifti(path):
        img = _load_nifti_header(path, max_voxels)
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return _raster_header(path, max_voxels), np.eye(4)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    raise ImageReadError(path, f"unsupported file type (use {', '.join(NIFTI_SUFFIXES + RASTER_SUFFIXES)})")


def check_claimed_size(path: str | Path, shape: tuple[int, ...], itemsize: int, offset: int,
                       max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Refuse a header whose claim cannot be true, before anything of that size is allocated.

    Args:
        path: the image file (its size on disk is the evidence).
        shape: the array shape the header claims.
        itemsize: bytes per voxel on disk.
        offset: bytes before the first voxel (NIfTI ``vox_offset``).
        max_voxels: the most voxels accepted at all (``--max-voxels``).

    Raises:
        ImageReadError: more voxels than ``max_voxels``; or more voxel bytes than the file can hold (an
            uncompressed file shorter than ``offset`` + data, a ``.nii.gz`` smaller than 1/1032 of its data).
    """
    voxels = _check_voxel_count(path, shape, max_voxels)
    claimed, size = voxels * itemsize, os.path.getsize(path)
    if str(path).lower().endswith(".gz"):
        if claimed > size * GZIP_MAX_RATIO:
            raise ImageReadError(path, f"the header claims {_shape(shape)} voxels ({claimed:,} bytes), more than "
                                       f"a {size:,}-byte compressed file can hold: truncated, or a forged header")
    elif offset + claimed > size:
        raise ImageReadError(path, f"the header claims {_shape(shape)} voxels ({claimed:,} bytes from byte "
                                   f"{offset}) but the file has {size:,} bytes: truncated")


def _check_voxel_count(path: str | Path, shape: tuple[int, ...], max_voxels: int) -> int:
    """The number of voxels ``shape`` claims, refused above ``max_voxels``."""
    voxels = math.prod(int(s) for s in shape)
    if voxels > max_voxels:
        raise ImageReadError(path, f"the header claims {_shape(shape)} = {voxels:,} voxels, more than the limit of "
                                   f"{max_voxels:,}; if the image is real, raise --max-voxels")
    return voxels


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _load_nifti_header(path: Path, max_voxels: int) -> Any:
    """``nib.load`` (header only; voxels stay on disk) and :func:`check_claimed_size`."""
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        img = nib.load(str(path))
        itemsize, offset = img.get_data_dtype().itemsize, int(getattr(img.dataobj, "offset", 0))
    except Exception as err:  # nibabel raises many types for damaged headers
        if _cut_short(path):
            raise ImageReadError(path, "truncated: the file ends before its end-of-stream marker, inside its "
                                       f"header ({type(err).__name__}: {err})") from err
        raise ImageReadError(path, f"unreadable or damaged NIfTI file ({type(err).__name__}: {err})") from err
    check_claimed_size(path, img.shape, itemsize, offset, max_voxels)
    return img


def _cut_short(path: Path) -> bool:
    """Whether ``path`` (whose header could not be read) ends early: a ``.gz`` stream without its end, or a
    file shorter than a NIfTI-1 header's 348 bytes. Only called on that error path: it may read the file."""
    if not str(path).lower().endswith(".gz"):
        return path.stat().st_size < 348
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (EOFError, zlib.error):
        return True
    except OSError:  # not gzip at all: garbage, not a cut file
        return False
    return False


def _raster_header(path: Path, max_voxels: int) -> tuple[int, ...]:
    """Shape ``(X, Y[, C])`` of a PNG/JPG from its header (Pillow decodes nothing until asked), at most
    ``max_voxels``. A JPEG can compress further than deflate, so the file size bounds nothing here."""
    from PIL import Image

    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            bands = len(img.getbands())
    except Exception as err:
        raise ImageReadError(path, f"unreadable image ({type(err).__name__}: {err})") from err
    shape = (width, height) + ((bands,) if bands > 1 else ())
    _check_voxel_count(path, shape, max_voxels)  # Pillow's own decompression-bomb check covers the rest
    return shape


def read_image(path: str | Path, dtype: type = np.float32,
               max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """Read all voxels of one image, once its header passed :func:`check_claimed_size`.

    Args:
        path: a ``.nii``/``.nii.gz``/``.png``/``.jpg`` file, or a DICOM series folder
            (:func:`medseg.data.dicom.read_series`: ``(X, Y, Z)``, RAS affine).
        dtype: numpy dtype of the returned array.
        max_voxels: the most voxels a header may claim.

    Returns:
        ``(array, affine)``: NIfTI arrays keep their on-disk axes ``(X, Y[, Z][, C])``; PNG/JPG give ``(X, Y)``
        for grey and ``(X, Y, C)`` for colour. ``affine`` is the ``(4, 4)`` voxel-to-world matrix.

    Raises:
        ImageReadError: missing, truncated or unreadable file, or an untrustworthy header, naming the file
            and the reason.
    """
    path = Path(path)
    if path.is_dir():  # a DICOM series folder (medseg.data.dicom)
        from medseg.data.dicom import read_series

        return read_series(path, dtype, max_voxels)
    if is_nifti(path):
        img = _load_nifti_header(path, max_voxels)
        try:
            array = np.asarray(img.dataobj, dtype=dtype)
        except Exception as err:  # EOFError, zlib.error, HeaderDataError, ValueError ...
            raise ImageReadError(path, f"unreadable or truncated NIfTI file ({type(err).__name__}: {err})") from err
        return array, np.asarray(img.affine, dtype=np.float64)
    if path.suffix.lower() in RASTER_SUFFIXES:
        from PIL import Image

        _raster_header(path, max_voxels)
        try:
            with Image.open(path) as img:
                img.load()
                array = np.asarray(img, dtype=dtype)
        except Exception as err:
            raise ImageReadError(path, f"unreadable or truncated image ({type(err).__name__}: {err})") from err
        array = np.swapaxes(array, 0, 1)  # (H, W[, C]) -> (X, Y[, C]), as MONAI's PILReader
        return np.ascontiguousarray(array), np.eye(4)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    raise ImageReadError(path, f"unsupported file type (use {', '.join(NIFTI_SUFFIXES + RASTER_SUFFIXES)})")


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


@contextlib.contextmanager
def flocked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created when missing): one process at a time on this
    host, and across hosts on file systems that support it. Without ``fcntl`` (not POSIX), no lock is taken."""
    if fcntl is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. ENOLCK: an NFS mount without lock support
            _warn_no_locks(path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def _warn_no_locks_once(folder: str, reason: str) -> None:
    logging.getLogger("medseg").warning(
        "%s: this file system refuses file locks (%s): processes writing here at once are not kept apart", folder,
        reason)


def _warn_no_locks(path: str | Path, err: OSError) -> None:
    _warn_no_locks_once(str(Path(path).parent), err.strerror or str(err))


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write ``rows`` (dicts) as CSV atomically; ``columns`` default to the first row's keys."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
