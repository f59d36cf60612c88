"""``medseg ab-report``: the two arms of a served A/B test compared from the request log of ``medseg serve``.

Each arm's answered requests (status ok) are summarised (latency, doubt, the predicted volume or area of each
structure, and with reference labels Dice and HD95 per structure) and the arms compared by unpaired statistics
(:mod:`medseg.evaluation.ab_stats`): the arms saw different patients. The results are written to
``ab_summary.json``, ``ab_report.md``, ``ab_report.html`` (one file; the benchmark report's templates, CSS and
number formats) and, with reference labels, ``ab_cases.csv`` (one row per scored request and structure).

More than two models in a log are not compared pairwise: ``arms`` (``--arms A,B``) picks two, the rows of the
others are left out and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path, write_csv
from medseg.evaluation import ab_render, ab_stats, report
from medseg.evaluation import report_format as fmt
from medseg.evaluation.ab_log import ABLog, Measure, read_log
from medseg.evaluation.ab_truth import TruthScores, load_truth, score_log
from medseg.evaluation.evaluate import nan_to_none
from medseg.metrics.conventions import EmptyMaskRules

TRUTH_METRICS = ("dice", "hd95")  # compared per structure when reference labels are given
FILES = ("ab_summary.json", "ab_report.md", "ab_report.html", "ab_cases.csv")


@dataclass
class Comparison:
    """One measure of the two arms: the values of each, their summaries (:func:`ab_stats.describe`) and their
    comparison (:func:`ab_stats.compare`, with ``p_holm``, ``significant`` and ``better_arm``)."""

    measure: Measure
    values: dict[str, list[float]]
    summaries: dict[str, dict[str, float]]
    result: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """The comparison as ``ab_summary.json`` holds it."""
        info = self.measure.info
        return {"family": self.measure.family, "key": info.key, "structure": self.measure.structure,
                "title": self.measure.title, "unit": info.unit, "decimals": info.decimals, "better": info.better,
                "arms": self.summaries, **self.result}


def ab_report(log_path: str | Path, out: str | Path | None = None, truth: str | Path | None = None,
              arms: list[str] | None = None, rules: EmptyMaskRules | None = None,
              max_voxels: int = DEFAULT_MAX_VOXELS) -> dict[str, Any]:
    """Compare the arms of ``log_path`` and write the report files into ``out`` (default: ``ab_report/`` beside
    the log).

    Args:
        log_path: the ``medseg serve`` request log (CSV).
        out: the output folder.
        truth: reference labels (a ``dataset.json`` or a folder of ``<case>.nii.gz``): adds Dice and HD95.
        arms: the two models to compare, arm A first (default: the log's two).
        rules: the empty-mask rules of the scores (default: Metrics Reloaded's).
        max_voxels: the most voxels an image header may claim.

    Returns:
        The summary written to ``ab_summary.json``.
    """
    log = read_log(log_path, arms)
    out = Path(out) if out is not None else log.path.parent / "ab_report"
    scores = score_log(log, load_truth(truth), rules, max_voxels) if truth is not None else None
    comparisons = compare_arms(log, scores)
    summary = summarize(log, comparisons, scores, None if truth is None else str(truth))
    out.mkdir(parents=True, exist_ok=True)
    if scores is not None and scores.rows:
        write_csv(out / "ab_cases.csv", scores.rows,
                  ["request", "case", "patient", "model", "structure", *scores.metrics])
    with atomic_path(out / "ab_summary.json") as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(nan_to_none(summary), handle, indent=2, ensure_ascii=False)
    page, markdown = report.render("ab", ab_render.context(summary, comparisons))
    for name, text in (("ab_report.md", markdown), ("ab_report.html", page)):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    summary["out"] = str(out)
    return summary


def compare_arms(log: ABLog, scores: TruthScores | None) -> list[Comparison]:
    """Every measure of the log (latency, doubt, each structure's size), and with ``scores`` Dice and HD95 per
    structure, compared between the arms; Holm's correction within each family."""
    values = [(m, {arm: log.values(arm, column) for arm in log.arms}) for column, m in log.measures.items()]
    if scores is not None:
        for metric in TRUTH_METRICS:
            for structure in scores.structures:
                measure = Measure(metric, structure, fmt.info(metric))
                values.append((measure, {arm: [r[metric] for r in scores.rows
                                               if r["model"] == arm and r["structure"] == structure]
                                         for arm in log.arms}))
    comparisons = []
    for measure, by_arm in values:
        if not any(by_arm.values()):  # a structure no answered request has (a classifier's log has no volumes)
            continue
        result = {**ab_stats.compare(*(by_arm[arm] for arm in log.arms)), "family": measure.family}
        summaries = {arm: ab_stats.describe(v) for arm, v in by_arm.items()}
        comparisons.append(Comparison(measure, by_arm, summaries, result))
    ab_stats.holm_within([c.result for c in comparisons])
    for c in comparisons:
        c.result["better_arm"] = ab_stats.better_arm(c.result["effect"], c.measure.info.better, log.arms)
        del c.result["family"]
    return comparisons


def summarize(log: ABLog, comparisons: list[Comparison], scores: TruthScores | None,
              truth: str | None) -> dict[str, Any]:
    """The content of ``ab_summary.json``: the arms, the requests, the comparisons, the contract checks."""
    latency = next(c for c in comparisons if c.measure.family == "latency") if comparisons else None
    per_arm = {}
    for k, arm in enumerate(log.arms):
        rows = log.of(arm, ok=False)
        per_arm[arm] = {
            "label": "AB"[k], "requests": len(rows), "ok": len(log.of(arm)),
            "errors": log.errors(arm), "patients": len({r["patient"] for r in rows if r["patient"]}),
            "without_patient": sum(not r["patient"] for r in rows),
            "latency_s": latency.summaries[arm] if latency else ab_stats.describe([]),
        }
    shared = log.shared_patients()
    times = sorted(t for t in (_time(r.get("time")) for r in log.rows) if t is not None)
    summary: dict[str, Any] = {
        "log": str(log.path), "arms": log.arms, "routed": log.routed, "order": log.order, "requests": len(log.rows),
        "left_out": log.left_out, "period": [times[0].isoformat(), times[-1].isoformat()] if times else None,
        "per_arm": per_arm, "shared_patients": {"count": len(shared), "ids": shared},
        "comparisons": [c.record() for c in comparisons], "truth": None,
    }
    if scores is not None:
        summary["truth"] = {"source": truth, "structures": scores.structures, "counts": scores.counts,
                            "scored": sum(c["scored"] for c in scores.counts.values()),
                            "missing_files": scores.missing_files, "grid_mismatches": scores.grid_mismatches}
    summary["statistics"] = ab_render.statistics_paragraphs(summary)
    return summary


def _time(text: str | None) -> datetime | None:
    """An ISO 8601 time, in UTC when it names no zone; ``None`` when it is not one."""
    try:
        time = datetime.fromisoformat(text or "")
    except ValueError:
        return None
    return time if time.tzinfo else time.replace(tzinfo=timezone.utc)
