"""Tests of training augmentation: every augmentation keeps image and label aligned and labels un-interpolated.

The alignment tests loop over ``AUGMENTATIONS_3D`` / ``AUGMENTATIONS_2D``, so an augmentation is tested the day it
is added. The image of each test case is derived from its label (``label * 100 + 10`` plus a small ramp), so the
label can be recovered from the augmented image by thresholding and compared with the augmented label.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.data.augment import AUGMENTATIONS_2D, AUGMENTATIONS_3D, AlbumentationsD, augmentation_transforms

# Augmentations that change intensities only: the label must come out exactly as it went in.
INTENSITY_ONLY = {"shift_intensity", "scale_intensity", "brightness_contrast", "gamma", "noise", "blur"}
# Strong settings (prob is always 1.0); a name missing here is tested with its defaults.
STRONG_3D: dict[str, dict[str, Any]] = {
    "rotate": {"degrees": 40.0},
    "zoom": {"min": 0.7, "max": 1.3},
    "shift_intensity": {"offset": 50.0},
    "scale_intensity": {"factor": 0.5},
    "gamma": {"min": 0.5, "max": 2.0},
    "noise": {"std": 5.0},
    "blur": {"sigma": 2.0},  # sigma is drawn from [sigma / 4, sigma]: 0.25 px is a no-op kernel
}
STRONG_2D: dict[str, dict[str, Any]] = {
    "rotate": {"degrees": 40.0},
    "affine": {"min": 0.8, "max": 1.2, "degrees": 30.0, "shift": 0.1},
    "zoom": {"min": 0.7, "max": 1.3},
    "elastic": {"alpha": 60.0, "sigma": 6.0},
    "brightness_contrast": {"limit": 0.3},
    "gamma": {"min": 0.5, "max": 2.0},
    "noise": {"std": 0.1},
    "blur": {"sigma": 2.0},  # sigma is drawn from [sigma / 4, sigma]: 0.25 px is a no-op kernel
}
SEEDS = (0, 1, 2)


def _label_3d() -> np.ndarray:
    """``(1, 20, 20, 12)`` labels 0..2: class 2 nested off-centre inside class 1 (every boundary one step)."""
    label = np.zeros((1, 20, 20, 12), np.float32)
    label[0, 2:16, 3:17, 1:11] = 1
    label[0, 9:14, 7:15, 3:9] = 2
    return label


def _label_2d() -> np.ndarray:
    """``(1, 32, 32)`` labels 0..2: class 2 nested off-centre inside class 1 (every boundary one step)."""
    label = np.zeros((1, 32, 32), np.float32)
    label[0, 3:26, 4:28] = 1
    label[0, 12:22, 9:19] = 2
    return label


def _image_from(label: np.ndarray, channels: int = 1) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, label.size, dtype=np.float32).reshape(label.shape)  # all values distinct
    return np.concatenate([label * 100.0 + 10.0 + ramp + 3.0 * c for c in range(channels)]).astype(np.float32)


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)


def _recover(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Label map from the image: thresholds halfway between the class medians of the image."""
    medians = [float(np.median(image[label == k])) for k in (0, 1, 2)]
    assert medians[0] < medians[1] < medians[2], f"class intensities out of order: {medians}"
    t1, t2 = (medians[0] + medians[1]) / 2, (medians[1] + medians[2]) / 2
    return (image >= t1).astype(np.float32) + (image >= t2).astype(np.float32)


def _apply(transforms: list, case: dict[str, Any], seed: int) -> dict[str, Any]:
    chain = mt.Compose(transforms)
    chain.set_random_state(seed)
    return chain({key: torch.as_tensor(value.copy()) for key, value in case.items()})


def _check_aligned(name: str, spatial_dims: int, opts: dict[str, Any]) -> None:
    label = _label_3d() if spatial_dims == 3 else _label_2d()
    image = _image_from(label)
    moved = False
    for seed in SEEDS:
        transforms = augmentation_transforms(
            {name: {"prob": 1.0, **opts}}, "segmentation", spatial_dims, seed=seed
        )
        out = _apply(transforms, {"image": image, "label": label}, seed)
        out_image, out_label = _np(out["image"]), _np(out["label"])
        # (c) shapes preserved
        assert out_image.shape == image.shape and out_label.shape == label.shape, name
        # (a) nearest neighbour only: no new label values
        assert set(np.unique(out_label).tolist()) <= {0.0, 1.0, 2.0}, (name, np.unique(out_label))
        if name in INTENSITY_ONLY:
            # (b) intensity only: the label is untouched, the image did change
            assert np.array_equal(out_label, label), f"{name} changed the label"
            assert not np.allclose(out_image, image), f"{name} with prob 1.0 left the image unchanged"
            continue
        # (b) spatial: image and label moved together
        agreement = float(np.mean(_recover(out_image[0], out_label[0]) == out_label[0]))
        assert agreement >= 0.95, f"{name} seed {seed}: image/label agreement {agreement:.3f}"
        moved |= not np.array_equal(out_label, label)
    if name not in INTENSITY_ONLY:
        assert moved, f"spatial augmentation {name!r} with prob 1.0 never moved the label"


