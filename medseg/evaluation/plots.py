"""Pictures of the evaluation and benchmark reports (matplotlib, no display needed): ROC curves, reliability
diagrams, confusion matrix, per-case box plots, training curves, and the best/worst-case overlay montage."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path, read_image
from medseg.evaluation import report_format as fmt
from medseg.metrics.classification import binary_roc_auc, confusion_matrix, reliability_curve


def roc_points(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores, hits = np.asarray(scores)[order], positive[order]
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    tp, fp = np.cumsum(hits)[last_of_tie], np.cumsum(~hits)[last_of_tie]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def pyplot():  # noqa: ANN202 - matplotlib types
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:  # noqa: ANN001
    """Write ``fig`` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    pyplot().close(fig)
    return path


def roc_png(y_true: np.ndarray, probabilities: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """One-vs-rest ROC curve per class (only class 1 for a binary problem), AUC in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    shown = [1] if len(names) == 2 else range(len(names))
    for k in shown:
        positive = y_true == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_points(positive, probabilities[:, k])
        ax.plot(fpr, tpr, label=f"{names[k]} (AUC {binary_roc_auc(positive, probabilities[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def reliability_png(y_true: np.ndarray, probabilities: np.ndarray, path: Path, bins: int = 15) -> Path:
    """Accuracy against confidence per bin (top label), with the bin counts underneath."""
    curve = reliability_curve(y_true, probabilities, bins)
    plt = pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = (curve["edges"][:-1] + curve["edges"][1:]) / 2
    width = np.diff(curve["edges"])
    ax.bar(centres, np.nan_to_num(curve["accuracy"]), width=width, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.set(ylabel="accuracy", title="reliability (top-label confidence)", ylim=(0, 1))
    ax.legend(loc="upper left")
    counts.bar(centres, curve["count"], width=width, edgecolor="black")
    counts.set(xlabel="confidence", ylabel="cases", xlim=(0, 1))
    return save_figure(fig, path)


def reliability_lines(curves: dict[str, dict[str, Sequence[float]]], path: Path, title: str) -> Path:
    """Reliability diagram of several curves (e.g. one per class, or per model and class): observed frequency
    against mean predicted probability per bin, with the bins' counts below (log scale).

    Args:
        curves: label -> ``{"confidence", "frequency", "count"}`` of the non-empty bins (see
            :meth:`medseg.metrics.calibration.BinaryCalibration.curve`).
    """
    plt = pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    for i, (label, curve) in enumerate(curves.items()):
        if len(curve["count"]):
            ax.plot(curve["confidence"], curve["frequency"], marker="o", ms=3, color=f"C{i}", label=label)
            counts.plot(curve["confidence"], curve["count"], marker=".", color=f"C{i}")
    ax.set(ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    # beside the axes, not over the curves (bbox_inches="tight" keeps it in the picture)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    counts.set(xlabel="mean predicted probability (bin)", ylabel="count", yscale="log")
    counts.grid(alpha=0.3)
    return save_figure(fig, path)


def confusion_png(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Counts with truth as rows and prediction as columns."""
    matrix = confusion_matrix(y_true, y_pred, len(names))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="prediction", ylabel="truth", title="confusion matrix")
    return save_figure(fig, path)


