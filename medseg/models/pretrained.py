"""Transfer learning: load weights from a local file by name and shape, and freeze a network's encoder.

Nothing is downloaded; weights come from files the user provides. Accepted file contents (read with
``torch.load(..., weights_only=True)``):

* a bare state dict ``{name: tensor}`` (``torch.save(net.state_dict(), path)``);
* a Lightning checkpoint ``{"state_dict": {...}, ...}`` whose network keys start with ``"net."`` (the
  LightningModule attribute holding the network); the prefix is stripped;
* either of the above saved from ``DataParallel``/DDP, with keys starting with ``"module."`` (stripped).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.models.registry import get_model_spec

LIGHTNING_PREFIX = "net."
PARALLEL_PREFIX = "module."


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read ``path`` and return its tensors keyed by network parameter/buffer name (prefixes stripped)."""
    if not path.is_file():
        raise FileNotFoundError(f"Pretrained weights file not found: {path}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"Cannot read weights from {path}: {err}") from err
    is_checkpoint = isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
    state = obj["state_dict"] if is_checkpoint else obj
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint with 'state_dict'."
        )
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        name = key.removeprefix(PARALLEL_PREFIX)
        if is_checkpoint:
            name = name.removeprefix(LIGHTNING_PREFIX).removeprefix(PARALLEL_PREFIX)
        result[name] = value
    return result


def load_pretrained(net: nn.Module, path: str | Path, strict: bool = False) -> dict[str, Any]:
    """Copy every tensor of a local weights file whose name and shape match ``net`` into ``net``.

    Typical use: start from weights trained on another data set, where the head (number of classes) differs;
    the head is reported as skipped and keeps its fresh initialisation.

    Args:
        net: The network to update in place.
        path: Local ``.pt``/``.pth``/``.ckpt`` file (see the module docstring for accepted contents).
        strict: Raise instead of loading when anything is skipped or missing.

    Returns:
        A report: ``"loaded"`` (names copied), ``"skipped"`` (names in the file not copied: shape mismatch or
        not in the model), ``"missing"`` (names of ``net`` not found in the file with a matching shape), and
        ``"reasons"`` (skipped name -> why).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file cannot be read, holds no state dict, no tensor matches, or ``strict`` is set and
            the file does not match ``net`` exactly. Messages name the file.
    """
    path = Path(path)
    source = _read_state_dict(path)
    target = net.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    reasons: dict[str, str] = {}
    for name, tensor in source.items():
        if name not in target:
            reasons[name] = "not in the model"
        elif tuple(tensor.shape) != tuple(target[name].shape):
            reasons[name] = f"shape {tuple(tensor.shape)} in file, {tuple(target[name].shape)} in model"
        else:
            loaded[name] = tensor
    missing = [name for name in target if name not in loaded]
    if not loaded:
        example = ", ".join(list(source)[:5]) or "no tensors"
        raise ValueError(
            f"No tensor in {path} matches {type(net).__name__} by name and shape (file keys: {example}, ...)."
        )
    if strict and (reasons or missing):
        raise ValueError(
            f"{path} does not match {type(net).__name__} exactly (strict=True): "
            f"{len(reasons)} skipped (e.g. {dict(list(reasons.items())[:3])}), "
            f"{len(missing)} missing (e.g. {missing[:3]})."
        )
    net.load_state_dict(loaded, strict=False)
    return {"loaded": list(loaded), "skipped": list(reasons), "missing": missing, "reasons": reasons}


def freeze_encoder(name: str, net: nn.Module) -> int:
    """Stop gradients through the encoder of a registered network (``requires_grad = False``).

    The encoder is defined per model in the registry (``ModelSpec.encoder``): classifiers freeze everything but
    the linear head ``fc``; segmentation networks freeze their down-sampling path including the bottleneck (see
    ``medseg.models.segmentation``). Norm layers in the encoder still update their running statistics in
    training mode; put them in ``eval()`` as well for a fully fixed encoder.

    Args:
        name: Registry name the network was built with.
        net: The network, as returned by ``create_model(name, ...)``.

    Returns:
        Number of scalar weights frozen (sum of ``numel`` over newly frozen parameters).
    """
    frozen = 0
    for module in get_model_spec(name).encoder(net):
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def unfreeze(net: nn.Module) -> int:
    """Make every parameter of ``net`` trainable again; returns the number of scalar weights unfrozen."""
    count = 0
    for param in net.parameters():
        if not param.requires_grad:
            param.requires_grad_(True)
            count += param.numel()
    return count
