"""A checkpoint ready to predict, and one case predicted on its own grid.

Everything needed comes from the checkpoint (network name and arguments, preprocessing spec, window, output
activation, label or region names), loaded with ``weights_only=True``. The per-case pipeline lives in
:mod:`medseg.inference.pipeline`; :func:`predict_segmentation` is its one-model shortcut.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from medseg.arrays import slabs
from medseg.data.dicom import is_dicom_series
from medseg.data.io import DEFAULT_MAX_VOXELS, is_nifti, read_header
from medseg.data.transforms import Preprocessing, preprocess_transforms
from medseg.errors import InputError
from medseg.inference.outputs import OutputSpec
from medseg.inference.window import Window
from medseg.models import create_model
from medseg.models.external import source_problem

NONFINITE_MODES = ("fail", "zero")
logger = logging.getLogger("medseg")


@dataclass
class LoadedModel:
    """A network ready to predict and the checkpoint facts it needs.

    Attributes:
        net: the network in eval mode.
        hparams: the module's saved hyperparameters (plain data).
        task: ``"segmentation"``, ``"classification"``, ``"multitask"`` or ``"enhancement"``.
        precision: the trainer precision the checkpoint was trained and validated at (``"32-true"``,
            ``"16-mixed"``, ``"bf16-mixed"``, ...), or ``None`` when the checkpoint does not say.
    """

    net: torch.nn.Module
    hparams: dict[str, Any]
    task: str
    precision: str | None = None

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the network to ``device`` (in place) and return ``self``."""
        self.net.to(device)
        return self

    @property
    def label_names(self) -> list[str]:
        names = self.hparams.get("label_names")
        return list(names) if names else [str(i) for i in range(self.hparams["num_classes"])]

    @property
    def outputs(self) -> OutputSpec:
        """What the output channels mean (softmax classes, sigmoid classes or regions)."""
        return OutputSpec.from_hparams(self.hparams)

    @property
    def window(self) -> Window:
        """The sliding window of a segmentation model (the one validation used)."""
        return Window.from_hparams(self.hparams)

    @property
    def preprocessing_key(self) -> str:
        """Models with equal keys preprocess a case identically (their inputs can be shared)."""
        spec = Preprocessing.from_dict(self.hparams.get("preprocessing_spec")).to_dict()
        return json.dumps([self.task, self.hparams["spatial_dims"], spec], sort_keys=True)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a medseg checkpoint without the YAML (``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError / ValueError: naming the checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, not a torch file, or pickled objects weights_only refuses
        raise ValueError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from err
    hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    if "network" not in hparams or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a medseg checkpoint (no network name or state_dict)")
    task = ckpt.get("medseg_task", "segmentation")
    problem = source_problem(hparams["network"], ckpt.get("medseg_network_source"))
    if problem:  # a network from a package that is not installed here
        raise ValueError(f"{path}: {problem}")
    net = create_model(hparams["network"], hparams["spatial_dims"], *network_channels(hparams),
                       **(hparams.get("network_args") or {}))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return LoadedModel(net.to(device).eval(), hparams, task, ckpt.get("medseg_precision"))


def network_channels(hparams: dict[str, Any]) -> tuple[int, int]:
    """The network's input and output channels: ``network_channels`` when the module saved them (an
    enhancement generator maps an image or a one-hot label map to an image), else the data's input channels and
    classes."""
    channels = hparams.get("network_channels")
    if channels:
        return int(channels[0]), int(channels[1])
    return int(hparams["in_channels"]), int(hparams["num_classes"])


def preprocess_for(model: LoadedModel, nonfinite: str = "fail") -> mt.Compose:
    """The checkpoint's preprocessing, image only (the same transforms training used), with
    :class:`FiniteVoxels` right after loading."""
    spec = Preprocessing.from_dict(model.hparams.get("preprocessing_spec"))
    transforms = preprocess_transforms(spec, model.task, model.hparams["spatial_dims"], keys=("image",))
    return mt.Compose([transforms[0], FiniteVoxels(nonfinite), *transforms[1:]])


class NonFiniteError(InputError):
    """NaN/Inf voxels: ``counts`` per channel (of ``size`` voxels each); :meth:`for_files` names the file."""

    def __init__(self, counts: list[int], size: int) -> None:
        self.counts, self.size = counts, size
        super().__init__(self._reason(sum(counts), size * len(counts)))

    def for_files(self, files: Sequence[str]) -> InputError:
        """The error naming the file (the channel's own file when each channel has one)."""
        channel = next(k for k, n in enumerate(self.counts) if n)
        if len(files) == len(self.counts):
            return InputError(f"{files[channel]}: {self._reason(self.counts[channel], self.size)}")
        return InputError(f"{files[0]}: {self}")

    @staticmethod
    def _reason(count: int, size: int) -> str:
        return f"{count} of {size} voxels are NaN or infinite; fix the image, or predict them as 0 with --nonfinite zero"


class FiniteVoxels(mt.Transform):
    """NaN/Inf voxels of a loaded image, before any transform spreads them (one NaN turns a z-score into NaN
    everywhere, which predicts as background): ``fail`` refuses the case, ``zero`` sets them to 0 (logged).

    Training never sees such voxels (the data checks refuse them), so nothing the model learned covers them.
    """

    def __init__(self, mode: str = "fail") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"--nonfinite must be one of {list(NONFINITE_MODES)}, got {mode!r}")
        self.mode = mode

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        x = data["image"]
        if not torch.is_floating_point(x):
            return data
        values = x.as_tensor() if hasattr(x, "as_tensor") else x
        counts = [0] * values.shape[0]
        for index in slabs(values.shape[1:], values.shape[0]):  # a bounded temporary, not a full-size mask
            slab = values[index]
            bad = ~torch.isfinite(slab)
            counts = [c + int(n) for c, n in zip(counts, bad.reshape(len(counts), -1).sum(dim=1), strict=True)]
            if self.mode == "zero":
                slab.masked_fill_(bad, 0.0)
        count = sum(counts)
        if count and self.mode == "fail":
            raise NonFiniteError(counts, x[0].numel())
        if count:
            source = getattr(x, "meta", {}).get("filename_or_obj", "image")
            logger.warning("%s: %d NaN/infinite voxel(s) set to 0 (--nonfinite zero)", source, count)
        return data


