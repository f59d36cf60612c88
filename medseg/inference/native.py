"""Predict one case on its own grid from a checkpoint: preprocess, sliding window, invert, label map.

Everything needed comes from the checkpoint (network name and arguments, preprocessing spec, roi size, label
names), loaded with ``weights_only=True``. The preprocessing (reorientation, resampling, cropping) is inverted
with nearest-neighbour interpolation, so the label map lands voxel-for-voxel on the input image's grid.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from medseg.data.transforms import Preprocessing, preprocess_transforms
from medseg.inference.predictor import sliding_window_logits
from medseg.models import create_model


@dataclass
class LoadedModel:
    """A network ready to predict and the checkpoint facts it needs.

    Attributes:
        net: the network in eval mode.
        hparams: the module's saved hyperparameters (plain data).
        task: ``"segmentation"`` or ``"classification"``.
    """

    net: torch.nn.Module
    hparams: dict[str, Any]
    task: str

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the network to ``device`` (in place) and return ``self``."""
        self.net.to(device)
        return self

    @property
    def label_names(self) -> list[str]:
        names = self.hparams.get("label_names")
        return list(names) if names else [str(i) for i in range(self.hparams["num_classes"])]


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
    net = create_model(
        hparams["network"], hparams["spatial_dims"], hparams["in_channels"], hparams["num_classes"],
        **(hparams.get("network_args") or {}),
    )
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return LoadedModel(net.to(device).eval(), hparams, task)


def preprocess_for(model: LoadedModel) -> mt.Compose:
    """The checkpoint's preprocessing, image only (the same transforms training used)."""
    spec = Preprocessing.from_dict(model.hparams.get("preprocessing_spec"))
    return mt.Compose(preprocess_transforms(spec, model.task, model.hparams["spatial_dims"], keys=("image",)))


def flip_sets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every combination of the flip ``axes`` (default: all spatial axes), the identity first.

    ``flip_sets(3)`` gives 8 sets: ``(), (0,), (1,), (2,), (0, 1), ...``.
    """
    axes = tuple(range(spatial_dims)) if axes is None else tuple(axes)
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad:
        raise ValueError(f"TTA flip axes {bad} are not spatial axes of a {spatial_dims}D model")
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


@torch.no_grad()
def segmentation_members(
    model: LoadedModel,
    image: str | list[str],
    flips: Sequence[tuple[int, ...]] = ((),),
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """Probability maps of one case on the input file's grid, one per test-time flip.

    The image is preprocessed with the checkpoint's own spec, predicted by sliding window (each flip of the
    whole image is a member), and every member's probabilities are mapped back through the inverse of the
    preprocessing with linear interpolation, so averaging and argmax happen on the input grid.

    Returns:
        ``[(K, X, Y[, Z]) float32, ...]`` with the spatial shape of the input image file.
    """
    preprocess = preprocess_for(model)
    data = preprocess({"image": image})
    x = data["image"]
    _check_input(model, x, image)
    hp = model.hparams
    batch = x.as_tensor()[None].to(device)
    roi = hp["roi_size"] if hp["spatial_dims"] == 3 else whole_image_roi(x.shape[1:], hp["roi_size"])
    members = []
    for flip in flips:
        dims = [a + 2 for a in flip]
        view = torch.flip(batch, dims) if dims else batch
        with _autocast(device):
            logits = sliding_window_logits(
                model.net, view, roi, sw_batch_size=hp.get("sw_batch_size", 4), overlap=hp.get("overlap", 0.25)
            )
        probabilities = torch.softmax(logits.float(), dim=1)
        probabilities = torch.flip(probabilities, dims) if dims else probabilities
        data["pred"] = _meta_like(x, probabilities[0].cpu())
        inverted = mt.Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=False)(data)
        members.append(_background_where_empty(np.asarray(inverted["pred"].cpu().numpy(), dtype=np.float32)))
    return members


def predict_segmentation(model: LoadedModel, image: str | list[str], device: str | torch.device = "cpu") -> np.ndarray:
    """Label map of one case on the input file's grid (argmax of the inverted probabilities).

    Returns:
        ``(X, Y[, Z])`` int16 array with the shape of the input image file.
    """
    probabilities = segmentation_members(model, image, device=device)[0]
    return probabilities.argmax(axis=0).astype(np.int16)


@torch.no_grad()
def classification_members(
    model: LoadedModel,
    image: str | list[str],
    flips: Sequence[tuple[int, ...]] = ((),),
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """Class probabilities ``(K,)`` of one case, one array per test-time flip."""
    x = preprocess_for(model)({"image": image})["image"]
    _check_input(model, x, image)
    x = x.as_tensor()[None].to(device)
    members = []
    for flip in flips:
        view = torch.flip(x, [a + 2 for a in flip]) if flip else x
        with _autocast(device):
            logits = model.net(view)
        members.append(torch.softmax(logits.float(), dim=1)[0].cpu().numpy())
    return members


def _background_where_empty(probabilities: np.ndarray) -> np.ndarray:
    """Voxels the inverse preprocessing padded (outside a foreground crop) hold zeros: make them background."""
    missing = np.clip(1.0 - probabilities.sum(axis=0), 0.0, 1.0)
    probabilities[0] += missing
    return probabilities


def whole_image_roi(shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """A 2D roi covering the whole image: each side rounded up to a multiple of the largest power of two
    dividing the training patch side (the patch suited the network, so such sizes do too)."""
    roi = []
    for side, p in zip(shape, patch, strict=True):
        step = int(p) & -int(p)  # largest power of two dividing p
        roi.append(max(int(p), -(-int(side) // step) * step))
    return roi


def _check_input(model: LoadedModel, x: Any, image: str | list[str]) -> None:
    """Refuse, naming the file, an input whose dimensionality or channel count the model cannot take."""
    first = image if isinstance(image, str) else image[0]
    dims, channels = model.hparams["spatial_dims"], model.hparams["in_channels"]
    if x.ndim - 1 != dims:
        raise ValueError(f"{first}: a {x.ndim - 1}D image, but the model is {dims}D")
    if x.shape[0] != channels:
        raise ValueError(f"{first}: {x.shape[0]} channel(s), but the model expects {channels}")


def _autocast(device: str | torch.device) -> Any:
    """Mixed precision on CUDA (fp16 windows), a no-op elsewhere."""
    kind = torch.device(device).type
    return torch.autocast("cuda", dtype=torch.float16) if kind == "cuda" else contextlib.nullcontext()


def _meta_like(reference: Any, array: torch.Tensor) -> Any:
    from monai.data import MetaTensor

    out = MetaTensor(array, meta=dict(reference.meta))  # meta carries the affine
    out.applied_operations = list(reference.applied_operations)
    return out
