"""``medseg predict``: predict a folder or a dataset.json with one or more checkpoints, on each input's own grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands.common import CommandError, doc, max_voxels_option, prediction_options

# medseg.inference.native.NONFINITE_MODES and medseg.inference.pipeline.PRECISIONS, written out so that the
# parser is built without importing torch (tests/test_console.py checks they agree)
NONFINITE_MODES = ("fail", "zero")
PRECISIONS = ("auto", "32", "16", "bf16")
OUTPUT_FORMATS = ("nifti", "dicom-seg")  # medseg.inference.dicom_seg.OUTPUT_FORMATS
RUNTIMES = ("auto", "torchscript", "onnx")  # medseg.deploy.artifact.RUNTIMES
BAKED_IN = ("tta", "tta_axes", "ensemble", "postprocess", "calibration")  # what --model brings with it


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg predict``."""
    parser = argparse.ArgumentParser(prog="medseg predict", description=doc("predict"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", action="append", help="checkpoint; repeat for an ensemble")
    source.add_argument("--model", default=None, metavar="DIR",
                        help="a folder written by medseg export: its networks, TTA, ensemble mode, post-processing "
                             "and calibration")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="how --model runs its networks: TorchScript or ONNX (CPU); auto = TorchScript when "
                             "exported")
    parser.add_argument("--input", required=True, help="folder of images, or a dataset.json / CSV")
    parser.add_argument("--output", required=True, help="folder for <case>.nii.gz / predictions.csv")
    prediction_options(parser, ensemble_default=None)
    parser.add_argument("--save-probabilities", action="store_true", help="probabilities/<case>.npz: float16 (K, ...) + affine")
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
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="nifti",
                        help="dicom-seg: also <case>.seg.dcm, a DICOM SEG referencing the input series (the input "
                             "must be DICOM series folders)")
    max_voxels_option(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    group.add_argument("--resume", action="store_true", help="skip cases whose outputs exist")
    return parser


def run(argv: list[str]) -> int:
    """``medseg predict ARGS``; exit code 1 when a case failed."""
    options_parser = parser()
    args = options_parser.parse_args(argv)
    if args.tta_axes is not None and not args.tta:
        options_parser.error("--tta-axes needs --tta")
    if args.runtime != "auto" and not args.model:
        options_parser.error("--runtime applies to --model (checkpoints run in torch)")
    if args.ckpt:
        from medseg.deploy.artifact import is_model_folder

        folders = [path for path in args.ckpt if is_model_folder(path)]
        if folders:
            raise CommandError(f"{folders[0]}: an exported model folder, not a checkpoint; predict with --model "
                               f"{folders[0]} (it brings its own TTA, ensemble and post-processing)")
    if args.model:
        given = [f"--{name.replace('_', '-')}" for name in BAKED_IN if getattr(args, name) not in (None, False)]
        if given:
            raise CommandError(f"{args.model}: an exported model carries its own TTA, ensemble mode, post-processing "
                               f"and calibration (see its medseg_model.json); drop {', '.join(given)}, or export "
                               "again with them")
    from medseg.data.discovery import parse_shard

    try:
        shard = parse_shard(args.shard) if args.shard is not None else None
    except ValueError as err:
        raise CommandError(str(err)) from err
    steps, temperature, baked = None, None, {}
    if args.model:
        from medseg.deploy.artifact import prediction_options, read_spec

        try:
            baked = prediction_options(read_spec(args.model))
        except ValueError as err:
            raise CommandError(str(err)) from err
        steps, temperature = baked.pop("postprocess"), baked.pop("temperature")
    elif args.postprocess:
        from medseg.inference.postprocess import load_postprocessing

        try:
            steps = load_postprocessing(args.postprocess)
        except ValueError as err:
            raise CommandError(f"--postprocess: {err}") from err
    from medseg.inference.batch import PredictOptions, predict_batch

    options = PredictOptions(
        output=Path(args.output), tta=baked.get("tta", args.tta), tta_axes=baked.get("tta_axes", args.tta_axes),
        ensemble=baked.get("ensemble", args.ensemble or "mean"), postprocess=steps, temperature=temperature,
        runtime=args.runtime,
        save_probabilities=args.save_probabilities, save_uncertainty=args.save_uncertainty, device=args.device,
        precision=args.precision, overwrite=args.overwrite, resume=args.resume, shard=shard,
        nonfinite=args.nonfinite, max_voxels=args.max_voxels, calibration=args.calibration,
        output_format=args.output_format,
    )
    try:
        report = predict_batch([args.model] if args.model else args.ckpt, args.input, options, devices=args.devices)
    except ValueError as err:  # bad checkpoint, mismatched ensemble, bad TTA axes, colliding case ids
        raise CommandError(str(err)) from err
    print(f"predicted {len(report.done)} case(s), skipped {len(report.skipped)}, failed {len(report.failed)}")
    if report.failed:  # each reason was printed once, when its case failed
        import sys

        shown = ", ".join(list(report.failed)[:10]) + (" ..." if len(report.failed) > 10 else "")
        print(f"medseg predict: {len(report.failed)} case(s) failed (reasons above): {shown}", file=sys.stderr)
    return 1 if report.failed else 0
