"""Tests of the synthetic phantom datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from medseg.data.datalist import load_dataset
from medseg.data.io import read_image, spacing_from_affine
from medseg.data.synthetic import make_synthetic, synthetic_affine

SMALL = (16, 16, 8)


def _meta(path: Path) -> dict:
    return json.loads(path.read_text())


def test_seg_files_and_dataset_json(tmp_path: Path) -> None:
    path = make_synthetic(tmp_path, cases=3, size=SMALL, test_cases=1)
    assert path == tmp_path / "dataset.json"
    meta = _meta(path)
    assert meta["task"] == "segmentation"
    assert meta["labels"] == {"0": "background", "1": "structure1"}
    assert meta["channel_names"] == {"0": "MRI"}
    assert [c["image"] for c in meta["training"]] == [f"imagesTr/case_00{i}.nii.gz" for i in range(3)]
    assert [c["label"] for c in meta["training"]] == [f"labelsTr/case_00{i}.nii.gz" for i in range(3)]
    assert [c["patient"] for c in meta["training"]] == ["p000", "p000", "p001"]
    assert meta["test"] == [{"image": "imagesTs/case_003.nii.gz", "label": "labelsTs/case_003.nii.gz"}]
    for rel in [
        "imagesTr/case_002.nii.gz",
        "labelsTr/case_002.nii.gz",
        "imagesTs/case_003.nii.gz",
        "labelsTs/case_003.nii.gz",
    ]:
        assert (tmp_path / rel).is_file(), rel


def test_geometry_is_non_identity_and_anisotropic(tmp_path: Path) -> None:
    make_synthetic(tmp_path, cases=1, size=SMALL)
    for rel in ["imagesTr/case_000.nii.gz", "labelsTr/case_000.nii.gz"]:
        img = nib.load(str(tmp_path / rel))
        assert img.shape == SMALL
        affine = img.affine
        assert affine[0, 0] < 0  # first axis flipped (LPS-like)
        assert np.any(affine[:3, 3] != 0)  # non-zero origin
        np.testing.assert_allclose(spacing_from_affine(affine), (1.0, 1.0, 2.0))
        np.testing.assert_allclose(affine, synthetic_affine(SMALL, (1.0, 1.0, 2.0)), atol=1e-5)
        assert nib.aff2axcodes(affine) == ("L", "A", "S")
    assert nib.load(str(tmp_path / "imagesTr/case_000.nii.gz")).get_data_dtype() == np.float32
    assert nib.load(str(tmp_path / "labelsTr/case_000.nii.gz")).get_data_dtype() == np.uint8


def test_structures_are_round_in_mm(tmp_path: Path) -> None:
    make_synthetic(tmp_path, cases=4, size=(48, 48, 24))  # default spacing (1, 1, 2)
    for i in range(4):
        label, _ = read_image(tmp_path / f"labelsTr/case_00{i}.nii.gz")
        idx = np.argwhere(label == 1)
        extent_vox = idx.max(0) - idx.min(0) + 1
        extent_mm = extent_vox * np.array([1.0, 1.0, 2.0])
        assert extent_vox[2] < 0.75 * extent_vox[:2].min()  # fewer voxels along z ...
        assert extent_mm.max() / extent_mm.min() < 1.8  # ... but about as wide in mm


def test_labels_have_every_class_and_intensities_differ(tmp_path: Path) -> None:
    make_synthetic(tmp_path, cases=4, classes=4, size=(24, 24, 12))
    for i in range(4):
        label, _ = read_image(tmp_path / f"labelsTr/case_00{i}.nii.gz")
        image, _ = read_image(tmp_path / f"imagesTr/case_00{i}.nii.gz")
        assert set(np.unique(label).astype(int)) == {0, 1, 2, 3}
        means = [float(image[label == k].mean()) for k in range(4)]
        assert min(np.diff(sorted(means))) > 50  # well separated against the noise (sigma 40)
        sizes = [int((label == k).sum()) for k in (1, 2, 3)]
        assert sizes[0] > sizes[2]  # structures of different sizes, largest first


def test_deterministic_with_seed(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", cases=2, size=SMALL, seed=7)
    make_synthetic(tmp_path / "b", cases=3, size=SMALL, seed=7)  # case i does not depend on the case count
    make_synthetic(tmp_path / "c", cases=2, size=SMALL, seed=8)
    for rel in ["imagesTr/case_001.nii.gz", "labelsTr/case_001.nii.gz"]:
        a, b, c = (read_image(tmp_path / d / rel)[0] for d in "abc")
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_classification_balanced_and_no_label_files(tmp_path: Path) -> None:
    path = make_synthetic(tmp_path, cases=9, classes=3, task="cls", size=SMALL, test_cases=2)
    meta = _meta(path)
    assert meta["task"] == "classification"
    assert meta["labels"] == {"0": "class0", "1": "class1", "2": "class2"}
    labels = [c["label"] for c in meta["training"]]
    assert labels == [i % 3 for i in range(9)]
    assert np.bincount(labels).tolist() == [3, 3, 3]
    assert not (tmp_path / "labelsTr").exists()
    assert [t["label"] for t in meta["test"]] == [0, 1]
    spec = load_dataset(tmp_path)
    assert spec.task == "classification" and spec.num_classes == 3


def test_classification_class_is_blob_count_and_size(tmp_path: Path) -> None:
    from scipy.ndimage import label as connected

    make_synthetic(tmp_path, cases=6, classes=3, task="cls", dims=2, size=(64, 64))
    mean_blob_area = {}
    for i in range(6):
        image, _ = read_image(tmp_path / f"imagesTr/case_00{i}.nii.gz")
        blobs, n_blobs = connected(image > 0.5 * (image.max() + np.median(image)))
        assert n_blobs == i % 3 + 1
        mean_blob_area.setdefault(i % 3, []).append((blobs > 0).sum() / n_blobs)
    areas = [np.mean(mean_blob_area[k]) for k in range(3)]
    assert areas[0] * 1.5 < areas[1] and areas[1] * 1.3 < areas[2]  # blobs grow with the class


def test_multichannel_lists_and_different_mappings(tmp_path: Path) -> None:
    path = make_synthetic(tmp_path, cases=2, size=SMALL, channels=3, test_cases=1)
    meta = _meta(path)
    assert meta["channel_names"] == {"0": "MRI0", "1": "MRI1", "2": "MRI2"}
    assert meta["training"][1]["image"] == [f"imagesTr/case_001_000{c}.nii.gz" for c in range(3)]
    assert meta["test"][0]["image"] == [f"imagesTs/case_002_000{c}.nii.gz" for c in range(3)]
    label, _ = read_image(tmp_path / "labelsTr/case_001.nii.gz")
    contrasts = []
    for c in range(3):
        image, _ = read_image(tmp_path / f"imagesTr/case_001_000{c}.nii.gz")
        contrasts.append(float(image[label == 1].mean() - image[label == 0].mean()))
    assert contrasts[0] > 0 > contrasts[1]  # channel 1 inverts the contrast
    assert abs(contrasts[2] - contrasts[0]) > 30
    spec = load_dataset(tmp_path)
    assert spec.in_channels == 3 and len(spec.training[0]["image"]) == 3


def test_2d_shapes_and_affine(tmp_path: Path) -> None:
    make_synthetic(tmp_path, dims=2, cases=2, classes=3)
    img = nib.load(str(tmp_path / "imagesTr/case_000.nii.gz"))
    assert img.shape == (64, 64)
    assert img.affine.shape == (4, 4)
    assert img.affine[0, 0] < 0
    np.testing.assert_allclose(spacing_from_affine(img.affine, 2), (0.8, 0.8))
    label, _ = read_image(tmp_path / "labelsTr/case_001.nii.gz")
    assert label.shape == (64, 64) and set(np.unique(label).astype(int)) == {0, 1, 2}


def test_load_dataset_reads_it(tmp_path: Path) -> None:
    make_synthetic(tmp_path, cases=4, classes=3, size=SMALL, test_cases=2)
    spec = load_dataset(tmp_path)
    assert spec.task == "segmentation" and spec.num_classes == 3 and spec.in_channels == 1
    assert [c["id"] for c in spec.training] == [f"case_00{i}" for i in range(4)]
    assert all(Path(p).is_file() for c in spec.training + spec.test for p in c["image"] + [c["label"]])
    assert [c["patient"] for c in spec.training] == ["p000", "p000", "p001", "p001"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dims": 4},
        {"task": "detection"},
        {"classes": 1},
        {"size": (16, 16)},
        {"cases": 0},
        {"seed": -1},
        {"modality": "pet"},
        {"modality": "ct", "channels": 2},
        {"structure_scale": 0.0},
        {"structure_scale": 3.0},
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="make_synthetic"):
        make_synthetic(tmp_path, **kwargs)


def test_too_many_structures_for_the_size_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        make_synthetic(tmp_path, cases=1, classes=40, size=(8, 8, 4))


def test_default_phantom_is_pinned(tmp_path: Path) -> None:
    """The default (MRI, scale 1) output stays what it was before the CT and structure-size options."""
    make_synthetic(tmp_path, cases=2, size=SMALL, seed=3)
    pinned = [
        (41, "4ef9f6b54d75ed89", 531585.124206543, 167.19026, 217.74324),
        (42, "019f528f038aac35", 540621.4518432617, 974.8837, 276.9137),
    ]
    for i, (count, digest, total, centre, corner) in enumerate(pinned):
        label, _ = read_image(tmp_path / f"labelsTr/case_00{i}.nii.gz")
        image, _ = read_image(tmp_path / f"imagesTr/case_00{i}.nii.gz")
        assert int((label > 0).sum()) == count
        assert (
            hashlib.sha256(np.ascontiguousarray(label.astype(np.uint8)).tobytes()).hexdigest()[:16] == digest
        )
        assert float(image.astype(np.float64).sum()) == pytest.approx(total, rel=1e-6)
        assert float(image[8, 8, 4]) == pytest.approx(centre, abs=1e-3)
        assert float(image[0, 0, 0]) == pytest.approx(corner, abs=1e-3)


def _corners_xy(shape: tuple[int, ...], width: int = 3) -> np.ndarray:
    """Mask of the four ``width x width`` corner columns of the x-y plane (outside any centred body ellipse)."""
    mask = np.zeros(shape, dtype=bool)
    for xs in (slice(0, width), slice(shape[0] - width, shape[0])):
        for ys in (slice(0, width), slice(shape[1] - width, shape[1])):
            mask[xs, ys] = True
    return mask


@pytest.mark.parametrize(
    ("kwargs", "hu"),
    [
        ({"classes": 3, "size": (40, 40, 16)}, {1: 200.0, 2: 100.0}),  # largest structure brightest
        ({"classes": 4, "dims": 2, "size": (64, 64)}, {1: 200.0, 2: 150.0, 3: 100.0}),
        ({"regions": True, "size": (48, 48, 20)}, {1: 100.0, 2: 150.0, 3: 200.0}),  # rising to the core
    ],
)
def test_ct_air_body_and_structures_at_their_hu(tmp_path: Path, kwargs: dict, hu: dict) -> None:
    path = make_synthetic(tmp_path, cases=4, modality="ct", **kwargs)
    meta = _meta(path)
    assert meta["channel_names"] == {"0": "CT"}
    assert load_dataset(tmp_path).in_channels == 1
    for case in meta["training"]:
        image, _ = read_image(tmp_path / case["image"])
        label, _ = read_image(tmp_path / case["label"])
        label = label.astype(int)
        assert set(np.unique(label)) == {0, *hu}
        assert image.min() >= -1024.0
        air = image[_corners_xy(image.shape)]
        assert abs(float(air.mean()) + 1000.0) < 5.0 and float(air.max()) < -900.0  # air, noise ~20 HU
        body = image > -500.0
        assert 0.3 < body.mean() < 0.8  # a body with air around it
        # soft tissue: body voxels well away from the air and from every structure
        plane = np.zeros((3,) * image.ndim, dtype=bool)
        plane[(slice(None), slice(None), *[1] * (image.ndim - 2))] = True  # x-y neighbours only
        tissue = binary_erosion(body, plane, iterations=2) & ~binary_dilation(label > 0, plane, iterations=2)
        assert abs(float(image[tissue].mean()) - 40.0) < 5.0
        assert 12.0 < float(image[tissue].std()) < 30.0  # the noise, no bias field
        for k, value in hu.items():
            core = (
                binary_erosion(label == k, plane) if (binary_erosion(label == k, plane)).any() else label == k
            )
            assert abs(float(np.median(image[core])) - value) < 15.0, (case["image"], k)
        # every structure lies inside the body: its voxels and their x-y neighbours are not air
        cross = np.zeros((3,) * image.ndim, dtype=bool)
        cross[(slice(None), 1, *[1] * (image.ndim - 2))] = True
        cross[(1, slice(None), *[1] * (image.ndim - 2))] = True
        assert body[binary_dilation(label > 0, cross)].all()


def test_ct_classification_blobs_inside_the_body(tmp_path: Path) -> None:
    path = make_synthetic(tmp_path, cases=3, classes=3, task="cls", modality="ct", size=(32, 32, 16))
    assert _meta(path)["channel_names"] == {"0": "CT"}
    for i in range(3):
        image, _ = read_image(tmp_path / f"imagesTr/case_00{i}.nii.gz")
        assert abs(float(image[_corners_xy(image.shape)].mean()) + 1000.0) < 5.0
        assert float(image.max()) > 100.0 + 50.0 * i  # blobs from 100 HU (class 0) to 200 HU (class 2)


def test_structure_scale_shrinks_the_foreground_by_its_cube(tmp_path: Path) -> None:
    def foreground(root: Path, **kwargs: object) -> float:
        make_synthetic(root, cases=6, classes=3, size=(64, 64, 32), **kwargs)
        shares = []
        for i in range(6):
            label, _ = read_image(root / f"labelsTr/case_00{i}.nii.gz")
            assert set(np.unique(label).astype(int)) == {0, 1, 2}  # every structure still there
            shares.append(float((label > 0).mean()))
        return float(np.mean(shares))

    full = foreground(tmp_path / "full")
    for scale in (0.4, 0.7):
        ratio = foreground(tmp_path / f"scale{scale}", structure_scale=scale) / full
        assert 0.6 * scale**3 < ratio < 1.5 * scale**3, (scale, ratio)
    ct = foreground(tmp_path / "ct_small", modality="ct", structure_scale=0.4) / full
    assert 0.6 * 0.4**3 < ct < 1.5 * 0.4**3
