"""``medseg benchmark``: cross-validate several configs on the same splits; results.csv, report.md/html."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medseg.commands.common import CommandError, doc, number, table
from medseg.evaluation.splits import STRATEGIES  # numpy only


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg benchmark`` (any other argument is a ``medseg fit`` override)."""
    parser = argparse.ArgumentParser(
        prog="medseg benchmark", description=doc("benchmark"),
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
    return parser


def run(argv: list[str]) -> int:
    """``medseg benchmark ARGS``: prints where it is while it runs, then the results table and the report."""
    args, overrides = parser().parse_known_args(argv)
    from medseg.evaluation.benchmark import run_benchmark, run_dataset_benchmark

    try:
        if args.datasets:
            rows = run_dataset_benchmark(args.configs, args.datasets, args.output, args.folds, args.strategy,
                                         args.seed, overrides)
            print(datasets_table(rows))
        else:
            rows = run_benchmark(args.configs, args.output, args.folds, args.strategy, args.seed, overrides)
            print(results_table(rows))
    except ValueError as err:
        raise CommandError(str(err)) from err
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def results_table(rows: list[dict[str, Any]]) -> str:
    """Models × metrics, ``mean ± std`` over the pooled out-of-fold cases; ``*`` marks each metric's best."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        cells.setdefault(row["model"], {})[row["metric"]] = (_mean_std(row.get("mean"), row.get("std"))
                                                             + ("*" if row.get("best") == row["model"] else " "))
    body = [[model, *(values.get(m, "") for m in metrics)] for model, values in cells.items()]
    return ("results (pooled out-of-fold, mean ± std over cases; * best):\n"
            + table(["model", *metrics], body))


def _mean_std(mean: object, std: object) -> str:
    """``0.912 ± 0.031`` (3 decimals below 10, 1 from 10 on; the std with the mean's), or the mean alone."""
    if not isinstance(mean, (int, float)):
        return number(mean)
    decimals = 3 if abs(mean) < 10 else 1
    spread = f" ± {float(std):.{decimals}f}" if isinstance(std, (int, float)) and std == std else ""
    return f"{float(mean):.{decimals}f}{spread}"


def datasets_table(rows: list[dict[str, Any]]) -> str:
    """The models × datasets table of the primary metric, with the models' mean ranks."""
    from medseg.evaluation.ranking import VALUE_TABLE

    values = [r for r in rows if r.get("table") == VALUE_TABLE]
    if not values:
        return ""
    columns = [k for k in values[0] if k not in ("metric", "table")]
    title = f"{values[0]['metric']} per dataset (mean ± 95% CI half-width; mean rank over datasets):\n"
    return title + table(columns, [[number(r.get(c), 3) for c in columns] for r in values])
