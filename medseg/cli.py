"""The ``medseg`` command.

``fit``, ``validate`` and ``test`` go through Lightning's ``LightningCLI`` (YAML configs, ``--print_config``,
``class_path``/``init_args``); ``demo``, ``make-synthetic`` and ``check-data`` are plain sub-commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

LIGHTNING_COMMANDS = ("fit", "validate", "test")
DEMO_TARGET_DICE = 0.90
USAGE = """usage: medseg COMMAND [options]

commands:
  fit             train a model from a YAML config   (medseg fit --config configs/seg3d_unet.yaml)
  validate        run validation on a checkpoint      (medseg validate --config C.yaml --ckpt_path X.ckpt)
  test            run the test loop on a checkpoint   (medseg test --config C.yaml --ckpt_path X.ckpt)
  predict         predict a folder or dataset.json with one or more checkpoints, on each input's own grid
  cv              cross-validate a config: folds trained, out-of-fold predictions, pooled evaluation
  benchmark       cross-validate several configs on the same splits; results.csv, report.md/html
  evaluate        score a folder of predictions against references: per_case.csv, summary.csv/json
  demo            make a synthetic 3D dataset, train a small 3D U-Net, report held-out Dice
  make-synthetic  write a synthetic Decathlon-style dataset
  check-data      read every case of a dataset and report every problem
  plan            derive a commented training config from a dataset's fingerprint

