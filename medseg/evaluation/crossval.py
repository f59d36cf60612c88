"""``medseg cv``: train every fold through ``medseg fit``, predict each fold's held-out cases through the same
path as ``medseg predict``, and evaluate the pooled out-of-fold predictions.

Output folder::

    splits.json                 the folds (reused on the next run)
    fold_<k>/                   each fold's run (config.yaml, checkpoints/, metrics.csv, ...)
    predictions/                out-of-fold <case>.nii.gz (segmentation), or fold_<k>/predictions.csv
                                merged into predictions.csv (classification)
    per_case.csv, summary.*     the evaluation of the pooled predictions
    postprocessing.json         segmentation: the post-processing that helped on them (``predict --postprocess``)
    cv.json                     folds, checkpoints and the headline metrics
"""

from __future__ import annotations

import csv
import json
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.data.datalist import SEGMENTATION, DatasetSpec, load_dataset
from medseg.data.io import atomic_path, read_image, spacing_from_affine, write_csv
from medseg.evaluation.evaluate import evaluate_segmentation
from medseg.evaluation.postprocess_choice import Case, choose_postprocessing
from medseg.evaluation.splits import fold_of, load_or_make_splits
from medseg.inference.batch import PredictOptions, predict_batch
from medseg.inference.postprocess import save_postprocessing
from medseg.metrics.classification import classification_metrics


def dataset_of(config: str | Path, overrides: list[str]) -> DatasetSpec:
    """The dataset a config trains on: ``data.root`` of the YAML, or of a ``--data.root`` override."""
    root = (yaml.safe_load(Path(config).read_text()) or {}).get("data", {}).get("root")
    for i, arg in enumerate(overrides):
        if arg == "--data.root" and i + 1 < len(overrides):
            root = overrides[i + 1]
        elif arg.startswith("--data.root="):
            root = arg.split("=", 1)[1]
    if not root:
        raise ValueError(f"{config}: no data.root (give --data.root DIR)")
    return load_dataset(root)


def predict_device(trainer: Any) -> str:
    """The device a fold trained on (``cuda:0``, ``cpu``, ...): its held-out cases are predicted there too."""
    return str(trainer.strategy.root_device)


