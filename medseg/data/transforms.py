"""Preprocessing and training-sample transforms (MONAI dictionary transforms on keys ``image``/``label``).

The preprocessing spec is a plain dict (it is saved in checkpoints, so it must stay plain data)::

    orientation: RAS          # axis codes, cut to the spatial dims ("RA" in 2D); null keeps the file's order
    spacing: [1.0, 1.0, 2.0]  # target voxel size in mm; null keeps the native spacing
    intensity: mri            # ct | mri | us | xray | none
    ct_window: [-1000, 1000]  # HU window for intensity: ct
    crop_foreground: false    # crop to the bounding box of non-zero image voxels (before intensity)
    resize: null              # classifiers: resize the whole image to this shape

Images are resampled with (bi/tri)linear interpolation, labels with nearest neighbour: labels are never
interpolated. Augmentation lives in :mod:`medseg.data.augment`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from monai import transforms as mt

from medseg.arrays import slabs
from medseg.data.dicom import DicomSeriesReader

INTENSITY_PRESETS = ("ct", "ct_zscore", "mri", "zscore", "us", "xray", "none")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass
class Preprocessing:
    """Validated preprocessing spec (see the module docstring)."""

    orientation: str | None = "RAS"
    spacing: list[float] | None = None
    intensity: str = "none"
    ct_window: list[float] | tuple[float, float] = (-1000.0, 1000.0)
    clip: list[float] | None = None
    zscore: list[float] | None = None
    crop_foreground: bool = False
    resize: list[int] | None = None

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> Preprocessing:
        """Build from a config dict; unknown keys or presets raise ``ValueError`` naming them."""
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing option(s) {unknown}; valid: {sorted(known)}")
        prep = cls(**spec)
        if prep.intensity not in INTENSITY_PRESETS:
            raise ValueError(f"unknown intensity preset {prep.intensity!r}; valid: {list(INTENSITY_PRESETS)}")
        if prep.intensity == "ct_zscore" and (
            not prep.clip or len(prep.clip) != 2 or prep.clip[0] >= prep.clip[1]
            or not prep.zscore or len(prep.zscore) != 2 or prep.zscore[1] <= 0
        ):
            raise ValueError("intensity ct_zscore needs clip: [low, high] (low < high) and zscore: [mean, std > 0], "
                             f"got clip {prep.clip}, zscore {prep.zscore}")
        if len(prep.ct_window) != 2 or prep.ct_window[0] >= prep.ct_window[1]:
            raise ValueError(f"ct_window must be [low, high] with low < high, got {prep.ct_window}")
        if prep.orientation is not None:
            codes = str(prep.orientation).upper()
            axes = [next((i for i, pair in enumerate(_RAS_LABELS) if c in pair), None) for c in codes]
            if len(codes) != 3 or None in axes or len(set(axes)) != 3:
                raise ValueError(f"orientation must be 3 axis codes such as 'RAS' or 'LPS', got {prep.orientation!r}")
            prep.orientation = codes
        for name in ("spacing", "resize"):
            values = getattr(prep, name)
            if values is not None and (not values or any(v <= 0 for v in values)):
                raise ValueError(f"preprocessing.{name} must hold positive numbers, got {values}")
        return prep

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, not tuples) for checkpoints and YAML."""
        out = asdict(self)
        out["ct_window"] = [float(v) for v in self.ct_window]
        return out


def keys_for(task: str, with_label: bool = False) -> tuple[str, ...]:
    """Dictionary keys that hold images: ``("image", "label")`` for segmentation and multitask, ``("image",
    "target")`` for enhancement (plus ``"label"`` when ``with_label``: a label-conditioned generator),
    ``("image",)`` for classification."""
    if task in ("segmentation", "multitask"):
        return ("image", "label")
    if task == "enhancement":
        return ("image", "target", "label") if with_label else ("image", "target")
    return ("image",)


def interpolation_modes(keys: tuple[str, ...], image: str, label: str) -> tuple[str, ...]:
    """One interpolation mode per key: ``label`` (nearest: labels are never interpolated) for a label map,
    ``image`` for images and enhancement targets."""
    return tuple(label if key == "label" else image for key in keys)


def preprocess_transforms(
    spec: Preprocessing, task: str, spatial_dims: int, keys: tuple[str, ...] | None = None
) -> list[mt.Transform]:
    """Load + geometry + intensity transforms shared by training, validation and prediction.

    Args:
        spec: the preprocessing spec.
        task: ``"segmentation"`` or ``"classification"``.
        spatial_dims: 2 or 3.
        keys: dictionary keys to load (default :func:`keys_for` the task; prediction loads ``("image",)``).

    Returns:
        Invertible MONAI transforms taking a case dict with file paths to tensors ``(C, *spatial)``.
    """
    keys = keys or keys_for(task)
    image_modes = interpolation_modes(keys, "bilinear", "nearest")
    load = mt.LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)
    # Registered last, so tried first; it claims only DICOM series folders, and files are still matched to
    # MONAI's readers by their suffix (passing reader= would make MONAI try every reader on every file). Like
    # theirs, it sets no size limit: the headers were checked against --max-voxels before (check_files, the
    # data checks).
    load.register(DicomSeriesReader(max_voxels=sys.maxsize))
    out: list[mt.Transform] = [load, mt.EnsureTyped(keys=keys, dtype=None, track_meta=True)]
    if spec.orientation:
        out.append(mt.Orientationd(keys=keys, axcodes=spec.orientation[:spatial_dims], labels=_RAS_LABELS))
    if spec.spacing:
        if len(spec.spacing) != spatial_dims:
            raise ValueError(f"preprocessing.spacing {spec.spacing} needs {spatial_dims} values")
        out.append(mt.Spacingd(keys=keys, pixdim=spec.spacing, mode=image_modes))
    if spec.crop_foreground:  # before intensity normalisation, which makes part of the foreground negative
        out.append(mt.CropForegroundd(keys=keys, source_key="image", select_fn=nonzero, allow_smaller=True))
    out.extend(_intensity(spec))
    if spec.resize:
        if len(spec.resize) != spatial_dims:
            raise ValueError(f"preprocessing.resize {spec.resize} needs {spatial_dims} values")
        modes = interpolation_modes(keys, "area", "nearest-exact")
        out.append(mt.Resized(keys=keys, spatial_size=spec.resize, mode=modes))
    out.append(mt.EnsureTyped(keys="image", dtype="float32"))
    return out


