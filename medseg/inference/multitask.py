"""The image-level classes of a multitask model (joint segmentation and classification) in ``medseg predict``.

A multitask network segments through ``forward`` (its label maps take the segmentation path unchanged) and
classifies the whole image through ``classify``. A case's class probabilities are, per member (each model of
each group x each test-time flip of the input), :func:`medseg.models.multitask.case_class_probabilities` on the
group's preprocessed image: the mean of the softmax over the sliding windows the segmentation uses (the training
patch, overlap and window batch of the checkpoint), under the same autocast. Members are combined as a
classifier's are (:func:`medseg.inference.ensemble.combine`: mean, or ``--ensemble vote``).

``--calibration``'s temperature rescales the segmentation probabilities only: it is fitted on them, and these
class probabilities are written as predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.inference.ensemble import combine
from medseg.inference.members import autocast_for
from medseg.inference.native import LoadedModel
from medseg.inference.pipeline import ModelGroup, PreparedCase, window_dtype


def class_names(model: LoadedModel) -> list[str]:
    """The model's image-level class names (``class_names`` in its hyperparameters).

    Raises:
        ValueError: the checkpoint holds no class names.
    """
    names = model.hparams.get("class_names")
    if not names:
        raise ValueError("a multitask checkpoint without 'class_names' in its hyperparameters")
    return [str(n) for n in names]


def check_members(models: Sequence[LoadedModel], paths: Sequence[str | Path]) -> None:
    """Refuse, naming the file, multitask members whose image-level classes or segmentation outputs differ from
    the first's (:func:`medseg.inference.sources.check_compatible` checks the rest)."""
    if len(paths) != len(models):  # an exported folder holds several members
        paths = [paths[0]] * len(models)
    for model, path in zip(models, paths, strict=True):
        try:
            names = class_names(model)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        if names != class_names(models[0]):
            raise ValueError(f"{path}: image-level classes {names} differ from {paths[0]} "
                             f"({class_names(models[0])})")
        if model.outputs != models[0].outputs:
            raise ValueError(f"{path}: its segmentation outputs differ from {paths[0]}'s")


@torch.no_grad()
def member_probabilities(prepared: PreparedCase, groups: Sequence[ModelGroup],
                         flips: Sequence[tuple[int, ...]] = ((),), device: str | torch.device = "cpu",
                         precision: str = "auto") -> list[np.ndarray]:
    """Image-level class probabilities ``(K,)`` of one case, one float32 array per member (model x flip)."""
    from medseg.models.multitask import case_class_probabilities

    members = []
    for group in groups:
        x = prepared.inputs[group.key].as_tensor()[None].to(device)
        for model in group.models:
            window = model.window
            autocast = autocast_for(device, window_dtype(precision, device, model.precision))
            for flip in flips:
                image = torch.flip(x, [a + 2 for a in flip]) if flip else x
                with autocast():
                    p = case_class_probabilities(model.net, image, window.roi, window.overlap, window.batch_size)
                members.append(torch.as_tensor(p).detach().float().cpu().numpy().reshape(-1))
    return members


def class_row(prepared: PreparedCase, groups: Sequence[ModelGroup], flips: Sequence[tuple[int, ...]],
              options: Any, first: LoadedModel) -> dict[str, Any]:
    """A case's ``predictions.csv`` columns: ``prediction`` (a class name) and ``p_<class>`` in class order.

    Args:
        options: the run's :class:`~medseg.inference.batch.PredictOptions` (device, precision, ensemble).
    """
    names = class_names(first)
    members = member_probabilities(prepared, groups, flips, options.device, options.precision)
    if any(m.shape != (len(names),) for m in members):
        shapes = sorted({m.shape for m in members})
        raise ValueError(f"the network's classify() gave {shapes} class probabilities for {len(names)} classes "
                         f"{names}")
    # No temperature here: --calibration rescales the segmentation probabilities only (module docstring).
    probabilities, label = combine([m.reshape(-1, 1) for m in members], options.ensemble)
    row: dict[str, Any] = {"prediction": names[int(label[0])]}
    row.update({f"p_{name}": float(p) for name, p in zip(names, probabilities[:, 0], strict=True)})
    return row
