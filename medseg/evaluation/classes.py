"""``medseg evaluate`` for image-level classes: ``predictions.csv`` (a classifier's, or a multitask model's) against
the dataset's classes, per case and, with ``patient_aggregate``, per patient (:mod:`medseg.evaluation.patients`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.datalist import load_dataset
from medseg.data.io import atomic_path, write_csv
from medseg.evaluation.evaluate import nan_to_none


def evaluate_classification(predictions: str | Path, truth: str | Path, output: str | Path,
                            patient_aggregate: str | None = None) -> dict[str, Any]:
    """Score ``predictions.csv`` (from ``medseg predict``) against the dataset's class labels.

    Writes ``summary.json``/``summary.csv`` (every metric of :func:`classification_metrics`), ``roc.png``,
    ``reliability.png`` and ``confusion.png``. Cases on one side only are listed in the summary.
    ``patient_aggregate`` (``mean`` or ``max``, :mod:`medseg.evaluation.patients`) also scores the patients of
    the dataset's ``patient`` ids into ``summary["patients"]`` and ``patients.csv``.
    """
    spec = load_dataset(truth)
    cases = spec.training + spec.test
    labels = {c["id"]: c["label"] for c in cases if c["label"] is not None}
    check_class_indices(labels, spec.label_names, spec.source, "label")
    return score_classes(predictions, labels, spec.label_names, output, {c["id"]: c["patient"] for c in cases},
                         patient_aggregate)


def check_class_indices(labels: dict[str, int], names: list[str], source: str | Path, key: str) -> None:
    """Refuse, naming ``source`` and the first such case, a class index outside ``0 .. len(names) - 1``."""
    wrong = sorted(case for case, value in labels.items() if not 0 <= value < len(names))
    if wrong:
        raise ValueError(f"{source}: case {wrong[0]!r} has {key} {labels[wrong[0]]}, not one of the {len(names)} "
                         f"declared classes (0..{len(names) - 1}: {names})"
                         + (f"; {len(wrong) - 1} more case(s) too" if len(wrong) > 1 else ""))


def score_classes(predictions: str | Path, labels: dict[str, int], names: list[str], output: str | Path,
                  patients: dict[str, str | None] | None = None,
                  patient_aggregate: str | None = None) -> dict[str, Any]:
    """:func:`evaluate_classification` on a truth already read: ``labels`` (case id -> class index) of the
    classes ``names``, and each case's patient id (``patients``) for ``patient_aggregate``."""
    from medseg.evaluation.plots import confusion_png, reliability_png, roc_png
    from medseg.metrics.classification import classification_metrics

    predictions, output = Path(predictions), Path(output)
    table = predictions / "predictions.csv" if predictions.is_dir() else predictions
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
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
    if patient_aggregate:
        from medseg.evaluation.patients import score_patients

        summary["patients"] = score_patients([r["case"] for r in matched], probabilities, labels, patients or {},
                                             names, patient_aggregate, output / "patients.csv")
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(nan_to_none(summary), handle, indent=2)
    scalar = [{"metric": k, "value": v} for k, v in summary.items() if isinstance(v, (int, float))]
    write_csv(output / "summary.csv", scalar, ["metric", "value"])
    roc_png(y_true, probabilities, names, output / "roc.png")
    reliability_png(y_true, probabilities, output / "reliability.png")
    confusion_png(y_true, probabilities.argmax(axis=1), names, output / "confusion.png")
    return summary
