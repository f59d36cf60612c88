"""The parts of a benchmark report as plain data (tables of formatted text, findings, figures) for the templates.

Nothing here reads files: :mod:`medseg.evaluation.benchmark_report` gathers the numbers, these functions shape
them, :func:`medseg.evaluation.report.write_reports` renders them. The rows are those of ``results.csv``
(:func:`medseg.evaluation.report.compare`), as numbers or as the text read back from the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.evaluation import report_format as fmt


@dataclass(frozen=True)
class Link:
    """A cell that links somewhere (a relative path in the output folder)."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Table:
    """A table of formatted cells.

    Args:
        columns: the header.
        rows: one list of cells (text or :class:`Link`) per row.
        caption: what the table shows (units, n, how the numbers were made).
        numeric: per column, whether it holds numbers (right-aligned); default all but the first.
        strong: ``(row, column)`` cells to emphasise (the best value).
        marked: rows to highlight (the best model).
    """

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    numeric: list[bool] = field(default_factory=list)
    strong: set[tuple[int, int]] = field(default_factory=set)
    marked: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.numeric = self.numeric or [i > 0 for i in range(len(self.columns))]


@dataclass
class Section:
    """A titled table (one metric, one class)."""

    title: str
    table: Table
    key: str = ""


@dataclass
class Figure:
    """A picture of the report with its title and caption (numbered by the template)."""

    path: Path
    title: str
    caption: str


@dataclass
class Finding:
    """The best model of one metric against the runner-up."""

    metric: fmt.MetricInfo
    best: str
    best_value: str
    runner_up: str = ""
    runner_value: str = ""
    margin: str = ""
    relation: str = ""
    p_holm: str = ""
    effect: str = ""

    @property
    def p_phrase(self) -> str:
        """The Holm-adjusted p-value for a sentence: ``"p < 0.001"`` or ``"p = 0.110"``."""
        return f"p < {self.p_holm[1:]}" if self.p_holm.startswith("<") else f"p = {self.p_holm}"


def rows_of(rows: list[dict[str, Any]], metric: str, models: list[str]) -> list[dict[str, Any]]:
    """The rows of one metric, in the order of ``models`` (rows of other models left out)."""
    mine = {r["model"]: r for r in rows if r["metric"] == metric}
    return [mine[m] for m in models if m in mine]


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def findings(rows: list[dict[str, Any]], metrics: list[str], models: list[str]) -> list[Finding]:
    """Per metric, the best model, its mean [95% CI], and how far ahead of the runner-up it is (difference of
    the means, Holm-adjusted p and effect size of the runner-up's test against the best)."""
    out = []
    for metric in metrics:
        info, mine = fmt.info(metric), rows_of(rows, metric, models)
        best = next((r for r in mine if r["model"] == r.get("best")), None)
        if best is None:
            continue
        finding = Finding(info, best["model"], info.estimate(best["mean"], None, best["ci_low"], best["ci_high"]))
        others = [r for r in mine if r is not best and not math.isnan(_float(r["mean"]))]
        if others:
            higher = info.better == "higher"
            runner = (max if higher else min)(others, key=lambda r: _float(r["mean"]))
            gap = _float(best["mean"]) - _float(runner["mean"])
            finding.runner_up, finding.runner_value = runner["model"], info.value(runner["mean"])
            finding.margin = info.value(abs(gap)) + (f" {info.unit}" if info.unit else "")
            finding.relation = "higher" if gap > 0 else "lower" if gap < 0 else "equal"
            finding.p_holm, finding.effect = fmt.p_value(runner["p_holm"]), fmt.effect(runner["effect_rbc"])
        out.append(finding)
    return out


def findings_table(found: list[Finding]) -> Table:
    """One row per metric: best model, its estimate, the runner-up and the margin."""
    rows = [[f"{f.metric.label} {f.metric.arrow}", f.best, f.best_value, f.runner_up or "—",
             f.runner_value or "—", f"{f.margin} {f.relation}" if f.runner_up else "—", f.p_holm or "—",
             f.effect or "—"] for f in found]
    return Table(["Metric", "Best model", "Best: mean [95% CI]", "Runner-up", "Runner-up: mean",
                  "Difference of means", "p (Holm)", "Effect size r"], rows,
                 "Best model per metric; the runner-up's Wilcoxon test against the best, Holm-adjusted.",
                 numeric=[False, False, True, False, True, True, True, True])


