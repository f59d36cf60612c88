"""The image-level classes of a multitask model (joint segmentation and classification) in ``medseg predict``.

A multitask network segments through ``forward`` and classifies through ``classify``; ``forward_with_class``
gives both from one encoder pass. ``medseg predict`` runs it in the segmentation's own sliding window
(:func:`medseg.inference.pipeline.segment` with an :class:`~medseg.inference.members.ImageClasses`), so a case's
class probabilities are, per member (each model of each group x each test-time flip, the window flipped as the
segmentation flips it), the mean of the softmax over those windows: what
:func:`medseg.models.multitask.case_class_probabilities` computes (validation calls it), without running the
encoder a second time. Members are combined as a classifier's are (:func:`medseg.inference.ensemble.combine`:
mean, or ``--ensemble vote``).

``--calibration``'s temperature rescales the segmentation probabilities only: it is fitted on them, and these
class probabilities are written as predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.inference.ensemble import combine
from medseg.inference.native import LoadedModel


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


def class_row(members: Sequence[np.ndarray], options: Any, first: LoadedModel) -> dict[str, Any]:
    """A case's ``predictions.csv`` columns: ``prediction`` (a class name) and ``p_<class>`` in class order.

    Args:
        members: each member's ``(K,)`` class probabilities (:meth:`ImageClasses.probabilities
            <medseg.inference.members.ImageClasses.probabilities>`).
        options: the run's :class:`~medseg.inference.batch.PredictOptions` (its ``ensemble``).
    """
    names = class_names(first)
    if any(m.shape != (len(names),) for m in members):
        shapes = sorted({m.shape for m in members})
        raise ValueError(f"the network's classify() gave {shapes} class probabilities for {len(names)} classes "
                         f"{names}")
    # No temperature here: --calibration rescales the segmentation probabilities only (module docstring).
    probabilities, label = combine([m.reshape(-1, 1) for m in members], options.ensemble)
    row: dict[str, Any] = {"prediction": names[int(label[0])]}
    row.update({f"p_{name}": float(p) for name, p in zip(names, probabilities[:, 0], strict=True)})
    return row
