"""The temperature ``medseg cv`` fits on its out-of-fold probabilities, saved as ``calibration.json`` for
``medseg predict --calibration``.

Segmentation fits on a seeded sample of voxels (every case contributes equally, :data:`SAMPLE_VOXELS` in all),
classification on every case. The file records what it was fitted on and the mean NLL of that sample before
and after, so a reader can see what it did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import DEFAULT_MAX_VOXELS, read_image
from medseg.evaluation.calibration_scores import read_probabilities
from medseg.metrics.calibration import PROB_EPS
from medseg.metrics.temperature import apply_temperature, fit_temperature, save_calibration

SAMPLE_VOXELS = 2_000_000
CALIBRATION_FILE = "calibration.json"


def mean_nll(probabilities: np.ndarray, target: np.ndarray, activation: str) -> float:
    """Mean NLL of ``(N, K)`` softmax rows and ``(N,)`` classes, or of ``(N, R)`` sigmoid probabilities and
    ``(N, R)`` bool targets (the mean over every entry), with ``p`` clipped to ``[PROB_EPS, 1 - PROB_EPS]``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    if activation == "softmax":
        return float(-np.mean(np.log(p[np.arange(len(target)), np.asarray(target, dtype=np.int64)])))
    return float(-np.mean(np.where(target, np.log(p), np.log1p(-p))))


def fit_and_save(probabilities: np.ndarray, target: np.ndarray, activation: str, path: Path,
                 facts: Mapping[str, Any]) -> dict[str, Any]:
    """Fit the temperature on a sample, write ``path`` with the sample's NLL before and after; returns its facts."""
    temperature = fit_temperature(probabilities, target, activation)
    scaled = apply_temperature(probabilities, temperature, activation, channel_axis=1)
    record = {**facts, "nll_before": mean_nll(probabilities, target, activation),
              "nll_after": mean_nll(scaled, target, activation)}
    save_calibration(path, temperature, activation, record)
    return {"temperature": temperature, "activation": activation, **record}


def segmentation_sample(
    folder: Path, references: Mapping[str, str], activation: str, regions: Sequence[Sequence[int]] | None,
    seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of voxels of saved probabilities and their targets.

    Args:
        folder: ``probabilities/`` of the out-of-fold predictions (``<case>.npz``, ``(P, *S)``).
        references: case id -> reference label file.
        activation: ``softmax`` (targets: the class index, channel ``c`` = label ``c``) or ``sigmoid``
            (targets: one bool per channel; a region's mask for region models, else ``label == c``).
        regions: the label values of each region, for region models.

    Returns:
        ``(probabilities (N, P) float32, target)``: ``(N,)`` int64 classes, or ``(N, P)`` bool.
    """
    rng = np.random.default_rng(seed)
    per_case = max(1, SAMPLE_VOXELS // max(1, len(references)))
    parts, targets = [], []
    for case, label in sorted(references.items()):
        probabilities, _ = read_probabilities(folder / f"{case}.npz")
        reference, _ = read_image(label, max_voxels=max_voxels)
        flat = probabilities.reshape(probabilities.shape[0], -1)
        chosen = rng.choice(flat.shape[1], size=min(per_case, flat.shape[1]), replace=False)
        truth = reference.reshape(-1)[chosen].round().astype(np.int64)
        parts.append(flat[:, chosen].T.astype(np.float32))
        if activation == "softmax":
            targets.append(truth)
        elif regions:
            targets.append(np.stack([np.isin(truth, list(values)) for values in regions], axis=1))
        else:
            targets.append(truth[:, None] == np.arange(flat.shape[0])[None, :])
    return np.concatenate(parts), np.concatenate(targets)
