"""DICOM series in (read_series, the MONAI reader, discovery, the data checks, predict), DICOM SEG out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.data.dicom import (
    is_dicom_series,
    read_series,
    read_series_header,
    series_datasets,
)
from medseg.data.io import ImageReadError, read_header, read_image, write_nifti
from medseg.data.synthetic_dicom import write_series

SHAPE = (24, 20, 12)  # X != Y: a transposed slice cannot pass
SLOPE, INTERCEPT = 2.0, -1024.0


def _volume(seed: int = 0) -> np.ndarray:
    """Hounsfield units that 16 bits with SLOPE and INTERCEPT store exactly (so NIfTI and DICOM agree exactly)."""
    return np.random.default_rng(seed).integers(0, 1500, SHAPE) * SLOPE + INTERCEPT


def _affine(kind: str) -> np.ndarray:
    """RAS affines: ``axial`` (the slice step along the orientation's normal), ``oblique`` (rotated about all
    three axes) and ``flipped`` (the first axis negated, as the synthetic phantoms: the step then points against
    the normal)."""
    if kind == "oblique":
        a, b, c = np.radians([20.0, -10.0, 35.0])
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        linear = rz @ ry @ rx @ np.diag([0.8, 0.9, 2.5])
    else:
        linear = np.diag([-1.0 if kind == "flipped" else 0.8, 0.9, 2.5])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, [12.5, -30.0, 47.25]
    return affine


def _z_flipped(affine: np.ndarray, nz: int) -> np.ndarray:
    """The affine of the same grid with its last axis reversed (voxel k becomes nz - 1 - k)."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, nz - 1
    return affine @ flip


@pytest.mark.parametrize(("kind", "order"), [("axial", "forward"), ("axial", "reversed"), ("oblique", "shuffled"),
                                             ("oblique", "reversed")])
def test_series_reads_as_the_same_volume_in_nifti(tmp_path: Path, kind: str, order: str) -> None:
    volume, affine = _volume(), _affine(kind)
    permutation = list(np.random.default_rng(1).permutation(SHAPE[2])) if order == "shuffled" else None
    write_series(tmp_path / "series", volume, affine, slope=SLOPE, intercept=INTERCEPT,
                 reverse_order=order == "reversed", order=permutation)
    write_nifti(volume.astype(np.float32), affine, tmp_path / "volume.nii.gz")
    nifti, nifti_affine = read_image(tmp_path / "volume.nii.gz")

    array, series_affine = read_series(tmp_path / "series")
    assert array.dtype == np.float32 and array.shape == SHAPE
    np.testing.assert_array_equal(array, nifti)  # rescaled: the stored values are (HU + 1024) / 2
    np.testing.assert_allclose(series_affine, nifti_affine, atol=1e-4)
    shape, header_affine = read_series_header(tmp_path / "series")
    assert shape == SHAPE
    np.testing.assert_allclose(header_affine, nifti_affine, atol=1e-4)
    # medseg's readers take the folder as an image
    assert read_header(tmp_path / "series")[0] == SHAPE
    np.testing.assert_array_equal(read_image(tmp_path / "series")[0], nifti)
    positions = [float(ds.ImagePositionPatient[2]) for ds in series_datasets(tmp_path / "series")]
    assert len(positions) == SHAPE[2] and (kind != "axial" or positions == sorted(positions))


def test_slices_against_the_normal_come_reversed_with_the_matching_affine(tmp_path: Path) -> None:
    volume, affine = _volume(), _affine("flipped")
    write_series(tmp_path / "series", volume, affine, slope=SLOPE, intercept=INTERCEPT)
    array, series_affine = read_series(tmp_path / "series")
    np.testing.assert_array_equal(array, volume[:, :, ::-1])
    np.testing.assert_allclose(series_affine, _z_flipped(affine, SHAPE[2]), atol=1e-4)


