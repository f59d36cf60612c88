"""``medseg evaluate`` for segmentation: prediction folder + references -> per_case.csv, summary.csv/json.

Cases present on one side only are reported (in the summary and on the console), never silently dropped. So are
prediction voxels whose label value the truth does not declare (``undeclared_labels``): they score as background.
A ``dataset.json`` that declares regions (overlapping sets of label values) is scored per region: the ``class``
column then holds the region's name.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.data.datalist import case_id, load_dataset
from medseg.data.io import (
    DEFAULT_MAX_VOXELS,
    atomic_path,
    is_image_file,
    read_image,
    spacing_from_affine,
    write_csv,
)
from medseg.metrics.segmentation import METRICS, case_metrics, region_metrics

SUMMARY_STATS = ("mean", "std", "median", "n")


def reference_cases(
    truth: str | Path | dict[str, str],
) -> tuple[dict[str, str], list[int] | None, dict[str, list[int]] | None]:
    """Reference label files by case id, and what a ``dataset.json`` declares: its foreground classes, and its
    regions (name -> label values) when it has any.

    Args:
        truth: a folder of label files, a ``dataset.json`` (its labelled ``test`` cases, else ``training``),
            or already a mapping ``case id -> label file``.
    """
    if isinstance(truth, dict):
        return dict(truth), None, None
    truth = Path(truth)
    if truth.is_file() or (truth / "dataset.json").is_file():
        spec = load_dataset(truth)
        cases = [c for c in spec.test if c["label"]] or spec.training
        regions = {name: list(values) for name, values in spec.regions} if spec.regions else None
        return {c["id"]: c["label"] for c in cases}, [k for k in spec.labels if k > 0], regions
    files = sorted(p for p in truth.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
    return {case_id(p): str(p) for p in files}, None, None


def evaluate_segmentation(
    pred: str | Path,
    truth: str | Path | dict[str, str],
    output: str | Path,
    nsd_tolerance_mm: float = 1.0,
    empty_distance: float = float("nan"),
    classes: list[int] | None = None,
    regions: dict[str, list[int]] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> dict[str, Any]:
    """Score every prediction ``<pred>/<case>.nii.gz`` against its reference; write the tables.

    ``classes`` (foreground label values) overrides what the references declare or contain; ``regions``
    (name -> label values; default: what a ``dataset.json`` declares) scores regions instead of classes.
    ``max_voxels`` bounds what an image header may claim.

    Returns:
        The summary dict written to ``summary.json``.
    """
    pred, output = Path(pred), Path(output)
    references, declared, declared_regions = reference_cases(truth)
    classes = classes or declared
    regions = regions or declared_regions
    predictions = {case_id(p): str(p) for p in pred.glob("*") if is_image_file(p) and not p.name.startswith(".")}
    matched = sorted(set(references) & set(predictions))
    declared_values = None if classes is None else {0, *classes}
    rows: list[dict[str, Any]] = []
    predicted: dict[str, dict[float, int]] = {}  # voxels of each predicted value, per case
    in_truth: set[float] = set()  # label values the reference files hold
    for case in tqdm(matched, desc="evaluating", unit="case"):
        reference, affine = read_image(references[case], max_voxels=max_voxels)
        prediction, pred_affine = read_image(predictions[case], max_voxels=max_voxels)
        if prediction.shape != reference.shape or not np.allclose(pred_affine, affine, atol=1e-3):
            raise ValueError(f"{predictions[case]}: grid {prediction.shape} does not match the reference "
                             f"{references[case]} {reference.shape} (shape or affine)")
        values, counts = np.unique(prediction, return_counts=True)
        predicted[case] = {float(v): int(n) for v, n in zip(values, counts, strict=True)}
        if declared_values is None:
            in_truth |= {float(v) for v in np.unique(reference)}
        spacing = spacing_from_affine(affine, reference.ndim)
        if regions:
            scores: dict[Any, dict[str, float]] = region_metrics(
                prediction.round(), reference.round(), spacing, regions, nsd_tolerance_mm, empty_distance)
        else:
            found = classes or sorted(int(v) for v in set(np.unique(reference).tolist()) | set(predicted[case]) if v > 0)
            scores = case_metrics(prediction.round(), reference.round(), spacing, found, nsd_tolerance_mm, empty_distance)
        rows += [{"case": case, "class": c, **values} for c, values in scores.items()]
    summary = summarize(rows)
    summary["cases"] = len(matched)
    summary["missing_predictions"] = sorted(set(references) - set(predictions))
    summary["unmatched_predictions"] = sorted(set(predictions) - set(references))
    summary["conventions"] = _convention_counts(rows)
    summary["undeclared_labels"] = _undeclared(predicted, declared_values, in_truth, predictions)
    output.mkdir(parents=True, exist_ok=True)
    write_csv(output / "per_case.csv", rows, ["case", "class", *METRICS])
    write_csv(output / "summary.csv", _summary_rows(summary), ["class", "metric", *SUMMARY_STATS])
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(_nan_to_none(summary), handle, indent=2)
    return summary


def _undeclared(predicted: dict[str, dict[float, int]], declared: set[int] | None, in_truth: set[float],
                files: dict[str, str]) -> dict[str, Any]:
    """Predicted label values the truth does not declare, warned per file and counted.

    With declared classes (a ``dataset.json``, or ``classes``), other values count as background in the scores.
    With a folder of label files, the values those files hold are the declared ones; another value is scored
    as a class of its own (Dice 0 where the truth has none).
    """
    allowed = {float(v) for v in declared} if declared is not None else in_truth
    effect = "they count as background" if declared is not None else "they are scored as a class of their own"
    by_case: dict[str, dict[str, int]] = {}
    for case, counts in predicted.items():
        extra = {v: n for v, n in counts.items() if v not in allowed}
        if extra:
            shown = sorted(int(v) if v.is_integer() else v for v in extra)
            by_case[case] = {f"{v:g}": n for v, n in extra.items()}
            print(f"warning: {files[case]}: label value(s) {shown} ({sum(extra.values())} voxel(s)) are not in the "
                  f"truth's labels {sorted(int(v) if v.is_integer() else v for v in allowed)}; {effect}",
                  file=sys.stderr)
    return {"cases": len(by_case), "voxels": sum(sum(v.values()) for v in by_case.values()), "by_case": by_case}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std, median and count (NaN ignored) of each metric per class, and the foreground mean
    (the mean over classes of the per-class means)."""
    per_class: dict[str, Any] = {}
    names = list(dict.fromkeys(r["class"] for r in rows))  # regions: in their declared order
    for c in sorted(names) if all(isinstance(c, int) for c in names) else names:
        per_class[str(c)] = {m: _stats([r[m] for r in rows if r["class"] == c]) for m in METRICS}
    foreground = {
        m: float(np.nanmean([v[m]["mean"] for v in per_class.values()])) if per_class else float("nan")
        for m in METRICS
    }
    return {"per_class": per_class, "foreground_mean": foreground}


