"""``medseg demo``: make a synthetic 3D dataset, train a small 3D U-Net, report held-out Dice."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.commands.common import doc

DEMO_TARGET_DICE = 0.90


def run(argv: list[str]) -> int:
    """``medseg demo``; exit code 1 when the held-out Dice misses :data:`DEMO_TARGET_DICE`."""
    parser = argparse.ArgumentParser(prog="medseg demo", description=doc("demo"))
    parser.add_argument("--out", default="demo_out", help="working folder (dataset, logs, checkpoint)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from medseg.demo import run_demo

    result = run_demo(Path(args.out), epochs=args.epochs, seed=args.seed)
    if result["mean_dice"] < DEMO_TARGET_DICE:
        print(f"medseg demo: mean Dice {result['mean_dice']:.3f} is below the target {DEMO_TARGET_DICE}", file=sys.stderr)
        return 1
    return 0