def test_a_series_folder_is_recognised_by_content(tmp_path: Path) -> None:
    write_series(tmp_path / "series", _volume()[:, :, :2], _affine("axial"))
    (tmp_path / "series" / "slice_0000.dcm").rename(tmp_path / "series" / "IM0001")  # no suffix: still DICOM
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "not.dcm").write_bytes(b"\0" * 200)
    (tmp_path / "hidden").mkdir()
    (tmp_path / "series" / "IM0001").rename(tmp_path / "hidden" / ".IM0001")
    assert is_dicom_series(tmp_path / "series") and read_series_header(tmp_path / "series")[0] == (24, 20, 1)
    assert not is_dicom_series(tmp_path / "fake") and not is_dicom_series(tmp_path / "hidden")
    assert not is_dicom_series(tmp_path / "series" / "slice_0001.dcm")  # a file is no series folder
    with pytest.raises(ImageReadError, match="no DICOM files"):
        read_header(tmp_path / "fake")


def _mixed(folder: Path) -> str:
    write_series(folder, _volume()[:, :, :3], _affine("axial"), series_uid="1.2.3.4", prefix="b")
    return "belong to 2 series"


def _missing(folder: Path) -> str:
    (folder / "slice_0005.dcm").unlink()
    return "expected 2.5 mm between slices, found 5 mm between slice_0004.dcm and slice_0006.dcm (a missing slice?)"


