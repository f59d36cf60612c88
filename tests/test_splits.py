"""Cross-validation splits: determinism, patient grouping, stratification, reuse and errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from medseg.evaluation.splits import STRATEGIES, fold_of, load_or_make_splits, make_splits


def _cases(n_patients: int = 12, per_patient: int = 2) -> list[dict]:
    return [
        {"id": f"p{p:02d}_c{c}", "patient": f"p{p:02d}", "label": p % 3}
        for p in range(n_patients) for c in range(per_patient)
    ]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_case_validated_once_and_patients_never_split(strategy: str) -> None:
    cases = _cases()
    splits = make_splits(cases, strategy, folds=4, seed=1)
    patient = {c["id"]: c["patient"] for c in cases}
    for fold in splits:
        assert not {patient[i] for i in fold["train"]} & {patient[i] for i in fold["val"]}
        assert sorted(fold["train"] + fold["val"]) == sorted(c["id"] for c in cases)
    if strategy != "holdout":
        validated = Counter(i for fold in splits for i in fold["val"])
        assert set(validated) == {c["id"] for c in cases} and set(validated.values()) == {1}
    expected = {"kfold": 4, "stratified": 4, "group": 4, "holdout": 1, "loocv": 12}[strategy]
    assert len(splits) == expected


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    cases = _cases()
    assert make_splits(cases, "kfold", 3, seed=7) == make_splits(cases, "kfold", 3, seed=7)
    assert make_splits(cases, "kfold", 3, seed=7) != make_splits(cases, "kfold", 3, seed=8)


def test_stratified_folds_keep_class_proportions() -> None:
    cases = _cases(n_patients=12)  # 4 patients per class, 3 classes
    for fold in make_splits(cases, "stratified", folds=4, seed=3):
        label = {c["id"]: c["label"] for c in cases}
        assert Counter(label[i] for i in fold["val"]) == {0: 2, 1: 2, 2: 2}  # one patient (2 cases) per class


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown split strategy"):
        make_splits(_cases(), "random")
    with pytest.raises(ValueError, match="need 2..12"):
        make_splits(_cases(), "kfold", folds=13)
    with pytest.raises(ValueError, match="patient id"):
        make_splits([{"id": "a", "patient": None}, {"id": "b", "patient": "x"}], "group", folds=2)
    with pytest.raises(ValueError, match="out of range"):
        fold_of(make_splits(_cases(), "kfold", 3), 3)


def test_saved_splits_are_reused_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    first = load_or_make_splits(path, _cases(), strategy="kfold", folds=3, seed=0)
    assert json.loads(path.read_text()) == first
    assert load_or_make_splits(path, _cases(), strategy="kfold", folds=3, seed=99) == first  # reused, not remade
    with pytest.raises(ValueError, match="splits.json"):
        load_or_make_splits(path, _cases()[:-2], strategy="kfold", folds=3)


def test_saved_splits_with_another_fold_count_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    load_or_make_splits(path, _cases(), strategy="kfold", folds=3, seed=0)
    with pytest.raises(ValueError, match="3 folds but 4"):
        load_or_make_splits(path, _cases(), strategy="kfold", folds=4, seed=0)
