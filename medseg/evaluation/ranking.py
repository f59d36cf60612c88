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