def _rtstruct(folder: Path) -> str:
    ds = pydicom.dcmread(folder / "slice_0003.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.save_as(folder / "slice_0003.dcm")
    return "slice_0003.dcm: SOP class RT Structure Set Storage (1.2.840.10008.5.1.4.1.1.481.3), not a single-frame"


def _rotated(folder: Path) -> str:
    ds = pydicom.dcmread(folder / "slice_0007.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(folder / "slice_0007.dcm")
    return "inconsistent orientation: slice_0007.dcm has ImageOrientationPatient [1, 0, 0, 0, 0, -1]"


def _truncated(folder: Path) -> str:
    data = (folder / "slice_0002.dcm").read_bytes()
    (folder / "slice_0002.dcm").write_bytes(data[: len(data) - 300])
    return "slice_0002.dcm: truncated"


def _three_slices_one_missing(folder: Path) -> str:
    """Of slices 0, 1 and 3, the median gap (3.75 mm) is the mean of 2.5 and 5: the wrong pair was blamed."""
    for k in (2, *range(4, SHAPE[2])):
        (folder / f"slice_{k:04d}.dcm").unlink()
    return "expected 2.5 mm between slices, found 5 mm between slice_0001.dcm and slice_0003.dcm (a missing slice?)"


@pytest.mark.parametrize("damage", [_mixed, _missing, _three_slices_one_missing, _rtstruct, _rotated, _truncated])
def test_broken_series_are_refused_naming_the_folder_and_the_reason(tmp_path: Path, damage) -> None:
    folder = tmp_path / "series"
    write_series(folder, _volume(), _affine("axial"))
    reason = damage(folder)
    for read in (read_series_header, read_series, read_image):
        with pytest.raises(ImageReadError) as caught:
            read(folder)
        assert str(caught.value).startswith(f"{folder}: ") and reason in str(caught.value)


def test_positions_rounded_to_hundredths_are_accepted_and_a_missing_slice_still_refused(tmp_path: Path) -> None:
    """0.625 mm slices at positions written with two decimals (0, 0.62, 1.25, 1.88, ...: gaps of 0.62 and 0.63 mm,
    1.6% apart) are one even series; without a slice they are not."""
    affine = np.diag([0.8, 0.9, 0.625, 1.0])
    paths = write_series(tmp_path / "series", _volume()[:, :, :8], affine)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [f"{float(v):.2f}" for v in ds.ImagePositionPatient]
        ds.save_as(path)
    assert [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths[:4]] == [0.0, 0.62, 1.25, 1.88]
    _, series_affine = read_series(tmp_path / "series")
    assert series_affine[2, 2] == pytest.approx(4.38 / 7)  # from the first and last positions
    paths[4].unlink()
    with pytest.raises(ImageReadError, match=r"between slice_0003.dcm and slice_0005.dcm \(a missing slice\?\)"):
        read_series(tmp_path / "series")


def _hand_built_series(folder: Path, pixels: list[np.ndarray], row_cosines: np.ndarray, column_cosines: np.ndarray,
                       pixel_spacing: tuple[float, float], positions: list[np.ndarray], order: list[int]) -> None:
    """Single-frame MR slices written with pydicom alone (not medseg's writer): slice ``k`` holds ``pixels[k]``
    (rows x columns) at ``positions[k]`` (LPS), the files written in ``order``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"f{n}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.Modality, ds.PatientID = "MR", "hand-built"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cosines, *column_cosines)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.PixelSpacing = [str(v) for v in pixel_spacing]
        ds.Rows, ds.Columns = pixels[k].shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype="<i2").tobytes()
        pydicom.dcmwrite(folder / f"f{n}.dcm", ds, enforce_file_format=True)


def test_hand_built_oblique_series_with_non_square_pixels_has_the_standard_affine(tmp_path: Path) -> None:
    """DICOM PS3.3 C.7.6.2.1.1: the pixel in column i and row j of a slice lies at
    ``P = S + X * dc * i + Y * dr * j`` (S: ImagePositionPatient, X/Y: the row/column direction cosines of
    ImageOrientationPatient, PixelSpacing = [dr, dc] = [row spacing, column spacing]); medseg's voxel (i, j, k)
    is slice k's pixel (row j, column i), and the affine is that map in RAS (x and y negated)."""
    theta = np.radians(30.0)
    row_cosines, column_cosines = np.array([np.cos(theta), np.sin(theta), 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row_cosines, column_cosines)
    rows, columns, slices, dr, dc = 5, 7, 4, 0.5, 0.8
    origin = np.array([10.0, -20.0, 30.0])
    positions = [origin + k * 2.5 * normal for k in range(slices)]
    pixels = [np.random.default_rng(k).integers(-100, 100, (rows, columns)) for k in range(slices)]
    _hand_built_series(tmp_path / "series", pixels, row_cosines, column_cosines, (dr, dc), positions, [2, 0, 3, 1])

    array, affine = read_series(tmp_path / "series")
    expected = np.eye(4)
    expected[:3, 0], expected[:3, 1] = row_cosines * dc, column_cosines * dr
    expected[:3, 2], expected[:3, 3] = 2.5 * normal, origin
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ expected
    np.testing.assert_allclose(affine, expected, atol=1e-5)
    assert array.shape == (columns, rows, slices)
    for k in range(slices):
        np.testing.assert_array_equal(array[:, :, k], pixels[k].T)
    i, j, k = 6, 4, 3  # a corner voxel, in world coordinates by the standard's formula
    world = positions[k] + row_cosines * dc * i + column_cosines * dr * j
    np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], world * [-1, -1, 1], atol=1e-5)


def test_channels_on_other_grids_are_refused_naming_both_folders(tmp_path: Path) -> None:
    from medseg.data.dicom import DicomSeriesReader

    affine = _affine("axial")
    write_series(tmp_path / "t1", _volume()[:, :, :3], affine)
    write_series(tmp_path / "t2", _volume()[:, :, :3], affine)
    write_series(tmp_path / "short", _volume()[:, :, :2], affine)
    moved = affine.copy()
    moved[:3, 3] += 0.5  # the same shape, half a millimetre away
    write_series(tmp_path / "moved", _volume()[:, :, :3], moved)
    reader = DicomSeriesReader()
    array, meta = reader.get_data(reader.read([str(tmp_path / "t1"), str(tmp_path / "t2")]))
    assert array.shape == (2, *SHAPE[:2], 3)
    for other, reason in (("short", "of shape (24, 20, 2), but the first channel"), ("moved", "affine differs")):
        with pytest.raises(ImageReadError, match="channels of a case must share one grid") as caught:
            reader.read([str(tmp_path / "t1"), str(tmp_path / other)])
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / other}: ") and str(tmp_path / "t1") in message and reason in message


def test_a_claimed_size_over_max_voxels_is_refused_before_pixel_data(tmp_path: Path, monkeypatch) -> None:
    write_series(tmp_path / "series", _volume(), _affine("axial"))
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(k.get("stop_before_pixels")) or real(*a, **k))
    with pytest.raises(ImageReadError, match=r"claims 24x20x12 = 5,760 voxels, more than the limit of 5,000"):
        read_series(tmp_path / "series", max_voxels=5000)
    assert reads == [True]  # one header, no pixel data
    assert read_series_header(tmp_path / "series", max_voxels=5760)[0] == SHAPE


