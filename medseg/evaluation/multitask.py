"""``medseg evaluate`` of a multitask model: its label maps scored as segmentation, its image-level classes
(``predictions.csv``) as classification, on the same cases of the dataset.

Output folder::

    segmentation/     per_case.csv, summary.csv, summary.json (:func:`medseg.evaluation.evaluate.evaluate_segmentation`)
    classification/   summary.json, summary.csv, roc.png, reliability.png, confusion.png, patients.csv
                      (:func:`medseg.evaluation.classes.score_classes`)
    summary.json      {"segmentation": ..., "classification": ..., "cases", "missing_predictions"}

The scored cases are the dataset's test cases that carry a label map or a class, else its training cases (as
segmentation picks its references). Refused in one line before anything is scored: a class index outside the
declared classes, a folder without a label map of any scored case (a classifier's ``predictions.csv``) or a table
without a row of any; the classes are scored first, so a patient refusal comes before the label maps are read.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from medseg.data.datalist import MULTITASK, load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path
from medseg.evaluation.classes import check_class_indices, score_classes
from medseg.evaluation.evaluate import evaluate_segmentation, nan_to_none, prediction_files
from medseg.evaluation.patients import patient_line
from medseg.metrics.conventions import EmptyMaskRules


def evaluate_multitask(
    pred: str | Path,
    truth: str | Path,
    output: str | Path,
    nsd_tolerance_mm: float = 1.0,
    rules: EmptyMaskRules | None = None,
    classes: list[int] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    probabilities: str | Path | None = None,
    patient_aggregate: str | None = None,
) -> dict[str, Any]:
    """Score a multitask prediction folder (``<case>.nii.gz`` and ``predictions.csv``) against a multitask
    ``dataset.json``; see the module docstring.

    Args:
        classes: foreground label values to score (default: the dataset's ``labels``).
        probabilities: saved segmentation probabilities (see :func:`evaluate_segmentation`).
        patient_aggregate: ``mean`` or ``max``: also score the image-level classes per patient
            (:mod:`medseg.evaluation.patients`).

    Returns:
        The summary written to ``output/summary.json``.
    """
    pred, output = Path(pred), Path(output)
    folder = pred.parent if pred.suffix == ".csv" else pred
    spec = load_dataset(truth)
    if spec.task != MULTITASK:
        raise ValueError(f"{spec.source}: a {spec.task} dataset; multitask predictions are scored against a "
                         "\"task\": \"multitask\" dataset.json")
    table = folder / "predictions.csv"
    if not table.is_file():
        raise ValueError(f"{table}: not found; `medseg predict` with a multitask model writes each case's "
                         "image-level class there beside its label map")
    cases = [c for c in spec.test if c["label"] or c["class"] is not None] or spec.training
    where = "test" if cases is not spec.training else "training"
    references = {c["id"]: c["label"] for c in cases if c["label"]}
    labels = {c["id"]: c["class"] for c in cases if c["class"] is not None}
    for side, found in (("label map ('label')", references), ("image-level class ('class')", labels)):
        if not found:
            raise ValueError(f"{spec.source}: no {where} case has a {side}, so that side cannot be scored")
    check_class_indices(labels, spec.class_names or [], spec.source, "class")
    _check_predicted(folder, table, references, labels, where, bool(spec.test) and where == "training")
    # The classes first: a refusal (a patient whose cases disagree) comes before the label maps are read.
    classification = score_classes(table, labels, spec.class_names or [], output / "classification",
                                   {c["id"]: c["patient"] for c in spec.training + spec.test}, patient_aggregate)
    segmentation = evaluate_segmentation(folder, references, output / "segmentation", nsd_tolerance_mm, rules,
                                         classes=classes or [k for k in spec.labels if k > 0],
                                         max_voxels=max_voxels, probabilities=probabilities, names=dict(spec.labels))
    summary = {
        "cases": len(cases),
        "missing_predictions": sorted(set(segmentation["missing_predictions"])
                                      | set(classification["missing_predictions"])),
        "segmentation": segmentation,
        "classification": classification,
    }
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(nan_to_none(summary), handle, indent=2)
    return summary


def _check_predicted(folder: Path, table: Path, references: dict[str, str], labels: dict[str, int], where: str,
                     test_unlabelled: bool) -> None:
    """Refuse a folder that holds no label map, or a table that holds no row, of the scored cases: a classifier's
    ``predictions.csv``, or predictions of other cases (those of the ``test`` list when it is unlabelled)."""
    hint = " (its 'test' cases carry neither 'label' nor 'class', so its 'training' cases are scored)" \
        if test_unlabelled else ""
    if not set(references) & set(prediction_files(folder)):
        raise ValueError(f"{folder}: no label map of the dataset's {len(references)} {where} case(s) (e.g. "
                         f"{min(references)}.nii.gz){hint}; a multitask evaluation scores the label maps and "
                         "predictions.csv that `medseg predict` writes with a multitask model")
    with table.open(newline="") as handle:
        rows = {row.get("case") for row in csv.DictReader(handle)}
    if not set(labels) & rows:
        raise ValueError(f"{table}: no row of the dataset's {len(labels)} {where} case(s) with a class (e.g. "
                         f"{min(labels)}){hint}")


def report_multitask(summary: dict[str, Any], output: str | Path) -> int:
    """Print both sides' scores; exit code 1 when either side misses a prediction."""
    seg, cls = summary["segmentation"], summary["classification"]
    fg, hits = seg["foreground_mean"], seg["conventions"]
    print(f"segmentation: {seg['cases']} case(s): foreground mean Dice {fg['dice']:.4f}, HD95 {fg['hd95']:.2f} mm, "
          f"NSD {fg['nsd']:.4f} ({hits['prediction_empty']} missed, {hits['reference_empty']} spurious "
          f"structure(s)); {Path(output) / 'segmentation'}")
    print(f"classification: {cls['cases']} case(s): accuracy {cls['accuracy']:.4f}, AUC {cls['auc']:.4f}, macro F1 "
          f"{cls['f1_macro']:.4f}, ECE {cls['ece']:.4f}; {Path(output) / 'classification'}")
    if cls.get("patients"):
        print(patient_line(cls["patients"], "classification/patients.csv"))
    for side, scored in (("segmentation", seg), ("classification", cls)):
        for key in ("missing_predictions", "unmatched_predictions"):
            if scored[key]:
                print(f"  {side}: {key.replace('_', ' ')}: {', '.join(scored[key])}", file=sys.stderr)
    if seg["undeclared_labels"]["cases"]:
        print(f"  undeclared label values: {seg['undeclared_labels']['voxels']} voxel(s) in "
              f"{seg['undeclared_labels']['cases']} case(s) (segmentation/summary.json)", file=sys.stderr)
    return 1 if summary["missing_predictions"] else 0