def nonzero(x: Any) -> Any:
    """Foreground for ``crop_foreground``: every non-zero voxel (nnU-Net's rule; CT air at -1000 HU counts)."""
    return x != 0


def _intensity(spec: Preprocessing) -> list[mt.Transform]:
    if spec.intensity == "ct":
        low, high = spec.ct_window
        return [WindowScaled("image", low, high)]
    if spec.intensity == "ct_zscore":
        return [ClippedZScored("image", spec.clip, spec.zscore)]
    if spec.intensity == "mri":
        return [NonzeroZScored("image")]
    if spec.intensity == "zscore":
        return [mt.NormalizeIntensityd("image", channel_wise=True)]
    if spec.intensity in ("us", "xray"):
        return [mt.ScaleIntensityd("image", minv=0.0, maxv=1.0, channel_wise=True)]
    return []


class NonzeroZScored(mt.MapTransform):
    """Per channel, z-score the non-zero voxels and leave zeros at zero (the ``mri`` preset): what MONAI's
    ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` computes (population std, a std of 0 taken as 1),
    but in place, in slabs, with the sums in float64. MONAI's boolean indexing holds about eight copies of the
    image at once (2.6 GB on a 512x512x300 CT); this holds a few MB."""

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _floating(d[key])
            for channel in _values(d[key]):
                zscore_nonzero_(channel)
        return d


class WindowScaled(mt.MapTransform):
    """Clip to ``[low, high]`` and scale to ``[0, 1]`` (the ``ct`` preset): MONAI's ``ScaleIntensityRanged``
    with ``clip=True`` and the same values, computed in place (MONAI's holds three copies of the image)."""

    def __init__(self, keys: Any, low: float, high: float) -> None:
        super().__init__(keys)
        self.low, self.high = float(low), float(high)

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _floating(d[key])
            _values(d[key]).clamp_(self.low, self.high).sub_(self.low).div_(self.high - self.low)
        return d


class ClippedZScored(mt.MapTransform):
    """Clip to ``[low, high]``, then subtract ``mean`` and divide by ``std`` (the ``ct_zscore`` preset: values
    taken from the dataset's foreground by ``medseg plan``, the same for every case), in place."""

    def __init__(self, keys: Any, clip: Any, zscore: Any) -> None:
        super().__init__(keys)
        (self.low, self.high), (self.mean, self.std) = (float(v) for v in clip), (float(v) for v in zscore)

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _floating(d[key])
            _values(d[key]).clamp_(self.low, self.high).sub_(self.mean).div_(self.std)
        return d


def _floating(image: Any) -> Any:
    """``image`` as a float tensor (MetaTensors stay MetaTensors); float32 unless it already floats."""
    tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(image)
    return tensor if tensor.is_floating_point() else tensor.float()


def _values(image: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a MetaTensor (a view: in-place changes reach the image)."""
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def zscore_nonzero_(channel: torch.Tensor) -> torch.Tensor:
    """Z-score the non-zero voxels of one channel ``(*S)`` in place (zeros stay zero); returns it."""
    budget = 1 << 20
    count, total = 0, 0.0
    for part in slabs(channel.shape, budget=budget):
        view = channel[part]
        count += int(torch.count_nonzero(view))
        total += float(view.sum(dtype=torch.float64))  # zeros add nothing
    if count == 0:
        return channel
    mean = total / count
    squares = 0.0
    for part in slabs(channel.shape, budget=budget):
        view = channel[part]
        deviation = view.double() - mean
        deviation *= view != 0
        squares += float((deviation * deviation).sum())
    std = (squares / count) ** 0.5 or 1.0
    for part in slabs(channel.shape, budget=budget):
        view = channel[part]
        zero = view == 0
        view.sub_(mean).div_(std).masked_fill_(zero, 0.0)
    return channel


def paired_patch_transforms(keys: tuple[str, ...], patch_size: list[int], samples_per_volume: int
                            ) -> list[mt.Transform]:
    """Random training patches taken at the same place from every key (enhancement: image, target, label)."""
    return [
        mt.SpatialPadd(keys=keys, spatial_size=patch_size),
        mt.RandSpatialCropSamplesd(keys=keys, roi_size=patch_size, num_samples=samples_per_volume,
                                   random_size=False),
    ]


def patch_sampling_transforms(
    patch_size: list[int], pos_fraction: float, samples_per_volume: int
) -> list[mt.Transform]:
    """Random training patches with a foreground/background ratio (segmentation).

    Args:
        patch_size: patch shape ``(*spatial)``; smaller volumes are padded first.
        pos_fraction: probability that a patch is centred on a foreground voxel (the rest: background).
        samples_per_volume: patches drawn from each loaded volume.
    """
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    return [
        mt.SpatialPadd(keys=("image", "label"), spatial_size=patch_size),
        mt.RandCropByPosNegLabeld(
            keys=("image", "label"),
            label_key="label",
            spatial_size=patch_size,
            pos=pos_fraction,
            neg=1.0 - pos_fraction,
            num_samples=samples_per_volume,
            allow_smaller=False,
        ),
    ]
