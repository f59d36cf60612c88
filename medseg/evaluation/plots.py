"""Classification pictures: ROC curves, reliability diagram, confusion matrix (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.data.io import atomic_path
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
    ax.legend(fontsize="small", loc="upper left")
    counts.set(xlabel="predicted probability", ylabel="count", yscale="log")
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
