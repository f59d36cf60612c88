"""Comparison of cross-validated models: per-case tables, statistics, plots, ``report.md`` and ``report.html``."""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from medseg.data.datalist import SEGMENTATION, DatasetSpec
from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path, read_image
from medseg.evaluation.plots import pyplot, save_figure

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


def statistics_note(metrics: dict[str, bool]) -> str:
    """The "Statistics" paragraph of a report: test, correction, effect size and confidence interval."""
    lower = ", ".join(m for m, higher in metrics.items() if not higher) or "none"
    return (
        "Each model is compared with the best model of each metric (highest mean; lowest for "
        f"{lower}) on the cases both have a value for, by the two-sided Wilcoxon signed-rank test of the paired "
        "per-case values (`wilcoxon_p`; zero differences dropped; 1 when all differences are zero). `p_holm`: "
        "these p-values Holm–Bonferroni-adjusted (step-down) over the comparisons with the best within each "
        "metric. Effect size `effect_rbc`: the matched-pairs rank-biserial correlation (W+ − W−)/(W+ + W−) of "
        "the differences model − best, in [−1, 1]; positive means the model's values tend to be higher than "
        "the best's (better for a higher-is-better metric, worse for the others); `median_diff`: the median "
        "difference model − best. `ci_low`/`ci_high`: 95% percentile bootstrap interval of the mean over "
        f"cases ({BOOTSTRAP_RESAMPLES} resamples of the cases with replacement, seed {BOOTSTRAP_SEED})."
    )


def box_plots(tables: dict[str, dict[str, dict[str, float]]], metrics: dict[str, bool], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        data = [[row[metric] for row in t.values() if not math.isnan(row[metric])] for t in tables.values()]
        ax.boxplot(data, tick_labels=list(tables))
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, path)


def training_curves(log_dirs: dict[str, list[str]], path: Path) -> Path:
    """Training loss per epoch (solid) and validation loss per validation round (dashed), one colour per model,
    each the mean over the model's folds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for colour, (model, dirs) in enumerate(log_dirs.items()):
        for key, style in (("train/loss_epoch", "-"), ("val/loss", "--")):
            curves = []
            for d in dirs:
                with (Path(d) / "metrics.csv").open(newline="") as handle:
                    curves.append([float(r[key]) for r in csv.DictReader(handle) if r.get(key)])
            n = min((len(c) for c in curves), default=0)
            if n:
                ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], axis=0), style, marker="o",
                        color=f"C{colour}", label=f"{model} {key.split('/')[0]}")
    ax.set(xlabel="epoch (train) / validation round (val)", ylabel="loss (mean over folds)", title="training curves")
    if ax.lines:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def overlay_montage(spec: DatasetSpec, cv_dir: Path, table: dict[str, dict[str, float]], path: Path,
                    max_voxels: int = DEFAULT_MAX_VOXELS) -> Path:
    """Best and worst cases by Dice: the slice with most reference foreground, outlines of reference/prediction."""
    from medseg.visualize import best_slice, overlay, save_montage

    ranked = sorted(table, key=lambda c: table[c]["dice"])
    chosen = list(dict.fromkeys([*ranked[-2:][::-1], *ranked[:2]]))
    by_id = {c["id"]: c for c in spec.training}
    tiles, titles = [], []
    for case in chosen:
        image, _ = read_image(by_id[case]["image"][0], max_voxels=max_voxels)
        truth, _ = read_image(by_id[case]["label"], max_voxels=max_voxels)
        pred, _ = read_image(cv_dir / "predictions" / f"{case}.nii.gz", max_voxels=max_voxels)
        if image.ndim == 3:
            z = best_slice(truth)
            image, truth, pred = image[..., z], truth[..., z], pred[..., z]
        tiles.append(overlay(image, truth, pred))
        titles.append(f"{'best' if case in ranked[-2:] else 'worst'} {case} Dice {table[case]['dice']:.3f}")
    return save_montage(tiles, titles, path)


def write_reports(output: Path, title: str, tables_md: list[str], images: list[Path]) -> None:
    """``report.md`` linking the pictures and ``report.html`` with them embedded (one file to open).

    Args:
        output: folder for both reports (the pictures are expected there too).
        title: the reports' heading.
        tables_md: markdown blocks, each a table, a ``#`` heading or a paragraph (``code``, ``**bold**`` and
            ``[text](link)`` are rendered in the HTML).
        images: PNG files to link (markdown) and embed (HTML).
    """
    md = [f"# {title}", *tables_md, "\n".join(f"![{p.stem}]({p.name})" for p in images)]
    with atomic_path(output / "report.md") as tmp:
        Path(tmp).write_text("\n\n".join(block for block in md if block) + "\n")
    html_blocks = "".join(_md_block_to_html(block) for block in tables_md)
    pictures = "".join(
        f'<h3>{p.stem}</h3><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #999;padding:4px 8px;text-align:right}img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{html_blocks}{pictures}</body></html>")
    with atomic_path(output / "report.html") as tmp:
        Path(tmp).write_text(page)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) with these columns; floats to 4 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _md_block_to_html(block: str) -> str:
    """One markdown block of :func:`write_reports` as HTML: a table, a heading or a paragraph."""
    if block.startswith("|"):
        return _md_table_to_html(block)
    level = len(block) - len(block.lstrip("#"))
    if 0 < level <= 6:
        return f"<h{level}>{_inline_html(block[level:].strip())}</h{level}>"
    return f"<p>{_inline_html(block)}</p>"


def _inline_html(text: str) -> str:
    """Escaped ``text`` with markdown ``code``, ``**bold**`` and ``[text](link)`` as HTML."""
    text = html.escape(text, quote=True)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)


def _md_table_to_html(table: str) -> str:
    lines = [line.strip("|").split("|") for line in table.splitlines() if not line.startswith("|---")]
    head = "".join(f"<th>{_inline_html(c.strip())}</th>" for c in lines[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline_html(c.strip())}</td>" for c in row) + "</tr>"
                   for row in lines[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
