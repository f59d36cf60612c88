"""Synthetic DICOM series for tests and demos: a volume and its affine written as single-frame slices.

A volume ``(X, Y, Z)`` with a nibabel (RAS) affine becomes ``Z`` files of one image each (CT Image Storage by
default, 16-bit signed, with RescaleSlope/RescaleIntercept): slice ``k`` holds ``volume[:, :, k]`` as its
``(Rows, Columns) = (Y, X)`` pixels at ``ImagePositionPatient`` = the world position of voxel ``(0, 0, k)``
converted to DICOM's LPS, with ``ImageOrientationPatient`` and ``PixelSpacing`` taken from the affine's first
two columns. Stored values are ``round((value - intercept) / slope)``: a volume that is a multiple of ``slope``
above ``intercept`` is stored exactly.

Readers sort slices along the normal of the orientation (row x column direction), not by file name or instance
number: when the affine's third column points against that normal, a reader's array is the volume flipped along
its last axis (with the matching affine).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(
    folder: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    series_uid: str | None = None,
    reverse_order: bool = False,
    order: Sequence[int] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    sop_class_uid: str = CT_IMAGE_STORAGE,
    modality: str = "CT",
    patient_id: str = "medseg-synthetic",
    series_number: int = 1,
    prefix: str = "slice",
) -> list[Path]:
    """Write ``volume`` as a DICOM series of single-frame images into ``folder`` (created).

    Args:
        folder: destination folder; files are named ``<prefix>_0000.dcm``, ... in the order written.
        volume: ``(X, Y, Z)`` values (e.g. Hounsfield units).
        affine: ``(4, 4)`` voxel-to-world matrix in nibabel's RAS convention.
        series_uid: the SeriesInstanceUID (new by default); give the same one to two calls to make a mixed folder.
        reverse_order: write the slices last first (file names and InstanceNumber then run against position).
        order: the slice indices in the order written (a permutation of ``range(Z)``); overrides
            ``reverse_order``.
        slope, intercept: RescaleSlope and RescaleIntercept of every slice.
        study_uid, frame_of_reference_uid: shared UIDs (new by default).
        sop_class_uid, modality: what the files claim to be (CT Image Storage by default).
        patient_id: PatientID (PatientName is ``Synthetic^<patient_id>``).
        series_number: SeriesNumber.
        prefix: the start of the file names (two calls with other prefixes can share a folder).

    Returns:
        The files written, in the order written.

    Raises:
        ValueError: ``volume`` is not 3D, or a value does not fit 16 bits after the rescale.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"write_series needs an (X, Y, Z) volume, got shape {volume.shape}")
    stored = np.rint((volume - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"values {volume.min():g}..{volume.max():g} do not fit 16 bits with slope {slope:g} and "
                         f"intercept {intercept:g}")
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step = lps[:3, 0], lps[:3, 1]  # along a row (next column), along a column (next row)
    spacing = (float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step)))  # PixelSpacing: row, column
    orientation = [*(col_step / spacing[1]), *(row_step / spacing[0])]
    nz = volume.shape[2]
    slices = list(order) if order is not None else list(range(nz))[:: -1 if reverse_order else 1]
    if sorted(slices) != list(range(nz)):
        raise ValueError(f"order must be a permutation of range({nz}), got {slices}")
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = study_uid or generate_uid(), frame_of_reference_uid or generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().strftime("%Y%m%d")
    paths = []
    for number, k in enumerate(slices, start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}_{number - 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, "medseg synthetic", "synthetic phantom"
        ds.PatientName, ds.PatientID = f"Synthetic^{patient_id}", patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = series_number, number
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        position = lps[:3, 3] + k * lps[:3, 2]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(v) for v in spacing]
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T, dtype="<i2").tobytes()
        _save(ds, path)
        paths.append(path)
    return paths


def _ds(value: float) -> str:
    """A decimal string (DICOM DS, at most 16 characters) for ``value``."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.8g}"


def _save(ds: object, path: Path) -> None:
    """Write a file with its 128-byte preamble, ``DICM`` and file meta (pydicom 3 and 2.x)."""
    import pydicom

    try:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        pydicom.dcmwrite(path, ds, write_like_original=False)