Run `medseg COMMAND --help` for the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    _show_medseg_logs()
    from medseg.data.checks import DataCheckError
    from medseg.data.datalist import DatasetError
    from medseg.data.io import ImageReadError
    from medseg.errors import ConfigError, InputError, ResumeError

    try:
        if command in LIGHTNING_COMMANDS:
            return run_lightning(argv)
        commands = {
            "predict": _predict, "evaluate": _evaluate, "cv": _cv, "benchmark": _benchmark, "demo": _demo,
            "make-synthetic": _make_synthetic, "check-data": _check_data, "plan": _plan,
        }
        if command in commands:
            return commands[command](rest)
    except (DataCheckError, DatasetError, ImageReadError, ResumeError, ConfigError, InputError, FileExistsError,
            FileNotFoundError) as err:
        if command not in LIGHTNING_COMMANDS or _first_process():
            print(f"medseg {command}: {err}", file=sys.stderr)  # once, not once per DDP process
        return 2
    except OSError as err:  # a folder that cannot be created, a disk that is full, a file without permission
        if command not in LIGHTNING_COMMANDS or _first_process():
            where = f"{err.filename}: " if err.filename else ""
            print(f"medseg {command}: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    print(f"medseg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _show_medseg_logs() -> None:
    """medseg's own log records (e.g. where the sliding window stitches) go to stderr, one line each."""
    logger = logging.getLogger("medseg")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("medseg: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the one at start-up), so output
    redirected or captured later still gets medseg's messages."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _first_process() -> bool:
    from medseg.resume import launched_rank

    return launched_rank() == 0


def run_lightning(argv: list[str]) -> int:
    """Run ``fit``/``validate``/``test`` (see :func:`medseg.training.run_cli`)."""
    from medseg.training import run_cli

    run_cli(argv)
    return 0


def _demo(argv: list[str]) -> int:
    from medseg.demo import run_demo

    parser = argparse.ArgumentParser(prog="medseg demo", description=_doc("demo"))
    parser.add_argument("--out", default="demo_out", help="working folder (dataset, logs, checkpoint)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_demo(Path(args.out), epochs=args.epochs, seed=args.seed)
    if result["mean_dice"] < DEMO_TARGET_DICE:
        print(f"medseg demo: mean Dice {result['mean_dice']:.3f} is below the target {DEMO_TARGET_DICE}", file=sys.stderr)
        return 1
    return 0


def _predict(argv: list[str]) -> int:
    from medseg.data.discovery import parse_shard
    from medseg.inference.batch import PredictOptions, predict_batch
    from medseg.inference.native import NONFINITE_MODES
    from medseg.inference.pipeline import PRECISIONS

    parser = argparse.ArgumentParser(prog="medseg predict", description=_doc("predict"))
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint; repeat for an ensemble")
    parser.add_argument("--input", required=True, help="folder of images, or a dataset.json / CSV")
    parser.add_argument("--output", required=True, help="folder for <case>.nii.gz / predictions.csv")
    parser.add_argument("--tta", action="store_true", help="average over flips along every combination of axes")
    parser.add_argument("--tta-axes", type=int, nargs="+", default=None, help="flip only these spatial axes")
    parser.add_argument("--ensemble", choices=("mean", "vote"), default="mean", help="how members combine")
    parser.add_argument("--postprocess", default=None, help="post-processing spec: JSON/YAML file or JSON text")
    parser.add_argument("--save-probabilities", action="store_true", help="probabilities/<case>.npz: float16 (K, ...) + affine")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="calibration.json of medseg cv: its temperature rescales the probabilities (the labels "
                             "do not change)")
    parser.add_argument("--save-uncertainty", action="store_true", help="entropy (+ member variance) maps")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda[:N]")
    parser.add_argument("--devices", type=int, default=1, help="worker processes, one per GPU (cuda:0..N-1)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="window precision: auto = what each checkpoint trained at (GPU), float32 on the CPU")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="predict part K (0..N-1) of N of the cases, e.g. one SLURM array task each")
    parser.add_argument("--nonfinite", choices=NONFINITE_MODES, default="fail",
                        help="NaN/Inf input voxels: fail the case, naming the file and the count (default), or "
                             "predict them as 0")
    _max_voxels_option(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    group.add_argument("--resume", action="store_true", help="skip cases whose outputs exist")
    args = parser.parse_args(argv)
    if args.tta_axes is not None and not args.tta:
        parser.error("--tta-axes needs --tta")
    try:
        shard = parse_shard(args.shard) if args.shard is not None else None
    except ValueError as err:
        print(f"medseg predict: {err}", file=sys.stderr)
        return 2
    steps = None
    if args.postprocess:
        from medseg.inference.postprocess import load_postprocessing

        try:
            steps = load_postprocessing(args.postprocess)
        except ValueError as err:
            print(f"medseg predict: --postprocess: {err}", file=sys.stderr)
            return 2
    options = PredictOptions(
        output=Path(args.output), tta=args.tta, tta_axes=args.tta_axes, ensemble=args.ensemble, postprocess=steps,
        save_probabilities=args.save_probabilities, save_uncertainty=args.save_uncertainty, device=args.device,
        precision=args.precision, overwrite=args.overwrite, resume=args.resume, shard=shard,
        nonfinite=args.nonfinite, max_voxels=args.max_voxels, calibration=args.calibration,
    )
    try:
        report = predict_batch(args.ckpt, args.input, options, devices=args.devices)
    except ValueError as err:  # bad checkpoint, mismatched ensemble, bad TTA axes, colliding case ids
        print(f"medseg predict: {err}", file=sys.stderr)
        return 2
    print(f"predicted {len(report.done)} case(s), skipped {len(report.skipped)}, failed {len(report.failed)}")
    if report.failed:  # each reason was printed once, when its case failed
        shown = ", ".join(list(report.failed)[:10]) + (" ..." if len(report.failed) > 10 else "")
        print(f"medseg predict: {len(report.failed)} case(s) failed (reasons above): {shown}", file=sys.stderr)
    return 1 if report.failed else 0


def _cv(argv: list[str]) -> int:
    from medseg.evaluation.crossval import run_cv
    from medseg.evaluation.splits import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="medseg cv", description=_doc("cv"),
        epilog="Any other argument is a `medseg fit` override applied to every fold, e.g. --trainer.max_epochs 1",
    )
    parser.add_argument("--config", required=True, action="append",
                        help="the training config (as for medseg fit); repeat to apply several in order")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--strategy", choices=STRATEGIES, default="kfold")
    parser.add_argument("--holdout-fraction", type=float, default=0.2)
    parser.add_argument("--fold", type=int, default=None,
                        help="train and predict this fold only (run folds in parallel, one GPU or node each; a "
                             "later plain `medseg cv` collects them)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, and of each fold's training, sampling and augmentation")
    parser.add_argument("--output", required=True)
    args, overrides = parser.parse_known_args(argv)
    try:
        result = run_cv(args.config, args.output, args.folds, args.strategy, args.holdout_fraction, args.fold,
                        args.seed, overrides)
    except ValueError as err:
        print(f"medseg cv: {err}", file=sys.stderr)
        return 2
    if args.fold is not None:
        print(f"fold {args.fold} trained and predicted in {Path(args.output) / f'fold_{args.fold}'}; run medseg cv "
              "without --fold, once every fold is done, for the pooled evaluation")
        return 0
    metrics = result.get("metrics", {})
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("dice", "hd95", "nsd", "accuracy", "auc", "f1_macro")}
    print(f"cross-validation ({result['folds']} folds) in {args.output}: {shown}")
    return 0


def _benchmark(argv: list[str]) -> int:
    from medseg.evaluation.benchmark import run_benchmark, run_dataset_benchmark
    from medseg.evaluation.splits import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="medseg benchmark", description=_doc("benchmark"),
        epilog="Any other argument is a `medseg fit` override applied to every config and fold",
    )
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--strategy", choices=STRATEGIES, default="kfold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    parser.add_argument("--datasets", nargs="+", metavar="DIR",
                        help="dataset folders or dataset.json files: benchmark the configs on each (into "
                             "OUTPUT/<dataset folder name>/) and rank the models across them")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.datasets:
            run_dataset_benchmark(args.configs, args.datasets, args.output, args.folds, args.strategy, args.seed,
                                  overrides)
        else:
            run_benchmark(args.configs, args.output, args.folds, args.strategy, args.seed, overrides)
    except ValueError as err:
        print(f"medseg benchmark: {err}", file=sys.stderr)
        return 2
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from medseg.evaluation.evaluate import evaluate_classification, evaluate_segmentation
    from medseg.metrics.conventions import EmptyMaskRules

    parser = argparse.ArgumentParser(prog="medseg evaluate", description=_doc("evaluate"))
    parser.add_argument("--pred", required=True, help="folder of <case>.nii.gz predictions, or predictions.csv")
    parser.add_argument("--truth", required=True, help="folder of reference label files, or a dataset.json")
    parser.add_argument("--output", required=True, help="folder for per_case.csv, summary.csv, summary.json")
    parser.add_argument("--labels", type=_labels, default=None, metavar="1,2",
                        help="foreground label values to score in every case (default: a dataset.json's labels, "
                             "else every value the reference files hold)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="normalised surface Dice tolerance (mm)")
    parser.add_argument("--empty-distance", default="diagonal", metavar="diagonal|MM|nan",
                        help="hd95/assd of a missed or spurious structure: the image diagonal in mm (default), a "
                             "number of mm, or nan to leave such pairs out of the means (counted and warned)")
    parser.add_argument("--probabilities", default=None, metavar="DIR",
                        help="saved probabilities (medseg predict --save-probabilities; default PRED/probabilities "
                             "when it exists): adds ECE, Brier and NLL per case and class, and reliability.png")
    parser.add_argument("--both-empty", default="1", choices=("1", "nan"),
                        help="dice/iou/nsd of a structure absent from both masks: 1 (default), or nan to leave "
                             "such pairs out")
    _max_voxels_option(parser)
    args = parser.parse_args(argv)
    pred = Path(args.pred)
    try:
        rules = EmptyMaskRules.parse(args.both_empty, args.empty_distance)
        if pred.suffix == ".csv" or (pred / "predictions.csv").is_file():
            return _report_classification(evaluate_classification(pred, args.truth, args.output), args.output)
        summary = evaluate_segmentation(args.pred, args.truth, args.output, args.nsd_tolerance, rules,
                                        classes=args.labels, max_voxels=args.max_voxels,
                                        probabilities=args.probabilities)
    except ValueError as err:
        print(f"medseg evaluate: {err}", file=sys.stderr)
        return 2
    fg, hits = summary["foreground_mean"], summary["conventions"]
    print(f"{summary['cases']} case(s): foreground mean Dice {fg['dice']:.4f}, HD95 {fg['hd95']:.2f} mm, "
          f"NSD {fg['nsd']:.4f}; tables in {args.output}")
    missed = hits["prediction_empty"] + hits["reference_empty"]
    if missed:
        print(f"  {hits['prediction_empty']} missed and {hits['reference_empty']} spurious structure(s): Dice 0, "
              f"HD95/ASSD {args.empty_distance}{'' if args.empty_distance == 'nan' else ' (penalty)'}")
    for metric, count in summary["left_out"].items():
        print(f"warning: {metric}: {count} case/class pair(s) are undefined (nan by request) and left out of its "
              "means", file=sys.stderr)
    for key in ("missing_predictions", "unmatched_predictions"):
        if summary[key]:
            print(f"  {key.replace('_', ' ')}: {', '.join(summary[key])}", file=sys.stderr)
    undeclared = summary["undeclared_labels"]
    if undeclared["cases"]:
        print(f"  undeclared label values: {undeclared['voxels']} voxel(s) in {undeclared['cases']} case(s) "
              "(summary.json: undeclared_labels)", file=sys.stderr)
    return 1 if summary["missing_predictions"] else 0


def _labels(text: str) -> list[int]:
    """Foreground label values written ``1,2,3``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give foreground label values > 0, e.g. 1,2")
    return sorted(set(values))


def _report_classification(summary: dict, output: str) -> int:
    print(f"{summary['cases']} case(s): accuracy {summary['accuracy']:.4f}, AUC {summary['auc']:.4f}, "
          f"macro F1 {summary['f1_macro']:.4f}, ECE {summary['ece']:.4f}; tables and plots in {output}")
    for key in ("missing_predictions", "unmatched_predictions"):
        if summary[key]:
            print(f"  {key.replace('_', ' ')}: {', '.join(summary[key])}", file=sys.stderr)
    return 1 if summary["missing_predictions"] else 0


def _make_synthetic(argv: list[str]) -> int:
    from medseg.data.synthetic import make_synthetic

    parser = argparse.ArgumentParser(prog="medseg make-synthetic", description=_doc("make-synthetic"))
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--classes", type=int, default=2, help="classes including background for seg")
    parser.add_argument("--task", choices=("seg", "cls"), default="seg")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--test-cases", type=int, default=0)
    parser.add_argument("--size", type=int, nargs="+", default=None, help="image shape, e.g. 48 48 24")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regions", action="store_true",
                        help="nested structures (labels 1 > 2 > 3) with overlapping regions whole/core/inner")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel size in mm, e.g. 0.7 0.7 5")
    parser.add_argument("--modality", choices=("mri", "ct"), default="mri",
                        help="ct: Hounsfield units, air around a soft-tissue body (channel name CT)")
    parser.add_argument("--structure-scale", type=float, default=1.0,
                        help="factor on the structures' radii, e.g. 0.4 for small lesion-like structures")
    args = parser.parse_args(argv)
    if args.regions and args.task != "seg":
        parser.error("--regions is for --task seg")
    path = make_synthetic(
        args.out, dims=args.dims, cases=args.cases, classes=args.classes, task=args.task, seed=args.seed,
        size=args.size, channels=args.channels, test_cases=args.test_cases, regions=args.regions,
        spacing=args.spacing, modality=args.modality, structure_scale=args.structure_scale,
    )
    print(f"wrote {args.cases} cases: {path}")
    return 0


def _check_data(argv: list[str]) -> int:
    from medseg.data.checks import check_counted, format_report

    parser = argparse.ArgumentParser(prog="medseg check-data", description=_doc("check-data"))
    parser.add_argument("root", help="dataset folder (with dataset.json / dataset.csv) or the description file")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="affine/spacing tolerance")
    _max_voxels_option(parser)
    args = parser.parse_args(argv)
    problems, n_cases = check_counted(args.root, tolerance=args.tolerance, progress=True, max_voxels=args.max_voxels)
    print(format_report(problems, n_cases))
    return 1 if problems else 0


def _count(text: str) -> int:
    """A positive whole number, also written as ``2e9``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number (e.g. 2000000000 or 2e9)")
    return int(value)


def _plan(argv: list[str]) -> int:
    from medseg.plan.fingerprint import fingerprint_dataset
    from medseg.plan.planner import make_plan, write_config

    parser = argparse.ArgumentParser(prog="medseg plan", description=_doc("plan"))
    parser.add_argument("dataset", help="dataset folder (with dataset.json) or the description file")
    parser.add_argument("--out", default=None, help="config to write (default DATASET/plans/<dims>d.yaml)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None, help="default: the images' own")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="memory budget of the patch (default: 80%% of the GPU's, or a CPU step budget)")
    parser.add_argument("--max-time", default=None, metavar="DD:HH:MM:SS",
                        help="wall time of training; the learning rate anneals over it")
    parser.add_argument("--network", default="planned_unet", help="the network to plan (planned_unet)")
    _max_voxels_option(parser)
    args = parser.parse_args(argv)
    from medseg.plan.rules import parse_duration

    try:
        if args.max_time:
            parse_duration(args.max_time)  # before the dataset is read
        if args.network != "planned_unet":
            raise ValueError(f"--network {args.network!r}: medseg plan plans 'planned_unet' only so far")
        fingerprint = fingerprint_dataset(args.dataset, max_voxels=args.max_voxels)
        dims = args.dims or fingerprint.spacings.shape[1]
        plan = make_plan(fingerprint, dims, args.gpu_memory, args.max_time, args.network)
    except ValueError as err:  # images too small, other dims, bad --max-time or --network
        print(f"medseg plan: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else fingerprint.spec.root / "plans" / f"{dims}d.yaml"
    command = " ".join(["medseg plan", *argv])
    write_config(plan, out, [f"Planned by `{command}` from {fingerprint.spec.source}.",
                             "Every derived value has its reason beside it; run it with medseg fit --config FILE."])
    width = max(len(row[0]) for row in plan.table)
    for name, found, decided in plan.table:
        print(f"{name:<{width}}  {found:<24}  {decided}")
    print(f"wrote {out}: medseg fit --config {out}")
    return 0


def _max_voxels_option(parser: argparse.ArgumentParser) -> None:
    from medseg.data.io import DEFAULT_MAX_VOXELS

    parser.add_argument("--max-voxels", type=_count, default=DEFAULT_MAX_VOXELS,
                        help="the most voxels an image header may claim; larger claims (and claims the file is too "
                             f"small to hold) are refused before any voxel is read (default {DEFAULT_MAX_VOXELS:,})")


def _doc(command: str) -> str:
    for line in USAGE.splitlines():
        if line.strip().startswith(command + " "):
            return line.strip()[len(command) :].strip()
    return ""
