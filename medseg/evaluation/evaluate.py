"""``medseg evaluate`` for segmentation: prediction folder + references -> per_case.csv, summary.csv/json.

Cases present on one side only are reported (in the summary and on the console), never silently dropped. So are
prediction voxels whose label value the truth does not declare (``undeclared_labels``): they score as background.
A ``dataset.json`` that declares regions (overlapping sets of label values) is scored per region: the ``class``
column then holds the region's name.

Every row names its structure (the ``name`` column of ``per_case.csv`` and ``summary.csv``, ``name`` in each
``per_class`` entry of ``summary.json``): a class's name from the ``dataset.json`` ``labels``, a region's name, or,
without names (a folder of labels), the label value as text. The size difference is ``volume_diff_ml`` for 3D
images and ``area_diff_mm2`` for 2D ones (:func:`medseg.metrics.segmentation.metric_names`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
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
from medseg.errors import InputError
from medseg.evaluation.calibration_scores import (
    CALIBRATION_METRICS,
    CalibrationScores,
    probability_layout,
    reliability_diagram,
    structures_of,
)
from medseg.metrics.conventions import EmptyMaskRules
from medseg.metrics.segmentation import both_empty_metrics, case_metrics, metric_names, region_metrics

SUMMARY_STATS = ("mean", "std", "median", "n", "undefined")
# Metrics whose NaN comes from an explicit request (--both-empty nan, --empty-distance nan): warned when averaged.
RULED_METRICS = ("dice", "iou", "nsd", "hd95", "assd")


def reference_cases(
    truth: str | Path | dict[str, str],
) -> tuple[dict[str, str], list[int] | None, dict[str, list[int]] | None, dict[int, str] | None]:
    """Reference label files by case id, and what a ``dataset.json`` declares: its foreground classes, its
    regions (name -> label values) when it has any, and its label names (value -> name).

    Args:
        truth: a folder of label files, a ``dataset.json`` (its labelled ``test`` cases, else ``training``),
            or already a mapping ``case id -> label file``.
    """
    if isinstance(truth, dict):
        return dict(truth), None, None, None
    truth = Path(truth)
    if truth.is_file() or (truth / "dataset.json").is_file():
        spec = load_dataset(truth)
        cases = [c for c in spec.test if c["label"]] or spec.training
        regions = {name: list(values) for name, values in spec.regions} if spec.regions else None
        return {c["id"]: c["label"] for c in cases}, [k for k in spec.labels if k > 0], regions, dict(spec.labels)
    files = sorted(p for p in truth.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
    return {case_id(p): str(p) for p in files}, None, None, None


def evaluate_segmentation(
    pred: str | Path,
    truth: str | Path | dict[str, str],
    output: str | Path,
    nsd_tolerance_mm: float = 1.0,
    rules: EmptyMaskRules | None = None,
    classes: list[int] | None = None,
    regions: dict[str, list[int]] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    probabilities: str | Path | None = None,
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Score every prediction ``<pred>/<case>.nii.gz`` against its reference; write the tables.

    Every case is scored on the same classes, however the truth is given: ``classes`` (foreground label
    values, ``--labels``), else those a ``dataset.json`` declares, else every foreground value the reference
    files hold. A class absent from a case's reference and prediction scores by ``rules.both_empty``; a
    predicted value outside those classes counts as background (and is reported, see ``undeclared_labels``).
    ``regions`` (name -> label values; default: what a ``dataset.json`` declares) scores regions instead.
    ``rules`` are the empty-mask rules (:mod:`medseg.metrics.conventions`); ``max_voxels`` bounds what an
    image header may claim. ``probabilities`` (default ``<pred>/probabilities`` when it exists, from ``medseg
    predict --save-probabilities``) adds ECE, Brier and NLL per case and structure, their pooled values, and
    ``reliability.png``. ``names`` (label value -> name; default: a ``dataset.json``'s ``labels``, else the
    value as text) fill the ``name`` column; a region's name is its own.

    The size difference is ``volume_diff_ml`` for 3D images and ``area_diff_mm2`` for 2D ones; every case must
    have the dimensionality of the first.

    Returns:
        The summary dict written to ``summary.json``.
    """
    pred, output, rules = Path(pred), Path(output), rules or EmptyMaskRules()
    references, declared, declared_regions, declared_names = reference_cases(truth)
    if classes and declared_regions and not regions:
        raise ValueError(f"{truth}: declares regions, which are scored instead of label values: leave out --labels")
    classes = classes or declared
    regions = regions or declared_regions
    names = names or declared_names or {}
    predictions = prediction_files(pred)
    matched = sorted(set(references) & set(predictions))
    calibration = _calibration(pred, probabilities, matched, classes, regions)
    calibrated: dict[tuple[str, Any], dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    predicted: dict[str, dict[float, int]] = {}  # voxels of each predicted value, per case
    in_truth: set[float] = set()  # label values the reference files hold
    first: tuple[int, str] | None = None  # the dimensionality of the first reference, and its file
    for case in tqdm(matched, desc="evaluating", unit="case"):
        prediction, reference, affine = read_on_one_grid(predictions[case], references[case], max_voxels)
        first = first or (reference.ndim, references[case])
        if reference.ndim != first[0]:
            raise ValueError(f"{references[case]}: a {reference.ndim}D image, but {first[1]} is {first[0]}D: the "
                             "cases of one evaluation must all be 2D or all 3D")
        values, counts = np.unique(prediction, return_counts=True)
        predicted[case] = {float(v): int(n) for v, n in zip(values, counts, strict=True)}
        truth_values = {float(v) for v in np.unique(reference)}
        in_truth |= truth_values
        # without declared classes: every value either side holds; those the truth never holds go below
        found = classes or sorted(int(v) for v in truth_values | set(predicted[case]) if v > 0)
        scores = score_case(prediction, reference, affine, found, regions, nsd_tolerance_mm, rules)
        rows += [{"case": case, "class": c, **values} for c, values in scores.items()]
        if calibration is not None:
            calibrated |= {(case, c): v for c, v in calibration.case(case, reference, affine).items()}
    ndim = first[0] if first else 3
    if not regions and classes is None:  # the classes are those the reference files hold, in every case
        classes = sorted(int(v) for v in in_truth if v > 0)
        rows = _on_classes(rows, matched, classes, rules, ndim)
    rows = [{**row, "name": row["class"] if regions else names.get(row["class"], str(row["class"]))}
            for row in rows]
    metrics = list(metric_names(ndim))
    if calibration is not None:
        metrics += CALIBRATION_METRICS
        calibration.keep(list(regions) if regions else classes)
        nan = dict.fromkeys(CALIBRATION_METRICS, float("nan"))
        rows = [{**row, **calibrated.get((row["case"], row["class"]), nan)} for row in rows]
    scored_values = {v for values in regions.values() for v in values} if regions else set(classes)
    declared_values = {0.0, *(float(v) for v in scored_values)}
    summary_absent = _absent_classes([] if regions else classes, in_truth)
    summary = summarize(rows, metrics)
    summary["cases"] = len(matched)
    summary["classes"] = list(regions) if regions else classes
    summary["missing_predictions"] = sorted(set(references) - set(predictions))
    summary["unmatched_predictions"] = sorted(set(predictions) - set(references))
    summary["rules"] = rules.describe()
    summary["conventions"] = _convention_counts(rows)
    summary["left_out"] = left_out(summary)
    summary["undeclared_labels"] = _undeclared(predicted, declared_values, predictions)
    summary["absent_classes"] = summary_absent
    output.mkdir(parents=True, exist_ok=True)
    if calibration is not None:
        summary["calibration"] = calibration.summary()
        reliability_diagram(calibration, output / "reliability.png")
    write_csv(output / "per_case.csv", rows, ["case", "class", "name", *metrics])
    write_csv(output / "summary.csv", _summary_rows(summary), ["class", "name", "metric", *SUMMARY_STATS])
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(nan_to_none(summary), handle, indent=2)
    return summary


class GridMismatch(InputError):
    """A prediction that does not lie on its reference's grid (shape or affine)."""


def prediction_files(pred: str | Path) -> dict[str, str]:
    """The label maps of a prediction folder by case id (every image file but hidden ones)."""
    return {case_id(p): str(p) for p in Path(pred).glob("*") if is_image_file(p) and not p.name.startswith(".")}


def read_on_one_grid(prediction_file: str | Path, reference_file: str | Path,
                     max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prediction and its reference, read: ``(prediction, reference, affine)``.

    Raises:
        GridMismatch: naming the prediction file, when its shape or affine is not the reference's.
    """
    reference, affine = read_image(reference_file, max_voxels=max_voxels)
    prediction, pred_affine = read_image(prediction_file, max_voxels=max_voxels)
    if prediction.shape != reference.shape or not np.allclose(pred_affine, affine, atol=1e-3):
        raise GridMismatch(f"{prediction_file}: grid {prediction.shape} does not match the reference "
                           f"{reference_file} {reference.shape} (shape or affine)")
    return prediction, reference, affine


def score_case(prediction: np.ndarray, reference: np.ndarray, affine: np.ndarray, classes: list[int],
               regions: dict[str, list[int]] | None, nsd_tolerance_mm: float,
               rules: EmptyMaskRules) -> dict[Any, dict[str, float]]:
    """One case's metrics (mm from ``affine``) per class of ``classes``, or per region when ``regions``."""
    spacing = spacing_from_affine(affine, reference.ndim)
    if regions:
        return region_metrics(prediction.round(), reference.round(), spacing, regions, nsd_tolerance_mm, rules)
    return case_metrics(prediction.round(), reference.round(), spacing, classes, nsd_tolerance_mm, rules)


def _calibration(pred: Path, probabilities: str | Path | None, cases: list[str], classes: list[int] | None,
                 regions: dict[str, list[int]] | None) -> CalibrationScores | None:
    """The calibration scorer of the saved probabilities, or ``None`` when there are none. Without declared
    classes every foreground channel is scored (the classes are settled after the last case)."""
    folder = Path(probabilities) if probabilities is not None else pred / "probabilities"
    if probabilities is not None and not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of probabilities (medseg predict --save-probabilities)")
    first = next((folder / f"{case}.npz" for case in cases if (folder / f"{case}.npz").is_file()), None)
    if first is None:
        if probabilities is not None:
            raise ValueError(f"{folder}: no <case>.npz of the {len(cases)} evaluated case(s) (medseg predict "
                             "--save-probabilities writes them)")
        return None
    channels, written_regions = probability_layout(first)
    if written_regions and not regions:
        raise ValueError(f"{first}: probabilities of a region model ({len(written_regions)} regions); give the "
                         "dataset.json that declares the regions as --truth")
    if not regions and classes is None:
        classes = list(range(1, channels))
    return CalibrationScores(folder, structures_of(classes, regions), regions=bool(regions))


def _on_classes(rows: list[dict[str, Any]], cases: list[str], classes: list[int],
                rules: EmptyMaskRules, ndim: int = 3) -> list[dict[str, Any]]:
    """The rows of ``classes`` only, with a both-empty row where a case had none of a class on either side."""
    scored = {(r["case"], r["class"]): r for r in rows}
    return [scored.get((case, c)) or {"case": case, "class": c, **both_empty_metrics(rules, ndim)}
            for case in cases for c in classes]


def _absent_classes(classes: list[int], in_truth: set[float]) -> list[int]:
    """Scored classes that no reference file holds, warned about: each case that does not predict them scores 1
    (both empty), which raises the mean without any evidence."""
    absent = [c for c in classes if float(c) not in in_truth]
    if absent:
        print(f"warning: class(es) {absent} are in no reference file: every case that does not predict them scores "
              "Dice 1 there (both empty), which raises the means; check --labels or the dataset's labels",
              file=sys.stderr)
    return absent


def _undeclared(predicted: dict[str, dict[float, int]], declared: set[float], files: dict[str, str]) -> dict[str, Any]:
    """Predicted label values outside the scored ones (``declared``: background and the scored classes, or the
    label values of the regions), warned per file and counted; they count as background in the scores."""
    allowed = declared
    effect = "they count as background"
    by_case: dict[str, dict[str, int]] = {}
    for case, counts in predicted.items():
        extra = {v: n for v, n in counts.items() if v not in allowed}
        if extra:
            shown = sorted(int(v) if v.is_integer() else v for v in extra)
            by_case[case] = {f"{v:g}": n for v, n in extra.items()}
            print(f"warning: {files[case]}: label value(s) {shown} ({sum(extra.values())} voxel(s)) are not among the "
                  f"scored labels {sorted(int(v) if v.is_integer() else v for v in allowed)}; {effect}",
                  file=sys.stderr)
    return {"cases": len(by_case), "voxels": sum(sum(v.values()) for v in by_case.values()), "by_case": by_case}


def summarize(rows: list[dict[str, Any]], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean, std, median and count of each metric per class, and the foreground mean (the mean over classes of
    the per-class means). NaN values are left out of the statistics and counted as ``undefined``.

    ``metrics`` default to those of the rows' dimensionality (:func:`metric_names`); each class's entry holds
    its ``name`` too when the rows do.
    """
    if metrics is None:
        metrics = metric_names(2 if rows and "area_diff_mm2" in rows[0] else 3)
    per_class: dict[str, Any] = {}
    classes = list(dict.fromkeys(r["class"] for r in rows))  # regions: in their declared order
    for c in sorted(classes) if all(isinstance(c, int) for c in classes) else classes:
        mine = [r for r in rows if r["class"] == c]
        per_class[str(c)] = {"name": str(mine[0]["name"])} if "name" in mine[0] else {}
        per_class[str(c)] |= {m: _stats([r[m] for r in mine]) for m in metrics}
    foreground = {
        m: float(np.nanmean([v[m]["mean"] for v in per_class.values()])) if per_class else float("nan")
        for m in metrics
    }
    return {"per_class": per_class, "foreground_mean": foreground}


def _stats(values: list[float]) -> dict[str, float]:
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    undefined = len(values) - len(finite)
    if not len(finite):
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0, "undefined": undefined}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
            "median": float(np.median(finite)), "n": int(len(finite)), "undefined": undefined}


def left_out(summary: dict[str, Any]) -> dict[str, int]:
    """How many case/class pairs each of :data:`RULED_METRICS` left out of its means (NaN by request)."""
    counts = {m: sum(stats[m]["undefined"] for stats in summary["per_class"].values()) for m in RULED_METRICS}
    return {m: n for m, n in counts.items() if n}


def _convention_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many case/class pairs hit an empty-mask rule (see medseg.metrics.conventions): both empty, a missed
    structure (prediction empty) and a spurious one (reference empty); the last two get the distance penalty."""
    both = sum(1 for r in rows if math.isnan(r["sensitivity"]) and math.isnan(r["precision"]))
    missed = sum(1 for r in rows if r["sensitivity"] == 0.0 and math.isnan(r["precision"]))
    spurious = sum(1 for r in rows if r["precision"] == 0.0 and math.isnan(r["sensitivity"]))
    return {"both_empty": both, "prediction_empty": missed, "reference_empty": spurious}


def _summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"class": c, "name": entry.get("name", c), "metric": m, **s}
            for c, entry in summary["per_class"].items() for m, s in entry.items() if m != "name"]
    rows += [{"class": "foreground", "name": "foreground", "metric": m, "mean": v, "std": "", "median": "", "n": "",
              "undefined": ""} for m, v in summary["foreground_mean"].items()]
    return rows


def nan_to_none(value: Any) -> Any:
    """NaN is not JSON: it becomes ``null``."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
