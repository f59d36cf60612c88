"""Patient-level classification: each patient's case probabilities combined into one, then scored as cases are.

A patient is the dataset's ``patient`` id; a case without one is a patient of its own (named by its case id).
Only cases with a prediction take part in a patient's probabilities; the patient's truth comes from all of its
labelled cases.

Rules (``evaluate --patient-aggregate``):

- ``mean``: the patient's probability of each class is the mean over its cases (rows still sum to 1).
- ``max``, two classes: the probability of the positive class (index 1) is the largest over the patient's cases
  and the negative class's is its complement: a patient is as positive as its most positive case (the "any
  positive instance" rule of multiple-instance learning).
- ``max``, more classes: each class's largest probability over the cases, divided by their sum.

Truth: the class the patient's cases share. When they disagree, a two-class patient is positive (class 1) if any
of its cases is, the rule ``max`` predicts by; with more classes there is no such rule and the patient is
refused, naming it and its cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import write_csv

AGGREGATES = ("mean", "max")
RULES = {
    "mean": "mean of the cases' probabilities",
    "max": "two classes: positive probability = the largest of the cases', negative = its complement; more "
           "classes: each class's largest probability, divided by their sum",
}


@dataclass
class Patients:
    """Patient-level rows: ``ids`` ``(P,)``, their predicted ``cases`` (ids), ``truth`` ``(P,)`` class indices and
    ``probabilities`` ``(P, K)``, in order of each patient's first case."""

    ids: list[str]
    cases: list[list[str]]
    truth: np.ndarray
    probabilities: np.ndarray


def patient_groups(case_ids: Sequence[str], patients: Mapping[str, str | None]) -> dict[str, list[str]]:
    """``patient id -> case ids`` of ``case_ids`` in their order; a case without a patient id is its own patient.

    Raises:
        ValueError: a case without a patient id whose case id is also another patient's id.
    """
    groups: dict[str, list[str]] = {}
    for case in case_ids:
        groups.setdefault(patients.get(case) or case, []).append(case)
    declared = {p for p in patients.values() if p}
    for case in case_ids:
        if not patients.get(case) and case in declared:
            raise ValueError(f"case {case!r} has no patient id and its case id is also a patient's id: give it a "
                             "'patient' in the dataset description")
    return groups


def aggregate(probabilities: np.ndarray, rule: str) -> np.ndarray:
    """One patient's ``(K,)`` probabilities from its cases' ``(N, K)`` rows by ``rule`` (module docstring)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if rule == "mean":
        return p.mean(axis=0)
    if rule != "max":
        raise ValueError(f"unknown patient aggregate {rule!r}; valid: {list(AGGREGATES)}")
    if p.shape[1] == 2:
        positive = p[:, 1].max()
        return np.array([1.0 - positive, positive])
    top = p.max(axis=0)
    return top / top.sum()


def patient_truth(patient: str, cases: Sequence[str], labels: Mapping[str, int], names: Sequence[str]) -> int:
    """The class of ``patient`` from its labelled ``cases`` (module docstring).

    Raises:
        ValueError: more than two classes and the cases disagree, naming the patient and each case's class.
    """
    values = {labels[c] for c in cases}
    if len(values) == 1:
        return values.pop()
    if len(names) == 2:
        return 1
    shown = ", ".join(f"{c}={names[labels[c]]}" for c in cases)
    raise ValueError(f"patient {patient!r}: its cases disagree on the class ({shown}); a patient-level score needs "
                     "one class per patient")


def aggregate_patients(case_ids: Sequence[str], probabilities: np.ndarray, labels: Mapping[str, int],
                       patients: Mapping[str, str | None], names: Sequence[str], rule: str) -> Patients:
    """The patients of the predicted ``case_ids`` (rows of ``probabilities`` ``(N, K)``), by ``rule``.

    Args:
        labels: class index of every labelled case (the patient's truth uses all of them, predicted or not).
        patients: patient id (or ``None``) of every case.
    """
    if rule not in AGGREGATES:
        raise ValueError(f"unknown patient aggregate {rule!r}; valid: {list(AGGREGATES)}")
    row = {case: i for i, case in enumerate(case_ids)}
    everyone = patient_groups(list(labels), patients)
    ids, cases, truth, rows = [], [], [], []
    for patient, predicted in patient_groups(case_ids, patients).items():
        ids.append(patient)
        cases.append(predicted)
        truth.append(patient_truth(patient, everyone[patient], labels, names))
        rows.append(aggregate(probabilities[[row[c] for c in predicted]], rule))
    k = len(names)
    return Patients(ids, cases, np.array(truth, dtype=np.int64),
                    np.array(rows, dtype=np.float64).reshape(len(ids), k))


def score_patients(case_ids: Sequence[str], probabilities: np.ndarray, labels: Mapping[str, int],
                   patients: Mapping[str, str | None], names: Sequence[str], rule: str,
                   table: Path) -> dict[str, Any]:
    """Score the patients of the predicted cases with :func:`classification_metrics` and write ``table``
    (``patients.csv``: patient, cases, truth, prediction, ``p_<class>``).

    Returns:
        The metrics, with ``patients`` (how many), ``aggregate`` (the rule's name) and ``rule`` (in words).
    """
    from medseg.metrics.classification import classification_metrics

    found = aggregate_patients(case_ids, probabilities, labels, patients, names, rule)
    summary: dict[str, Any] = classification_metrics(found.truth, found.probabilities, names)
    summary.update(patients=len(found.ids), aggregate=rule, rule=RULES[rule])
    rows = [{"patient": patient, "cases": " ".join(cases), "truth": names[int(y)], "prediction": names[int(p.argmax())],
             **{f"p_{n}": float(v) for n, v in zip(names, p, strict=True)}}
            for patient, cases, y, p in zip(found.ids, found.cases, found.truth, found.probabilities, strict=True)]
    write_csv(table, rows, ["patient", "cases", "truth", "prediction", *(f"p_{n}" for n in names)])
    return summary


def patient_line(patients: dict[str, Any], table: str) -> str:
    """The console line of :func:`score_patients`' summary, naming the ``table`` it wrote."""
    return (f"{patients['patients']} patient(s) ({patients['aggregate']} of their cases): accuracy "
            f"{patients['accuracy']:.4f}, AUC {patients['auc']:.4f}, macro F1 {patients['f1_macro']:.4f}, ECE "
            f"{patients['ece']:.4f}; {table}")
