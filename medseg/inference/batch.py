"""``medseg predict``: many cases, one or more checkpoints, outputs on each input's own grid.

A case that cannot be processed is reported with its file and reason and the others go on; every output is
written under a temporary name and renamed; existing outputs are kept unless ``overwrite`` (or skipped with
``resume``).
"""

from __future__ import annotations

import csv
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medseg.data.datalist import case_id, load_dataset
from medseg.data.io import (
    atomic_path,
    is_image_file,
    read_header,
    spacing_from_affine,
    write_csv,
    write_nifti,
)
from medseg.inference.ensemble import case_doubt, combine, entropy, member_variance
from medseg.inference.native import (
    LoadedModel,
    classification_members,
    flip_sets,
    load_model,
    segmentation_members,
)

LABEL_FOLDERS = ("labelsTr", "labelsTs")
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


def find_cases(source: str | Path, in_channels: int, exclude: Path | None = None) -> list[dict[str, Any]]:
    """Cases to predict: ``{"id", "image": [files]}``.

    Args:
        source: a ``dataset.json``/CSV (its ``test`` list, else its ``training`` list), or a folder of images
            (searched recursively; hidden files, ``labelsTr``/``labelsTs`` folders and ``exclude`` are skipped).
            With ``in_channels > 1`` a folder uses nnU-Net's naming, ``<case>_0000.nii.gz``, ``<case>_0001...``.
        in_channels: input channels the models expect.
        exclude: a folder never read as input (the output folder, when it lies inside ``source``).

    Raises:
        ValueError: two cases would get the same id (their outputs would overwrite each other).
    """
    source = Path(source)
    if source.is_file() and not is_image_file(source):
        spec = load_dataset(source)
        cases = [{"id": c["id"], "image": list(c["image"])} for c in (spec.test or spec.training)]
    elif source.is_dir():
        cases = _folder_cases(source, in_channels, exclude.resolve() if exclude else None)
    else:
        raise FileNotFoundError(f"{source}: no such folder or dataset description")
    for case in cases:
        case["id"] = re.sub(r"[\\/]+", "_", case["id"]).lstrip(".") or "case"  # ids name files in the output
    seen: dict[str, str] = {}
    for case in cases:
        if case["id"] in seen:
            raise ValueError(f"{case['image'][0]} and {seen[case['id']]} would both be written as {case['id']}.nii.gz")
        seen[case["id"]] = case["image"][0]
    return cases


def _folder_cases(source: Path, in_channels: int, exclude: Path | None) -> list[dict[str, Any]]:
    files = sorted(
        p for p in source.rglob("*")
        if p.is_file() and is_image_file(p)
        and not any(part.startswith(".") or part in LABEL_FOLDERS for part in p.relative_to(source).parts)
        and not (exclude and p.resolve().is_relative_to(exclude))
    )
    if not files:
        raise FileNotFoundError(f"{source}: no .nii/.nii.gz/.png/.jpg images found")
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in files:
        name = case_id(path)
        match = CHANNEL_SUFFIX.match(name) if in_channels > 1 else None
        groups[(path.parent, match.group("case") if match else name)].append(path)
    counts: dict[str, int] = defaultdict(int)
    for _, name in groups:
        counts[name] += 1
    return [
        {"id": name if counts[name] == 1 else "__".join((*folder.relative_to(source).parts, name)),
         "image": [str(p) for p in sorted(paths)]}
        for (folder, name), paths in sorted(groups.items())
    ]


def predict_batch(
    checkpoints: list[str | Path],
    source: str | Path | None,
    options: PredictOptions,
    devices: int = 1,
    cases: list[dict[str, Any]] | None = None,
) -> PredictReport:
    """Predict every case of ``source`` with the ensemble of ``checkpoints``; see the module docstring.

    Args:
        cases: the cases to predict (``{"id", "image": [files]}``) instead of reading ``source``.
        devices: worker processes, one per device (``cuda:K..K+N-1`` from ``--device cuda:K``, or CPU workers
            when ``options.device`` is ``cpu``); the cases are dealt out in disjoint shards, so each case is
            predicted exactly once, and a worker that dies marks only its own cases as failed.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: before any case starts, for unloadable or mismatched
            checkpoints, bad options, colliding case ids, or outputs that exist without overwrite/resume.
    """
    models = [load_model(path) for path in checkpoints]  # on the CPU: checked once, before any case
    _check_compatible(models, checkpoints)
    if options.tta:
        flip_sets(models[0].hparams["spatial_dims"], options.tta_axes)
    if cases is None:
        cases = find_cases(source, models[0].hparams["in_channels"], exclude=options.output)
    options.output.mkdir(parents=True, exist_ok=True)
    finished = _finished_cases(models[0].task, cases, options)
    todo = [case for case in cases if case["id"] not in finished]
    report = PredictReport(skipped=[case["id"] for case in cases if case["id"] in finished])
    rows = [row for row in finished.values() if row]
    doubts = _previous_rows(options.output / "uncertainty.csv", set(finished)) if options.save_uncertainty else []
    paths = [str(c) for c in checkpoints]
    if devices <= 1:
        results = [(todo, _run_shard(paths, todo, options, 0, models=models))]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        shards = [todo[rank::devices] for rank in range(devices)]
        with ProcessPoolExecutor(max_workers=devices, mp_context=context) as pool:
            futures = [
                pool.submit(_run_shard, paths, shard, replace(options, device=_device_of(options.device, rank)),
                            rank, devices)
                for rank, shard in enumerate(shards)
            ]
            results = [(shard, _shard_outcome(future, shard)) for shard, future in zip(shards, futures, strict=True)]
    for _, shard in results:
        report.done += shard.done
        report.failed.update(shard.failed)
        rows += shard.rows
        doubts += shard.doubts
    if rows:
        order = {case["id"]: i for i, case in enumerate(cases)}
        write_csv(options.output / "predictions.csv", sorted(rows, key=lambda r: order.get(r["case"], -1)))
    if doubts:
        write_csv(options.output / "uncertainty.csv", sorted(doubts, key=lambda r: -float(r["doubt"])))
    return report