def run_cv(
    config: str | Path,
    output: str | Path,
    folds: int = 5,
    strategy: str = "kfold",
    holdout_fraction: float = 0.2,
    fold: int | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Cross-validate ``config``; see the module docstring. ``overrides`` are ``medseg fit`` arguments applied to
    every fold (e.g. ``["--trainer.max_epochs", "1"]``); ``fold`` runs one fold only (no pooled evaluation).
    """
    from medseg.lightning_cli import MedSegCLI
    from medseg.resume import saved_checkpoint

    output, overrides = Path(output), list(overrides or [])
    spec = dataset_of(config, overrides)
    splits = load_or_make_splits(output / "splits.json", spec.training, strategy=strategy, folds=folds, seed=seed,
                                 holdout_fraction=holdout_fraction)
    chosen = [fold] if fold is not None else list(range(len(splits)))
    for k in chosen:
        fold_of(splits, k)  # out of range: an error before anything trains
    by_id = {case["id"]: case for case in spec.training}
    checkpoints: dict[int, str] = {}
    timing = {"train_seconds": 0.0, "predict_seconds": 0.0, "predicted_cases": 0}
    log_dirs: dict[int, str] = {}
    parameters = 0
    device = "auto"
    for k in chosen:
        val = fold_of(splits, k)["val"]
        start = time.perf_counter()
        cli = MedSegCLI(args=[
            "fit", "--config", str(config), *overrides, "--data.val_cases", json.dumps(val),
            "--trainer.default_root_dir", str(output / f"fold_{k}"), "--seed_everything", str(seed),
        ], single_process=True)  # a DDP launcher would re-run the whole `medseg cv` command in each process
        timing["train_seconds"] += time.perf_counter() - start
        checkpoints[k] = saved_checkpoint(cli.trainer, "best")
        log_dirs[k] = str(cli.trainer.log_dir)
        parameters = sum(p.numel() for p in cli.model.net.parameters())
        start = time.perf_counter()
        # Segmentation writes one file per case, so every fold shares one folder (its run.json lists each
        # fold's model and cases); classification writes one table per run, so each fold has its own, merged
        # below.
        target = output / "predictions" / ("" if spec.task == SEGMENTATION else f"fold_{k}")
        device = predict_device(cli.trainer)
        max_voxels = cli.datamodule.hparams.max_voxels  # the images passed the data checks at this limit
        predict_batch(
            [checkpoints[k]], None, PredictOptions(output=target, overwrite=True, device=device, mix_models=True,
                                                   max_voxels=max_voxels),
            cases=[{"id": i, "image": by_id[i]["image"]} for i in val],
        )
        timing["predict_seconds"] += time.perf_counter() - start
        timing["predicted_cases"] += len(val)
    result: dict[str, Any] = {
        "config": str(config), "overrides": shlex.join(overrides), "strategy": strategy, "folds": len(splits),
        "checkpoints": checkpoints, "log_dirs": log_dirs, "parameters": parameters, "task": spec.task,
        "device": device, "max_voxels": max_voxels,
        "train_seconds": timing["train_seconds"],
        "predict_seconds_per_case": timing["predict_seconds"] / max(timing["predicted_cases"], 1),
    }
    if fold is None:
        held_out = {i for split in splits for i in split["val"]}  # all cases, except with holdout
        result["metrics"] = _evaluate_pooled(spec, output, held_out, max_voxels)
    with atomic_path(output / "cv.json") as tmp, open(tmp, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    return result


def _evaluate_pooled(spec: DatasetSpec, output: Path, held_out: set[str], max_voxels: int) -> dict[str, Any]:
    if spec.task == SEGMENTATION:
        classes = [k for k in spec.labels if k > 0]
        regions = {name: list(values) for name, values in spec.regions} if spec.regions else None
        references = {c["id"]: c["label"] for c in spec.training if c["id"] in held_out}
        summary = evaluate_segmentation(output / "predictions", references, output, classes=classes, regions=regions,
                                        max_voxels=max_voxels)
        if not regions:  # post-processing acts on label values; choosing it for regions is not done yet
            _choose_postprocessing(spec, output, classes, held_out, max_voxels)
        return summary["foreground_mean"]
    rows = []
    for table in sorted((output / "predictions").glob("fold_*/predictions.csv")):
        with table.open(newline="") as handle:
            rows += list(csv.DictReader(handle))
    write_csv(output / "predictions" / "predictions.csv", rows)
    truth = {c["id"]: c["label"] for c in spec.training}
    names = spec.label_names
    y_true = np.array([truth[row["case"]] for row in rows])
    probabilities = np.array([[float(row[f"p_{name}"]) for name in names] for row in rows])
    metrics = classification_metrics(y_true, probabilities, names)
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def _choose_postprocessing(spec: DatasetSpec, output: Path, classes: list[int], held_out: set[str],
                           max_voxels: int) -> None:
    """Pick post-processing on the out-of-fold predictions; write ``postprocessing.json`` (maybe empty)."""
    cases = []
    for case in (c for c in spec.training if c["id"] in held_out):
        prediction, affine = read_image(output / "predictions" / f"{case['id']}.nii.gz", max_voxels=max_voxels)
        reference, _ = read_image(case["label"], max_voxels=max_voxels)
        cases.append(Case(prediction.round().astype(np.int16), reference.round().astype(np.int16),
                          spacing_from_affine(affine, reference.ndim)))
    steps, scores = choose_postprocessing(cases, classes)
    save_postprocessing(steps, output / "postprocessing.json")
    with atomic_path(output / "postprocessing_scores.json") as tmp, open(tmp, "w") as handle:
        json.dump({"classes": classes, **scores}, handle, indent=2)
