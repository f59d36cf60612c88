"""``medseg predict``: predict a folder or a dataset.json with one or more checkpoints, on each input's own grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands.common import CommandError, doc, max_voxels_option

# medseg.inference.native.NONFINITE_MODES and medseg.inference.pipeline.PRECISIONS, written out so that the
# parser is built without importing torch (tests/test_console.py checks they agree)
NONFINITE_MODES = ("fail", "zero")
PRECISIONS = ("auto", "32", "16", "bf16")


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg predict``."""
    parser = argparse.ArgumentParser(prog="medseg predict", description=doc("predict"))
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
    from medseg.data.discovery import parse_shard

    try:
        shard = parse_shard(args.shard) if args.shard is not None else None
    except ValueError as err:
        raise CommandError(str(err)) from err
    steps = None
    if args.postprocess:
        from medseg.inference.postprocess import load_postprocessing

        try:
            steps = load_postprocessing(args.postprocess)
        except ValueError as err:
            raise CommandError(f"--postprocess: {err}") from err
    from medseg.inference.batch import PredictOptions, predict_batch

    options = PredictOptions(
        output=Path(args.output), tta=args.tta, tta_axes=args.tta_axes, ensemble=args.ensemble, postprocess=steps,
        save_probabilities=args.save_probabilities, save_uncertainty=args.save_uncertainty, device=args.device,
        precision=args.precision, overwrite=args.overwrite, resume=args.resume, shard=shard,
        nonfinite=args.nonfinite, max_voxels=args.max_voxels, calibration=args.calibration,
    )
    try:
        report = predict_batch(args.ckpt, args.input, options, devices=args.devices)
    except ValueError as err:  # bad checkpoint, mismatched ensemble, bad TTA axes, colliding case ids
        raise CommandError(str(err)) from err
    print(f"predicted {len(report.done)} case(s), skipped {len(report.skipped)}, failed {len(report.failed)}")
    if report.failed:  # each reason was printed once, when its case failed
        import sys

        shown = ", ".join(list(report.failed)[:10]) + (" ..." if len(report.failed) > 10 else "")
        print(f"medseg predict: {len(report.failed)} case(s) failed (reasons above): {shown}", file=sys.stderr)
    return 1 if report.failed else 0
