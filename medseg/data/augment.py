"""Training augmentation from YAML: MONAI transforms for 3D, albumentations for 2D.

The config is an ordered mapping ``name -> options``; every option has a default, ``prob`` is the chance
the transform is applied::

    augmentation:
      flip: {prob: 0.5}
      rotate90: {prob: 0.5}               # 3D only
      rotate: {prob: 0.2, degrees: 15}
      zoom: {prob: 0.2, min: 0.9, max: 1.1}
      elastic: {prob: 0.1}
      shift_intensity: {prob: 0.2, offset: 0.1}
      scale_intensity: {prob: 0.2, factor: 0.1}
      brightness_contrast: {prob: 0.2, limit: 0.2}   # 2D only
      gamma: {prob: 0.2, min: 0.7, max: 1.5}
      noise: {prob: 0.2, std: 0.05}
      blur: {prob: 0.1, sigma: 1.0}

Image and label always move together; labels are resampled with nearest neighbour (never interpolated).
2D images are rescaled to [0, 1] per channel around the albumentations pipeline (and back afterwards), so
brightness and gamma act the same whatever intensity normalisation came before.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from medseg.data.sampling import mixed_seed
from medseg.data.transforms import interpolation_modes, keys_for

AUGMENTATIONS_3D = (
    "flip", "rotate90", "rotate", "zoom", "elastic", "shift_intensity", "scale_intensity", "gamma", "noise", "blur",
)
AUGMENTATIONS_2D = (
    "flip", "rotate", "affine", "zoom", "elastic", "brightness_contrast", "gamma", "noise", "blur",
)


def augmentation_transforms(
    spec: dict[str, dict[str, Any]] | None, task: str, spatial_dims: int, seed: int = 0
) -> list[mt.Transform]:
    """Build the augmentation transforms of a config.

    Args:
        spec: ordered ``name -> options`` mapping (``None``/empty: no augmentation).
        task: ``"segmentation"`` (image + label move together) or ``"classification"`` (image only).
        spatial_dims: 3 uses MONAI, 2 uses albumentations.
        seed: seed of the 2D albumentations pipeline.

    Raises:
        ValueError: an unknown name (listing the valid ones) or an unknown option.
    """
    if not spec:
        return []
    valid = AUGMENTATIONS_3D if spatial_dims == 3 else AUGMENTATIONS_2D
    unknown = [name for name in spec if name not in valid]
    if unknown:
        raise ValueError(f"unknown {spatial_dims}D augmentation(s) {unknown}; valid: {list(valid)}")
    keys = keys_for(task)
    if spatial_dims == 3:
        return [_monai_3d(name, dict(opts or {}), keys) for name, opts in spec.items()]
    return [AlbumentationsD(keys, spec, seed=seed)]


def augment_collated(
    transform: mt.Compose,
    stream: np.random.RandomState,
    batch: dict[str, Any],
    keys: tuple[str, ...],
    seed: int,
    epoch: int,
) -> dict[str, Any]:
    """Apply ``transform`` to each case of a collated batch where the batch lies (GPU augmentation).

    Args:
        transform: the augmentation (MONAI dict transforms work on CUDA tensors).
        stream: the one generator all of ``transform``'s random steps draw from (``share_random_state``).
        batch: ``image`` ``(B, C, *spatial)``, optional ``label`` ``(B, 1, *spatial)``, ``id`` (B case ids).
        keys: the keys to augment together.
        seed, epoch: with the case id and its place in the batch, the seed of each case's draw, so the result
            does not depend on what ran before (exact resume).
    """
    keys = tuple(k for k in keys if torch.is_tensor(batch.get(k)))
    samples = []
    for index, case_id in enumerate(batch["id"]):
        stream.seed(mixed_seed(seed, epoch, str(case_id), index))
        samples.append(transform({k: batch[k][index] for k in keys}))
    plain = {k: torch.stack([_plain_tensor(s[k]) for s in samples]) for k in keys}
    return {**batch, **plain}


def _plain_tensor(value: Any) -> torch.Tensor:
    """A torch tensor without MONAI metadata (as the loader's ``EnsureTyped(track_meta=False)`` gives)."""
    tensor = torch.as_tensor(value)
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _take(opts: dict[str, Any], name: str, **defaults: Any) -> dict[str, Any]:
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise ValueError(f"augmentation {name!r}: unknown option(s) {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **opts}


def _monai_3d(name: str, opts: dict[str, Any], keys: tuple[str, ...]) -> mt.Transform:
    interp = interpolation_modes(keys, "bilinear", "nearest")
    zoom_interp = interpolation_modes(keys, "trilinear", "nearest-exact")  # "nearest" samples floor(i/z): shifted
    if name == "flip":
        o = _take(opts, name, prob=0.5)
        return mt.Compose([mt.RandFlipd(keys, prob=o["prob"], spatial_axis=axis) for axis in range(3)])
    if name == "rotate90":
        o = _take(opts, name, prob=0.5)
        return mt.RandRotate90d(keys, prob=o["prob"], max_k=3, spatial_axes=(0, 1))
    if name == "rotate":
        o = _take(opts, name, prob=0.2, degrees=15.0)
        r = math.radians(o["degrees"])
        return mt.RandRotated(keys, range_x=r, range_y=r, range_z=r, prob=o["prob"], mode=interp, padding_mode="zeros")
    if name == "zoom":
        o = _take(opts, name, prob=0.2, min=0.9, max=1.1)
        return mt.RandZoomd(keys, prob=o["prob"], min_zoom=o["min"], max_zoom=o["max"], mode=zoom_interp, keep_size=True)
    if name == "elastic":
        o = _take(opts, name, prob=0.1, sigma=(5.0, 7.0), magnitude=(50.0, 150.0))
        return mt.Rand3DElasticd(
            keys, sigma_range=o["sigma"], magnitude_range=o["magnitude"], prob=o["prob"], mode=interp, padding_mode="zeros"
        )
    if name == "shift_intensity":
        o = _take(opts, name, prob=0.2, offset=0.1)
        return mt.RandShiftIntensityd("image", offsets=o["offset"], prob=o["prob"])
    if name == "scale_intensity":
        o = _take(opts, name, prob=0.2, factor=0.1)
        return mt.RandScaleIntensityd("image", factors=o["factor"], prob=o["prob"])
    if name == "gamma":
        o = _take(opts, name, prob=0.2, min=0.7, max=1.5)
        return mt.RandAdjustContrastd("image", gamma=(o["min"], o["max"]), prob=o["prob"])
    if name == "noise":
        o = _take(opts, name, prob=0.2, std=0.05)
        return mt.RandGaussianNoised("image", std=o["std"], prob=o["prob"])
    o = _take(opts, name, prob=0.1, sigma=1.0)  # blur
    s = (0.25 * o["sigma"], o["sigma"])
    return mt.RandGaussianSmoothd("image", sigma_x=s, sigma_y=s, sigma_z=s, prob=o["prob"])


def _albumentations_2d(spec: dict[str, dict[str, Any]], seed: int) -> Any:
    import albumentations as A
    import cv2

    steps = []
    for name, raw in spec.items():
        opts = dict(raw or {})
        if name == "flip":
            o = _take(opts, name, prob=0.5)
            steps += [A.HorizontalFlip(p=o["prob"]), A.VerticalFlip(p=o["prob"])]
        elif name == "rotate":
            o = _take(opts, name, prob=0.2, degrees=15.0)
            steps.append(A.Affine(rotate=(-o["degrees"], o["degrees"]), p=o["prob"], mask_interpolation=cv2.INTER_NEAREST))
        elif name in ("affine", "zoom"):
            o = _take(opts, name, prob=0.2, min=0.9, max=1.1, degrees=0.0 if name == "zoom" else 15.0, shift=0.0)
            steps.append(
                A.Affine(
                    scale=(o["min"], o["max"]), rotate=(-o["degrees"], o["degrees"]),
                    translate_percent=(-o["shift"], o["shift"]), p=o["prob"], mask_interpolation=cv2.INTER_NEAREST,
                )
            )
        elif name == "elastic":
            o = _take(opts, name, prob=0.1, alpha=30.0, sigma=6.0)
            steps.append(A.ElasticTransform(alpha=o["alpha"], sigma=o["sigma"], p=o["prob"], mask_interpolation=cv2.INTER_NEAREST))
        elif name == "brightness_contrast":
            o = _take(opts, name, prob=0.2, limit=0.2)
            steps.append(A.RandomBrightnessContrast(brightness_limit=o["limit"], contrast_limit=o["limit"], p=o["prob"]))
        elif name == "gamma":
            o = _take(opts, name, prob=0.2, min=0.7, max=1.5)
            steps.append(A.RandomGamma(gamma_limit=(100 * o["min"], 100 * o["max"]), p=o["prob"]))
        elif name == "noise":
            o = _take(opts, name, prob=0.2, std=0.05)
            steps.append(A.GaussNoise(std_range=(0.0, o["std"]), p=o["prob"]))
        else:  # blur
            o = _take(opts, name, prob=0.1, sigma=1.0)
            steps.append(A.GaussianBlur(sigma_limit=(0.25 * o["sigma"], o["sigma"]), blur_limit=0, p=o["prob"]))
    return A.Compose(steps, seed=seed)


class AlbumentationsD(mt.MapTransform, mt.Randomizable):
    """Apply an albumentations pipeline to a 2D case dict: image ``(C, H, W)``, optional label ``(1, H, W)``.

    Randomizable so MONAI's per-worker seeding (``set_random_state``) reaches the albumentations pipeline.
    """

    def __init__(self, keys: tuple[str, ...], spec: dict[str, dict[str, Any]], seed: int = 0) -> None:
        super().__init__(keys)
        self.pipeline = _albumentations_2d(spec, seed)
        self.set_random_state(seed)

    def randomize(self, data: Any = None) -> None:
        self.pipeline.set_random_seed(int(self.R.randint(0, 2**31 - 1)))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.randomize()
        out = dict(data)
        image = torch.as_tensor(out["image"])
        array = image.detach().cpu().numpy().astype(np.float32)  # (C, H, W)
        low = array.min(axis=(1, 2), keepdims=True)
        span = np.maximum(array.max(axis=(1, 2), keepdims=True) - low, 1e-8)
        hwc = np.ascontiguousarray(((array - low) / span).transpose(1, 2, 0))
        kwargs: dict[str, Any] = {"image": hwc}
        if "label" in self.keys:
            kwargs["mask"] = np.asarray(out["label"])[0].astype(np.uint8)
        result = self.pipeline(**kwargs)
        aug = result["image"].transpose(2, 0, 1) * span + low
        out["image"] = _like(image, aug.astype(np.float32))
        if "label" in self.keys:
            out["label"] = _like(torch.as_tensor(out["label"]), result["mask"][None].astype(np.float32))
        return out


def _like(reference: torch.Tensor, array: np.ndarray) -> torch.Tensor:
    """A tensor with ``array``'s values and ``reference``'s metadata (MetaTensor affine kept)."""
    tensor = torch.as_tensor(np.ascontiguousarray(array))
    if hasattr(reference, "copy_meta_from"):
        from monai.data import MetaTensor

        return MetaTensor(tensor, meta=dict(reference.meta))
    return tensor
