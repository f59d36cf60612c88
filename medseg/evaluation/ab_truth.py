"""Scores of an A/B log's kept predictions against reference label maps (``medseg ab-report --truth``).

A request is scored when its case has a reference label and its ``prediction`` file exists; the others are
counted per arm (no reference, no kept prediction). Each scored request gets, per structure, the metrics ``medseg
evaluate`` gives (:func:`medseg.metrics.segmentation.case_metrics` or ``region_metrics``, empty masks by the rules
of :mod:`medseg.metrics.conventions`), on the classes the truth declares: a ``dataset.json``'s labels or regions,
else every foreground value the scored references hold (a class absent from both masks of a request scores by the
both-empty rule). A kept prediction that does not lie on its reference's grid (shape or affine) is not scored:
it is counted (``grid_mismatch``) and listed, and the others are scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.datalist import load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS
from medseg.errors import InputError
from medseg.evaluation.ab_log import ABLog
from medseg.evaluation.evaluate import GridMismatch, read_on_one_grid, reference_cases, score_case
from medseg.metrics.conventions import EmptyMaskRules
from medseg.metrics.segmentation import both_empty_metrics, metric_names

SHOWN_MISSING = 5  # missing prediction files named in the summary


@dataclass
class Truth:
    """Reference label maps by case id, and what the description declares."""

    source: str
    references: dict[str, str]
    classes: list[int] | None = None
    regions: dict[str, list[int]] | None = None
    names: dict[int, str] = field(default_factory=dict)


@dataclass
class TruthScores:
    """Per-request, per-structure scores of the two arms.

    Attributes:
        rows: ``request, case, patient, model, structure, <metrics>`` per scored request and structure.
        metrics: the metric columns (:func:`medseg.metrics.segmentation.metric_names`).
        structures: the structures' names, in order.
        counts: ``arm -> {"scored", "no_reference", "no_prediction", "grid_mismatch"}`` over the arm's answered
            requests.
        missing_files: the first prediction files the log names that do not exist.
        grid_mismatches: ``{"request", "case", "model", "prediction", "reason"}`` of each kept prediction not on
            its reference's grid.
    """

    rows: list[dict[str, Any]]
    metrics: tuple[str, ...]
    structures: list[str]
    counts: dict[str, dict[str, int]]
    missing_files: list[str]
    grid_mismatches: list[dict[str, str]] = field(default_factory=list)


def load_truth(truth: str | Path) -> Truth:
    """The references of ``truth``: a ``dataset.json`` (or its folder; every case of ``training`` and ``test``
    with a label) or a folder of label maps ``<case>.nii.gz``."""
    path = Path(truth)
    if not path.exists():
        raise InputError(f"{path}: no such dataset.json or folder of label maps")
    if path.is_file() or (path / "dataset.json").is_file():
        spec = load_dataset(path)
        references = {c["id"]: c["label"] for c in spec.training + spec.test if c.get("label")}
        regions = {name: list(values) for name, values in spec.regions} if spec.regions else None
        return Truth(str(spec.source), references, [k for k in spec.labels if k > 0], regions, dict(spec.labels))
    references = reference_cases(path)[0]
    if not references:
        raise InputError(f"{path}: no label map (<case>.nii.gz) in this folder")
    return Truth(str(path), references)


def prediction_file(text: str, log_folder: Path) -> Path | None:
    """The kept label map a log row names: an absolute path, else relative to the log's folder, else to the
    current folder (where ``medseg serve`` ran); ``None`` when the row names none or the file does not exist."""
    if not text:
        return None
    path = Path(text)
    for candidate in ([path] if path.is_absolute() else [log_folder / path, Path.cwd() / path]):
        if candidate.is_file():
            return candidate
    return None


def score_log(log: ABLog, truth: Truth, rules: EmptyMaskRules | None = None,
              max_voxels: int = DEFAULT_MAX_VOXELS, nsd_tolerance_mm: float = 1.0) -> TruthScores:
    """Score every answered request of both arms that has a reference and a kept prediction."""
    rules = rules or EmptyMaskRules()
    counts = {arm: {"scored": 0, "no_reference": 0, "no_prediction": 0, "grid_mismatch": 0} for arm in log.arms}
    missing: list[str] = []
    mismatches: list[dict[str, str]] = []
    scored: list[tuple[dict[str, Any], dict[Any, dict[str, float]]]] = []
    held: set[int] = set()  # foreground values the scored references hold
    ndim = None
    for row in (r for arm in log.arms for r in log.of(arm)):
        tally = counts[row["model"]]
        if row["case"] not in truth.references:
            tally["no_reference"] += 1
            continue
        file = prediction_file(row["prediction"], log.path.parent)
        if file is None:
            tally["no_prediction"] += 1
            if row["prediction"] and len(missing) < SHOWN_MISSING:
                missing.append(row["prediction"])
            continue
        try:
            scores, values, ndim = _score_one(row["case"], file, truth, rules, max_voxels, nsd_tolerance_mm, ndim)
        except GridMismatch as err:
            tally["grid_mismatch"] += 1
            mismatches.append({"request": row["request"], "case": row["case"], "model": row["model"],
                               "prediction": str(file), "reason": str(err)})
            continue
        held |= values
        scored.append((row, scores))
        tally["scored"] += 1
    metrics = metric_names(ndim or 3)
    keys: list[Any] = list(truth.regions) if truth.regions else (truth.classes or sorted(held))
    names = {k: k if truth.regions else truth.names.get(k) or str(k) for k in keys}
    empty = both_empty_metrics(rules, ndim or 3)
    rows = [{"request": row["request"], "case": row["case"], "patient": row["patient"], "model": row["model"],
             "structure": names[k], **{m: scores.get(k, empty)[m] for m in metrics}}
            for row, scores in scored for k in keys]
    return TruthScores(rows, metrics, [names[k] for k in keys], counts, missing, mismatches)


def _score_one(case: str, file: Path, truth: Truth, rules: EmptyMaskRules, max_voxels: int, nsd_tolerance_mm: float,
               ndim: int | None) -> tuple[dict[Any, dict[str, float]], set[int], int]:
    """One kept prediction against its case's reference: the scores by class (or region), the foreground values
    the reference holds, and its dimensionality (which must be that of the requests scored before)."""
    reference_file = truth.references[case]
    prediction, reference, affine = read_on_one_grid(file, reference_file, max_voxels)
    if ndim is not None and reference.ndim != ndim:
        raise InputError(f"{reference_file}: a {reference.ndim}D image, but the requests scored before are {ndim}D")
    in_reference = {int(v) for v in np.unique(reference) if v > 0}
    found = truth.classes or sorted(in_reference | {int(v) for v in np.unique(prediction) if v > 0})
    return (score_case(prediction, reference, affine, found, truth.regions or None, nsd_tolerance_mm, rules),
            in_reference, reference.ndim)
