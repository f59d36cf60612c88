"""DICOM series: a folder of single-frame images read as one volume with its geometry.

A *series folder* holds DICOM files (``DICM`` at byte 128; hidden files, other files and ``DICOMDIR`` are
ignored) of one series of CT, MR or PET slices. Its array is indexed ``(X, Y, Z)``: column ``i``, row ``j`` and
slice ``k``, the slices sorted along the normal of ``ImageOrientationPatient`` (row x column direction) by the
projection of ``ImagePositionPatient`` on it, whatever the file names or instance numbers. RescaleSlope and
RescaleIntercept are applied. The affine is the voxel-to-world matrix in nibabel's RAS convention (DICOM's
patient coordinates are LPS: its first two rows are negated), built from ``ImagePositionPatient`` of the first
slice, ``ImageOrientationPatient``, ``PixelSpacing`` and the step between slice positions: what
:func:`medseg.data.io.read_image` gives for the same volume saved as NIfTI.

Refused, each as an :class:`~medseg.data.io.ImageReadError` naming the folder and the reason: no DICOM files;
files of several series; a non-image object (a segmentation, an RT structure set, a presentation state, ...) or
a multi-frame image; missing slices or uneven spacing; orientation, matrix size or pixel spacing that differ
between slices; unreadable or truncated files; a size over ``max_voxels`` (before any pixel data is read).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import DEFAULT_MAX_VOXELS, ImageReadError, _check_voxel_count

IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
"""The single-frame cross-sectional image classes medseg reads as slices."""
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE = 0.01
SPACING_TOLERANCE_MM = 0.05
"""Largest accepted deviation of a slice gap (and of a slice position from the line of slices): 1% of the expected
gap or 0.05 mm, whichever is larger (but at most a quarter of the gap). Exports often round positions to 0.01 mm
(0.625 mm slices then have gaps of 0.62 and 0.63 mm); a missing slice is off by a whole gap."""
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file: ``DICM`` at byte 128 (the suffix does not matter)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _candidates(folder: str | Path) -> Iterator[Path]:
    """The DICOM files directly inside ``folder``, in directory order (hidden files and ``DICOMDIR`` left out;
    an unreadable folder has none)."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file() and is_dicom_file(p):
            yield p


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly inside ``folder``, sorted by name (hidden files and ``DICOMDIR`` left out)."""
    return sorted(_candidates(folder))


def is_dicom_series(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files directly (checked by content; stops at the first one)."""
    return Path(path).is_dir() and next(_candidates(path), None) is not None


def expand_series(paths: Sequence[str]) -> list[str]:
    """``paths`` with each folder followed by the (non-hidden) files in it: what a cache stamp must cover (a
    folder's own size and time do not change when a file in it is rewritten). Nothing is read."""
    expanded = []
    for path in paths:
        expanded.append(path)
        if Path(path).is_dir():
            expanded += [str(p) for p in sorted(Path(path).iterdir()) if not p.name.startswith(".") and p.is_file()]
    return expanded


@dataclass
class Series:
    """The headers of one series folder, checked and sorted.

    Attributes:
        folder: the series folder.
        files: the DICOM files in slice order.
        headers: their datasets without pixel data, in the same order.
        shape: ``(X, Y, Z)`` = (columns, rows, slices).
        affine: ``(4, 4)`` voxel-to-world matrix, RAS.
    """

    folder: Path
    files: list[Path]
    headers: list[Any]
    shape: tuple[int, int, int]
    affine: np.ndarray