# Resampling an oblique grid puts samples on the volume's border, where the affines' last digits (NIfTI keeps
# float32, DICOM decimal strings) decide in or out: the oblique case is only reoriented.
@pytest.mark.parametrize(("kind", "spacing"), [("oblique", None), ("flipped", [1.5, 1.5, 2.0])])
def test_monai_loading_and_preprocessing_agree_with_nifti(tmp_path: Path, kind: str, spacing) -> None:
    from monai import transforms as mt

    from medseg.data.transforms import Preprocessing, preprocess_transforms

    volume, affine = _volume(), _affine(kind)
    write_series(tmp_path / "series", volume, affine, slope=SLOPE, intercept=INTERCEPT, reverse_order=True)
    write_nifti(volume.astype(np.float32), affine, tmp_path / "volume.nii.gz")
    spec = Preprocessing.from_dict({"orientation": "RAS", "spacing": spacing, "intensity": "ct"})
    pipeline = mt.Compose(preprocess_transforms(spec, "segmentation", 3, keys=("image",)))
    dicom, nifti = (pipeline({"image": str(tmp_path / name)})["image"] for name in ("series", "volume.nii.gz"))
    assert dicom.shape == nifti.shape and dicom.shape[0] == 1
    np.testing.assert_allclose(dicom.numpy(), nifti.numpy(), atol=1e-6)
    np.testing.assert_allclose(dicom.affine.numpy(), nifti.affine.numpy(), atol=1e-4)
    back = pipeline.inverse({"image": dicom})["image"]  # the prediction path inverts onto the series grid
    assert tuple(back.shape[1:]) == SHAPE
    np.testing.assert_allclose(back.affine.numpy(), affine if kind == "oblique" else _z_flipped(affine, SHAPE[2]),
                               atol=1e-4)


def test_discovery_takes_a_series_folder_or_the_series_under_a_folder(tmp_path: Path) -> None:
    from medseg.data.discovery import find_cases

    write_series(tmp_path / "in" / "patient1" / "1.2.840.5", _volume()[:, :, :2], _affine("axial"))
    write_series(tmp_path / "in" / "patient2" / "ct", _volume()[:, :, :2], _affine("axial"))
    write_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "in" / "other.nii.gz")
    one = find_cases(tmp_path / "in" / "patient1" / "1.2.840.5", 1)
    assert one == [{"id": "1.2.840.5", "image": [str(tmp_path / "in" / "patient1" / "1.2.840.5")]}]
    cases = {case["id"]: case["image"] for case in find_cases(tmp_path / "in", 1)}
    assert cases == {"1.2.840.5": [str(tmp_path / "in" / "patient1" / "1.2.840.5")],
                     "ct": [str(tmp_path / "in" / "patient2" / "ct")],
                     "other": [str(tmp_path / "in" / "other.nii.gz")]}
    # a stray DICOM file among NIfTI cases makes neither one series nor is it dropped silently: the mix is refused
    (tmp_path / "in" / "patient1" / "1.2.840.5" / "slice_0000.dcm").rename(tmp_path / "in" / "stray.dcm")
    with pytest.raises(ValueError, match=r"in: holds DICOM files \(stray.dcm, ...\) and other images \(other.nii.gz"):
        find_cases(tmp_path / "in", 1)
    (tmp_path / "in" / "stray.dcm").unlink()
    write_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "in" / "patient2" / "ct" / "copy.nii.gz")
    with pytest.raises(ValueError, match=r"ct: holds DICOM files \(slice_0000.dcm, ...\) and other images \(copy"):
        find_cases(tmp_path / "in", 1)


def _frames(seg_path: Path) -> dict[tuple[str, int], np.ndarray]:
    """(source SOPInstanceUID, segment number) -> the frame ``(rows, columns)``, read with pydicom alone."""
    seg = pydicom.dcmread(seg_path)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = (item if "SegmentIdentificationSequence" in item else shared).SegmentIdentificationSequence[0]
        frames[(str(uid), int(segment.ReferencedSegmentNumber))] = pixels[index]
    return frames


