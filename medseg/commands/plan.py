"""``medseg plan``: derive a commented training config from a dataset's fingerprint."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.commands.common import CommandError, doc, max_voxels_option


def run(argv: list[str]) -> int:
    """``medseg plan DATASET``: write the config and print each derived value with what it was derived from."""
    parser = argparse.ArgumentParser(prog="medseg plan", description=doc("plan"))
    parser.add_argument("dataset", help="dataset folder (with dataset.json) or the description file")
    parser.add_argument("--out", default=None, help="config to write (default DATASET/plans/<dims>d.yaml)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None, help="default: the images' own")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="memory budget of the patch (default: 80%% of the GPU's, or a CPU step budget)")
    parser.add_argument("--max-time", default=None, metavar="DD:HH:MM:SS",
                        help="wall time of training; the learning rate anneals over it")
    parser.add_argument("--network", default="planned_unet", help="the network to plan (planned_unet)")
    max_voxels_option(parser)
    args = parser.parse_args(argv)
    from medseg.plan.fingerprint import fingerprint_dataset
    from medseg.plan.planner import make_plan, write_config
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
        raise CommandError(str(err)) from err
    out = Path(args.out) if args.out else fingerprint.spec.root / "plans" / f"{dims}d.yaml"
    command = " ".join(["medseg plan", *argv])
    write_config(plan, out, [f"Planned by `{command}` from {fingerprint.spec.source}.",
                             "Every derived value has its reason beside it; run it with medseg fit --config FILE."])
    width = max(len(row[0]) for row in plan.table)
    for name, found, decided in plan.table:
        print(f"{name:<{width}}  {found:<24}  {decided}")
    print(f"wrote {out}: medseg fit --config {out}")
    return 0