def read_series_header(folder: str | Path,
                       max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape ``(X, Y, Z)`` and RAS affine of a series folder, from its headers alone (no pixel data read).

    Raises:
        ImageReadError: naming the folder and the reason (see the module docstring).
    """
    series = scan_series(folder, max_voxels)
    return series.shape, series.affine


def series_datasets(folder: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Any]:
    """The series' datasets (``pydicom.Dataset``, without pixel data) in the array's slice order."""
    return scan_series(folder, max_voxels).headers


def read_series(folder: str | Path, dtype: type = np.float32,
                max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """All voxels of a series folder, rescaled (slope and intercept of each slice), once its headers passed.

    Returns:
        ``(array, affine)``: ``(X, Y, Z)`` voxels of ``dtype`` and the ``(4, 4)`` RAS voxel-to-world matrix.

    Raises:
        ImageReadError: naming the folder and the reason (a file's pixel data that cannot be decoded names the
            file).
    """
    import pydicom

    series = scan_series(folder, max_voxels)
    array = np.empty(series.shape, dtype=dtype)
    for k, path in enumerate(series.files):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as err:  # truncated pixel data, a codec that is not installed, ...
            raise ImageReadError(series.folder, f"{path.name}: pixel data cannot be read or decoded "
                                                f"({type(err).__name__}: {err})") from err
        if pixels.shape != series.shape[1::-1]:
            raise ImageReadError(series.folder, f"{path.name}: pixel data of shape {pixels.shape}, but the header "
                                                f"says {ds.Rows}x{ds.Columns}")
        slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
        array[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return array, series.affine


def scan_series(folder: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Series:
    """Read and check the headers of a series folder and sort its slices (see the module docstring)."""
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(folder, "folder not found" if not folder.exists() else "not a folder")
    files = dicom_files(folder)
    if not files:
        raise ImageReadError(folder, "no DICOM files in this folder (none has 'DICM' at byte 128)")
    headers = []
    for path in files:
        try:
            with open(path, "rb") as handle:
                ds = pydicom.dcmread(handle, stop_before_pixels=True)
                pixel_data_at = handle.tell()  # where the pixel data element starts
        except Exception as err:  # pydicom raises many types for damaged files
            raise ImageReadError(folder, f"{path.name}: unreadable or truncated DICOM file "
                                         f"({type(err).__name__}: {err})") from err
        _check_image(folder, path, ds, pixel_data_at)
        if not headers:  # the size claimed, before any other file is parsed
            _check_voxel_count(folder, (int(ds.Columns), int(ds.Rows), len(files)), max_voxels)
        headers.append(ds)
    _check_one_series(folder, files, headers)
    _check_same_grid(folder, files, headers)
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal) or 1.0
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    files, headers, positions = [files[i] for i in order], [headers[i] for i in order], positions[order]
    step = _slice_step(folder, files, headers[0], positions, normal)
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = orientation[:3] * column_spacing, orientation[3:] * row_spacing
    lps[:3, 2], lps[:3, 3] = step, positions[0]
    shape = (int(headers[0].Columns), int(headers[0].Rows), len(files))
    return Series(folder, files, headers, shape, _LPS_TO_RAS @ lps)


def _check_image(folder: Path, path: Path, ds: Any, pixel_data_at: int) -> None:
    """Refuse a file that is not a single-frame, single-sample image slice with its geometry, or (uncompressed
    transfer syntaxes) whose file ends before the pixel data its header claims, from ``pixel_data_at`` on."""
    from pydicom.uid import UID

    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        name = f"SOP class {UID(sop_class).name} ({sop_class})" if sop_class else "no SOP Class UID"
        raise ImageReadError(folder, f"{path.name}: {name}, not a single-frame image; medseg reads series of "
                                     f"{', '.join(IMAGE_SOP_CLASSES.values())} slices")
    missing = [key for key in _REQUIRED if ds.get(key) in (None, "")]
    if missing:
        raise ImageReadError(folder, f"{path.name}: no {', '.join(missing)}: the slice's geometry is unknown")
    frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    if frames != 1 or samples != 1:
        raise ImageReadError(folder, f"{path.name}: {frames} frame(s) of {samples} sample(s) per pixel; medseg "
                                     "reads single-frame greyscale slices")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not UID(syntax).is_compressed:
        claimed = int(ds.Rows) * int(ds.Columns) * math.ceil(int(ds.get("BitsAllocated") or 16) / 8)
        size = path.stat().st_size
        if size < pixel_data_at + 8 + claimed:  # 8: the shortest element header (tag and length)
            raise ImageReadError(folder, f"{path.name}: truncated: its header claims {ds.Rows}x{ds.Columns} pixels "
                                         f"({claimed:,} bytes from byte {pixel_data_at}) but the file has {size:,} "
                                         "bytes")


def _check_one_series(folder: Path, files: list[Path], headers: list[Any]) -> None:
    uids: dict[str, Path] = {}
    for path, ds in zip(files, headers, strict=True):
        uids.setdefault(str(ds.get("SeriesInstanceUID", "")), path)
    if len(uids) > 1:
        shown = ", ".join(f"{uid or '(none)'} ({path.name}, ...)" for uid, path in list(uids.items())[:3])
        raise ImageReadError(folder, f"the files belong to {len(uids)} series (SeriesInstanceUID {shown}); put "
                                     "each series in its own folder")


def _check_same_grid(folder: Path, files: list[Path], headers: list[Any]) -> None:
    """The same orientation, matrix size and pixel spacing in every slice."""
    first, reference = files[0], headers[0]
    for path, ds in zip(files[1:], headers[1:], strict=True):
        for key, what in (("ImageOrientationPatient", "orientation"), ("PixelSpacing", "pixel spacing")):
            mine, theirs = (np.array([float(v) for v in d.get(key)]) for d in (ds, reference))
            if mine.shape != theirs.shape or np.max(np.abs(mine - theirs)) > ORIENTATION_TOLERANCE * max(
                    1.0, float(np.max(np.abs(theirs)))):
                raise ImageReadError(folder, f"inconsistent {what}: {path.name} has {key} {_list(mine)}, "
                                             f"{first.name} {_list(theirs)}")
        if (ds.Rows, ds.Columns) != (reference.Rows, reference.Columns):
            raise ImageReadError(folder, f"inconsistent matrix size: {path.name} has {ds.Rows}x{ds.Columns} "
                                         f"pixels, {first.name} {reference.Rows}x{reference.Columns}")


def _slice_step(folder: Path, files: list[Path], first: Any, positions: np.ndarray,
                normal: np.ndarray) -> np.ndarray:
    """The world step (LPS, mm) from one slice to the next; refuses missing slices and uneven spacing."""
    if len(files) == 1:
        thickness = _number(first, "SpacingBetweenSlices", 0.0) or _number(first, "SliceThickness", 0.0) or 1.0
        return normal * thickness
    gaps = np.diff(positions @ normal)
    typical = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if gap < SPACING_TOLERANCE * max(typical, 1e-3):
            raise ImageReadError(folder, f"two slices at the same position ({files[k].name} and "
                                         f"{files[k + 1].name}): several acquisitions in one series?")
    expected = float(gaps.min())  # not the median: of three slices with one missing, that is the mean gap
    tolerance = max(SPACING_TOLERANCE * expected, min(SPACING_TOLERANCE_MM, expected / 4))
    for k, gap in enumerate(gaps):
        if gap - expected > tolerance:
            hint = " (a missing slice?)" if gap > 1.5 * expected else ""
            raise ImageReadError(folder, f"uneven slice spacing: expected {expected:.4g} mm between slices, found "
                                         f"{gap:.4g} mm between {files[k].name} and {files[k + 1].name}{hint}")
    step = (positions[-1] - positions[0]) / (len(files) - 1)  # along the normal, or sheared by a gantry tilt
    off_line = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(len(files)), step)), axis=1)
    if off_line.max() > tolerance:
        k = int(np.argmax(off_line))
        raise ImageReadError(folder, f"the slice positions do not lie on one line: {files[k].name} is "
                                     f"{off_line[k]:.4g} mm off it")
    return step


def _check_same_channel_grid(first: str | Path, reference: tuple[np.ndarray, np.ndarray], folder: str | Path,
                             channel: tuple[np.ndarray, np.ndarray]) -> None:
    """Refuse a channel's series whose grid (shape, or affine beyond 1e-3 mm) is not the first channel's."""
    (array, affine), (first_array, first_affine) = channel, reference
    if array.shape != first_array.shape:
        raise ImageReadError(folder, f"a channel of shape {array.shape}, but the first channel ({first}) has "
                                     f"shape {first_array.shape}: the channels of a case must share one grid")
    if not np.allclose(affine, first_affine, rtol=0.0, atol=1e-3):
        raise ImageReadError(folder, f"a channel whose affine differs from the first channel's ({first}) by up to "
                                     f"{np.abs(affine - first_affine).max():.4g}: the channels of a case must share "
                                     "one grid")


def _number(ds: Any, key: str, default: float) -> float:
    value = ds.get(key)
    return default if value in (None, "") else float(value)


def _list(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def __getattr__(name: str) -> Any:
    """``DicomSeriesReader``, defined on first use: importing this module does not import MONAI (seconds)."""
    if name != "DicomSeriesReader":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    reader = globals()[name] = _reader_class()
    return reader


def _reader_class() -> type:
    """A MONAI ``ImageReader`` for series folders, as ``medseg.data.dicom.DicomSeriesReader`` (picklable)."""
    from monai.data import ImageReader
    from monai.utils import MetaKeys, SpaceKeys

    class DicomSeriesReader(ImageReader):
        """A MONAI ``ImageReader`` for series folders, for ``LoadImage``/``LoadImaged``: :func:`read_series`'s
        array and RAS affine. It claims only series folders, so files still go to MONAI's own readers. Several
        folders (one per channel) are stacked along a new first axis, as MONAI's readers stack files, once their
        grids (shape and affine) are found to be the same."""

        def __init__(self, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
            super().__init__()
            self.max_voxels = max_voxels

        def verify_suffix(self, filename: Any) -> bool:
            names = filename if isinstance(filename, (list, tuple)) else [filename]
            return bool(names) and all(isinstance(n, (str, Path)) and is_dicom_series(n) for n in names)

        def read(self, data: Any, **kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
            names = data if isinstance(data, (list, tuple)) else [data]
            channels = [read_series(name, max_voxels=self.max_voxels) for name in names]
            for name, (array, affine) in zip(names[1:], channels[1:], strict=True):
                _check_same_channel_grid(names[0], channels[0], name, (array, affine))
            return channels

        def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
            arrays, affine = [array for array, _ in img], img[0][1]
            meta = {MetaKeys.AFFINE: affine.copy(), MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                    MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape), MetaKeys.SPACE: SpaceKeys.RAS,
                    MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(arrays) == 1 else 0}
            return (arrays[0] if len(arrays) == 1 else np.stack(arrays)), meta

    DicomSeriesReader.__module__, DicomSeriesReader.__qualname__ = __name__, "DicomSeriesReader"
    return DicomSeriesReader
