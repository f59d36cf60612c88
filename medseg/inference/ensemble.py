"""Combining members (models x test-time flips) in native space, and how much they doubt.

Pure array functions: a member is a probability map ``(K, *spatial)`` on the input image's grid.
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


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Voxelwise predictive entropy (nats) of ``(K, *spatial)`` probabilities; 0 = certain, log K = uniform."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=0)).astype(np.float32)


def member_variance(members: Sequence[np.ndarray]) -> np.ndarray:
    """Voxelwise variance across members, averaged over classes: ``(*spatial)``; 0 when members agree."""
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in members])
    return stack.var(axis=0).mean(axis=0)


def case_doubt(entropy_map: np.ndarray, members_labels: Sequence[np.ndarray]) -> float:
    """One doubt score per case: mean entropy over the voxels any member calls foreground (0 if none).

    Background far from any structure is certain and would dilute the score, so it is left out.
    """
    region = np.zeros(entropy_map.shape, dtype=bool)
    for labels in members_labels:
        region |= np.asarray(labels) > 0
    return float(entropy_map[region].mean()) if region.any() else 0.0
