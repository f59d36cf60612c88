"""``medseg cv``: cross-validate a config; folds trained, out-of-fold predictions, pooled evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medseg.commands.common import CommandError, doc, number, table
from medseg.evaluation.splits import STRATEGIES  # numpy only


def parser(prog: str = "medseg cv") -> argparse.ArgumentParser:
    """The options of ``medseg cv`` (any other argument is a ``medseg fit`` override)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc("cv"),
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
    return parser


def run(argv: list[str]) -> int:
    """``medseg cv ARGS``: prints where it is while it runs, then the pooled results."""
    args, overrides = parser().parse_known_args(argv)
    from medseg.evaluation.crossval import run_cv

    try:
        result = run_cv(args.config, args.output, args.folds, args.strategy, args.holdout_fraction, args.fold,
                        args.seed, overrides)
    except ValueError as err:
        raise CommandError(str(err)) from err
    if args.fold is not None:
        print(f"fold {args.fold} trained and predicted in {Path(args.output) / f'fold_{args.fold}'}; run medseg cv "
              "without --fold, once every fold is done, for the pooled evaluation")
        return 0
    print(results_table(result, Path(args.output)))
    return 0


def results_table(result: dict[str, Any], output: Path) -> str:
    """The end of ``medseg cv``: the pooled out-of-fold metrics (segmentation: the foreground means) and where
    the tables are."""
    scalars = {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))}
    what = "foreground mean" if result.get("task") == "segmentation" else "value"
    lines = [f"cross-validation ({result['folds']} folds) in {output}: pooled out-of-fold results",
             table(["metric", what], [[k, number(v)] for k, v in scalars.items()])]
    tables = [output / name for name in ("summary.csv", "per_case.csv") if (output / name).is_file()]
    tables.append(output / "cv.json")
    lines.append(f"report: {', '.join(str(p) for p in tables)}")
    return "\n".join(lines)
