"""Cross-validation splits: deterministic, patient-grouped, optionally stratified, saved as ``splits.json``.

Cases of one patient always stay on one side (cases without a patient id are their own patient). A saved
``splits.json`` is reused on the next run, like nnU-Net's ``splits_final.json``, so folds never move.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medseg.data.io import atomic_path

STRATEGIES = ("kfold", "stratified", "group", "holdout", "loocv")


def make_splits(
    cases: list[dict[str, Any]],
    strategy: str = "kfold",
    folds: int = 5,
    seed: int = 0,
    holdout_fraction: float = 0.2,
) -> list[dict[str, list[str]]]:
    """Folds as ``[{"train": [ids], "val": [ids]}, ...]``.

    Args:
        cases: case dicts with ``id``, ``patient`` and (for ``stratified``) an integer ``label``.
        strategy: ``kfold`` (patient-grouped), ``stratified`` (patient-grouped, class proportions kept per fold),
            ``group`` (like kfold, but every case must have a patient id), ``holdout`` (one split of
            ``holdout_fraction`` patients), ``loocv`` (one fold per patient).
        folds: number of folds (``kfold``/``stratified``/``group``).
        seed: shuffling seed; the same seed and cases give the same splits.

    Raises:
        ValueError: unknown strategy, too few patients for the folds, missing patient ids or class labels.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown split strategy {strategy!r}; valid: {list(STRATEGIES)}")
    groups = _groups(cases, require_patient=strategy == "group")
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    if strategy == "holdout":
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
        n_val = min(len(names) - 1, max(1, round(holdout_fraction * len(names))))
        buckets = [names[:n_val]]
    elif strategy == "loocv":
        buckets = [[name] for name in names]
    else:
        if not 2 <= folds <= len(names):
            raise ValueError(f"{folds} folds need 2..{len(names)} (the number of patients)")
        ordered = _stratified_order(names, groups) if strategy == "stratified" else names
        buckets = [ordered[i::folds] for i in range(folds)]
    return [_split(groups, set(bucket)) for bucket in buckets]


def load_or_make_splits(path: str | Path, cases: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, list[str]]]:
    """The splits saved at ``path`` if they cover exactly these cases, else new ones (saved there).

    Raises:
        ValueError: the saved splits name other cases than the dataset has (naming the file).
    """
    path = Path(path)
    ids = {case["id"] for case in cases}
    if path.is_file():
        saved = json.loads(path.read_text())
        covered = {i for fold in saved for i in fold["train"] + fold["val"]}
        wanted = kwargs.get("folds", 5) if kwargs.get("strategy", "kfold") in ("kfold", "stratified", "group") else None
        if wanted is not None and len(saved) != wanted:
            raise ValueError(f"{path}: holds {len(saved)} folds but {wanted} were asked for; delete it to make new splits")
        if covered != ids:
            raise ValueError(
                f"{path}: the saved splits cover other cases than the dataset "
                f"({len(covered - ids)} unknown, {len(ids - covered)} missing); delete it to make new splits"
            )
        return saved
    splits = make_splits(cases, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(splits, handle, indent=1)
    return splits


def fold_of(splits: list[dict[str, list[str]]], fold: int) -> dict[str, list[str]]:
    """One fold; an index out of range is an error naming the valid range."""
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} out of range: the splits have folds 0..{len(splits) - 1}")
    return splits[fold]


def _groups(cases: list[dict[str, Any]], require_patient: bool) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in cases:
        if require_patient and not case.get("patient"):
            raise ValueError(f"strategy 'group' needs a patient id for every case; {case['id']} has none")
        groups[case.get("patient") or f"case:{case['id']}"].append(case)
    return groups


def _stratified_order(names: list[str], groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Patients ordered class by class (each patient's majority class), so dealing them out round-robin
    gives every fold about the same share of each class."""
    label_of = {}
    for name in names:
        labels = [case.get("label") for case in groups[name]]
        if any(not isinstance(label, int) for label in labels):
            raise ValueError(f"strategy 'stratified' needs integer class labels; patient {name} has {labels}")
        label_of[name] = Counter(labels).most_common(1)[0][0]
    return sorted(names, key=lambda n: label_of[n])  # stable: the shuffled order within a class is kept


def _split(groups: dict[str, list[dict[str, Any]]], val: set[str]) -> dict[str, list[str]]:
    return {
        "train": sorted(c["id"] for name, cases in groups.items() if name not in val for c in cases),
        "val": sorted(c["id"] for name, cases in groups.items() if name in val for c in cases),
    }