def _stats(values: list[float]) -> dict[str, float]:
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not len(finite):
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
            "median": float(np.median(finite)), "n": int(len(finite))}


def _convention_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many case/class pairs hit an empty-mask convention (see medseg.metrics.segmentation)."""
    both = sum(1 for r in rows if math.isnan(r["sensitivity"]) and math.isnan(r["precision"]))
    missed = sum(1 for r in rows if r["sensitivity"] == 0.0 and math.isnan(r["precision"]))
    spurious = sum(1 for r in rows if r["precision"] == 0.0 and math.isnan(r["sensitivity"]))
    return {"both_empty": both, "prediction_empty": missed, "reference_empty": spurious}


def _summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"class": c, "metric": m, **s} for c, metrics in summary["per_class"].items() for m, s in metrics.items()]
    rows += [{"class": "foreground", "metric": m, "mean": v, "std": "", "median": "", "n": ""}
             for m, v in summary["foreground_mean"].items()]
    return rows


def _nan_to_none(value: Any) -> Any:
    """NaN is not JSON: it becomes ``null``."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate_classification(predictions: str | Path, truth: str | Path, output: str | Path) -> dict[str, Any]:
    """Score ``predictions.csv`` (from ``medseg predict``) against the dataset's class labels.

    Writes ``summary.json``/``summary.csv`` (every metric of :func:`classification_metrics`), ``roc.png``,
    ``reliability.png`` and ``confusion.png``. Cases on one side only are listed in the summary.
    """
    from medseg.evaluation.plots import confusion_png, reliability_png, roc_png
    from medseg.metrics.classification import classification_metrics

    predictions, output = Path(predictions), Path(output)
    table = predictions / "predictions.csv" if predictions.is_dir() else predictions
    spec = load_dataset(truth)
    labels = {c["id"]: c["label"] for c in spec.training + spec.test if c["label"] is not None}
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = spec.label_names
    missing_columns = [f"p_{n}" for n in names if f"p_{n}" not in (rows[0] if rows else {})]
    if missing_columns:
        raise ValueError(f"{table}: no column(s) {missing_columns} for the dataset's classes")
    matched = [r for r in rows if r["case"] in labels]
    y_true = np.array([labels[r["case"]] for r in matched])
    probabilities = np.array([[float(r[f"p_{n}"]) for n in names] for r in matched])
    summary: dict[str, Any] = classification_metrics(y_true, probabilities, names)
    summary["cases"] = len(matched)
    summary["missing_predictions"] = sorted(set(labels) - {r["case"] for r in rows})
    summary["unmatched_predictions"] = sorted({r["case"] for r in rows} - set(labels))
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(_nan_to_none(summary), handle, indent=2)
    scalar = [{"metric": k, "value": v} for k, v in summary.items() if isinstance(v, (int, float))]
    write_csv(output / "summary.csv", scalar, ["metric", "value"])
    roc_png(y_true, probabilities, names, output / "roc.png")
    reliability_png(y_true, probabilities, output / "reliability.png")
    confusion_png(y_true, probabilities.argmax(axis=1), names, output / "confusion.png")
    return summary
