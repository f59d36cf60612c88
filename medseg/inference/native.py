"""Predict one case on its own grid from a checkpoint: preprocess, sliding window, invert, label map.

Everything needed comes from the checkpoint (network name and arguments, preprocessing spec, roi size, label
names), loaded with ``weights_only=True``. The preprocessing (reorientation, resampling, cropping) is inverted
with nearest-neighbour interpolation, so the label map lands voxel-for-voxel on the input image's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from medseg.data.transforms import Preprocessing, preprocess_transforms
from medseg.inference.predictor import labels_from_logits, sliding_window_logits
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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
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


@torch.no_grad()
def predict_segmentation(model: LoadedModel, image: str | list[str], device: str | torch.device = "cpu") -> np.ndarray:
    """Label map of one case on the input file's grid.

    Args:
        model: from :func:`load_model`.
        image: the case's image file, or one file per channel.

    Returns:
        ``(X, Y[, Z])`` int array with the shape of the input image file.
    """
    preprocess = preprocess_for(model)
    data = preprocess({"image": image})
    x = data["image"]
    hp = model.hparams
    logits = sliding_window_logits(
        model.net, x[None].to(device), hp["roi_size"], sw_batch_size=hp.get("sw_batch_size", 4),
        overlap=hp.get("overlap", 0.25),
    )
    labels = labels_from_logits(logits)[0].to("cpu").float()  # (1, *spatial) on the preprocessed grid
    data["pred"] = _meta_like(x, labels)
    inverted = mt.Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=True)(data)
    return np.asarray(inverted["pred"][0].cpu().numpy()).round().astype(np.int16)


def _meta_like(reference: Any, array: torch.Tensor) -> Any:
    from monai.data import MetaTensor

    out = MetaTensor(array, meta=dict(reference.meta))  # meta carries the affine
    out.applied_operations = list(reference.applied_operations)
    return out