@pytest.mark.parametrize("name", AUGMENTATIONS_3D)
def test_3d_augmentation_keeps_image_and_label_aligned(name: str) -> None:
    _check_aligned(name, 3, STRONG_3D.get(name, {}))


@pytest.mark.parametrize("name", AUGMENTATIONS_2D)
def test_2d_augmentation_keeps_image_and_label_aligned(name: str) -> None:
    _check_aligned(name, 2, STRONG_2D.get(name, {}))


def test_alignment_check_detects_a_misaligned_label() -> None:
    """The check above is not vacuous: a label flipped without its image fails it."""
    label = _label_3d()
    image = _image_from(label)
    flipped = label[:, ::-1].copy()
    try:
        agreement = float(np.mean(_recover(image[0], flipped[0]) == flipped[0]))
    except AssertionError:  # class medians out of order: also a detected misalignment
        return
    assert agreement < 0.95


def test_intensity_only_names_are_known_augmentations() -> None:
    assert INTENSITY_ONLY <= set(AUGMENTATIONS_3D) | set(AUGMENTATIONS_2D)
    assert set(STRONG_3D) <= set(AUGMENTATIONS_3D) and set(STRONG_2D) <= set(AUGMENTATIONS_2D)


@pytest.mark.parametrize("spatial_dims, names", [(3, AUGMENTATIONS_3D), (2, AUGMENTATIONS_2D)])
def test_prob_zero_is_identity(spatial_dims: int, names: tuple[str, ...]) -> None:
    label = _label_3d() if spatial_dims == 3 else _label_2d()
    image = _image_from(label)
    spec = {name: {"prob": 0.0} for name in names}
    out = _apply(
        augmentation_transforms(spec, "segmentation", spatial_dims), {"image": image, "label": label}, 0
    )
    assert np.allclose(_np(out["image"]), image, rtol=1e-5, atol=1e-3)
    assert np.array_equal(_np(out["label"]), label)


# ---------------------------------------------------------------------------------------- the builder


def test_empty_spec_gives_no_transforms() -> None:
    assert augmentation_transforms(None, "segmentation", 3) == []
    assert augmentation_transforms({}, "segmentation", 2) == []


@pytest.mark.parametrize(
    "spatial_dims, bad, valid",
    [(3, "brightness_contrast", AUGMENTATIONS_3D), (2, "rotate90", AUGMENTATIONS_2D)],
)
def test_unknown_name_lists_valid_ones(spatial_dims: int, bad: str, valid: tuple[str, ...]) -> None:
    for name in (bad, "sharpen"):
        with pytest.raises(ValueError) as info:
            augmentation_transforms({"flip": {}, name: {"prob": 1.0}}, "segmentation", spatial_dims)
        message = str(info.value)
        assert name in message
        assert all(v in message for v in valid)


@pytest.mark.parametrize("spatial_dims, names", [(3, AUGMENTATIONS_3D), (2, AUGMENTATIONS_2D)])
def test_unknown_option_raises_for_every_name(spatial_dims: int, names: tuple[str, ...]) -> None:
    for name in names:
        with pytest.raises(ValueError) as info:
            augmentation_transforms({name: {"prob": 0.5, "strength": 3}}, "segmentation", spatial_dims)
        message = str(info.value)
        assert name in message and "strength" in message and "prob" in message


def test_3d_runs_through_monai() -> None:
    transforms = augmentation_transforms({name: {} for name in AUGMENTATIONS_3D}, "segmentation", 3)
    assert len(transforms) == len(AUGMENTATIONS_3D)
    for transform in transforms:
        assert isinstance(transform, mt.Transform)
        assert type(transform).__module__.startswith("monai.")
    # every step is random, so MONAI's per-worker seeding reaches it
    assert all(isinstance(t, mt.Randomizable) for t in mt.Compose(transforms).flatten().transforms)


def test_2d_runs_through_albumentations() -> None:
    transforms = augmentation_transforms({name: {} for name in AUGMENTATIONS_2D}, "segmentation", 2)
    assert len(transforms) == 1 and isinstance(transforms[0], AlbumentationsD)
    pipeline = transforms[0].pipeline
    assert isinstance(pipeline, A.Compose)
    assert len(pipeline.transforms) >= len(AUGMENTATIONS_2D)
    assert all(type(t).__module__.startswith("albumentations.") for t in pipeline.transforms)


# ------------------------------------------------------------------------------ 2D intensity range