def metric_sections(rows: list[dict[str, Any]], metrics: list[str], models: list[str],
                    counts: dict[str, dict[str, int]]) -> list[Section]:
    """One table per metric, a row per model: ``mean ± std [95% CI]``, median difference, p-values, effect.

    Args:
        rows: ``results.csv`` rows.
        metrics: the metrics, in order.
        models: the models, in row order.
        counts: ``metric -> model -> cases with a value``.
    """
    sections = []
    for metric in metrics:
        info, mine = fmt.info(metric), rows_of(rows, metric, models)
        if not mine:
            continue
        body, marked = [], set()
        for i, r in enumerate(mine):
            is_best = r["model"] == r.get("best")
            marked |= {i} if is_best else set()
            body.append([f"{r['model']} (best)" if is_best else r["model"],
                         fmt.integer(counts.get(metric, {}).get(r["model"])),
                         info.estimate(r["mean"], r["std"], r["ci_low"], r["ci_high"]),
                         "reference" if is_best else info.signed(r["median_diff"]),
                         "—" if is_best else fmt.p_value(r["wilcoxon_p"]),
                         "—" if is_best else fmt.p_value(r["p_holm"]),
                         "—" if is_best else fmt.effect(r["effect_rbc"])])
        unit = f" in {info.unit}" if info.unit else ""
        caption = (f"{info.name}{unit}, {info.direction} ({info.arrow}): {info.description}. Mean ± std over the "
                   "cases [95% bootstrap CI of the mean]; the median paired difference, the Wilcoxon p-value "
                   "(raw and Holm-adjusted) and the rank-biserial effect size r are against the best model.")
        table = Table(["Model", "Cases (n)", f"Mean ± std [95% CI]{unit}", f"Median difference vs best{unit}",
                       "p (Wilcoxon)", "p (Holm)", "Effect size r"], body, caption, marked=marked)
        sections.append(Section(f"{info.label} {info.arrow}", table, metric))
    return sections


def class_sections(per_class: dict[str, dict[str, dict[str, Any]]], names: dict[str, str],
                   metrics: list[str]) -> list[Section]:
    """One table per class (or region), a row per model, ``mean ± std`` of each metric; the best bold.

    Args:
        per_class: ``model -> class key -> metric -> {"mean", "std", "n"}`` (``summary.json`` ``per_class``).
        names: ``class key -> shown name`` (the label's name and value).
        metrics: the metrics to show (those a model lacks are left out).
    """
    models = list(per_class)
    keys = list(dict.fromkeys(k for classes in per_class.values() for k in classes))
    sections = []
    for key in keys:
        shown = [m for m in metrics if any(isinstance(per_class[x].get(key, {}).get(m), dict) for x in models)]
        stats = {x: per_class[x].get(key, {}) for x in models}
        body, strong = [], set()
        for model in models:
            n = max((s.get("n", 0) or 0 for s in stats[model].values() if isinstance(s, dict)), default=0)
            body.append([model, fmt.integer(n)] + [
                fmt.info(m).estimate(stats[model].get(m, {}).get("mean"), stats[model].get(m, {}).get("std"))
                for m in shown])
        for j, metric in enumerate(shown):
            best = _best_index([_float(stats[x].get(metric, {}).get("mean")) for x in models], fmt.info(metric))
            strong |= {(best, j + 2)} if best is not None and len(models) > 1 else set()
        columns = ["Model", "Cases (n)"] + [f"{fmt.info(m).label} {fmt.info(m).arrow}" for m in shown]
        caption = (f"{names.get(key, key)}: mean ± std over the cases (pooled out-of-fold); the best value of each "
                   "column in bold.")
        sections.append(Section(names.get(key, key), Table(columns, body, caption, strong=strong), str(key)))
    return sections


def _best_index(means: list[float], info: fmt.MetricInfo) -> int | None:
    finite = [(i, v) for i, v in enumerate(means) if not math.isnan(v)]
    if not finite:
        return None
    key = {"higher": lambda iv: -iv[1], "lower": lambda iv: iv[1]}.get(info.better, lambda iv: abs(iv[1]))
    return min(finite, key=key)[0]


def resources_table(runs: dict[str, dict[str, Any]], folds: int) -> Table:
    """Parameters and time of each model, shown once."""
    rows = [[name, fmt.integer(run.get("parameters")), fmt.seconds(run.get("train_seconds")),
             fmt.milliseconds(run.get("predict_seconds_per_case"))] for name, run in runs.items()]
    return Table(["Model", "Parameters", f"Training time ({folds} folds)", "Prediction time per case"], rows,
                 "Trainable parameters; training time summed over the folds; prediction time per held-out case.")


def ensemble_table(rows: list[dict[str, Any]]) -> Table | None:
    """The fold ensembles on the labelled test cases: a row per model, the mean of each metric."""
    if not rows:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    values = {(r["model"], r["metric"]): r["mean"] for r in rows}
    body = [[m] + [fmt.info(k).value(values.get((m, k))) for k in metrics] for m in models]
    return Table(["Model"] + [f"{fmt.info(k).label} {fmt.info(k).arrow}" for k in metrics], body,
                 "Each model's folds as one ensemble on the labelled test cases (mean over the cases).")


def markdown_table(text: str, caption: str = "") -> Table:
    """A :class:`Table` from a Markdown table (``| a | b |`` lines; the ``|---|`` line skipped)."""
    lines = [line.strip().strip("|").split("|") for line in text.strip().splitlines()
             if line.strip().startswith("|") and not line.strip().startswith("|---")]
    cells = [[c.strip() for c in line] for line in lines]
    return Table(cells[0], cells[1:], caption, numeric=[False] * len(cells[0]))
