"""Combining a stack of members (models x test-time flips): classification, where members are tiny.

Segmentation never stacks members; it accumulates them (:mod:`medseg.inference.members`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COMBINE_MODES = ("mean", "vote")


def combine(members: Sequence[np.ndarray], mode: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of an ensemble.

    Args:
        members: probability maps ``(K, *spatial)``, one per member, on one grid.
        mode: ``"mean"`` (argmax of the mean probability) or ``"vote"`` (the label most members chose; ties go
            to the label with the higher mean probability).

    Returns:
        ``(mean_probabilities (K, *spatial) float32, labels (*spatial) int64)``.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; valid: {list(COMBINE_MODES)}")
    if not members:
        raise ValueError("combine needs at least one member")
    shapes = {m.shape for m in members}
    if len(shapes) != 1:
        raise ValueError(f"members disagree in shape: {sorted(shapes)}")
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in members])  # (M, K, *spatial)
    mean = stack.mean(axis=0)
    if mode == "mean":
        return mean, mean.argmax(axis=0)
    k = stack.shape[1]
    votes = np.stack([(stack.argmax(axis=1) == c).sum(axis=0) for c in range(k)])  # (K, *spatial)
    # Ties: add the mean probability (< 1) so it only decides between equal vote counts.
    return mean, (votes + mean).argmax(axis=0)
