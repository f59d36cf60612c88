"""Tests of preprocessing (geometry, intensity presets, crop, resize) and training patch sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai import transforms as mt

from medseg.data.io import write_nifti
from medseg.data.transforms import (
    INTENSITY_PRESETS,
    Preprocessing,
    keys_for,
    patch_sampling_transforms,
    preprocess_transforms,
)

# ---------------------------------------------------------------------------------------------- helpers


def _case(
    tmp_path: Path, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray | None = None
) -> dict:
    """Write ``image`` (and ``label``) as NIfTI files; return the case dict MONAI loads."""
    affine = np.eye(4) if affine is None else affine
    case: dict[str, Any] = {
        "image": str(write_nifti(image.astype(np.float32), affine, tmp_path / "img.nii.gz"))
    }
    if label is not None:
        case["label"] = str(write_nifti(label.astype(np.uint8), affine, tmp_path / "lab.nii.gz"))
    return case


def _run(case: dict, spec: dict[str, Any] | None = None, task: str = "segmentation", dims: int = 3) -> dict:
    chain = mt.Compose(preprocess_transforms(Preprocessing.from_dict(spec), task, dims))
    return chain(dict(case))


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


# --------------------------------------------------------------------------------------------- the spec


def test_from_dict_defaults_and_round_trip() -> None:
    prep = Preprocessing.from_dict(None)
    assert prep.orientation == "RAS" and prep.spacing is None and prep.intensity == "none"
    spec = {
        "orientation": "LPS",
        "spacing": [1.0, 1.0, 2.5],
        "intensity": "ct",
        "ct_window": (-200, 300),
        "crop_foreground": True,
        "resize": None,
    }
    plain = Preprocessing.from_dict(spec).to_dict()
    assert plain == {**spec, "ct_window": [-200.0, 300.0], "clip": None, "zscore": None}  # plain lists for YAML
    assert Preprocessing.from_dict(plain) == Preprocessing.from_dict(plain)


def test_from_dict_rejects_unknown_key_and_lists_valid() -> None:
    with pytest.raises(ValueError, match="spacingg") as info:
        Preprocessing.from_dict({"spacingg": [1, 1, 1]})
    assert "spacing" in str(info.value).replace("spacingg", "") and "intensity" in str(info.value)


@pytest.mark.parametrize("preset", ["CT", "mr", "pet", ""])
def test_from_dict_rejects_unknown_preset(preset: str) -> None:
    with pytest.raises(ValueError, match="intensity") as info:
        Preprocessing.from_dict({"intensity": preset})
    assert all(p in str(info.value) for p in INTENSITY_PRESETS)


@pytest.mark.parametrize("window", [[1000, -1000], [0, 0], [100], [-1, 0, 1]])
def test_from_dict_rejects_bad_ct_window(window: list[float]) -> None:
    with pytest.raises(ValueError, match="ct_window"):
        Preprocessing.from_dict({"intensity": "ct", "ct_window": window})


def test_keys_for() -> None:
    assert keys_for("segmentation") == ("image", "label")
    assert keys_for("classification") == ("image",)


@pytest.mark.parametrize("option, value", [("spacing", [1.0, 1.0]), ("resize", [8, 8])])
def test_wrong_number_of_values_for_dims(option: str, value: list) -> None:
    with pytest.raises(ValueError, match=option):
        preprocess_transforms(Preprocessing.from_dict({option: value}), "segmentation", 3)


# ------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("diagonal", [(-1.5, -1.0, 2.0), (-1.0, 1.0, 3.0)], ids=["LPS", "LAS"])
def test_orientation_to_ras_keeps_world_positions(tmp_path: Path, diagonal: tuple[float, ...]) -> None:
    affine = np.diag([*diagonal, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    image = np.zeros((6, 5, 4), np.float32)
    image[1, 3, 2] = 7.0  # a marked voxel
    image[4, 0, 1] = 3.0
    label = (image > 0).astype(np.uint8) * np.where(image == 7.0, 2, 1).astype(np.uint8)
    out = _run(_case(tmp_path, image, label, affine), {"orientation": "RAS"})
    for key in ("image", "label"):
        new_affine = _array(out[key].affine)
        assert np.all(np.diag(new_affine)[:3] > 0), new_affine
        assert np.allclose(np.abs(np.diag(new_affine)[:3]), np.abs(diagonal))
        assert out[key].shape == (1, 6, 5, 4)
    for value, old_index, key in (
        (7.0, (1, 3, 2), "image"),
        (3.0, (4, 0, 1), "image"),
        (2, (1, 3, 2), "label"),
    ):
        found = np.argwhere(_array(out[key])[0] == value)
        assert len(found) == 1
        world_after = _array(out[key].affine) @ np.r_[found[0], 1.0]
        world_before = affine @ np.r_[old_index, 1.0]
        assert np.allclose(world_after, world_before)
    # the flipped axes really were flipped (not just relabelled)
    if diagonal[0] < 0:
        assert np.argwhere(_array(out["image"])[0] == 7.0)[0][0] == 6 - 1 - 1


def test_orientation_none_keeps_file_order(tmp_path: Path) -> None:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    image = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    out = _run(_case(tmp_path, image, None, affine), {"orientation": None}, task="classification")
    assert np.array_equal(_array(out["image"])[0], image)
    assert np.allclose(_array(out["image"].affine), affine)


def test_spacing_resamples_and_never_interpolates_labels(tmp_path: Path) -> None:
    size, spacing, target = (13, 13, 7), (1.0, 1.0, 2.0), (2.0, 2.0, 1.0)
    affine = np.diag([*spacing, 1.0])
    rng = np.random.default_rng(0)
    label = np.zeros(size, np.uint8)
    label[2:9, 3:10, 1:5] = 1
    label[4:7, 5:8, 2:4] = 3  # values 0, 1, 3: an interpolated label would show 2 or fractions
    label[10:12, 1:3, 5:7] = 3
    image = label * 100.0 + rng.normal(0, 1, size)
    out = _run(_case(tmp_path, image, label, affine), {"spacing": list(target)})
    # MONAI keeps the first and last voxel centres: n_out = (n_in - 1) * spacing_in / spacing_out + 1
    expected = tuple(int(round((n - 1) * s / t + 1)) for n, s, t in zip(size, spacing, target, strict=True))
    assert expected == (7, 7, 13)
    assert out["image"].shape == (1, *expected) == out["label"].shape
    assert np.allclose(np.linalg.norm(_array(out["label"].affine)[:3, :3], axis=0), target)
    values = np.unique(_array(out["label"]))
    assert set(values.tolist()) == {0.0, 1.0, 3.0}
    # the image was interpolated (fractional values between classes exist along the upsampled z axis)
    img = _array(out["image"])[0]
    assert np.any((img > 20) & (img < 80)) or np.any((img > 120) & (img < 280))
    # image and label still overlap: label 3 voxels are bright
    assert img[_array(out["label"])[0] == 3].mean() > 250


# ------------------------------------------------------------------------------------------- intensity


def test_ct_window_clips_and_scales(tmp_path: Path) -> None:
    image = np.zeros((4, 4, 2), np.float32)
    hu = [-3000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]
    image.flat[: len(hu)] = hu
    out = _run(
        _case(tmp_path, image, None), {"intensity": "ct", "ct_window": [-1000, 1000]}, task="classification"
    )
    got = _array(out["image"])[0].ravel()[: len(hu)]
    # (HU - low) / (high - low), clipped to [0, 1]
    assert np.allclose(got, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    assert out["image"].dtype == torch.float32


def test_ct_other_window(tmp_path: Path) -> None:
    image = (
        np.array([-200.0, -160.0, 40.0, 240.0, 900.0, -900.0, 0.0, 0.0]).reshape(2, 2, 2).astype(np.float32)
    )
    out = _run(
        _case(tmp_path, image, None), {"intensity": "ct", "ct_window": [-160, 240]}, task="classification"
    )
    got = _array(out["image"])[0].ravel()
    assert np.allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.4, 0.4], atol=1e-6)


def test_mri_zscores_nonzero_voxels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((10, 10, 6), np.float32)
    image[2:8, 1:9, 1:5] = rng.normal(500.0, 80.0, (6, 8, 4))
    out = _run(_case(tmp_path, image, None), {"intensity": "mri"}, task="classification")
    got = _array(out["image"])[0]
    inside = image != 0
    assert np.all(got[~inside] == 0)  # background stays zero
    assert abs(got[inside].mean()) < 1e-4
    assert abs(got[inside].std() - 1.0) < 1e-3
    # affine map of the input (order kept): z = (x - mean) / std
    expected = (image[inside] - image[inside].mean()) / image[inside].std()
    assert np.allclose(got[inside], expected, atol=1e-4)


@pytest.mark.parametrize("preset", ["us", "xray"])
def test_us_xray_scale_each_channel_to_unit_range(tmp_path: Path, preset: str) -> None:
    rng = np.random.default_rng(2)
    first = rng.uniform(20.0, 220.0, (8, 6)).astype(np.float32)
    second = rng.uniform(-5.0, 3.0, (8, 6)).astype(np.float32)
    files = [
        str(write_nifti(first, np.eye(4), tmp_path / "a_0000.nii.gz")),
        str(write_nifti(second, np.eye(4), tmp_path / "a_0001.nii.gz")),
    ]
    chain = preprocess_transforms(Preprocessing.from_dict({"intensity": preset}), "classification", 2)
    got = _array(mt.Compose(chain)({"image": files})["image"])
    assert got.shape == (2, 8, 6)
    for channel, source in zip(got, (first, second), strict=True):
        assert channel.min() == pytest.approx(0.0, abs=1e-6) and channel.max() == pytest.approx(1.0, abs=1e-6)
        expected = (source - source.min()) / (source.max() - source.min())
        assert np.allclose(channel, expected, atol=1e-5)


def test_none_preset_keeps_values(tmp_path: Path) -> None:
    image = np.linspace(-1000, 3000, 32, dtype=np.float32).reshape(4, 4, 2)
    out = _run(
        _case(tmp_path, image, None), {"intensity": "none", "orientation": None}, task="classification"
    )
    assert np.array_equal(_array(out["image"])[0], image)


# ------------------------------------------------------------------------------------ crop and resize


def test_crop_foreground_to_nonzero_box(tmp_path: Path) -> None:
    image = np.zeros((12, 12, 6), np.float32)
    image[3:9, 2:10, 1:5] = 5.0
    label = (image > 0).astype(np.uint8)
    out = _run(_case(tmp_path, image, label), {"crop_foreground": True})
    assert out["image"].shape == out["label"].shape == (1, 6, 8, 4)
    assert np.all(_array(out["label"]) == 1)
    # the crop moves the origin: the first kept voxel is voxel (3, 2, 1) of the input
    assert np.allclose(_array(out["image"].affine)[:3, 3], [3.0, 2.0, 1.0])


def test_crop_foreground_with_mri_keeps_whole_nonzero_region(tmp_path: Path) -> None:
    """Regression: cropping after z-scoring (x > 0) used to cut away the darker half of the foreground."""
    image = np.zeros((12, 12, 6), np.float32)
    image[3:9, 2:10, 1:5] = np.linspace(1.0, 10.0, 6)[:, None, None]  # non-zero, varying along x
    label = (image > 0).astype(np.uint8)
    out = _run(_case(tmp_path, image, label), {"crop_foreground": True, "intensity": "mri"})
    assert out["image"].shape == (1, 6, 8, 4)
    assert int(_array(out["label"]).sum()) == int(label.sum())


def test_resize_for_classification(tmp_path: Path) -> None:
    image = np.zeros((12, 9, 6), np.float32)
    image[:6] = 4.0
    out = _run(
        _case(tmp_path, image, None), {"resize": [4, 3, 3], "orientation": None}, task="classification"
    )
    got = _array(out["image"])
    assert got.shape == (1, 4, 3, 3)
    # area interpolation averages blocks: the first half stays 4, the second 0
    assert np.allclose(got[0, :2], 4.0) and np.allclose(got[0, 2:], 0.0)


def test_resize_2d_segmentation_label_nearest(tmp_path: Path) -> None:
    label = np.zeros((10, 10), np.uint8)
    label[2:5, 2:9] = 2
    label[6:9, 1:4] = 1
    out = _run(_case(tmp_path, label * 10.0, label), {"resize": [7, 13]}, dims=2)
    assert out["image"].shape == out["label"].shape == (1, 7, 13)
    assert set(np.unique(_array(out["label"])).tolist()) == {0.0, 1.0, 2.0}


def test_resize_keeps_label_on_image(tmp_path: Path) -> None:
    label = np.zeros((40, 40), np.uint8)
    label[5:33, 6:35] = 1
    label[15:27, 12:28] = 2  # nested: every boundary is one class step
    out = _run(
        _case(tmp_path, label * 100.0 + 10.0, label), {"resize": [17, 23], "orientation": None}, dims=2
    )
    image, resized = _array(out["image"])[0], _array(out["label"])[0]
    # classify each pixel by the nearest class intensity (thresholds halfway: 60 and 160)
    recovered = (image >= 60).astype(np.float32) + (image >= 160)
    assert np.mean(recovered == resized) >= 0.95


# ------------------------------------------------------------------------------------- patch sampling


def _sample(
    image: np.ndarray, label: np.ndarray, patch: list[int], pos: float, n: int, seed: int
) -> list[dict]:
    chain = mt.Compose(patch_sampling_transforms(patch, pos, n))
    chain.set_random_state(seed)
    return chain({"image": image[None].astype(np.float32), "label": label[None].astype(np.float32)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patches_have_patch_size_and_foreground(seed: int) -> None:
    label = np.zeros((20, 18, 12), np.float32)
    label[15:17, 1:3, 9:11] = 1  # a small structure near a corner: patch centres must be corrected inwards
    image = label * 10.0 + np.arange(label.size, dtype=np.float32).reshape(label.shape) / label.size
    patches = _sample(image, label, [6, 6, 4], 1.0, 8, seed)
    assert len(patches) == 8
    for patch in patches:
        assert patch["image"].shape == patch["label"].shape == (1, 6, 6, 4)
        assert _array(patch["label"]).sum() > 0
        # image and label were cut at the same place
        assert np.array_equal(_array(patch["image"])[0] >= 10.0, _array(patch["label"])[0] == 1)


def test_small_image_is_padded_up_to_patch_size() -> None:
    label = np.zeros((5, 3, 2), np.float32)
    label[2, 1, 1] = 1
    image = 1.0 + label  # all voxels > 0 so padding (zeros) is visible
    patches = _sample(image, label, [8, 8, 4], 1.0, 3, 0)
    for patch in patches:
        img = _array(patch["image"])
        assert img.shape == (1, 8, 8, 4) and patch["label"].shape == (1, 8, 8, 4)
        assert int((img > 0).sum()) == image.size  # the whole image is inside, the rest is padding
        assert _array(patch["label"]).sum() == 1


def test_pos_fraction_zero_centres_on_background() -> None:
    label = np.zeros((30, 30, 4), np.float32)
    label[:3, :3, :] = 1
    patches = _sample(label, label, [4, 4, 4], 0.0, 10, 0)
    assert len(patches) == 10
    # a patch centred on background far more often misses the small corner structure
    assert sum(_array(p["label"]).sum() == 0 for p in patches) >= 5


@pytest.mark.parametrize("fraction", [-0.1, 1.01, 2.0])
def test_pos_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match="pos_fraction"):
        patch_sampling_transforms([8, 8, 8], fraction, 2)


@pytest.mark.parametrize(
    "spec, word",
    [({"orientation": "RAX"}, "orientation"), ({"orientation": "RRS"}, "orientation"),
     ({"spacing": [1.0, 0.0, 1.0]}, "spacing"), ({"resize": [32, -1]}, "resize")],
)
def test_preprocessing_rejects_bad_geometry_up_front(spec: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Preprocessing.from_dict(spec)
