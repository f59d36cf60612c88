"""``medseg cv``: train every fold through :func:`medseg.training.fit`, predict each fold's held-out cases through
the same path as ``medseg predict``, and evaluate the pooled out-of-fold predictions.

The stages talk through files, so folds can run apart and a stopped run continues:

* ``medseg cv ... --fold K`` trains and predicts fold K only (one GPU or node each, in parallel); a later plain
  ``medseg cv`` with the same output collects them: it trains and predicts only what is missing, then makes the
  pooled evaluation, the post-processing choice and the calibration.
* a fold killed while training resumes from its ``last.ckpt``; one killed while predicting predicts only the
  cases without a prediction.

Output folder::

    splits.json                 the folds (reused on the next run)
    fold_<k>/                   each fold's run (<config>/version_N/: config.yaml, checkpoints/, metrics.csv)
    fold_<k>/fold.json          the fold's checkpoint and timings once trained; "predicted" once predicted
    predictions/                out-of-fold <case>.nii.gz and probabilities/ (segmentation), or
                                fold_<k>/predictions.csv merged into predictions.csv (classification)
    per_case.csv, summary.*     the evaluation of the pooled predictions
    postprocessing.json         segmentation: the post-processing that helped on them (``predict --postprocess``)
    calibration.json            the temperature fitted on them (``predict --calibration``)
    cv.json                     folds, checkpoints and the headline metrics
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.datalist import CLASSIFICATION, SEGMENTATION, DatasetSpec, load_dataset
from medseg.data.io import atomic_path, read_image, spacing_from_affine, write_csv
from medseg.evaluation.evaluate import evaluate_segmentation
from medseg.evaluation.postprocess_choice import Case, choose_postprocessing
from medseg.evaluation.splits import fold_of, load_or_make_splits
from medseg.inference.batch import PredictOptions, predict_batch
from medseg.inference.postprocess import save_postprocessing
from medseg.metrics.classification import classification_metrics

FOLD_FILE = "fold.json"


def dataset_of(configs: str | Path | list[str | Path], overrides: list[str]) -> DatasetSpec:
    """The dataset a training run would use: ``data.root`` after every config file and override is applied."""
    from medseg.training import resolved_data

    configs = configs if isinstance(configs, list) else [configs]
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"{config}: no such config file")
    args = [arg for config in configs for arg in ("--config", str(config))] + list(overrides)
    root = resolved_data(args).get("root")
    if not root:
        raise ValueError(f"{configs[0]}: no data.root (give --data.root DIR)")
    spec = load_dataset(root)
    if spec.task not in (SEGMENTATION, CLASSIFICATION):
        raise ValueError(f"{spec.source}: cross-validation and benchmarks run on segmentation and classification "
                         f"datasets; {spec.task} datasets train with `medseg fit` and are scored with "
                         "`medseg evaluate`")
    return spec


def predict_device(trainer: Any) -> str:
    """The device a fold trained on (``cuda:0``, ``cpu``, ...): its held-out cases are predicted there too."""
    return str(trainer.strategy.root_device)


def run_cv(
    config: str | Path | list[str | Path],
    output: str | Path,
    folds: int = 5,
    strategy: str = "kfold",
    holdout_fraction: float = 0.2,
    fold: int | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Cross-validate ``config`` (one file, or several applied in order as ``--config`` repeated); see the module
    docstring. ``overrides`` are ``medseg fit`` arguments applied to every fold (e.g. ``["--trainer.max_epochs",
    "1"]``); ``fold`` trains and predicts that fold only (no pooled evaluation); ``seed`` is the split's, and
    each fold's ``seed_everything`` and ``data.seed`` (sampling and augmentation). ``progress`` is the
    :class:`medseg.progress.CvProgress` that shows where the folds are (``medseg benchmark`` shares one across
    its models); by default one for this config.

    Returns:
        ``cv.json``'s content (with ``fold``: that fold's record only, and ``cv.json`` is not written).
    """
    output, overrides = Path(output), list(overrides or [])
    configs = [Path(c) for c in (config if isinstance(config, list) else [config])]
    spec = dataset_of(configs, overrides)
    splits = load_or_make_splits(output / "splits.json", spec.training, strategy=strategy, folds=folds, seed=seed,
                                 holdout_fraction=holdout_fraction)
    chosen = [fold] if fold is not None else list(range(len(splits)))
    for k in chosen:
        fold_of(splits, k)  # out of range: an error before anything trains
    from medseg.progress import CvProgress

    tracker, records = progress or CvProgress([configs[0].stem]), {}
    for i, k in enumerate(chosen):
        with tracker.fold(configs[0].stem, len(chosen), f"fold {i + 1}/{len(chosen)}" if fold is None else f"fold {k}"):
            records[k] = _run_fold(spec, configs, overrides, output, k, fold_of(splits, k)["val"], seed)
    if fold is not None:
        return records[fold]
    result: dict[str, Any] = {
        "config": str(configs[0]), "configs": [str(c) for c in configs], "overrides": shlex.join(overrides),
        "strategy": strategy, "folds": len(splits), "seed": seed, "task": spec.task,
        "checkpoints": {k: r["checkpoint"] for k, r in records.items()},
        "log_dirs": {k: r["log_dir"] for k, r in records.items()},
        "parameters": records[0]["parameters"], "device": records[0]["device"],
        "max_voxels": records[0]["max_voxels"],
        "train_seconds": sum(r["train_seconds"] for r in records.values()),
        "predict_seconds_per_case": sum(r["predict_seconds"] for r in records.values())
        / max(sum(len(r["cases"]) for r in records.values()), 1),
    }
    held_out = {i for split in splits for i in split["val"]}  # all cases, except with holdout
    result["metrics"] = _evaluate_pooled(spec, output, held_out, result["max_voxels"], len(splits))
    result["calibration"] = _calibrate(spec, output, held_out, records[0], seed)
    with atomic_path(output / "cv.json") as tmp, open(tmp, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    return result


def _run_fold(spec: DatasetSpec, configs: list[Path], overrides: list[str], output: Path, k: int,
              val: list[str], seed: int) -> dict[str, Any]:
    """Train fold ``k`` (or resume it, or find it trained) and predict its held-out cases (or the missing ones);
    returns its ``fold.json`` record.

    ``fold.json`` is written before training starts, with what the fold is trained from (configs, overrides,
    seed, held-out cases): a rerun asking for anything else is refused instead of reusing the fold.
    """
    import time

    from medseg.progress import QUIET_FOLD_ARGS, EpochProgress
    from medseg.training import fit, resumable_checkpoint

    folder = output / f"fold_{k}"
    identity = {"configs": [str(c.resolve()) for c in configs], "overrides": list(overrides), "seed": seed}
    record = _read_record(folder / FOLD_FILE, val, identity)
    trained_now = not record.get("trained")
    if trained_now:
        _write_record(folder / FOLD_FILE, {"fold": k, "cases": val, "run": identity, "trained": False})
        resume = resumable_checkpoint(folder / configs[0].stem)
        args = [arg for config in configs for arg in ("--config", str(config))]
        args += [*QUIET_FOLD_ARGS, *overrides, "--data.val_cases", json.dumps(val),
                 "--trainer.default_root_dir", str(folder)]
        if resume is not None:
            print(f"medseg cv: fold {k}: resuming from {resume}")
            args += ["--ckpt_path", str(resume)]
        # One process: a DDP launcher would re-run the whole `medseg cv` command in each process.
        result = fit(args, seed=seed, single_process=True, callbacks=[EpochProgress()])
        record = {"fold": k, "cases": val, "run": identity, "trained": True,
                  "checkpoint": _absolute(result.best), "last": _absolute(result.last),
                  "log_dir": _absolute(result.log_dir), "parameters": result.parameters,
                  "train_seconds": result.seconds, "device": predict_device(result.cli.trainer),
                  # the images passed the data checks at this limit
                  "max_voxels": result.cli.datamodule.hparams.max_voxels, "predicted": False}
        _write_record(folder / FOLD_FILE, record)
    if not record["predicted"]:
        start = time.perf_counter()
        by_id = {case["id"]: case for case in spec.training}
        # Segmentation writes one file per case, so every fold shares one folder (its run.json lists each
        # fold's model and cases); classification writes one table per run, so each fold has its own, merged
        # after. A fold trained earlier predicts only its cases without a prediction.
        target = output / "predictions" / ("" if spec.task == SEGMENTATION else f"fold_{k}")
        options = PredictOptions(output=target, overwrite=trained_now, resume=not trained_now,
                                 device=record["device"], mix_models=True, max_voxels=record["max_voxels"],
                                 save_probabilities=spec.task == SEGMENTATION)
        report = predict_batch([record["checkpoint"]], None, options,
                               cases=[{"id": i, "image": by_id[i]["image"]} for i in val])
        if report.failed:
            raise ValueError(f"fold {k}: {len(report.failed)} held-out case(s) failed to predict: "
                             + "; ".join(report.failed.values()))
        record.update(predicted=True, predict_seconds=time.perf_counter() - start)
        _write_record(folder / FOLD_FILE, record)
    return record


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def _read_record(path: Path, val: list[str], identity: dict[str, Any]) -> dict[str, Any]:
    """A fold's record (``{}`` when it has none), refused when it was started for other held-out cases, other
    configs, overrides or seed, or when its checkpoint is gone."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a fold record ({err}); delete it to train the fold again") from err
    if sorted(record.get("cases", [])) != sorted(val):
        raise ValueError(f"{path}: the fold was trained on other held-out cases than splits.json gives; "
                         "use another --output, or delete the fold's folder to train it again")
    saved = record.get("run")
    if saved != identity:
        changed = [key for key in identity if (saved or {}).get(key) != identity[key]]
        raise ValueError(f"{path}: the fold was started with other {', '.join(changed) or 'settings'} "
                         f"({ {k: (saved or {}).get(k) for k in changed} }) than this run asks for "
                         f"({ {k: identity[k] for k in changed} }); use another --output, or delete {path.parent} "
                         "to train the fold again")
    if record.get("trained") and not Path(record.get("checkpoint", "")).is_file():
        raise ValueError(f"{path}: its checkpoint {record.get('checkpoint')} is gone; delete {path.parent} to train "
                         "the fold again")
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(record, handle, indent=2)


def _evaluate_pooled(spec: DatasetSpec, output: Path, held_out: set[str], max_voxels: int,
                     folds: int) -> dict[str, Any]:
    if spec.task == SEGMENTATION:
        classes = [k for k in spec.labels if k > 0]
        regions = {name: list(values) for name, values in spec.regions} if spec.regions else None
        references = {c["id"]: c["label"] for c in spec.training if c["id"] in held_out}
        summary = evaluate_segmentation(output / "predictions", references, output, classes=classes, regions=regions,
                                        max_voxels=max_voxels, names=dict(spec.labels))
        if not regions:  # post-processing acts on label values; choosing it for regions is not done yet
            _choose_postprocessing(spec, output, classes, held_out, max_voxels)
        return summary["foreground_mean"]
    write_csv(output / "predictions" / "predictions.csv", _fold_rows(output, folds, held_out))
    y_true, probabilities = _pooled_classification(spec, output)
    metrics = classification_metrics(y_true, probabilities, spec.label_names)
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def _calibrate(spec: DatasetSpec, output: Path, held_out: set[str], record: dict[str, Any],
               seed: int) -> dict[str, Any]:
    """Fit the temperature on the out-of-fold probabilities; write ``calibration.json``."""
    from medseg.evaluation.calibrate import CALIBRATION_FILE, fit_and_save, segmentation_sample

    facts = {"task": spec.task, "fitted_on": "out-of-fold probabilities of medseg cv", "cases": len(held_out)}
    if spec.task != SEGMENTATION:
        y, p = _pooled_classification(spec, output)
        return fit_and_save(p, y, "softmax", output / CALIBRATION_FILE, facts)
    from medseg.inference.outputs import OutputSpec
    from medseg.resume import checkpoint_summary

    activation = OutputSpec.from_hparams(checkpoint_summary(Path(record["checkpoint"]))["hyper_parameters"]).activation
    folder = output / "predictions" / "probabilities"
    references = {c["id"]: c["label"] for c in spec.training if c["id"] in held_out}
    missing = sorted(case for case in references if not (folder / f"{case}.npz").is_file())
    if missing:  # predicted before cv saved probabilities: no temperature rather than one from some cases
        (output / CALIBRATION_FILE).unlink(missing_ok=True)
        print(f"warning: medseg cv: {folder}: no probabilities of {len(missing)} out-of-fold case(s) (e.g. "
              f"{missing[0]}): no {CALIBRATION_FILE} fitted; predict them again (delete the fold's prediction) "
              "to get one", file=sys.stderr)
        return {}
    regions = [values for _, values in spec.regions] if spec.regions else None
    p, y = segmentation_sample(folder, references, activation, regions, seed, record["max_voxels"])
    return fit_and_save(p, y, activation, output / CALIBRATION_FILE, {**facts, "voxels": len(p)})


def _fold_rows(output: Path, folds: int, held_out: set[str]) -> list[dict[str, str]]:
    """The rows of each fold's ``predictions/fold_<k>/predictions.csv`` for its held-out cases (folds of other
    splits left there are not read); a case predicted twice is refused."""
    rows: list[dict[str, str]] = []
    for k in range(folds):
        table = output / "predictions" / f"fold_{k}" / "predictions.csv"
        with table.open(newline="") as handle:
            rows += [row for row in csv.DictReader(handle) if row["case"] in held_out]
    seen: set[str] = set()
    twice = sorted({row["case"] for row in rows if row["case"] in seen or seen.add(row["case"])})
    if twice:
        raise ValueError(f"{output / 'predictions'}: case(s) {twice[:5]} are predicted by more than one fold")
    return rows


def _pooled_classification(spec: DatasetSpec, output: Path) -> tuple[np.ndarray, np.ndarray]:
    """Class indices ``(N,)`` and probabilities ``(N, K)`` of the pooled ``predictions/predictions.csv``."""
    with (output / "predictions" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = {c["id"]: c["label"] for c in spec.training}
    y = np.array([truth[row["case"]] for row in rows])
    return y, np.array([[float(row[f"p_{name}"]) for name in spec.label_names] for row in rows])


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