def _shard_outcome(future: Any, shard: list[dict[str, Any]]) -> _ShardResult:
    """A worker's result, or every case of its shard failed with the reason the worker died."""
    try:
        return future.result()
    except Exception as err:  # the worker process died or could not start (e.g. no such CUDA device)
        reason = f"worker failed: {type(err).__name__}: {err}"
        return _ShardResult(failed={case["id"]: f"{case['image'][0]}: {reason}" for case in shard})


def _previous_rows(table: Path, keep: set[str]) -> list[dict[str, Any]]:
    """Rows of an earlier run's CSV for the cases skipped now (``--resume`` keeps them)."""
    if not keep or not table.exists():
        return []
    with table.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["case"] in keep]


@dataclass
class _ShardResult:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    doubts: list[dict[str, Any]] = field(default_factory=list)


def _device_of(device: str, rank: int) -> str:
    """``cuda:K`` plus ``rank`` for CUDA (``cuda`` counts from 0); the same CPU for every CPU worker."""
    if not device.startswith("cuda"):
        return device
    base = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def _run_shard(
    checkpoints: list[str],
    cases: list[dict[str, Any]],
    options: PredictOptions,
    rank: int,
    workers: int = 1,
    models: list[LoadedModel] | None = None,
) -> _ShardResult:
    """Predict ``cases`` in this process (one worker of ``workers``); a failing case does not stop the rest."""
    if workers > 1 and not options.device.startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    models = [m.to(options.device) for m in models] if models else [
        load_model(path, device=options.device) for path in checkpoints
    ]
    result = _ShardResult()
    for case in tqdm(cases, desc=f"predicting [{options.device}]", unit="case", position=rank):
        start = time.perf_counter()
        try:
            if models[0].task == "segmentation":
                result.doubts.append(_predict_segmentation_case(models, case, options))
            else:
                result.rows.append(_predict_classification_case(models, case, options))
        except Exception as err:  # any failure of one case (unreadable, out of memory, ...) stays with that case
            _remove_outputs(case["id"], options.output)
            message = f"{type(err).__name__}: {err}"
            reason = message if str(case["image"][0]) in message else f"{case['image'][0]}: {message}"
            result.failed[case["id"]] = reason
            tqdm.write(f"{case['id']} FAILED: {reason}", file=sys.stderr)
            continue
        result.done.append(case["id"])
        tqdm.write(f"{case['id']} done in {time.perf_counter() - start:.2f} s on {options.device}")
    return result


def _case_outputs(case: str, output: Path) -> list[Path]:
    """Every file a segmentation case may write (the label map last: it marks the case as finished)."""
    return [
        output / "probabilities" / f"{case}.npz",
        output / "uncertainty" / f"{case}_entropy.nii.gz",
        output / "uncertainty" / f"{case}_variance.nii.gz",
        output / f"{case}.nii.gz",
    ]


def _remove_outputs(case: str, output: Path) -> None:
    for path in _case_outputs(case, output):
        path.unlink(missing_ok=True)


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
        done = {c["id"]: None for c in cases if _complete(c["id"], options)}
    if done and not options.resume:
        raise FileExistsError(
            f"{options.output}: {len(done)} case(s) already predicted (e.g. {next(iter(done))}); "
            "use --overwrite to redo them or --resume to skip them"
        )
    return done


def _complete(case: str, options: PredictOptions) -> bool:
    """A segmentation case is finished when its label map and every side output asked for exist."""
    probabilities, entropy_map, _, labels = _case_outputs(case, options.output)
    wanted = [labels] + [probabilities] * options.save_probabilities + [entropy_map] * options.save_uncertainty
    return all(path.exists() for path in wanted)


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
    row = {"case": case["id"], "doubt": 0.0, "members": len(members)}
    probabilities_path, entropy_path, variance_path, labels_path = _case_outputs(case["id"], options.output)
    if options.save_probabilities:
        _write_npz(probabilities_path, probabilities=probabilities.astype(np.float16), affine=affine,
                   label_names=np.array(models[0].label_names))
    if options.save_uncertainty:
        entropy_map = entropy(probabilities)
        write_nifti(entropy_map, affine, entropy_path)
        if len(members) > 1:
            write_nifti(member_variance(members), affine, variance_path)
        row["doubt"] = case_doubt(entropy_map, [m.argmax(axis=0) for m in members])
    dtype = np.uint8 if probabilities.shape[0] <= 255 else np.int16
    write_nifti(labels.astype(dtype), affine, labels_path)  # last: its presence means the case is complete
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
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
