"""Calibration of segmentation probabilities (``medseg predict --save-probabilities``) against the references.

Each scored structure (a foreground class, or a region) is a binary problem: the probability of its channel
against the reference mask, over every voxel of the case. Per case and structure this gives ECE (15 bins,
torchmetrics' binning), Brier score and NLL (:class:`~medseg.metrics.calibration.BinaryCalibration`); the
accumulators are also pooled over the cases, for a reliability diagram and the pooled figures.

Channel ``c`` holds class ``c`` (softmax, or sigmoid classes), or region ``r`` (region models), as the writer
(:mod:`medseg.inference.writers`) stores them.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.metrics.calibration import BinaryCalibration

CALIBRATION_METRICS = ("ece", "brier", "nll")


def read_probabilities(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``(P, *S)`` float16 probabilities and the affine of a ``probabilities/<case>.npz``.

    Raises:
        ValueError: naming the file, when it is not such an archive.
    """
    if not path.is_file():
        raise ValueError(f"{path}: no such probabilities file (medseg predict --save-probabilities)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["probabilities"], archive["affine"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a probabilities file of medseg predict ({type(err).__name__}: {err})") from err


def probability_layout(path: Path) -> tuple[int, list[list[int]] | None]:
    """The number of channels ``P`` a ``probabilities/<case>.npz`` holds (from its header only), and the label
    values of each channel when a region model wrote it (``None`` for a class model)."""
    try:
        with zipfile.ZipFile(path) as archive:
            with archive.open("probabilities.npy") as handle:
                version = np.lib.format.read_magic(handle)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape = header(handle)[0]
            regions = None
            if "regions.npy" in archive.namelist():
                with archive.open("regions.npy") as handle:
                    regions = json.loads(str(np.load(handle, allow_pickle=False)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a probabilities file of medseg predict ({type(err).__name__}: {err})") from err
    return int(shape[0]), regions


class CalibrationScores:
    """Per-case calibration of saved probabilities, pooled per structure over the cases.

    Args:
        folder: the ``probabilities/`` folder of a prediction folder.
        structures: what is scored: name -> ``(channel, label values)``; the reference mask of a structure is
            ``reference in values``.
        bins: ECE bins.
        regions: the structures are a region model's (every channel is one).
    """

    def __init__(self, folder: Path, structures: Mapping[Any, tuple[int, Sequence[int]]], bins: int = 15,
                 regions: bool = False) -> None:
        self.folder, self.structures, self.bins, self.regions = folder, dict(structures), bins, regions
        self.pooled = {name: BinaryCalibration(bins) for name in self.structures}
        self.missing: list[str] = []

    def case(self, case: str, reference: np.ndarray, affine: np.ndarray) -> dict[Any, dict[str, float]]:
        """ECE, Brier and NLL of every structure in one case (NaN when its probabilities were not saved)."""
        path = self.folder / f"{case}.npz"
        if not path.is_file():
            self.missing.append(case)
            return {name: dict.fromkeys(CALIBRATION_METRICS, float("nan")) for name in self.structures}
        probabilities, saved_affine = read_probabilities(path)
        if probabilities.shape[1:] != reference.shape or not np.allclose(saved_affine, affine, atol=1e-3):
            raise ValueError(f"{path}: grid {probabilities.shape[1:]} does not match the reference's "
                             f"{reference.shape} (shape or affine)")
        top = max(channel for channel, _ in self.structures.values())
        if probabilities.shape[0] <= top:
            raise ValueError(f"{path}: {probabilities.shape[0]} probability channel(s), but channel {top} is scored")
        if self.regions and probabilities.shape[0] != len(self.structures):
            raise ValueError(f"{path}: {probabilities.shape[0]} probability channel(s) for {len(self.structures)} "
                             "regions: not the probabilities of this region model")
        scores = {}
        for name, (channel, values) in self.structures.items():
            accumulator = BinaryCalibration(self.bins)
            accumulator.update(probabilities[channel], np.isin(reference, list(values)))
            self.pooled[name] += accumulator
            result = accumulator.result()
            scores[name] = {m: result[m] for m in CALIBRATION_METRICS}
        return scores

    def keep(self, names: Sequence[Any]) -> None:
        """Keep the pooled figures of these structures only (the classes the evaluation settled on)."""
        self.pooled = {name: self.pooled[name] for name in names if name in self.pooled}

    def summary(self) -> dict[str, Any]:
        """Pooled ECE/Brier/NLL per structure (over every voxel of every case) and the cases without a file."""
        pooled = {str(name): {m: acc.result()[m] for m in CALIBRATION_METRICS} for name, acc in self.pooled.items()}
        curves = {str(name): {k: acc.curve()[k].tolist() for k in ("confidence", "frequency", "count")}
                  for name, acc in self.pooled.items()}
        return {"pooled": pooled, "curves": curves, "missing_probabilities": sorted(self.missing)}


def structures_of(classes: Sequence[int] | None, regions: Mapping[str, Sequence[int]] | None
                  ) -> dict[Any, tuple[int, list[int]]]:
    """The channel and label values of each scored structure: class ``c`` is channel ``c``; region ``r`` (in
    order) is channel ``r``."""
    if regions:
        return {name: (r, list(values)) for r, (name, values) in enumerate(regions.items())}
    return {int(c): (int(c), [int(c)]) for c in classes or []}


def reliability_diagram(scores: CalibrationScores, path: Path) -> Path:
    """The pooled reliability diagram of every structure (all voxels of all cases), its ECE in the legend."""
    from medseg.evaluation.plots import reliability_lines

    curves = {f"{name} (ECE {acc.result()['ece']:.3f})": acc.curve() for name, acc in scores.pooled.items()}
    return reliability_lines(curves, path, "reliability (all voxels of all cases)")
