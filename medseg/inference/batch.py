"""``medseg predict``: many cases, one or more checkpoints, outputs on each input's own grid.

A case that cannot be processed is reported with its file and reason and the others go on; every output is
written under a temporary name and renamed; existing outputs are kept unless ``overwrite`` (or skipped with
``resume``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medseg.data.datalist import case_id, load_dataset
from medseg.data.io import ImageReadError, read_header, spacing_from_affine, write_nifti
from medseg.inference.ensemble import case_doubt, combine, entropy, member_variance
from medseg.inference.native import (
    LoadedModel,
    classification_members,
    flip_sets,
    load_model,
    segmentation_members,
)

log = logging.getLogger("medseg.predict")
IMAGE_PATTERN = re.compile(r"\.(nii|nii\.gz|png|jpe?g)$", re.IGNORECASE)
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class PredictOptions:
    """What ``medseg predict`` was asked to do (see the CLI help)."""

    output: Path
    tta: bool = False
    tta_axes: list[int] | None = None
    ensemble: str = "mean"
    postprocess: list[dict[str, Any]] | None = None
    save_probabilities: bool = False
    save_uncertainty: bool = False
    device: str = "cpu"
    overwrite: bool = False
    resume: bool = False


@dataclass
class PredictReport:
    """Outcome of a batch: cases done, skipped (resume) and failed (``id -> "file: reason"``)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def find_cases(source: str | Path, in_channels: int) -> list[dict[str, Any]]:
    """Cases to predict: ``{"id", "image": [files]}``.

    Args:
        source: a ``dataset.json``/CSV (its ``test`` list, else its ``training`` list), or a folder of images
            (searched recursively). With ``in_channels > 1`` a folder uses nnU-Net's naming,
            ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... one file per channel.
        in_channels: input channels the models expect.

    Ids are made unique: two files with the same name in different folders get their folder in the id.
    """
    source = Path(source)
    if source.is_file() and not IMAGE_PATTERN.search(source.name):
        spec = load_dataset(source)
        cases = spec.test or spec.training
        return [{"id": c["id"], "image": list(c["image"])} for c in cases]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder or dataset description")
    files = sorted(p for p in source.rglob("*") if p.is_file() and IMAGE_PATTERN.search(p.name))
    if not files:
        raise FileNotFoundError(f"{source}: no .nii/.nii.gz/.png/.jpg images found")
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in files:
        name = case_id(path)
        match = CHANNEL_SUFFIX.match(name) if in_channels > 1 else None
        groups[(path.parent, match.group("case") if match else name)].append(path)
    names = defaultdict(int)
    for _, name in groups:
        names[name] += 1
    cases = []
    for (folder, name), paths in sorted(groups.items()):
        unique = name if names[name] == 1 else "_".join((*folder.relative_to(source).parts, name)) or name
        cases.append({"id": unique, "image": [str(p) for p in sorted(paths)]})
    return cases