def flip_sets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every combination of the flip ``axes`` (default: all spatial axes), the identity first.

    ``flip_sets(3)`` gives 8 sets: ``(), (0,), (1,), (2,), (0, 1), ...``.
    """
    axes = tuple(range(spatial_dims)) if axes is None else tuple(axes)
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad:
        raise ValueError(f"TTA flip axes {bad} are not spatial axes of a {spatial_dims}D model")
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def predict_segmentation(model: LoadedModel, image: str | list[str], device: str | torch.device = "cpu") -> np.ndarray:
    """Label map of one case on the input file's grid.

    Returns:
        ``(X, Y[, Z])`` int16 array with the spatial shape of the input image file.
    """
    from medseg.inference.pipeline import group_models, prepare_case, segment

    groups = group_models([model.to(device)])
    prepared = prepare_case({"id": "case", "image": [image] if isinstance(image, str) else list(image)}, groups)
    maps = segment(prepared, groups, device=device)
    return maps.labels.astype(np.int16)


def check_files(model: LoadedModel, files: Sequence[str], max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """Refuse, from the headers alone and before any transform, files the model cannot take.

    Dimensionality and channels are read as MONAI's loaders read them: a NIfTI file's first three axes (its
    only two, for a 2D file) are spatial and any further axes channels; a PNG/JPG is 2D, its colours channels.
    Each header's claimed size is checked too (:func:`~medseg.data.io.check_claimed_size`).

    Returns:
        The ``(4, 4)`` affine of the first file (the grid the outputs are written on).

    Raises:
        ImageReadError / InputError: naming the file.
    """
    dims, expected = model.hparams["spatial_dims"], model.hparams["in_channels"]
    channels, affine = 0, None
    for file in files:
        shape, file_affine = read_header(file, max_voxels)
        affine = file_affine if affine is None else affine
        spatial = shape[:3] if is_nifti(file) or is_dicom_series(file) else shape[:2]  # a series: (X, Y, Z)
        if len(spatial) != dims:
            raise other_dimensionality(file, len(spatial), dims, f" (shape {tuple(shape)})")
        channels += math.prod(shape[len(spatial):])
    if channels != expected:
        raise other_channels(files, channels, expected)
    return affine


def check_input(model: LoadedModel, x: Any, image: str | Sequence[str]) -> None:
    """Refuse, naming the file, a preprocessed input whose dimensionality or channel count the model cannot take."""
    files = [image] if isinstance(image, str) else list(image)
    dims, channels = model.hparams["spatial_dims"], model.hparams["in_channels"]
    if x.ndim - 1 != dims:
        raise other_dimensionality(files[0], x.ndim - 1, dims)
    if x.shape[0] != channels:
        raise other_channels(files[:1], x.shape[0], channels)


def other_dimensionality(file: str, found: int, dims: int, shape: str = "") -> InputError:
    """``<file>: a 3D image, but the model is 2D (shape ...); ...`` with what to do instead."""
    return InputError(f"{file}: a {found}D image, but the model is {dims}D{shape}; it was trained on {dims}D images: "
                      f"predict {dims}D images, or use a {found}D model")


def other_channels(files: Sequence[str], found: int, expected: int) -> InputError:
    """``<file>: 2 channel(s), but the model expects 1 (...); ...`` with what to do instead."""
    what = f"{len(files)} files with {found} channel(s)" if len(files) > 1 else f"{found} channel(s)"
    return InputError(f"{files[0]}: {what}, but the model expects {expected} (it was trained on {expected}-channel "
                      f"images); give each case {expected} channel(s), or use a model trained on {found}")
