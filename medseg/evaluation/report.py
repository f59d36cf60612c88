"""Comparison of cross-validated models: per-case tables, statistics, and ``report.md``/``report.html``.

The reports are rendered from the Jinja2 templates in ``medseg/evaluation/templates`` (``<kind>.html.j2`` and
``<kind>.md.j2``); :mod:`medseg.evaluation.report_sections` shapes their content, :mod:`medseg.evaluation.plots`
draws their figures.
"""

from __future__ import annotations

import base64
import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from medseg.data.datalist import SEGMENTATION, DatasetSpec
from medseg.data.io import atomic_path
from medseg.evaluation import report_format as fmt

# metric -> higher is better
SEG_METRICS = {"dice": True, "nsd": True, "hd95": False, "assd": False, "ece": False, "brier": False, "nll": False}
CLS_METRICS = {"correct": True, "brier": False, "nll": False}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def per_case_table(spec: DatasetSpec, cv_dir: Path) -> dict[str, dict[str, float]]:
    """``case -> metric -> value`` of one model's pooled out-of-fold predictions (foreground mean per case)."""
    table: dict[str, dict[str, float]] = {}
    if spec.task == SEGMENTATION:
        with (cv_dir / "per_case.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        for case in sorted({r["case"] for r in rows}):
            mine = [r for r in rows if r["case"] == case]
            table[case] = {m: _nanmean([float(r.get(m) or "nan") for r in mine]) for m in SEG_METRICS}
        return table
    truth = {c["id"]: c["label"] for c in spec.training}
    with (cv_dir / "predictions" / "predictions.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            p = np.array([float(row[f"p_{n}"]) for n in spec.label_names])
            k = truth[row["case"]]
            onehot = np.eye(len(p))[k]
            # Brier as medseg.metrics.classification defines it: (p1 - y)^2 for two classes, else the sum.
            brier = (p[1] - (k == 1)) ** 2 if len(p) == 2 else ((p - onehot) ** 2).sum()
            table[row["case"]] = {"correct": float(p.argmax() == k), "brier": float(brier),
                                  "nll": float(-np.log(max(p[k], 1e-15)))}
    return table


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def bootstrap_ci(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (cases resampled with replacement; seeded)."""
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the order given.

    With the ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value of
    ``p_(i)`` (1-based) is ``max_{j <= i} min(1, (m - j + 1) * p_(j))`` (monotone in the sorted order).

    Args:
        pvalues: raw p-values; NaN ones are left out of ``m`` and stay NaN.

    Returns:
        The adjusted p-values, one per input, in the input order.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p[index]))
        adjusted[index] = running
    return [float(v) for v in adjusted]


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation ``r = (W+ - W-) / (W+ + W-)`` of paired differences.

    ``W+``/``W-`` are the sums of the ranks of ``|d|`` (average ranks for ties) over the positive/negative
    differences; zero differences are dropped, as in the Wilcoxon signed-rank test (``W+`` is the statistic of
    ``scipy.stats.wilcoxon(d, alternative="greater")``, so ``r = 2 W+ / (n (n + 1) / 2) - 1`` for ``n`` nonzero
    differences). ``r`` lies in [-1, 1]: +1 when every difference is positive, -1 when every one is negative.

    Args:
        differences: paired differences ``a - b``; NaN ones are ignored.

    Returns:
        ``r``; 0.0 when every difference is zero; NaN when there is no difference at all.
    """
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan")
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    plus, minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((plus - minus) / (plus + minus))


def compare(tables: dict[str, dict[str, dict[str, float]]], metrics: dict[str, bool]) -> list[dict[str, Any]]:
    """Each model against the best model of each metric, paired on the cases both have a value for.

    Args:
        tables: ``model -> case -> metric -> value`` (:func:`per_case_table`); only common cases are used.
        metrics: ``metric -> higher is better``.

    Returns:
        Rows ``model, metric, mean, std, ci_low, ci_high, best, wilcoxon_p, p_holm, effect_rbc, median_diff``.
        ``wilcoxon_p``: two-sided Wilcoxon signed-rank test vs the best (1.0 when all differences are zero, NaN
        without a common case); ``p_holm``: those p-values Holm-adjusted within the metric; ``effect_rbc``: the
        rank-biserial correlation of the differences ``model - best``; ``median_diff``: their median. Positive
        effects mean the model's values tend to be higher than the best's (better for a higher-is-better metric,
        worse for a lower-is-better one). The four are empty for the best model itself.
    """
    rows = []
    cases = sorted(set.intersection(*(set(t) for t in tables.values())))
    for metric, higher in metrics.items():
        values = {m: np.array([t[c][metric] for c in cases]) for m, t in tables.items()}
        means = {m: np.nanmean(v) if np.isfinite(v).any() else np.nan for m, v in values.items()}
        ranked = [m for m in means if not math.isnan(means[m])]
        best = (max if higher else min)(ranked, key=lambda m: means[m]) if ranked else None
        metric_rows = []
        for model, v in values.items():
            low, high = bootstrap_ci(v)
            row = {"model": model, "metric": metric, "mean": float(means[model]),
                   "std": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan"),
                   "ci_low": low, "ci_high": high, "best": best}
            if best is not None and model != best:
                row.update(_paired_test(v, values[best]))
            else:
                row.update(wilcoxon_p="", p_holm="", effect_rbc="", median_diff="")
            metric_rows.append(row)
        tested = [r for r in metric_rows if r["wilcoxon_p"] != ""]
        for row, adjusted in zip(tested, holm([r["wilcoxon_p"] for r in tested]), strict=True):
            row["p_holm"] = adjusted
        rows += metric_rows
    return rows


def _paired_test(model: np.ndarray, best: np.ndarray) -> dict[str, float]:
    """Wilcoxon p-value, rank-biserial effect and median of ``model - best`` on the cases both have."""
    both = ~np.isnan(model) & ~np.isnan(best)
    diff = model[both] - best[both]
    if not both.any():  # no case where both models have a value: nothing to test
        return {"wilcoxon_p": float("nan"), "effect_rbc": float("nan"), "median_diff": float("nan")}
    p = 1.0 if not np.any(diff) else float(stats.wilcoxon(model[both], best[both]).pvalue)
    return {"wilcoxon_p": p, "effect_rbc": rank_biserial(diff), "median_diff": float(np.median(diff))}


def statistics_paragraphs(metrics: dict[str, bool], cases: int | None = None, folds: int | None = None,
                          models: int | None = None, task: str = SEGMENTATION) -> list[str]:
    """The "Statistics" section of a report: what the numbers are taken over, the test, the correction, the
    effect size, the confidence interval and the units, as paragraphs.

    Args:
        metrics: ``metric -> higher is better``.
        cases: the number of cases (pooled out-of-fold), when known.
        folds: the number of cross-validation folds, when known.
        models: the number of models, when known (the number of tests per metric is one less).
        task: the dataset's task (what a case's value is).
    """
    n = f"n = {cases:,} cases" if cases else "the cases"
    per_case = ("the mean over its foreground classes (or regions)" if task == SEGMENTATION
                else "1 when its predicted class is right, else 0 (accuracy), or its Brier score or NLL")
    lower = [fmt.info(m).name for m, higher in metrics.items() if not higher]
    tests = f"m = {models - 1} comparison{'s' if models != 2 else ''}" if models else "the comparisons"
    units = "; ".join(f"{', '.join(names)}: {unit}" for unit, names in _units(metrics).items())
    return [
        f"Data: every model was cross-validated on the same {f'{folds} ' if folds else ''}folds, and the held-out "
        f"predictions of all folds are pooled (pooled out-of-fold): each of {n} is scored once per model, by the "
        f"model that did not train on it. A case's value of a metric is {per_case}.",
        "Summaries: the mean and the standard deviation (sample, n − 1) are taken over the cases. The 95% "
        "confidence interval is a percentile bootstrap of the mean over the cases: "
        f"{BOOTSTRAP_RESAMPLES:,} resamples of the cases with replacement (seed {BOOTSTRAP_SEED}).",
        "Tests: for each metric the best model has the highest mean (the lowest for "
        f"{', '.join(lower) or 'none'}). Every other model is compared with it on the cases both have a value "
        "for, by the two-sided Wilcoxon signed-rank test of the paired per-case values (zero differences dropped; "
        f"p = 1 when all differences are zero). Within each metric the p-values of the {tests} with the best "
        "are Holm–Bonferroni-adjusted (step-down), shown as p (Holm); metrics are not corrected for one another.",
        "Effect size: the matched-pairs rank-biserial correlation r = (W+ − W−)/(W+ + W−) of the paired "
        "differences model − best, in [−1, 1]: +1 when the model's value is higher in every case, −1 when it is "
        "lower in every case. For a higher-is-better metric a negative r means the model is worse than the best, "
        "for a lower-is-better one a positive r does. The median difference is the median of the paired "
        "differences model − best, in the metric's unit.",
        f"Units: {units}" + ("; size differences of the per-class tables: ml for 3D volumes, mm² for 2D areas."
                             if task == SEGMENTATION else "."),
    ]


def statistics_note(metrics: dict[str, bool], **kwargs: Any) -> str:
    """The "Statistics" paragraphs of :func:`statistics_paragraphs` as one text."""
    return " ".join(statistics_paragraphs(metrics, **kwargs))


def _units(metrics: dict[str, bool]) -> dict[str, list[str]]:
    units: dict[str, list[str]] = {}
    for metric in metrics:
        info = fmt.info(metric)
        unit = info.unit or ("unitless, in [0, 1]" if info.decimals == 3 else "unitless")
        units.setdefault(unit, []).append(info.name)
    return units


def _environment():  # noqa: ANN202 - jinja2 types
    """The Jinja2 environment of the report templates (HTML autoescaped, Markdown not)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("medseg.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    environment.filters["data_uri"] = _data_uri
    environment.filters["md"] = _markdown_cell
    environment.filters["arguments"] = _arguments
    return environment


def _arguments(text: str) -> list[str]:
    """Command-line text as one piece per option with its value (``--a 1 --b x`` -> ``--a 1``, ``--b x``), so
    that a line never breaks inside an option."""
    return [piece for piece in re.split(r"\s+(?=--)", text.strip()) if piece]


def _data_uri(path: str | Path) -> str:
    """A PNG as a ``data:`` URI, so that ``report.html`` is one file to open."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _markdown_cell(value: Any) -> str:
    """Text for a Markdown table cell: ``|`` escaped, on one line."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(kind: str, context: dict[str, Any]) -> tuple[str, str]:
    """``(html, markdown)`` of the templates ``<kind>.html.j2`` and ``<kind>.md.j2`` with ``context``."""
    environment = _environment()
    context = {"subtitle": "", "toc": [], **context}
    page = environment.get_template(f"{kind}.html.j2").render(**context)
    markdown = environment.get_template(f"{kind}.md.j2").render(**context)
    return page, _tidy_markdown(markdown)


def _tidy_markdown(text: str) -> str:
    """At most one blank line in a row, one newline at the end."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.strip() or (lines and lines[-1].strip()):
            lines.append(line.rstrip())
    return "\n".join(lines).strip() + "\n"


def write_reports(output: Path, kind: str, context: dict[str, Any]) -> None:
    """Render ``report.html`` (figures embedded: one file to open) and ``report.md`` (linking the figures,
    which lie beside it) into ``output``.

    Args:
        output: folder for both reports (the figures are expected there too).
        kind: the templates' name: ``"benchmark"`` (one dataset) or ``"datasets"`` (models across datasets).
        context: the templates' variables (see :mod:`medseg.evaluation.benchmark_report`).
    """
    page, markdown = render(kind, context)
    with atomic_path(output / "report.md") as tmp:
        Path(tmp).write_text(markdown, encoding="utf-8")
    with atomic_path(output / "report.html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) with these columns; floats to 4 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
