"""Models across datasets: per-dataset ranks, mean ranks and the models × datasets table of
``medseg benchmark --datasets`` (results as the nnU-Net "revisited" paper presents them)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from medseg.data.datalist import SEGMENTATION

MEAN_RANK = "mean rank"
VALUE_TABLE = "mean ± 95% CI half-width"
RANK_TABLE = "rank"
RESERVED_COLUMNS = ("model", "metric", "table", MEAN_RANK)


def primary_metric(task: str) -> str:
    """The metric of the models × datasets table: ``dice`` for segmentation, ``correct`` (accuracy) otherwise."""
    return "dice" if task == SEGMENTATION else "correct"


def rank_models(means: dict[str, float], higher_is_better: bool) -> dict[str, float]:
    """Rank models by their mean on one dataset.

    Args:
        means: ``model -> mean`` of one metric.
        higher_is_better: the metric's direction.

    Returns:
        ``model -> rank``: 1 = best; tied models share the average of their ranks; a NaN mean (no value) ranks
        after every number.
    """
    keys = np.array([float(means[m]) for m in means])
    keys = -keys if higher_is_better else keys
    keys = np.where(np.isnan(keys), np.inf, keys)
    return {m: float(r) for m, r in zip(means, stats.rankdata(keys, method="average"), strict=True)}


def model_rows(results: dict[str, list[dict[str, Any]]], models: list[str],
               metric: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``dataset -> model -> row`` of one metric from each dataset's ``results.csv`` rows.

    Raises:
        ValueError: a model has no row for the metric on a dataset (naming both).
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset, rows in results.items():
        mine = {r["model"]: r for r in rows if r["metric"] == metric and r["model"] in models}
        missing = [m for m in models if m not in mine]
        if missing:
            raise ValueError(f"dataset {dataset}: no {metric} result for {', '.join(missing)}")
        table[dataset] = mine
    return table


def rank_table(results: dict[str, list[dict[str, Any]]], models: list[str], metric: str,
               higher_is_better: bool) -> list[dict[str, Any]]:
    """Each model's rank on each dataset by its mean, and the mean of those ranks.

    Args:
        results: ``dataset -> rows`` with ``model``, ``metric`` and ``mean`` (``results.csv`` of each dataset;
            values may be strings as read back from the file).
        models: the models to rank, in the order of the rows returned (other rows are ignored).
        metric: the metric to rank by.
        higher_is_better: its direction.

    Returns:
        One row per model: ``model``, one rank column per dataset, ``mean rank``.
    """
    rows = model_rows(results, models, metric)
    ranks = {d: rank_models({m: float(r[m]["mean"]) for m in models}, higher_is_better) for d, r in rows.items()}
    return [{"model": m, **{d: ranks[d][m] for d in results}, MEAN_RANK: float(np.mean([ranks[d][m] for d in results]))}
            for m in models]


def estimate_cell(mean: float | str, low: float | str, high: float | str) -> str:
    """``"mean ± h"`` with ``h`` half the width of the interval ``[low, high]``; only the mean without one."""
    mean, low, high = float(mean), float(low), float(high)
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {(high - low) / 2:.2g}"


def value_table(results: dict[str, list[dict[str, Any]]], models: list[str], metric: str,
                higher_is_better: bool) -> list[dict[str, Any]]:
    """The models × datasets table: ``mean ± CI half-width`` per dataset and the mean rank (:func:`rank_table`)."""
    rows = model_rows(results, models, metric)
    ranks = {r["model"]: r[MEAN_RANK] for r in rank_table(results, models, metric, higher_is_better)}
    return [{"model": m, **{d: estimate_cell(rows[d][m]["mean"], rows[d][m]["ci_low"], rows[d][m]["ci_high"])
                            for d in results}, MEAN_RANK: ranks[m]}
            for m in models]


def by_dataset_rows(results: dict[str, list[dict[str, Any]]], models: list[str], metrics: dict[str, bool],
                    primary: str) -> list[dict[str, Any]]:
    """The rows of ``results_by_dataset.csv``: the models × datasets value table of ``primary``, then a rank
    table of every metric.

    Args:
        results: ``dataset -> results.csv rows``.
        models: the models, in row order.
        metrics: ``metric -> higher is better``.
        primary: the metric of the value table.

    Returns:
        Rows ``metric, table, model, <dataset>..., mean rank`` where ``table`` is ``"mean ± 95% CI half-width"``
        (cells as :func:`estimate_cell`) or ``"rank"`` (1 = best, ties averaged).
    """
    out = [{"metric": primary, "table": VALUE_TABLE, **row}
           for row in value_table(results, models, primary, metrics[primary])]
    for metric, higher in metrics.items():
        out += [{"metric": metric, "table": RANK_TABLE, **row} for row in rank_table(results, models, metric, higher)]
    return out


def mean_rank_by_metric(results: dict[str, list[dict[str, Any]]], models: list[str],
                        metrics: dict[str, bool]) -> list[dict[str, Any]]:
    """One row per model: its mean rank over the datasets for each metric (columns named by the metrics)."""
    ranks = {metric: {r["model"]: r[MEAN_RANK] for r in rank_table(results, models, metric, higher)}
             for metric, higher in metrics.items()}
    return [{"model": m, **{metric: ranks[metric][m] for metric in metrics}} for m in models]


def datasets_context(results: dict[str, list[dict[str, Any]]], models: list[str], metrics: dict[str, bool],
                     primary: str, sources: dict[str, str], facts: list[tuple[str, str]]) -> dict[str, Any]:
    """The variables of the ``datasets`` report templates (:func:`medseg.evaluation.report.write_reports`).

    Args:
        results: ``dataset -> results.csv rows``.
        models: the models, in row order.
        metrics: ``metric -> higher is better``.
        primary: the metric of the models × datasets table.
        sources: ``dataset name -> where it was read from``.
        facts: ``(label, value)`` lines about the run (models, folds, overrides).
    """
    from medseg.evaluation import report_format as fmt
    from medseg.evaluation.report import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
    from medseg.evaluation.report_sections import Link, Table

    info, names = fmt.info(primary), list(results)
    rows = model_rows(results, models, primary)
    mean_ranks = {r["model"]: r[MEAN_RANK] for r in rank_table(results, models, primary, metrics[primary])}
    body = [[m, *(info.estimate(rows[d][m]["mean"], None, rows[d][m]["ci_low"], rows[d][m]["ci_high"])
                  for d in names), fmt.number(mean_ranks[m], 2)] for m in models]
    strong = set()
    for j, d in enumerate(names, start=1):
        ranks = rank_models({m: float(rows[d][m]["mean"]) for m in models}, metrics[primary])
        strong |= {(i, j) for i, m in enumerate(models) if ranks[m] == 1.0}
    leader = min(models, key=lambda m: mean_ranks[m])
    strong |= {(models.index(leader), len(names) + 1)}
    values = Table(["Model", *names, "Mean rank"], body,
                   f"{info.label}, {info.direction}: mean over the cases of each dataset [95% bootstrap CI of the "
                   "mean], pooled out-of-fold; the best model of each dataset and the best mean rank in bold.",
                   strong=strong)
    by_metric = mean_rank_by_metric(results, models, metrics)
    rank_strong = {(min(range(len(models)), key=lambda i: by_metric[i][k]), j) for j, k in enumerate(metrics, 1)}
    ranks = Table(["Model", *(f"{fmt.info(k).label} {fmt.info(k).arrow}" for k in metrics)],
                  [[r["model"], *(fmt.number(r[k], 2) for k in metrics)] for r in by_metric],
                  f"Each model's rank per metric averaged over the {len(names)} datasets (1 = best); the best in "
                  "bold.", strong=rank_strong)
    lower = ", ".join(fmt.info(m).name for m, higher in metrics.items() if not higher) or "none"
    statistics = [
        f"Ranks: on each dataset the models are ranked by their mean (rank 1 = best: the highest mean; the "
        f"lowest for {lower}); tied models share the average of their ranks and a model without a value ranks "
        f"last. The mean rank is the average of a model's ranks over the {len(names)} datasets.",
        "Intervals: each dataset's 95% confidence interval is a percentile bootstrap of the mean over its cases "
        f"({BOOTSTRAP_RESAMPLES:,} resamples of the cases with replacement, seed {BOOTSTRAP_SEED}). The "
        "per-dataset tests, effect sizes and "
        "per-class results are in each dataset's own report; every rank is in results_by_dataset.csv.",
    ]
    datasets = Table(["Dataset", "Source", "Report"],
                     [[Link(n, f"{n}/report.html"), sources[n], Link("report", f"{n}/report.html")] for n in names],
                     "Each dataset's own benchmark report lies in the folder of its name.",
                     numeric=[False, False, False])
    return {"title": "medseg benchmark across datasets",
            "subtitle": f"{len(models)} models on {len(names)} datasets",
            "toc": [("summary", "Summary"), ("by-dataset", f"{info.name} per dataset"),
                    ("ranks", "Mean rank per metric"), ("statistics", "Statistics"), ("datasets", "Datasets")],
            "facts": facts, "primary": info, "leader": leader, "leader_rank": fmt.number(mean_ranks[leader], 2),
            "n_datasets": len(names), "values": values, "ranks": ranks, "statistics": statistics,
            "datasets": datasets}
