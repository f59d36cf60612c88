"""The temperature ``medseg cv`` fits on its out-of-fold probabilities, saved as ``calibration.json`` for
``medseg predict --calibration``.

Segmentation fits on a seeded sample of voxels (every case contributes equally, :data:`SAMPLE_VOXELS` in all),
classification on every case. The file records what it was fitted on and the mean NLL of that sample before
and after, so a reader can see what it did.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import DEFAULT_MAX_VOXELS, read_image
from medseg.evaluation.calibration_scores import read_probabilities
from medseg.metrics.calibration import PROB_EPS
from medseg.metrics.temperature import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    fit_temperature,
    save_calibration,
)

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
    """Fit the temperature on a sample, write ``path`` with the sample's NLL before and after; returns its facts.

    A temperature at a bound of the search (:data:`~medseg.metrics.temperature.TEMPERATURE_BOUNDS`) is kept but
    flagged (``at_bound``) and warned about: the model's probabilities are far from calibrated (e.g. a model
    trained for a few steps), and the fitted value says little.
    """
    temperature = fit_temperature(probabilities, target, activation)
    scaled = apply_temperature(probabilities, temperature, activation, channel_axis=1)
    at_bound = any(abs(np.log(temperature / bound)) < 1e-3 for bound in TEMPERATURE_BOUNDS)
    record = {**facts, "nll_before": mean_nll(probabilities, target, activation),
              "nll_after": mean_nll(scaled, target, activation), "at_bound": at_bound}
    if at_bound:
        print(f"warning: {path}: the fitted temperature {temperature:.3g} is at the bound of "
              f"{list(TEMPERATURE_BOUNDS)}: the out-of-fold probabilities are far from calibrated", file=sys.stderr)
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
        path = folder / f"{case}.npz"
        probabilities, affine = read_probabilities(path)
        reference, reference_affine = read_image(label, max_voxels=max_voxels)
        if probabilities.shape[1:] != reference.shape or not np.allclose(affine, reference_affine, atol=1e-3):
            raise ValueError(f"{path}: grid {probabilities.shape[1:]} does not match the reference {label} "
                             f"{reference.shape} (shape or affine)")
        # Voxels drawn with replacement: no permutation of the whole volume, and the index works on both arrays
        # whatever their memory order.
        where = np.unravel_index(rng.integers(0, reference.size, size=min(per_case, reference.size)), reference.shape)
        truth = np.asarray(reference[where]).round().astype(np.int64)
        parts.append(np.stack([channel[where] for channel in probabilities], axis=1).astype(np.float32))
        if activation == "softmax":
            targets.append(truth)
        elif regions:
            targets.append(np.stack([np.isin(truth, list(values)) for values in regions], axis=1))
        else:
            targets.append(truth[:, None] == np.arange(probabilities.shape[0])[None, :])
    return np.concatenate(parts), np.concatenate(targets)
