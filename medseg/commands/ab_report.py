"""``medseg ab-report``: compare the two arms of a served A/B test from the request log of ``medseg serve``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medseg.commands.common import CommandError, doc, max_voxels_option, table


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg ab-report``."""
    parser = argparse.ArgumentParser(
        prog="medseg ab-report", description=doc("ab-report"),
        epilog="Writes ab_report.md, ab_report.html, ab_summary.json and, with --truth, ab_cases.csv (one row per "
               "scored request and structure). The arms saw different patients: the tests are unpaired "
               "(Mann-Whitney U, Holm-corrected within each measure, Cliff's delta).")
    parser.add_argument("log", help="the request log of medseg serve (CSV, medseg serve --log)")
    parser.add_argument("--truth", default=None, metavar="DATASET",
                        help="reference labels: a dataset.json (or its folder), or a folder of <case>.nii.gz label "
                             "maps; adds Dice and HD95 of the kept predictions (medseg serve --keep-predictions)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the report files (default: ab_report/ beside the log)")
    parser.add_argument("--arms", type=arms, default=None, metavar="A,B",
                        help="the two models to compare, arm A first (needed when the log holds more than two; "
                             "default: the log's two models, in the order of medseg serve's split, else "
                             "alphabetical)")
    parser.add_argument("--empty-distance", default="diagonal", metavar="diagonal|MM|nan",
                        help="with --truth: HD95 of a missed or spurious structure (as medseg evaluate)")
    max_voxels_option(parser)
    return parser


def arms(text: str) -> list[str]:
    """Two model names written ``A,B``."""
    names = [name.strip() for name in text.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: give two different model names, A,B")
    return names


def run(argv: list[str]) -> int:
    """``medseg ab-report ARGS``: 0 when the report is written."""
    args = parser().parse_args(argv)
    from medseg.evaluation.ab_report import ab_report
    from medseg.metrics.conventions import EmptyMaskRules

    try:
        rules = EmptyMaskRules.parse("1", args.empty_distance)
        summary = ab_report(args.log, args.out, args.truth, args.arms, rules, args.max_voxels)
    except ValueError as err:
        raise CommandError(str(err)) from err
    print(console_summary(summary))
    shared = summary["shared_patients"]
    if shared["count"]:
        print(f"warning: {shared['count']} patient(s) served by both arms (the split must keep a patient on one "
              f"arm): {', '.join(shared['ids'][:10])}{', ...' if shared['count'] > 10 else ''}", file=sys.stderr)
    print(f"report: {Path(summary['out']) / 'ab_report.html'} (and ab_report.md, ab_summary.json"
          f"{', ab_cases.csv' if summary['truth'] and summary['truth']['scored'] else ''})")
    return 0


def console_summary(summary: dict[str, Any]) -> str:
    """The arms and the comparisons as a short table for the terminal."""
    from medseg.evaluation import report_format as fmt

    per_arm = summary["per_arm"]
    lines = [f"A/B of {summary['log']}: " + " vs ".join(f"{a} ({per_arm[a]['label']})" for a in summary["arms"])]
    lines.append(table(["arm", "model", "requests", "ok", "errors", "latency median (s)", "p95 (s)"], [
        [e["label"], arm, fmt.integer(e["requests"]), fmt.integer(e["ok"]), fmt.integer(sum(e["errors"].values())),
         *(fmt.number(e["latency_s"][k], 3) for k in ("median", "p95"))]
        for arm, e in per_arm.items()]))
    rows = []
    for c in summary["comparisons"]:
        medians = [fmt.number(c["arms"][a]["median"], c["decimals"]) for a in summary["arms"]]
        best = c["better_arm"]
        rows.append([c["title"] + (f" ({c['unit']})" if c["unit"] else ""), *medians,
                     fmt.p_value(c["p_holm"]), fmt.effect(c["effect"]),
                     f"{per_arm[best]['label']}{'' if c['significant'] else ' (n.s.)'}" if best else "-"])
    lines.append(table(["measure", "median A", "median B", "p (Holm)", "r", "better"], rows))
    truth = summary["truth"]
    if truth:
        unscored = {a: c["no_reference"] + c["no_prediction"] + c.get("grid_mismatch", 0)
                    for a, c in truth["counts"].items()}
        lines.append(f"  scored against {truth['source']}: {truth['scored']} request(s); not scored (no reference, "
                     f"no kept prediction or another grid): "
                     + ", ".join(f"{per_arm[a]['label']} {n}" for a, n in unscored.items()))
        for mismatch in truth.get("grid_mismatches", [])[:5]:
            lines.append(f"  not scored: {mismatch['reason']}")
    return "\n".join(lines)