def test_2d_flip_returns_original_intensities() -> None:
    """The [0, 1] rescale around albumentations is undone: a flip only moves values (per channel ranges)."""
    label = _label_2d()
    image = _image_from(label, channels=2)
    image[1] = image[1] / 50.0 - 3.0  # a second channel with a different range, negative values
    out = _apply(
        augmentation_transforms({"flip": {"prob": 1.0}}, "segmentation", 2),
        {"image": image, "label": label},
        0,
    )
    got = _np(out["image"])
    assert got.shape == image.shape
    for channel in range(2):
        assert np.allclose(
            np.sort(got[channel].ravel()), np.sort(image[channel].ravel()), rtol=1e-5, atol=1e-4
        )
    # horizontal + vertical flip at prob 1.0 = half turn, for the image and the label alike
    assert np.allclose(got, image[:, ::-1, ::-1], rtol=1e-5, atol=1e-4)
    assert np.array_equal(_np(out["label"]), label[:, ::-1, ::-1])


@pytest.mark.parametrize("name", AUGMENTATIONS_2D)
def test_2d_output_stays_in_input_range(name: str) -> None:
    label = _label_2d()
    image = _image_from(label)
    spec = {name: {"prob": 1.0, **STRONG_2D.get(name, {})}}
    out = _apply(augmentation_transforms(spec, "segmentation", 2), {"image": image, "label": label}, 0)
    got = _np(out["image"])
    assert got.min() >= image.min() - 1e-3 and got.max() <= image.max() + 1e-3
    assert got.max() > 100.0  # not left in [0, 1]


def test_2d_keeps_metatensor_metadata() -> None:
    label = _label_2d()
    affine = torch.diag(torch.tensor([0.5, 0.7, 1.0, 1.0], dtype=torch.float64))
    case = {
        "image": MetaTensor(torch.as_tensor(_image_from(label)), affine=affine),
        "label": MetaTensor(torch.as_tensor(label), affine=affine),
    }
    out = augmentation_transforms({"flip": {"prob": 1.0}}, "segmentation", 2)[0](case)
    for key in ("image", "label"):
        assert isinstance(out[key], MetaTensor)
        assert torch.allclose(out[key].affine.to(torch.float64), affine)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_classification_augments_image_only(spatial_dims: int) -> None:
    label = _label_3d() if spatial_dims == 3 else _label_2d()
    image = _image_from(label)
    transforms = augmentation_transforms({"flip": {"prob": 1.0}}, "classification", spatial_dims)
    chain = mt.Compose(transforms)
    out = chain({"image": torch.as_tensor(image), "label": 1})
    assert out["label"] == 1
    assert not np.allclose(_np(out["image"]), image)
    assert np.allclose(np.sort(_np(out["image"]).ravel()), np.sort(image.ravel()), atol=1e-3)


# ------------------------------------------------------------------------------------- determinism


SPEC_3D = {"flip": {"prob": 0.5}, "rotate": {"prob": 1.0}, "noise": {"prob": 1.0}}
SPEC_2D = {"flip": {"prob": 0.5}, "affine": {"prob": 1.0}, "noise": {"prob": 1.0}}


@pytest.mark.parametrize("spatial_dims, spec", [(3, SPEC_3D), (2, SPEC_2D)])
def test_same_seed_same_output(spatial_dims: int, spec: dict) -> None:
    label = _label_3d() if spatial_dims == 3 else _label_2d()
    case = {"image": _image_from(label), "label": label}

    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        out = _apply(augmentation_transforms(spec, "segmentation", spatial_dims, seed=seed), case, seed)
        return _np(out["image"]), _np(out["label"])

    first, again, other = run(5), run(5), run(6)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.allclose(first[0], other[0])


def test_2d_seed_argument_alone_fixes_the_output() -> None:
    label = _label_2d()
    case = {"image": torch.as_tensor(_image_from(label)), "label": torch.as_tensor(label)}
    outs = [augmentation_transforms(SPEC_2D, "segmentation", 2, seed=s)[0](dict(case)) for s in (3, 3, 4)]
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["label"], outs[1]["label"])
    assert not torch.allclose(outs[0]["image"], outs[2]["image"])


def test_2d_set_random_state_reaches_albumentations() -> None:
    """MONAI's DataLoader seeds workers with ``set_random_state``; that must fix the albumentations draws."""
    label = _label_2d()
    case = {"image": torch.as_tensor(_image_from(label)), "label": torch.as_tensor(label)}
    a = AlbumentationsD(("image", "label"), SPEC_2D, seed=1)
    b = AlbumentationsD(("image", "label"), SPEC_2D, seed=2)
    a.set_random_state(11)
    b.set_random_state(11)
    for _ in range(2):  # and successive draws stay in step
        out_a, out_b = a(dict(case)), b(dict(case))
        assert torch.equal(out_a["image"], out_b["image"]) and torch.equal(out_a["label"], out_b["label"])
    first, second = a(dict(case)), a(dict(case))
    assert not torch.allclose(first["image"], second["image"])  # successive calls differ