def box_plots(tables: dict[str, dict[str, dict[str, float]]], metrics: dict[str, bool] | Sequence[str],
              path: Path, columns: int = 4) -> Path:
    """Per-case values of each metric, a box per model with the cases as dots; axes labelled with units.

    Args:
        tables: ``model -> case -> metric -> value``.
        metrics: the metrics (one panel each).
        path: the PNG to write.
        columns: panels per row.
    """
    plt = pyplot()
    metrics = list(metrics)
    columns = min(columns, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.9 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        info = fmt.info(metric)
        data = [[row[metric] for row in t.values() if not math.isnan(row[metric])] for t in tables.values()]
        ax.boxplot(data, tick_labels=[f"{m}\n(n = {len(d)})" for m, d in zip(tables, data, strict=True)],
                   widths=0.5, showfliers=False, medianprops={"color": "C1", "lw": 2})
        for i, values in enumerate(data, start=1):
            ax.plot(i + rng.uniform(-0.12, 0.12, len(values)), values, "o", ms=3, alpha=0.55, color="C0")
        ax.set_title(f"{info.name} {info.arrow}  ({info.direction})", fontsize=10)
        ax.set_ylabel(info.label)
        ax.set_xlabel("model")
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Per-case values, pooled out-of-fold (box: quartiles and median; dots: cases)")
    fig.tight_layout()
    return save_figure(fig, path)


def epoch_means(dirs: Sequence[str | Path], key: str) -> dict[int, float]:
    """``epoch -> mean over the folds`` of the column ``key`` of each fold's ``metrics.csv``.

    Epochs count from 1 (``metrics.csv``'s ``epoch`` column + 1, so a validation round sits at the epoch it
    ended); a fold's last value of an epoch counts; an epoch averages the folds that have it.
    """
    by_epoch: dict[int, list[float]] = {}
    for d in dirs:
        fold: dict[int, float] = {}
        with (Path(d) / "metrics.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(key):
                    fold[int(float(row["epoch"])) + 1 if row.get("epoch") else len(fold) + 1] = float(row[key])
        for epoch, value in fold.items():
            by_epoch.setdefault(epoch, []).append(value)
    return {e: float(np.mean(v)) for e, v in sorted(by_epoch.items())}


def training_curves(log_dirs: dict[str, list[str]], path: Path) -> Path:
    """Training loss per epoch (solid) and validation loss at the epochs validation ran (dashed), both with
    markers, one colour per model, each the mean over the model's folds; validation Dice beside them when
    logged."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    dice = {m: epoch_means(d, "val/dice") for m, d in log_dirs.items()}
    panels = 2 if any(dice.values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4), squeeze=False, sharex=True)
    loss = axes[0][0]
    folds = max((len(d) for d in log_dirs.values()), default=0)
    for colour, (model, dirs) in enumerate(log_dirs.items()):
        for key, style, marker, part in (("train/loss_epoch", "-", "o", "training"),
                                         ("val/loss", "--", "s", "validation")):
            curve = epoch_means(dirs, key)
            if curve:
                loss.plot(list(curve), list(curve.values()), style, marker=marker, ms=5, color=f"C{colour}",
                          label=f"{model}, {part}")
        if panels == 2 and dice[model]:
            axes[0][1].plot(list(dice[model]), list(dice[model].values()), "--", marker="s", ms=5,
                            color=f"C{colour}", label=model)
    loss.set(xlabel="epoch", ylabel=f"loss (mean over {folds} folds)", title="Loss per epoch")
    if panels == 2:
        axes[0][1].set(xlabel="epoch", ylabel=f"validation Dice (mean over {folds} folds)",
                       title="Validation Dice ↑")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def overlay_montage(spec: Any, cv_dir: Path, table: dict[str, dict[str, float]], path: Path,
                    max_voxels: int = DEFAULT_MAX_VOXELS, model: str | None = None) -> Path:
    """The two best and two worst cases of one model by Dice: on the slice with most reference foreground, the
    outlines of the reference (green) and of the model's pooled out-of-fold prediction (red), with a legend.

    Args:
        spec: the dataset (:class:`medseg.data.datalist.DatasetSpec`).
        cv_dir: the model's cross-validation folder (``predictions/<case>.nii.gz``).
        table: ``case -> metric -> value`` of the model (``dice`` ranks the cases).
        path: the PNG to write.
        max_voxels: the most voxels an image header may claim.
        model: the model's name, shown above the tiles (default: ``cv_dir``'s name).
    """
    from medseg.visualize import MIN_TILE, best_slice, overlay, save_montage

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
        zoom = max(2, -(-MIN_TILE // max(1, min(image.shape[:2]))))
        tiles.append(overlay(image, truth, pred, zoom=min(zoom, 8)))
        titles.append(f"{'best' if case in ranked[-2:] else 'worst'}: {case}, Dice {table[case]['dice']:.3f}")
    heading = f"Model {model or cv_dir.name}: best and worst cases by Dice (pooled out-of-fold predictions)"
    return save_montage(tiles, titles, path, heading=heading)
