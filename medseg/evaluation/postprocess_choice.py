"""Choose post-processing on cross-validation results, keeping a step only if it helps (nnU-Net's rule).

Per foreground class, in order, the candidates are: keep the largest component, remove components smaller than
each of a few volumes (mm³), and fill holes. The best candidate of a class is kept only if it raises the mean
Dice over classes without lowering any class's mean Dice or raising any class's mean HD95; later classes are
tried on the predictions the earlier choices already changed. The result is a spec ``medseg predict
--postprocess`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.inference.postprocess import apply_postprocessing
from medseg.metrics.segmentation import binary_metrics

VOLUMES_MM3 = (10.0, 50.0, 200.0, 1000.0)
_EPS = 1e-9


@dataclass
class Case:
    """One out-of-fold case: prediction and reference label maps ``(X, Y[, Z])`` and the voxel spacing (mm)."""

    prediction: np.ndarray
    reference: np.ndarray
    spacing: Sequence[float]


def candidates(label: int, volumes_mm3: Sequence[float] = VOLUMES_MM3) -> list[dict]:
    """The post-processing steps tried for one class."""
    return [
        {"op": "keep_largest_component", "classes": [label]},
        *({"op": "remove_small_components", "classes": [label], "min_volume_mm3": v} for v in volumes_mm3),
        {"op": "fill_holes", "classes": [label]},
    ]


def score(cases: Sequence[Case], classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean Dice and mean HD95 per class over the cases, under medseg's empty-mask rules (a structure a step
    removes entirely gets the HD95 penalty, so removing a true structure never looks better): ``(K,)`` each."""
    dice = np.zeros(len(classes))
    hd95 = np.zeros(len(classes))
    for i, c in enumerate(classes):
        values = [binary_metrics(k.prediction == c, k.reference == c, k.spacing) for k in cases]
        dice[i] = np.mean([v["dice"] for v in values])
        hd95[i] = np.mean([v["hd95"] for v in values])
    return dice, hd95


def _no_worse(new: np.ndarray, old: np.ndarray, higher_is_better: bool) -> bool:
    both = ~np.isnan(new) & ~np.isnan(old)
    if np.any(np.isnan(new) & ~np.isnan(old)):
        return False
    diff = (new - old)[both] if higher_is_better else (old - new)[both]
    return bool(np.all(diff >= -_EPS))


def choose_postprocessing(
    cases: Sequence[Case], classes: Sequence[int], volumes_mm3: Sequence[float] = VOLUMES_MM3
) -> tuple[list[dict], dict[str, list[float]]]:
    """Greedy per-class choice (see the module docstring).

    Returns:
        ``(steps, scores)``: the chosen spec, and the per-class Dice/HD95 before and after it.
    """
    current = list(cases)
    dice, hd95 = score(current, classes)
    before = {"dice": dice.tolist(), "hd95": hd95.tolist()}
    chosen: list[dict] = []
    for label in classes:
        best: tuple[float, dict, list[Case], np.ndarray, np.ndarray] | None = None
        for step in candidates(label, volumes_mm3):
            trial = [Case(apply_postprocessing(k.prediction, k.spacing, [step]), k.reference, k.spacing) for k in current]
            new_dice, new_hd95 = score(trial, classes)
            helps = np.nanmean(new_dice) > np.nanmean(dice) + _EPS
            if helps and _no_worse(new_dice, dice, True) and _no_worse(new_hd95, hd95, False):
                if best is None or np.nanmean(new_dice) > best[0]:
                    best = (float(np.nanmean(new_dice)), step, trial, new_dice, new_hd95)
        if best is not None:
            _, step, current, dice, hd95 = best
            chosen.append(step)
    return chosen, {"before_dice": before["dice"], "before_hd95": before["hd95"],
                    "after_dice": dice.tolist(), "after_hd95": hd95.tolist()}
