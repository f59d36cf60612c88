"""Unpaired statistics of two arms that saw different patients: per-arm summaries, the Mann–Whitney U test, the
rank-biserial effect size (Cliff's delta), the difference of medians with a bootstrap interval, and Holm's
correction within a family of tests (:func:`medseg.evaluation.report.holm`).

The bootstrap is :func:`medseg.evaluation.report.bootstrap_ci`'s (percentile, the same resamples and seed, and
the same numbers), drawn in chunks so that a log of many requests never holds all resamples at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import stats

from medseg.evaluation.report import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, holm

CHUNK_VALUES = 1 << 22  # the most resampled values held at once (32 MiB of float64)
ALPHA = 0.05


def _resamples(rng: np.random.Generator, sizes: Sequence[int], resamples: int) -> Iterator[list[np.ndarray]]:
    """Index arrays ``(k, size)`` per sample, ``resamples`` rows in all, drawn from ``rng`` in the order that one
    ``rng.integers(0, size, (resamples, size))`` per sample would draw them when there is one sample."""
    rows = max(1, CHUNK_VALUES // max(sum(sizes), 1))
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        yield [rng.integers(0, size, size=(k, size)) for size in sizes]


def bootstrap_mean_ci(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean, as :func:`medseg.evaluation.report.bootstrap_ci` (NaN
    values dropped; NaN with fewer than two values), in bounded memory."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[i].mean(axis=1) for (i,) in _resamples(rng, [len(values)], resamples)])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def describe(values: Sequence[float]) -> dict[str, float]:
    """``n``, ``median``, ``p95`` (linear interpolation), ``mean``, ``std`` (n − 1) and the 95% bootstrap CI of the
    mean (``ci_low``, ``ci_high``) of the values that are not NaN."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        nan = float("nan")
        return {"n": 0, "median": nan, "p95": nan, "mean": nan, "std": nan, "ci_low": nan, "ci_high": nan}
    low, high = bootstrap_mean_ci(v)
    return {"n": int(len(v)), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "ci_low": low, "ci_high": high}


def rank_biserial(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank-biserial correlation of two independent samples, ``r = 2 U_a / (n_a n_b) − 1``.

    ``U_a`` is the Mann–Whitney statistic of ``a`` (``scipy.stats.mannwhitneyu(a, b).statistic``: the pairs
    ``(x in a, y in b)`` with ``x > y``, ties counting one half), so ``r`` equals Cliff's delta,
    ``P(x > y) − P(x < y)`` over all pairs: +1 when every value of ``a`` is above every value of ``b``, −1 when
    every one is below, 0 for no tendency. NaN without a value on either side.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not len(a) or not len(b):
        return float("nan")
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2.0 * u / (len(a) * len(b)) - 1.0)


def median_difference_ci(a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """``median(a) − median(b)`` and its 95% percentile bootstrap interval, each arm resampled on its own (with
    replacement, its own size, seeded); the interval is NaN with fewer than two values on a side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not len(a) or not len(b):
        return float("nan"), float("nan"), float("nan")
    diff = float(np.median(a) - np.median(b))
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([np.median(a[i], axis=1) - np.median(b[j], axis=1)
                            for i, j in _resamples(rng, [len(a), len(b)], resamples)])
    return diff, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Arm A's values against arm B's: the two-sided Mann–Whitney U test (``scipy.stats.mannwhitneyu``, method
    ``"auto"``: exact when a sample has at most 8 values and there are no ties, else the normal approximation
    with tie and continuity corrections), the rank-biserial effect, the difference of medians A − B with its CI.

    Returns:
        ``n_a, n_b, u, p, effect, median_diff, diff_low, diff_high``; ``u``/``p``/``effect`` NaN when a side has
        no value, ``p`` 1 when every value of both arms is the same.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    diff, low, high = median_difference_ci(x, y)
    out: dict[str, Any] = {"n_a": int(len(x)), "n_b": int(len(y)), "u": float("nan"), "p": float("nan"),
                           "effect": float("nan"), "median_diff": diff, "diff_low": low, "diff_high": high}
    if len(x) and len(y):
        if np.ptp(np.concatenate([x, y])) == 0:  # one value everywhere: no difference (scipy says NaN or 1)
            out.update(u=len(x) * len(y) / 2.0, p=1.0, effect=0.0)
        else:
            test = stats.mannwhitneyu(x, y, alternative="two-sided")
            out.update(u=float(test.statistic), p=float(test.pvalue), effect=rank_biserial(x, y))
    return out


def better_arm(effect: float, better: str, arms: Sequence[str]) -> str:
    """The arm whose values tend to be better by the rank-biserial ``effect`` (positive: arm A's values tend to be
    higher), for a metric where ``better`` is ``"higher"`` or ``"lower"``; ``""`` for no direction or no tendency."""
    if better not in ("higher", "lower") or not np.isfinite(effect) or effect == 0:
        return ""
    return arms[0] if (effect > 0) == (better == "higher") else arms[1]


def holm_within(comparisons: list[dict[str, Any]], key: str = "family") -> None:
    """Add ``p_holm`` to each comparison: the Holm-adjusted ``p`` among the comparisons of its ``key`` (family), and
    ``significant`` (``p_holm < 0.05``)."""
    families: dict[str, list[dict[str, Any]]] = {}
    for c in comparisons:
        families.setdefault(c[key], []).append(c)
    for members in families.values():
        for c, adjusted in zip(members, holm([c["p"] for c in members]), strict=True):
            c["p_holm"] = adjusted
            c["significant"] = bool(np.isfinite(adjusted) and adjusted < ALPHA)
