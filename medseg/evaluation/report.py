"""Comparison of cross-validated models: per-case tables, statistics, plots, ``report.md`` and ``report.html``."""

from __future__ import annotations

import base64
import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from medseg.data.datalist import SEGMENTATION, DatasetSpec
from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path, read_image
from medseg.evaluation.plots import pyplot, save_figure

# metric -> higher is better
SEG_METRICS = {"dice": True, "nsd": True, "hd95": False, "assd": False}
CLS_METRICS = {"correct": True, "brier": False, "nll": False}


def per_case_table(spec: DatasetSpec, cv_dir: Path) -> dict[str, dict[str, float]]:
    """``case -> metric -> value`` of one model's pooled out-of-fold predictions (foreground mean per case)."""
    table: dict[str, dict[str, float]] = {}
    if spec.task == SEGMENTATION:
        with (cv_dir / "per_case.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        for case in sorted({r["case"] for r in rows}):
            mine = [r for r in rows if r["case"] == case]
            table[case] = {m: _nanmean([float(r[m]) for r in mine]) for m in SEG_METRICS}
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


def bootstrap_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (cases resampled with replacement; seeded)."""
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(tables: dict[str, dict[str, dict[str, float]]], metrics: dict[str, bool]) -> list[dict[str, Any]]:
    """Rows ``model, metric, mean, std, ci_low, ci_high, best, wilcoxon_p`` (paired on common cases, vs the best
    model of that metric; ``wilcoxon_p`` is empty for the best itself)."""
    rows = []
    cases = sorted(set.intersection(*(set(t) for t in tables.values())))
    for metric, higher in metrics.items():
        values = {m: np.array([t[c][metric] for c in cases]) for m, t in tables.items()}
        means = {m: np.nanmean(v) if np.isfinite(v).any() else np.nan for m, v in values.items()}
        ranked = [m for m in means if not math.isnan(means[m])]
        best = (max if higher else min)(ranked, key=lambda m: means[m]) if ranked else None
        for model, v in values.items():
            low, high = bootstrap_ci(v)
            p = ""
            if best is not None and model != best:
                both = ~np.isnan(v) & ~np.isnan(values[best])
                diff = v[both] - values[best][both]
                if not both.any():
                    p = float("nan")  # no case where both models have a value: nothing to test
                else:
                    p = 1.0 if not np.any(diff) else float(stats.wilcoxon(v[both], values[best][both]).pvalue)
            rows.append({"model": model, "metric": metric, "mean": float(means[model]),
                         "std": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan"),
                         "ci_low": low, "ci_high": high, "best": best, "wilcoxon_p": p})
    return rows


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
    """``report.md`` linking the pictures and ``report.html`` with them embedded (one file to open)."""
    md = [f"# {title}", "", *tables_md, ""] + [f"![{p.stem}]({p.name})" for p in images]
    with atomic_path(output / "report.md") as tmp:
        Path(tmp).write_text("\n".join(md) + "\n")
    html_tables = "".join(_md_table_to_html(t) for t in tables_md)
    pictures = "".join(
        f'<h3>{p.stem}</h3><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #999;padding:4px 8px;text-align:right}img{max-width:100%}</style></head>"
            f"<body><h1>{title}</h1>{html_tables}{pictures}</body></html>")
    with atomic_path(output / "report.html") as tmp:
        Path(tmp).write_text(html)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _md_table_to_html(table: str) -> str:
    lines = [line.strip("|").split("|") for line in table.splitlines() if not line.startswith("|---")]
    head = "".join(f"<th>{c.strip()}</th>" for c in lines[0])
    body = "".join("<tr>" + "".join(f"<td>{c.strip()}</td>" for c in row) + "</tr>" for row in lines[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