def predict_batch(
    checkpoints: list[str | Path], source: str | Path, options: PredictOptions, devices: int = 1
) -> PredictReport:
    """Predict every case of ``source`` with the ensemble of ``checkpoints``; see the module docstring.

    Args:
        devices: worker processes, one per device (``cuda:0..N-1``, or CPU workers when ``options.device`` is
            ``cpu``); the cases are dealt out in disjoint shards, so each case is predicted exactly once.
    """
    first = load_model(checkpoints[0])
    cases = find_cases(source, first.hparams["in_channels"])
    options.output.mkdir(parents=True, exist_ok=True)
    finished = _finished_cases(first.task, cases, options)
    todo = [case for case in cases if case["id"] not in finished]
    report = PredictReport(skipped=[case["id"] for case in cases if case["id"] in finished])
    rows: list[dict[str, Any]] = [row for row in finished.values() if row]
    doubts: list[dict[str, Any]] = []
    if devices <= 1:
        results = [_run_shard([str(c) for c in checkpoints], todo, options, 0)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(max_workers=devices, mp_context=context) as pool:
            futures = [
                pool.submit(_run_shard, [str(c) for c in checkpoints], todo[rank::devices],
                            replace(options, device=_device_of(options.device, rank)), rank, devices)
                for rank in range(devices)
            ]
            results = [future.result() for future in futures]
    for shard in results:
        report.done += shard.done
        report.failed.update(shard.failed)
        rows += shard.rows
        doubts += shard.doubts
    if rows:
        order = {case["id"]: i for i, case in enumerate(cases)}
        _write_csv(options.output / "predictions.csv", sorted(rows, key=lambda r: order.get(r["case"], -1)))
    if doubts and options.save_uncertainty:
        _write_csv(options.output / "uncertainty.csv", sorted(doubts, key=lambda r: -r["doubt"]))
    return report


@dataclass
class _ShardResult:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    doubts: list[dict[str, Any]] = field(default_factory=list)


def _device_of(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.startswith("cuda") else device


def _run_shard(
    checkpoints: list[str], cases: list[dict[str, Any]], options: PredictOptions, rank: int, workers: int = 1
) -> _ShardResult:
    """Predict ``cases`` in this process (one worker of ``workers``); a failing case does not stop the rest."""
    if workers > 1 and not options.device.startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    models = [load_model(path, device=options.device) for path in checkpoints]
    _check_compatible(models, checkpoints)
    result = _ShardResult()
    for case in tqdm(cases, desc=f"predicting [{options.device}]", unit="case", position=rank):
        start = time.perf_counter()
        try:
            if models[0].task == "segmentation":
                result.doubts.append(_predict_segmentation_case(models, case, options))
            else:
                result.rows.append(_predict_classification_case(models, case, options))
        except (ImageReadError, OSError, ValueError, RuntimeError) as err:
            reason = str(err) if str(case["image"][0]) in str(err) else f"{case['image'][0]}: {err}"
            result.failed[case["id"]] = reason
            log.error("%s failed: %s", case["id"], reason)
            continue
        result.done.append(case["id"])
        log.info("%s done in %.2f s on %s", case["id"], time.perf_counter() - start, options.device)
    return result


def _finished_cases(task: str, cases: list[dict[str, Any]], options: PredictOptions) -> dict[str, Any]:
    """Cases already predicted in ``options.output``: refused unless ``overwrite`` (redo) or ``resume`` (skip).

    Returns:
        ``id -> previous CSV row`` (classification) or ``id -> None`` (segmentation) for the cases to skip.
    """
    if options.overwrite:
        return {}
    if task == "classification":
        table = options.output / "predictions.csv"
        done = {}
        if table.exists():
            with table.open(newline="") as handle:
                done = {row["case"]: row for row in csv.DictReader(handle)}
    else:
        done = {c["id"]: None for c in cases if (options.output / f"{c['id']}.nii.gz").exists()}
    if done and not options.resume:
        raise FileExistsError(
            f"{options.output}: {len(done)} case(s) already predicted (e.g. {next(iter(done))}); "
            "use --overwrite to redo them or --resume to skip them"
        )
    return done


def _check_compatible(models: list[LoadedModel], paths: list[str | Path]) -> None:
    first = models[0]
    for model, path in zip(models[1:], paths[1:], strict=True):
        for key in ("num_classes", "in_channels", "spatial_dims"):
            if model.hparams[key] != first.hparams[key]:
                raise ValueError(f"{path}: {key} {model.hparams[key]} differs from {paths[0]} ({first.hparams[key]})")
        if model.task != first.task:
            raise ValueError(f"{path}: a {model.task} model cannot join a {first.task} ensemble")


def _predict_segmentation_case(models: list[LoadedModel], case: dict[str, Any], options: PredictOptions) -> dict:
    shape, affine = read_header(case["image"][0])
    spatial_dims = models[0].hparams["spatial_dims"]
    flips = flip_sets(spatial_dims, options.tta_axes) if options.tta else [()]
    members = [m for model in models for m in segmentation_members(model, case["image"], flips, options.device)]
    probabilities, labels = combine(members, options.ensemble)
    if options.postprocess:
        from medseg.inference.postprocess import apply_postprocessing

        labels = apply_postprocessing(labels, spacing_from_affine(affine, spatial_dims), options.postprocess)
    dtype = np.uint8 if probabilities.shape[0] <= 255 else np.int16
    write_nifti(labels.astype(dtype), affine, options.output / f"{case['id']}.nii.gz")
    if options.save_probabilities:
        _write_npz(options.output / "probabilities" / f"{case['id']}.npz", probabilities=probabilities.astype(np.float16),
                   affine=affine, label_names=np.array(models[0].label_names))
    row = {"case": case["id"], "doubt": 0.0, "members": len(members)}
    if options.save_uncertainty:
        entropy_map = entropy(probabilities)
        write_nifti(entropy_map, affine, options.output / "uncertainty" / f"{case['id']}_entropy.nii.gz")
        if len(members) > 1:
            write_nifti(member_variance(members), affine, options.output / "uncertainty" / f"{case['id']}_variance.nii.gz")
        row["doubt"] = case_doubt(entropy_map, [m.argmax(axis=0) for m in members])
    return row


def _predict_classification_case(models: list[LoadedModel], case: dict[str, Any], options: PredictOptions) -> dict:
    spatial_dims = models[0].hparams["spatial_dims"]
    flips = flip_sets(spatial_dims, options.tta_axes) if options.tta else [()]
    members = [m for model in models for m in classification_members(model, case["image"], flips, options.device)]
    probabilities, label = combine([m.reshape(-1, 1) for m in members], options.ensemble)
    names = models[0].label_names
    row: dict[str, Any] = {"case": case["id"], "prediction": names[int(label[0])]}
    row.update({f"p_{name}": float(p) for name, p in zip(names, probabilities[:, 0], strict=True)})
    return row


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed ``.npz`` atomically (NIfTI has no float16, so probabilities go here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
