"""``medseg export``: checkpoints and their prediction options as one self-contained model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands.common import CommandError, doc, prediction_options

FORMATS = ("torchscript", "onnx", "both")  # medseg.deploy.export.FORMATS


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg export``."""
    parser = argparse.ArgumentParser(prog="medseg export", description=doc("export"))
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint; repeat for an ensemble")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to create")
    parser.add_argument("--format", choices=FORMATS, default="torchscript",
                        help="network files: TorchScript, ONNX (fixed patch, run with onnxruntime), or both")
    prediction_options(parser)
    parser.add_argument("--no-bundle", action="store_true", help="do not write the MONAI bundle layout")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    return parser


def run(argv: list[str]) -> int:
    """``medseg export ARGS``."""
    options_parser = parser()
    args = options_parser.parse_args(argv)
    if args.tta_axes is not None and not args.tta:
        options_parser.error("--tta-axes needs --tta")
    from medseg.deploy.export import SPEC_NAME, export_model

    try:
        out = export_model(args.ckpt, args.out, tta=args.tta, tta_axes=args.tta_axes, ensemble=args.ensemble,
                           postprocess=args.postprocess, calibration=args.calibration, formats=args.format,
                           bundle=not args.no_bundle, overwrite=args.overwrite)
    except ImportError as err:  # onnx/onnxruntime not installed
        raise CommandError(f"{err}; install the deploy extra: pip install \"medseg[deploy]\"") from err
    except ValueError as err:
        raise CommandError(str(err)) from err
    import json

    spec = json.loads((Path(out) / SPEC_NAME).read_text())
    print(describe(spec, out))
    return 0


def describe(spec: dict, out: Path) -> str:
    """What was exported, in a few lines: members, runtimes and their agreement, options, bundle."""
    inference = spec["inference"]
    lines = [f"exported {len(spec['members'])} member(s) to {out} ({spec['task']}, {spec['spatial_dims']}D, "
             f"labels {', '.join(spec['label_names'])})"]
    for k, member in enumerate(spec["members"]):
        parts = [f"{kind} (max |logit diff| {member[f'{kind}_max_abs_diff']:.1e})" for kind in ("torchscript", "onnx")
                 if member.get(kind)]
        lines.append(f"  member {k}: {member['checkpoint']}: {', '.join(parts)}")
    options = [f"TTA {len(inference['flips'])} flips" if inference["tta"] else "no TTA",
               f"ensemble {inference['ensemble']}",
               f"{len(inference['postprocess'])} post-processing step(s)" if inference["postprocess"] else
               "no post-processing",
               f"temperature {inference['temperature']:.3f}" if inference["temperature"] else "not calibrated"]
    lines.append("  " + ", ".join(options))
    bundle = spec.get("bundle", {})
    lines.append(f"  MONAI bundle: {bundle['config']}" if "config" in bundle else
                 f"  MONAI bundle: none ({bundle.get('omitted', 'not written')})")
    lines.append(f"  predict with: medseg predict --model {out} --input IMAGES --output OUT")
    return "\n".join(lines)
