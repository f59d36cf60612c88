"""The one set of rules for structures that one or both masks lack, shared by validation and evaluation.

Following Metrics Reloaded (Maier-Hein et al., Nature Methods 2024), a segmentation metric must say what it gives
when the reference or the prediction holds no voxel of a structure. medseg states it once, here, and every
number it reports goes through these rules: the ``val/dice`` that picks the best checkpoint, and the Dice, HD95
and ASSD that ``medseg evaluate``, ``cv`` and ``benchmark`` report.

=======================  ==================================  ===========================================
reference / prediction   both empty ("true negative")        one empty (a missed or a spurious structure)
=======================  ==================================  ===========================================
Dice, IoU, NSD           ``both_empty`` (default 1)          0
HD95, ASSD               0                                   ``distance_penalty`` (default: the image
                                                             diagonal in mm, the worst possible distance)
=======================  ==================================  ===========================================

A missed structure can therefore never improve a mean: its Dice is the lowest possible, and its distance is
larger than any distance two non-empty masks in the same image can have (voxel centres lie inside the image).
NaN (``both_empty=nan`` or ``distance_penalty="nan"``) leaves such pairs out of the means, on explicit request
only; every summary then counts how many pairs were left out.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

DIAGONAL = "diagonal"


@dataclass(frozen=True)
class EmptyMaskRules:
    """What the metrics of a structure give when one or both masks lack it (see the module docstring).

    Args:
        both_empty: Dice, IoU and NSD when neither mask holds the structure: 1 (a correct "absent"), or NaN to
            leave the pair out of the means (MONAI's ``ignore_empty`` does that, and more: it also drops
            spurious predictions, which this never does).
        distance_penalty: HD95 and ASSD when exactly one mask is empty: ``"diagonal"`` (the image's diagonal in
            mm), a number of mm, or ``"nan"`` to leave the pair out.
    """

    both_empty: float = 1.0
    distance_penalty: str | float = DIAGONAL

    def __post_init__(self) -> None:
        if not (math.isnan(self.both_empty) or self.both_empty in (0.0, 1.0)):
            raise ValueError(f"both_empty must be 1, 0 or nan, got {self.both_empty!r}")
        penalty = self.distance_penalty
        if isinstance(penalty, str):
            if penalty not in (DIAGONAL, "nan"):
                raise ValueError(f"distance penalty must be 'diagonal', 'nan' or a number of mm, got {penalty!r}")
        elif not (penalty > 0 and math.isfinite(penalty)):
            raise ValueError(f"distance penalty must be a finite number of mm > 0 (a miss must cost something), "
                             f"got {penalty!r}")

    @classmethod
    def parse(cls, both_empty: str | float = 1.0, distance_penalty: str | float = DIAGONAL) -> EmptyMaskRules:
        """Rules from command-line text: ``both_empty`` ``"1"``/``"0"``/``"nan"``; ``distance_penalty``
        ``"diagonal"``/``"nan"``/a number of mm."""
        text = str(distance_penalty).strip().lower()
        try:
            value = float(text)
        except ValueError:
            value = None
        penalty: str | float = text if value is None else ("nan" if math.isnan(value) else value)
        return cls(float(str(both_empty).strip().lower()), penalty)

    def penalty_mm(self, shape: Sequence[int], spacing: Sequence[float]) -> float:
        """HD95/ASSD of a missed or spurious structure in an image of ``shape`` voxels of ``spacing`` mm."""
        if self.distance_penalty == DIAGONAL:
            return image_diagonal_mm(shape, spacing)
        if self.distance_penalty == "nan":
            return float("nan")
        return float(self.distance_penalty)

    def describe(self) -> dict[str, Any]:
        """The rules as plain data (for ``summary.json`` and reports)."""
        return {"both_empty": None if math.isnan(self.both_empty) else self.both_empty,
                "distance_penalty": self.distance_penalty}


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of the image's extent in mm: ``sqrt(sum((n_i * s_i)^2))``; larger than any distance
    between two voxel centres of the image."""
    return float(np.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def dice_from_counts(true_positives: Any, predicted: Any, reference: Any, both_empty: float = 1.0) -> Any:
    """Dice ``2 TP / (|P| + |R|)`` from voxel counts, elementwise; ``both_empty`` where both counts are 0.

    The one Dice formula of medseg: validation calls it on torch tensors ``(N, S)`` (cases x structures), the
    evaluation on plain numbers.

    Args:
        true_positives, predicted, reference: counts of ``P & R``, ``P`` and ``R`` (numbers, numpy arrays or
            tensors of one shape).
        both_empty: the value where neither mask holds the structure (1, or NaN to leave it out).
    """
    loaded = sys.modules.get("torch")  # a tensor means torch is loaded; evaluate never needs to import it
    if loaded is not None and isinstance(true_positives, loaded.Tensor):
        total = (predicted + reference).double()
        dice = 2.0 * true_positives.double() / total.clamp_min(1.0)
        return loaded.where(total > 0, dice, loaded.full_like(dice, both_empty))
    total = np.asarray(predicted, dtype=np.float64) + np.asarray(reference, dtype=np.float64)
    dice = np.where(total > 0, 2.0 * np.asarray(true_positives, dtype=np.float64) / np.maximum(total, 1.0),
                    both_empty)
    return float(dice) if dice.ndim == 0 else dice


def mask_dice(predicted: torch.Tensor, reference: torch.Tensor, both_empty: float = 1.0) -> torch.Tensor:
    """Dice per case and structure of boolean/0-1 masks ``(N, S, *spatial)``: ``(N, S)`` float64."""
    dims = tuple(range(2, predicted.ndim))
    predicted, reference = predicted.bool(), reference.bool()
    tp = (predicted & reference).sum(dim=dims)
    return dice_from_counts(tp, predicted.sum(dim=dims), reference.sum(dim=dims), both_empty)


def conventions_markdown(rules: EmptyMaskRules | None = None) -> str:
    """The rules as a Markdown table in Metrics Reloaded's terms (for reports)."""
    rules = rules or EmptyMaskRules()
    both = "left out (NaN)" if math.isnan(rules.both_empty) else f"{rules.both_empty:g}"
    penalty = {DIAGONAL: "the image diagonal (mm), larger than any real distance", "nan": "left out (NaN)"}.get(
        str(rules.distance_penalty), f"{rules.distance_penalty} mm")
    return "\n".join([
        "| reference / prediction | both empty (true negative) | one empty (missed or spurious structure) |",
        "|---|---|---|",
        f"| Dice, IoU, NSD | {both} | 0 |",
        f"| HD95, ASSD | 0 | {penalty} |",
        "| ECE, Brier, NLL | every voxel counts | every voxel counts |",
    ])