def test_dicom_seg_holds_each_class_on_its_source_frames(tmp_path: Path) -> None:
    import highdicom as hd

    from medseg.inference.dicom_seg import read_dicom_seg, write_dicom_seg

    order = list(np.random.default_rng(2).permutation(SHAPE[2]))
    paths = write_series(tmp_path / "series", _volume(), _affine("oblique"), order=order)
    uid_of_slice = {k: str(pydicom.dcmread(p).SOPInstanceUID) for p, k in zip(paths, order, strict=True)}
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:9, 3:7, 1:4] = 1
    labels[12:20, 10:16, 6:9] = 2  # class 3 ("absent") is in no voxel
    path = write_dicom_seg(labels, tmp_path / "series", ["liver", "tumour", "absent"], tmp_path / "out" / "c.seg.dcm")

    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY" and seg.Manufacturer == "medseg"
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["liver", "tumour", "absent"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(paths[0]).SeriesInstanceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uid_of_slice.values())
    frames = _frames(path)
    expected = {(uid_of_slice[k], value): (labels[:, :, k] == value).T
                for value in (1, 2) for k in range(SHAPE[2]) if (labels[:, :, k] == value).any()}
    assert set(frames) == set(expected)  # empty frames left out, class 3 without any
    for key, frame in frames.items():
        np.testing.assert_array_equal(frame, expected[key])
    masks = read_dicom_seg(path, tmp_path / "series")
    assert sorted(masks) == [1, 2, 3] and not masks[3].any()
    for value in (1, 2):
        np.testing.assert_array_equal(masks[value], labels == value)


def test_a_region_model_gets_one_overlapping_segment_per_region(tmp_path: Path) -> None:
    from medseg.inference.dicom_seg import read_dicom_seg, write_dicom_seg

    write_series(tmp_path / "series", _volume()[:, :, :4], _affine("axial"))
    labels = np.zeros((24, 20, 4), np.uint8)
    labels[2:10, 2:10, :] = 1
    labels[4:6, 4:6, 1:3] = 2
    path = write_dicom_seg(labels, tmp_path / "series", ["whole", "core"], tmp_path / "r.seg.dcm",
                           regions=[(1, 2), (2,)])
    masks = read_dicom_seg(path, tmp_path / "series")
    np.testing.assert_array_equal(masks[1], labels > 0)
    np.testing.assert_array_equal(masks[2], labels == 2)
    # the series' headers are untrusted on the way out and back: the same voxel limit as reading it
    for call in (lambda: write_dicom_seg(labels, tmp_path / "series", ["whole"], tmp_path / "x.dcm", max_voxels=1000),
                 lambda: read_dicom_seg(path, tmp_path / "series", max_voxels=1000)):
        with pytest.raises(ImageReadError, match="more than the limit of 1,000"):
            call()


