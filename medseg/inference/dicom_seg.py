"""DICOM SEG: a label map on a DICOM series' grid written as a Segmentation object that references the series.

``medseg predict --output-format dicom-seg`` writes ``<case>.seg.dcm`` beside ``<case>.nii.gz`` with highdicom: a
BINARY Segmentation, one segment per structure (segment ``k`` = label ``k`` of a class model, or region ``k`` of a
region model; a structure absent from the case still gets its segment), one frame per source slice where the
segment is present, each frame referencing its source image (SOPInstanceUID) and the series. The segment labels
are the checkpoint's structure names; medseg knows nothing of the anatomy, so every segment is coded as the
generic property "Tissue", and the algorithm is identified as medseg (automatic, family "Artificial
Intelligence", medseg's version). The file is written atomically.

The SEG copies the patient and study of its source: a series without FrameOfReferenceUID, StudyInstanceUID or
PatientID is refused (before inference, by :func:`check_seg_source`); type-2 attributes an anonymised export left
out (PatientName, PatientBirthDate, PatientSex, AccessionNumber, StudyID, StudyDate, StudyTime,
ReferringPhysicianName) are written empty, as the standard allows.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.dicom import is_dicom_series, series_datasets
from medseg.data.io import DEFAULT_MAX_VOXELS, ImageReadError, atomic_path
from medseg.errors import InputError

OUTPUT_FORMATS = ("nifti", "dicom-seg")
SEG_SUFFIX = ".seg.dcm"
SEG_SERIES_NUMBER = 1000
SOURCE_REQUIRED = ("FrameOfReferenceUID", "StudyInstanceUID", "PatientID")
"""What a SEG cannot be written without: it shares its source's frame of reference, study and patient."""
TYPE2_FILLED = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                "StudyTime", "ReferringPhysicianName")
"""Type-2 attributes the SEG copies from its source, written empty where the source has none."""


def check_seg_source(images: Sequence[str], task: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> str:
    """The series folder a case's DICOM SEG references (its first image), or an :class:`InputError` naming it
    and saying why the case cannot have one (a file is no series; a classification model segments nothing; a
    slice without FrameOfReferenceUID, StudyInstanceUID or PatientID). Reads the headers only."""
    source = str(images[0])
    if task != "segmentation":
        raise InputError(f"{source}: --output-format dicom-seg is for segmentation models; this one is a model of "
                         f"the {task} task")
    if not is_dicom_series(source):
        raise InputError(f"{source}: --output-format dicom-seg needs a DICOM series folder as input (a SEG "
                         "references its source images); predict this file with --output-format nifti")
    _check_required(source, series_datasets(source, max_voxels))
    return source


def _check_required(folder: str | Path, sources: Sequence[Any]) -> None:
    """Refuse source slices without one of :data:`SOURCE_REQUIRED`, naming the folder and the first such file."""
    for ds in sources:
        missing = [key for key in SOURCE_REQUIRED if ds.get(key) in (None, "")]
        if missing:
            name = Path(str(ds.filename)).name if getattr(ds, "filename", None) else "a slice"
            raise InputError(f"{folder}: {name} has no {', '.join(missing)}: a DICOM SEG shares its source's frame "
                             "of reference, study and patient; predict it with --output-format nifti")


def write_dicom_seg(labels: np.ndarray, series_folder: str | Path, names: Sequence[str], path: str | Path,
                    regions: Sequence[Sequence[int]] | None = None,
                    max_voxels: int = DEFAULT_MAX_VOXELS) -> Path:
    """Write the label map ``labels`` as a DICOM SEG referencing the series in ``series_folder``.

    Args:
        labels: ``(X, Y, Z)`` integer label map on the series grid (as :func:`medseg.data.dicom.read_series`
            gives it).
        series_folder: the source series.
        names: the structure names: of labels ``1..K`` (the checkpoint's label names without background), or of
            each region.
        path: the ``.dcm`` file to write (parent folders are created).
        regions: for a region model, the label values of each region (segments may then overlap).
        max_voxels: the most voxels the series' headers may claim.

    Returns:
        ``path``.

    Raises:
        InputError: the label map is not on the series grid, or holds a value no segment describes, or the
            series lacks what a SEG copies (see :func:`check_seg_source`).
        ImageReadError: the series cannot be read.
    """
    import highdicom as hd

    from medseg import __version__

    sources = series_datasets(series_folder, max_voxels)
    _check_required(series_folder, sources)
    sources = [_with_type2(ds) for ds in sources]
    grid = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    labels = np.asarray(labels)
    if labels.shape != grid:
        raise InputError(f"{series_folder}: a label map of shape {labels.shape} is not on the series grid {grid}")
    if not names:
        raise InputError(f"{series_folder}: no structure names: a DICOM SEG needs at least one segment")
    frames = labels.transpose(2, 1, 0)  # (X, Y, Z) -> (slices, rows, columns), the sources' order
    if regions is None:
        top = int(frames.max(initial=0))
        if top > len(names) or int(frames.min(initial=0)) < 0:
            raise InputError(f"{series_folder}: label value {top} has no segment ({len(names)} structure names)")
        pixels = frames.astype(np.uint8 if len(names) < 256 else np.uint16)
    else:  # stacked segments: region r is every voxel whose label is one of its values
        pixels = np.stack([np.isin(frames, list(values)) for values in regions], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", version=__version__, family=_ai_family())
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name)[:64], segmented_property_category=_tissue(),
            segmented_property_type=_tissue(), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, name in enumerate(names, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg",
        software_versions=__version__, device_serial_number="medseg", series_description="medseg segmentation",
        content_label="MEDSEG", content_description="medseg automatic segmentation",
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def read_dicom_seg(path: str | Path, series_folder: str | Path,
                   max_voxels: int = DEFAULT_MAX_VOXELS) -> dict[int, np.ndarray]:
    """The segments of a DICOM SEG as boolean masks ``(X, Y, Z)`` on the grid of its source series.

    Returns:
        Segment number -> mask, for every segment the SEG describes (an empty mask where it has no frame).

    Raises:
        ImageReadError: the file is not a DICOM SEG, or it does not reference ``series_folder``'s images.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as err:
        raise ImageReadError(path, f"not a readable DICOM SEG ({type(err).__name__}: {err})") from err
    sources = series_datasets(series_folder, max_voxels)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    numbers = [int(n) for n in seg.segment_numbers]
    try:
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers,
                                                   assert_missing_frames_are_empty=True)
    except Exception as err:
        raise ImageReadError(path, f"its frames do not map onto the series in {series_folder} "
                                   f"({type(err).__name__}: {err})") from err
    return {number: pixels[..., i].transpose(2, 1, 0).astype(bool) for i, number in enumerate(numbers)}


def segment_labels(path: str | Path) -> dict[int, str]:
    """Segment number -> segment label (the structure name) of a DICOM SEG."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    return {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}


def _with_type2(ds: Any) -> Any:
    """``ds``, or a copy of it with the :data:`TYPE2_FILLED` attributes it lacks set empty."""
    missing = [key for key in TYPE2_FILLED if key not in ds]
    if not missing:
        return ds
    ds = copy.deepcopy(ds)
    for key in missing:
        setattr(ds, key, "")
    return ds


def _tissue() -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept("85756007", "SCT", "Tissue")


def _ai_family() -> Any:
    from pydicom.sr.codedict import codes

    return codes.cid7162.ArtificialIntelligence

