"""``medseg predict``: many cases, one or more checkpoints, outputs on each input's own grid.

Three stages (:mod:`medseg.inference.cases`, :mod:`medseg.inference.pipeline`, :mod:`medseg.inference.writers`):

1. **Cases:** discovery (a folder or a dataset description, ``--shard K/N`` of it) and resume bookkeeping.
2. **Per-case pipeline:** preprocess -> window -> TTA -> invert -> accumulate. On a GPU, while one case is
   predicted, a background thread reads and preprocesses the next one and another writes the previous one, so
   the accelerator does not wait on nibabel or gzip (on the CPU the stages run in turn: the windows already
   use every core).
3. **Writers:** every file under a temporary name and renamed, the label map last; table rows appended as each
   case completes.

A case that cannot be processed is reported with its file and reason and the others go on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medseg.data.discovery import find_cases, shard_cases
from medseg.data.io import DEFAULT_MAX_VOXELS, ImageReadError, spacing_from_affine
from medseg.errors import InputError
from medseg.inference.cases import case_table, finish_table, pending_cases
from medseg.inference.dicom_seg import OUTPUT_FORMATS, check_seg_source, write_dicom_seg
from medseg.inference.ensemble import combine
from medseg.inference.members import ImageClasses
from medseg.inference.native import NONFINITE_MODES, LoadedModel, flip_sets
from medseg.inference.output_folder import OutputFolder, checkpoint_facts
from medseg.inference.pipeline import (
    PRECISIONS,
    PreparedCase,
    classify,
    group_models,
    prepare_case,
    segment,
    window_dtype,
)
from medseg.inference.sources import check_compatible, checked_temperature, load_sources, runtime_of
from medseg.inference.writers import CaseFiles, RowTable, write_case_maps


@dataclass
class PredictOptions:
    """What ``medseg predict`` was asked to do (see the CLI help).

    ``device`` is ``auto`` (CUDA when there is one), ``cpu`` or ``cuda[:N]``; ``precision`` is ``auto`` (the
    precision each checkpoint was trained at, on a GPU; float32 on the CPU), ``32``, ``16`` or ``bf16``;
    ``shard`` is ``(K, N)``: predict part K (from 0) of N; ``nonfinite`` is ``fail`` (a case with NaN/Inf
    voxels fails, naming the file and the count) or ``zero`` (they are predicted as 0); ``max_voxels`` bounds
    what an input header may claim; ``mix_models`` lets runs of different models share the output folder on
    disjoint cases (cross-validation's out-of-fold predictions; see :mod:`medseg.inference.output_folder`);
    ``calibration`` is a ``calibration.json`` (from ``medseg cv``) whose temperature rescales the probabilities;
    ``temperature`` is that temperature given directly (an exported model's); ``runtime`` is how an exported
    model folder runs its networks (``auto``, ``torchscript`` or ``onnx``; checkpoints always run in torch);
    ``output_format`` ``dicom-seg`` also writes ``<case>.seg.dcm``, a DICOM SEG referencing the case's input
    series (:mod:`medseg.inference.dicom_seg`; a case whose input is not a DICOM series then fails, and a
    classifier is refused before any case).
    """

    output: Path
    tta: bool = False
    tta_axes: list[int] | None = None
    ensemble: str = "mean"
    postprocess: list[dict[str, Any]] | None = None
    save_probabilities: bool = False
    save_uncertainty: bool = False
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    resume: bool = False
    shard: tuple[int, int] | None = None
    nonfinite: str = "fail"
    max_voxels: int = DEFAULT_MAX_VOXELS
    mix_models: bool = False
    calibration: str | None = None
    temperature: float | None = None
    runtime: str = "auto"
    output_format: str = "nifti"

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {self.output_format!r}")


@dataclass
class PredictReport:
    """Outcome of a batch: cases done, skipped (resume) and failed (``id -> "file: reason"``)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


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
            when the device is the CPU); the cases are dealt out in disjoint shards, so each case is predicted
            exactly once, and a worker that dies marks only its own cases as failed.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: before any case starts, for unloadable or mismatched
            checkpoints, bad options, colliding case ids, or outputs that exist without overwrite/resume.
    """
    models = load_sources(checkpoints, options.runtime)  # on the CPU: checked once, before any case
    check_compatible(models, checkpoints)
    if models[0].task == "multitask":
        from medseg.inference.multitask import check_members

        check_members(models, checkpoints)
    if models[0].task == "enhancement":  # generators: no label maps, probabilities or label-conditioned ones
        from medseg.inference.enhance import check_generators

        check_generators(models, checkpoints, options)
    _flips(models[0], options)
    if options.output_format == "dicom-seg" and models[0].task != "segmentation":
        article = "an" if models[0].task[0] in "aeiou" else "a"
        raise ValueError(f"--output-format dicom-seg: a DICOM SEG holds segments, and {checkpoints[0]} is "
                         f"{article} {models[0].task} model; use --output-format nifti")
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {options.precision!r}")
    if options.nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {list(NONFINITE_MODES)}, got {options.nonfinite!r}")
    runtime = runtime_of(models, checkpoints)
    if runtime == "onnx" and options.precision in ("16", "bf16"):
        raise ValueError(f"--precision {options.precision}: onnxruntime runs the ONNX networks in float32; use "
                         "--precision 32 (or auto), or --runtime torchscript")
    options = replace(options, device=resolve_device(options.device))
    temperature = _temperature(options, models[0])
    if cases is None:
        cases = find_cases(source, models[0].hparams["in_channels"], exclude=options.output)
    if options.shard is not None:
        cases = shard_cases(cases, *options.shard)
    # What the windows really run at ("auto" differs between a GPU and the CPU) is what a prediction depends on.
    recorded = {**asdict(options), "precision_option": options.precision, "runtime": runtime,
                "calibration": temperature if options.calibration or options.temperature is not None else None,
                "precision": [str(window_dtype(options.precision, options.device, m.precision) or torch.float32)
                              for m in models]}
    folder = OutputFolder(options.output, checkpoint_facts(checkpoints), recorded,
                          [case["id"] for case in cases], overwrite=options.overwrite, mix=options.mix_models)
    with folder:
        task = models[0].task
        table = case_table(task, options)
        _forget(folder.replaced, options, table)
        todo, skipped = pending_cases(task, cases, options, table)
        return _predict_cases(models, [str(c) for c in checkpoints], cases, todo, options, table, devices,
                              PredictReport(skipped=skipped))


def _forget(cases: set[str], options: PredictOptions, table: RowTable | None) -> None:
    """Remove the outputs and rows of ``cases`` (an earlier run of another model that is being replaced)."""
    for case in cases:
        CaseFiles.of(case, options.output).remove()
    if cases and table is not None:
        table.rewrite(keep=lambda row: row["case"] not in cases)


def _predict_cases(models: list[LoadedModel], paths: list[str], cases: list[dict[str, Any]],
                   todo: list[dict[str, Any]], options: PredictOptions, table: RowTable | None, devices: int,
                   report: PredictReport) -> PredictReport:
    """Predict ``todo`` in this process or in ``devices`` worker processes; the table is finished after."""
    task = models[0].task
    if devices <= 1:
        outcomes = [_run_cases(models, todo, options, table)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        shards = [todo[rank::devices] for rank in range(devices)]
        with ProcessPoolExecutor(max_workers=devices, mp_context=context) as pool:
            futures = [
                pool.submit(_run_worker, paths, shard, replace(options, device=_device_of(options.device, rank)),
                            rank, devices)
                for rank, shard in enumerate(shards)
            ]
            outcomes = [_worker_outcome(future, shard) for shard, future in zip(shards, futures, strict=True)]
    for outcome in outcomes:
        report.done += outcome.done
        report.failed.update(outcome.failed)
    finish_table(table, task, cases, set(report.failed))
    return report


@dataclass
class _Outcome:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _worker_outcome(future: Any, shard: list[dict[str, Any]]) -> _Outcome:
    """A worker's result, or every case of its shard failed with the reason the worker died."""
    try:
        return future.result()
    except Exception as err:  # the worker process died or could not start (e.g. no such CUDA device)
        reason = f"worker failed: {type(err).__name__}: {err}"
        return _Outcome(failed={case["id"]: f"{case['image'][0]}: {reason}" for case in shard})


def _device_of(device: str, rank: int) -> str:
    """``cuda:K`` plus ``rank`` for CUDA (``cuda`` counts from 0); the same CPU for every CPU worker."""
    if not device.startswith("cuda"):
        return device
    base = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def _run_worker(checkpoints: list[str], cases: list[dict[str, Any]], options: PredictOptions, rank: int,
                workers: int) -> _Outcome:
    """One worker process of ``--devices N``: its own models, its share of the threads, its shard."""
    from medseg.console import hide_library_noise

    hide_library_noise()  # a spawned process starts with Python's warning filters
    if not options.device.startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    models = load_sources(checkpoints, options.runtime)
    return _run_cases(models, cases, options, case_table(models[0].task, options), position=rank)


def _run_cases(
    models: list[LoadedModel], cases: list[dict[str, Any]], options: PredictOptions, table: RowTable | None,
    position: int = 0,
) -> _Outcome:
    """Predict ``cases`` in this process. On an accelerator, case ``i + 1`` is read while case ``i`` is predicted
    and case ``i - 1`` is written; on the CPU these run in turn. A failing case does not stop the rest."""
    models = [model.to(options.device) for model in models]
    groups = group_models(models, options.nonfinite)
    outcome = _Outcome()
    if not cases:
        return outcome
    bar = tqdm(total=len(cases), desc=f"predicting [{options.device}]", unit="case", position=position)
    # Background reading and writing keep an accelerator busy. On the CPU the windows already use every core,
    # and more threads only slow torch's down (measured: 8% slower on 2 cores), so the stages run in turn there.
    if background_stages(options.device):
        reader: Any = ThreadPoolExecutor(1, thread_name_prefix="medseg-read")
        writer: Any = ThreadPoolExecutor(1, thread_name_prefix="medseg-write")
    else:
        reader, writer = _InTurn(deferred=True), _InTurn(deferred=False)
    with reader, writer:
        upcoming = reader.submit(prepare_case, cases[0], groups, options.max_voxels)
        pending: tuple[dict[str, Any], Future, float] | None = None
        for i, case in enumerate(cases):
            start = time.perf_counter()
            current = upcoming
            if i + 1 < len(cases):
                upcoming = reader.submit(prepare_case, cases[i + 1], groups, options.max_voxels)
            try:
                if options.overwrite:  # the old files go first: a kill now leaves the case unfinished, not mixed
                    CaseFiles.of(case["id"], options.output).remove()
                job = _predict(current.result(), groups, models[0], options, table)
            except Exception as err:  # any failure of one case (unreadable, out of memory, ...) stays with it
                _fail(case, err, options, outcome)
                bar.update()
                continue
            finally:
                current = None  # noqa: F841  (the preprocessed image is not kept while the next case runs)
            if pending is not None:  # at most one case waits for its writer: memory stays bounded
                _collect(*pending, options, outcome, bar)
            pending = (case, writer.submit(_timed, job), start)
        if pending is not None:
            _collect(*pending, options, outcome, bar)
    bar.close()
    return outcome


def _predict(prepared: PreparedCase, groups: list, first: LoadedModel, options: PredictOptions,
             table: RowTable | None) -> Callable[[], None]:
    """Predict one prepared case; returns the job that writes its outputs."""
    flips = _flips(first, options)
    case = prepared.case
    seg_source = check_seg_source(case["image"], first.task, options.max_voxels) \
        if options.output_format == "dicom-seg" else None
    temperature = _temperature(options, first)
    if first.task == "enhancement":
        from medseg.inference.enhance import enhance_job

        return enhance_job(prepared, groups, flips, options)
    # A multitask model's image-level classes come from the segmentation's own window pass.
    image_classes = ImageClasses() if first.task == "multitask" else None
    if first.task == "classification":
        members = classify(prepared, groups, flips, options.device, options.precision)
        probabilities, label = combine([m.reshape(-1, 1) for m in members], options.ensemble)
        if temperature != 1.0:
            from medseg.metrics.temperature import apply_temperature

            probabilities = apply_temperature(probabilities, temperature, "softmax")
        names = first.label_names
        row: dict[str, Any] = {"case": case["id"], "prediction": names[int(label[0])]}
        row.update({f"p_{name}": float(p) for name, p in zip(names, probabilities[:, 0], strict=True)})
        return lambda: table.append(row) if table is not None else None
    maps = segment(prepared, groups, flips, options.device, options.precision, options.ensemble,
                   probabilities=options.save_probabilities, uncertainty=options.save_uncertainty,
                   temperature=temperature, image_classes=image_classes)
    class_row = _class_row(image_classes, options, first) if image_classes is not None else {}
    # What waits for the writer holds no view of the float32 accumulator, so that is freed now.
    if maps.probabilities is not None:
        maps.probabilities = maps.probabilities.astype(np.float16)
    if maps.variance is not None:
        maps.variance = np.array(maps.variance)
    affine, names = prepared.affine, first.label_names

    def write() -> None:
        if options.postprocess:
            from medseg.inference.postprocess import apply_postprocessing

            maps.labels = apply_postprocessing(maps.labels, spacing_from_affine(affine, maps.labels.ndim),
                                               options.postprocess)
        if table is not None:  # the row before the label map: a case with a label map always has its row
            doubt = maps.doubt if options.save_uncertainty else ""  # (a multitask row without --save-uncertainty)
            table.append({"case": case["id"], **class_row, "doubt": doubt, "members": maps.members})
        files = CaseFiles.of(case["id"], options.output)
        if seg_source is not None:  # before the label map, whose presence marks the case complete
            write_dicom_seg(maps.labels, seg_source, first.outputs.structures, files.dicom_seg, first.outputs.regions,
                            options.max_voxels)
        write_case_maps(files, maps, affine, names, first.outputs.regions)

    return write


def _class_row(image_classes: ImageClasses, options: PredictOptions, first: LoadedModel) -> dict[str, Any]:
    """A multitask case's ``prediction`` and ``p_<class>`` columns (:mod:`medseg.inference.multitask`)."""
    from medseg.inference.multitask import class_row

    return class_row(image_classes.probabilities(), options, first)


def _temperature(options: PredictOptions, first: LoadedModel) -> float:
    """The run's temperature: given directly (an exported model's), or of ``--calibration``, or 1."""
    if options.temperature is not None:
        return float(options.temperature)
    return checked_temperature(options.calibration, first) if options.calibration else 1.0


def background_stages(device: str) -> bool:
    """Whether reading and writing run in background threads: on an accelerator, not on the CPU."""
    return torch.device(device).type != "cpu"


class _InTurn:
    """Stands in for a one-thread pool when the stages run in turn: a deferred job (reading the next case) runs
    when its result is asked for, any other (writing) at once. Either way a failure stays in the future, as a
    thread pool keeps it, and fails only its own case."""

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred

    def __enter__(self) -> _InTurn:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future = _Later(fn, args)
        if not self.deferred:
            future.run()
        return future


class _Later(Future):
    """A future computed in the calling thread the first time its result is asked for."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__()
        self._call: tuple[Callable[..., Any], tuple[Any, ...]] | None = (fn, args)

    def run(self) -> None:
        """Compute the result now (once), keeping a failure for whoever asks for the result."""
        if self._call is not None:
            fn, args = self._call
            self._call = None
            try:
                self.set_result(fn(*args))
            except Exception as err:  # kept for the caller, as a thread pool keeps it
                self.set_exception(err)

    def result(self, timeout: float | None = None) -> Any:
        self.run()
        return super().result(timeout)


def _timed(job: Callable[[], None]) -> float:
    """Run a write job; returns when it finished (``time.perf_counter``)."""
    job()
    return time.perf_counter()


def _collect(case: dict[str, Any], future: Future, start: float, options: PredictOptions, outcome: _Outcome,
             bar: tqdm) -> None:
    try:
        finished = future.result()
    except Exception as err:
        _fail(case, err, options, outcome)
    else:
        outcome.done.append(case["id"])
        tqdm.write(f"{case['id']} done in {finished - start:.2f} s on {options.device}")
    bar.update()


def _fail(case: dict[str, Any], err: BaseException, options: PredictOptions, outcome: _Outcome) -> None:
    CaseFiles.of(case["id"], options.output).remove()
    message = str(err) if isinstance(err, (InputError, ImageReadError)) else f"{type(err).__name__}: {err}"
    reason = message if str(case["image"][0]) in message else f"{case['image'][0]}: {message}"
    outcome.failed[case["id"]] = reason
    tqdm.write(f"{case['id']} FAILED: {reason}", file=sys.stderr)


def _flips(model: LoadedModel, options: PredictOptions) -> list[tuple[int, ...]]:
    return flip_sets(model.hparams["spatial_dims"], options.tta_axes) if options.tta else [()]