@pytest.fixture(scope="module")
def dicom_case(seg3d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A seg3d test volume (x flipped, 1 x 1 x 2 mm) as NIfTI and as a DICOM series of the same values."""
    root = tmp_path_factory.mktemp("dicom_case")
    volume, affine = read_image(seg3d_root / "imagesTs" / "case_006.nii.gz")
    volume = np.rint(volume / 0.5) * 0.5  # what 16 bits with slope 0.5 store exactly
    write_nifti(volume.astype(np.float32), affine, root / "nifti" / "case_006.nii.gz")
    write_series(root / "dicom" / "case_006", volume, affine, slope=0.5, intercept=0.0, reverse_order=True)
    return root / "nifti", root / "dicom", affine


def test_predict_gives_the_same_labels_from_dicom_and_writes_a_seg(
        dicom_case: tuple[Path, Path, np.ndarray], seg3d_checkpoint: Path, tmp_path: Path) -> None:
    import torch

    from medseg.inference.batch import PredictOptions, predict_batch
    from medseg.inference.dicom_seg import read_dicom_seg, segment_labels
    from medseg.inference.native import load_model

    nifti_in, dicom_in, affine = dicom_case
    for source, out, output_format in ((nifti_in, "from_nifti", "nifti"), (dicom_in, "from_dicom", "dicom-seg")):
        options = PredictOptions(output=tmp_path / out, device="cpu", save_probabilities=True,
                                 output_format=output_format)
        report = predict_batch([seg3d_checkpoint], source, options)
        assert report.done == ["case_006"] and not report.failed
    labels_nifti, affine_nifti = read_image(tmp_path / "from_nifti" / "case_006.nii.gz", dtype=np.int16)
    labels_dicom, affine_dicom = read_image(tmp_path / "from_dicom" / "case_006.nii.gz", dtype=np.int16)
    # the series' slices run against its normal: its grid is the NIfTI grid with z reversed
    np.testing.assert_allclose(affine_nifti, affine, atol=1e-4)
    np.testing.assert_allclose(affine_dicom, _z_flipped(affine, labels_nifti.shape[2]), atol=1e-4)
    np.testing.assert_array_equal(labels_dicom, labels_nifti[:, :, ::-1])
    probabilities = [np.load(tmp_path / out / "probabilities" / "case_006.npz")["probabilities"].astype(np.float32)
                     for out in ("from_nifti", "from_dicom")]
    np.testing.assert_allclose(probabilities[1], probabilities[0][..., ::-1], atol=1e-3)

    seg_path = tmp_path / "from_dicom" / "case_006.seg.dcm"
    names = torch.load(seg3d_checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["label_names"]
    assert segment_labels(seg_path) == dict(enumerate(names[1:], start=1)) == {1: "structure1"}
    assert load_model(seg3d_checkpoint).outputs.structures == names[1:]
    masks = read_dicom_seg(seg_path, dicom_in / "case_006")
    np.testing.assert_array_equal(masks[1], labels_dicom == 1)
    series = series_datasets(dicom_in / "case_006")
    seg = pydicom.dcmread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert {uid for uid, _ in _frames(seg_path)} <= {str(ds.SOPInstanceUID) for ds in series}


def test_dicom_seg_of_a_nifti_input_fails_with_the_reason(
        dicom_case: tuple[Path, Path, np.ndarray], seg3d_checkpoint: Path, tmp_path: Path) -> None:
    from medseg.commands import predict as command
    from medseg.inference.batch import PredictOptions, predict_batch
    from medseg.inference.dicom_seg import OUTPUT_FORMATS

    assert command.OUTPUT_FORMATS == OUTPUT_FORMATS  # the parser's copy (it imports nothing heavy)
    nifti_in = dicom_case[0]
    report = predict_batch([seg3d_checkpoint], nifti_in,
                           PredictOptions(output=tmp_path / "out", device="cpu", output_format="dicom-seg"))
    assert list(report.failed) == ["case_006"]
    assert "case_006.nii.gz: --output-format dicom-seg needs a DICOM series folder" in report.failed["case_006"]
    assert not (tmp_path / "out" / "case_006.nii.gz").exists()
    with pytest.raises(ValueError, match="output_format must be one of"):
        PredictOptions(output=tmp_path, output_format="dicom")


def test_check_data_reads_series_folders_and_reports_broken_ones(tmp_path: Path, capsys) -> None:
    from medseg.cli import main
    from medseg.data.checks import check_dataset

    affine = _affine("axial")
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:9, 3:9, 2:6] = 1
    for case in ("good", "broken"):
        write_series(tmp_path / "images" / case, _volume(), affine)
        write_nifti(labels, affine, tmp_path / "labels" / f"{case}.nii.gz")
    description = {"labels": {"0": "background", "1": "lesion"}, "channel_names": {"0": "CT"},
                   "training": [{"image": f"images/{case}", "label": f"labels/{case}.nii.gz"} for case in ("good",)]}
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    assert check_dataset(tmp_path, spatial_dims=3) == []
    assert main(["check-data", str(tmp_path)]) == 0

    description["training"].append({"image": "images/broken", "label": "labels/broken.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    (tmp_path / "images" / "broken" / "slice_0004.dcm").unlink()
    problems = check_dataset(tmp_path)
    assert [(p.file, p.message[:40]) for p in problems] == [
        (str((tmp_path / "images" / "broken").resolve()), "uneven slice spacing: expected 2.5 mm be")]
    capsys.readouterr()
    assert main(["check-data", str(tmp_path)]) == 1
    assert "images/broken: uneven slice spacing" in capsys.readouterr().out
    assert [p.message for p in check_dataset(tmp_path, spatial_dims=2)][0].startswith("has 3 axes")
    # a file rewritten in place (the folder's own time does not change) is checked again, not taken from the cache
    reason = _rtstruct(tmp_path / "images" / "good")
    assert [p.message for p in check_dataset(tmp_path)][0].startswith(reason)


def test_resume_writes_the_seg_a_nifti_only_run_left_out(
        dicom_case: tuple[Path, Path, np.ndarray], seg3d_checkpoint: Path, tmp_path: Path) -> None:
    """A case predicted without --output-format dicom-seg is not complete for a --resume that asks for the SEG."""
    from medseg.inference.batch import PredictOptions, predict_batch

    _, dicom_in, _ = dicom_case
    out = tmp_path / "out"
    assert predict_batch([seg3d_checkpoint], dicom_in, PredictOptions(output=out, device="cpu")).done == ["case_006"]
    assert not (out / "case_006.seg.dcm").exists()
    resumed = predict_batch([seg3d_checkpoint], dicom_in,
                            PredictOptions(output=out, device="cpu", resume=True, output_format="dicom-seg"))
    assert resumed.done == ["case_006"] and not resumed.skipped
    assert (out / "case_006.seg.dcm").is_file()
    again = predict_batch([seg3d_checkpoint], dicom_in,
                          PredictOptions(output=out, device="cpu", resume=True, output_format="dicom-seg"))
    assert again.skipped == ["case_006"] and not again.done


def test_one_failing_case_of_a_dicom_seg_run_leaves_the_others_done(
        dicom_case: tuple[Path, Path, np.ndarray], seg3d_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """Three series: a write job that fails (on the CPU the writer runs in turn: its failure must stay with its
    case), an anonymised series without type-2 attributes (its SEG is still written), and a series without a
    FrameOfReferenceUID (refused before inference, naming the folder)."""
    import highdicom as hd

    from medseg.inference import batch
    from medseg.inference.dicom_seg import TYPE2_FILLED, read_dicom_seg

    source = dicom_case[1] / "case_006"
    folders = {name: tmp_path / "in" / name for name in ("a_write_fails", "b_anonymised", "c_no_frame")}
    for name, folder in folders.items():
        folder.mkdir(parents=True)
        for path in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            for key in TYPE2_FILLED if name == "b_anonymised" else ("FrameOfReferenceUID",) * (name == "c_no_frame"):
                delattr(ds, key)
            ds.save_as(folder / path.name)
    real_write = batch.write_case_maps

    def write_case_maps(files, *args, **kwargs):
        if files.labels.name.startswith("a_write_fails"):
            raise OSError("disk full (simulated)")
        return real_write(files, *args, **kwargs)

    monkeypatch.setattr(batch, "write_case_maps", write_case_maps)
    out = tmp_path / "out"
    report = batch.predict_batch([seg3d_checkpoint], tmp_path / "in",
                                 batch.PredictOptions(output=out, device="cpu", output_format="dicom-seg"))
    assert report.done == ["b_anonymised"]
    assert report.failed == {
        "a_write_fails": f"{folders['a_write_fails']}: OSError: disk full (simulated)",
        "c_no_frame": f"{folders['c_no_frame']}: slice_0000.dcm has no FrameOfReferenceUID: a DICOM SEG shares its "
                      "source's frame of reference, study and patient; predict it with --output-format nifti"}
    outputs = sorted(p.name for p in out.iterdir() if p.name.startswith(tuple(folders)))
    assert outputs == ["b_anonymised.nii.gz", "b_anonymised.seg.dcm"]  # the failed cases' SEG files removed
    seg = hd.seg.segread(out / "b_anonymised.seg.dcm")
    assert all(seg.get(key) in ("", None) for key in TYPE2_FILLED)  # present and empty, as type 2 allows
    labels, _ = read_image(out / "b_anonymised.nii.gz", dtype=np.int16)
    assert (labels == 1).any()
    np.testing.assert_array_equal(read_dicom_seg(out / "b_anonymised.seg.dcm", folders["b_anonymised"])[1], labels == 1)


def test_a_classifier_is_refused_dicom_seg_before_any_case(seg3d_checkpoint: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    from dataclasses import replace

    from medseg.inference import batch
    from medseg.inference.native import load_model

    classifier = replace(load_model(seg3d_checkpoint), task="classification")
    monkeypatch.setattr(batch, "load_sources", lambda paths, runtime="auto": [classifier])
    options = batch.PredictOptions(output=tmp_path / "out", device="cpu", output_format="dicom-seg")
    with pytest.raises(ValueError, match=r"dicom-seg: a DICOM SEG holds segments, and .* is a classification model"):
        batch.predict_batch([seg3d_checkpoint], tmp_path / "no_such_input", options)
    assert not (tmp_path / "out").exists()
