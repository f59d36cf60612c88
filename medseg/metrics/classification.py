"""Classification metrics on class indices and predicted probabilities, agreeing with scikit-learn.

All functions are pure numpy. Inputs are ``y_true`` ``(N,)`` integer class indices in ``[0, K)``, and either
``y_pred`` ``(N,)`` predicted indices or ``probabilities`` ``(N, K)`` whose rows sum to 1.

Conventions (each matches scikit-learn where scikit-learn has the metric):

- precision / recall / F1 use ``zero_division=0``; macro means run over all ``K`` classes (scikit-learn with
  ``labels=range(K)``), so a class never seen nor predicted counts as 0.
- balanced accuracy is the mean recall over the classes present in ``y_true``.
- ROC-AUC is exact with ties (Mann-Whitney U with average ranks). ``K == 2``: the AUC of class 1's probability
  (reported for both classes). ``K > 2``: one-vs-rest per class; a class absent from ``y_true`` (or present in
  every sample) has no AUC (NaN) and is left out of the macro mean.
- negative log-likelihood is the mean ``-log p_true`` with ``p`` clipped to ``[1e-15, 1 - 1e-15]``.
- Brier score follows ``sklearn.metrics.brier_score_loss(scale_by_half="auto")``: ``K == 2`` gives the binary
  score ``mean((p_1 - y)^2)``; ``K > 2`` gives ``mean_i sum_k (p_ik - onehot_ik)^2`` (range ``[0, 2]``).
- expected calibration error uses the top-label confidence (``max_k p_k``, correct when its argmax, first index on
  ties, is the truth): ``sum_b |acc_b - conf_b| * n_b / N``, with the bins of
  :func:`medseg.metrics.calibration.calibration_bins`, torchmetrics' rule: ``[lo, hi)`` on torch's float32 edges,
  a confidence of exactly 1 in a slot of its own. It equals torchmetrics' ``MulticlassCalibrationError(norm="l1")``
  for every ``K``, ``K == 2`` included; it is not ``BinaryCalibrationError``, which bins ``p_1`` against ``y``
  (:class:`medseg.metrics.calibration.BinaryCalibration` does that).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.metrics.calibration import calibration_bins, calibration_edges, calibration_error

NLL_EPS = 1e-15


def _labels(y_true: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Checked ``(N,)`` int64 class indices in ``[0, num_classes)``."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y


def _check_probabilities(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(N,)`` labels and ``(N, K)`` float64 probabilities whose rows sum to 1."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, K) with K >= 2, got {p.shape}")
    y = _labels(y_true, p.shape[1])
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {p.shape[0]} probability rows")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probability rows must sum to 1 (apply softmax first)")
    return y, p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``(K, K)`` int64: row = true class, column = predicted class.

    Args:
        y_true: ``(N,)`` true class indices.
        y_pred: ``(N,)`` predicted class indices.
        num_classes: ``K``.
    """
    y, yp = _labels(y_true, num_classes), _labels(y_pred, num_classes)
    if y.shape != yp.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {yp.shape} differ in shape")
    counts = np.bincount(y * num_classes + yp, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of ``(N,)`` predictions equal to the ``(N,)`` truth."""
    y, yp = _labels(y_true), _labels(y_pred)
    return float(np.mean(y == yp))


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, 0 where ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall ``(K,)`` over the classes present in ``y_true`` (``sklearn.metrics.balanced_accuracy_score``)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1, each ``(K,)``, 0 where undefined (``zero_division=0``).

    Returns:
        ``{"precision", "recall", "f1", "support"}``, each of shape ``(K,)``; the macro values are their means.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    return {
        "precision": _safe_divide(tp, predicted),
        "recall": _safe_divide(tp, support),
        "f1": _safe_divide(2.0 * tp, predicted + support),
        "support": support,
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``(N,)`` values, ties sharing their average rank (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC-AUC of ``(N,)`` scores for ``(N,)`` boolean ``positive``; ties count one half.

    Uses the Mann-Whitney statistic ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with average ranks,
    which equals the trapezoidal area under the ROC curve (``sklearn.metrics.roc_auc_score``).

    Returns:
        The AUC, or NaN when ``positive`` holds only one class.
    """
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if pos.shape != s.shape or pos.ndim != 1:
        raise ValueError(f"positive {pos.shape} and scores {s.shape} must be matching 1-D arrays")
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(s)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[float, np.ndarray]:
    """ROC-AUC, binary for ``K == 2`` and one-vs-rest macro for ``K > 2``.

    Args:
        y_true: ``(N,)`` class indices.
        probabilities: ``(N, K)``.

    Returns:
        ``(macro, per_class)``: ``per_class`` ``(K,)`` holds each class's one-vs-rest AUC, NaN for a class
        absent from ``y_true`` (or the only class in it); ``macro`` is the mean over the non-NaN entries (NaN
        if none). For ``K == 2`` both entries are the binary AUC of class 1's probability.
    """
    y, p = _check_probabilities(y_true, probabilities)
    k = p.shape[1]
    if k == 2:
        auc = binary_roc_auc(y == 1, p[:, 1])
        return auc, np.array([auc, auc])
    per_class = np.array([binary_roc_auc(y == c, p[:, c]) for c in range(k)])
    valid = ~np.isnan(per_class)
    macro = float(per_class[valid].mean()) if valid.any() else float("nan")
    return macro, per_class


def negative_log_likelihood(y_true: np.ndarray, probabilities: np.ndarray, eps: float = NLL_EPS) -> float:
    """Mean ``-log p_true`` over ``(N,)`` samples, ``p`` ``(N, K)`` clipped to ``[eps, 1 - eps]`` (log loss)."""
    y, p = _check_probabilities(y_true, probabilities)
    p_true = np.clip(p[np.arange(y.size), y], eps, 1.0 - eps)
    return float(-np.mean(np.log(p_true)))


def brier_score(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Brier score of ``(N, K)`` probabilities, scikit-learn's ``brier_score_loss`` convention.

    ``K == 2``: ``mean_i (p_i1 - y_i)^2`` in ``[0, 1]`` (binary score). ``K > 2``:
    ``mean_i sum_k (p_ik - onehot_ik)^2`` in ``[0, 2]``. The binary value is half the multi-class formula.
    """
    y, p = _check_probabilities(y_true, probabilities)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _top_label(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` top-label confidence and ``(N,)`` bool correctness of the argmax (first index on ties)."""
    y, p = _check_probabilities(y_true, probabilities)
    return p.max(axis=1), p.argmax(axis=1) == y


def reliability_curve(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability diagram data in ``bins`` equal-width confidence bins ``[lo, hi)`` on ``[0, 1]``.

    The bins are those of :func:`expected_calibration_error`, except that confidences of exactly 1 (a slot of
    their own there) are drawn in the last bin, ``[lo, 1]``.

    Args:
        y_true: ``(N,)`` class indices.
        probabilities: ``(N, K)``.
        bins: number of bins ``B``.

    Returns:
        ``{"edges": (B + 1,), "confidence": (B,), "accuracy": (B,), "count": (B,)}``: mean top-label
        confidence and accuracy of argmax predictions per bin (NaN for empty bins) and the samples per bin.
    """
    count, sum_conf, sum_acc = calibration_bins(*_top_label(y_true, probabilities), bins)
    count, sum_conf, sum_acc = (np.r_[a[:-2], a[-2] + a[-1]] for a in (count, sum_conf, sum_acc))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        mean_acc = np.where(count > 0, sum_acc / count, np.nan)
    edges = calibration_edges(bins).astype(np.float64)
    return {"edges": edges, "confidence": mean_conf, "accuracy": mean_acc, "count": count}


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE ``sum_b |acc_b - conf_b| * n_b / N`` (torchmetrics' ``MulticlassCalibrationError``, l1)."""
    return calibration_error(*calibration_bins(*_top_label(y_true, probabilities), bins))


def classification_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    label_names: Sequence[str] | None = None,
    bins: int = 15,
) -> dict[str, float]:
    """All classification metrics of ``(N, K)`` probabilities, predictions being their argmax (ties: lowest index).

    Args:
        y_true: ``(N,)`` class indices.
        probabilities: ``(N, K)`` rows summing to 1.
        label_names: ``K`` names for the per-class keys; default ``class0 .. class{K-1}``.
        bins: calibration bins for ``ece``.

    Returns:
        Flat dict of floats: ``accuracy``, ``balanced_accuracy``, ``precision_macro``, ``recall_macro``,
        ``f1_macro``, ``auc`` (binary or one-vs-rest macro), ``nll``, ``brier``, ``ece``, and per class
        ``precision_<name>``, ``recall_<name>``, ``f1_<name>``, ``auc_<name>`` (NaN when undefined).
    """
    y, p = _check_probabilities(y_true, probabilities)
    k = p.shape[1]
    names = [f"class{c}" for c in range(k)] if label_names is None else [str(n) for n in label_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} label names for {k} probability columns")
    y_pred = p.argmax(axis=1)
    prf = precision_recall_f1(y, y_pred, k)
    auc, auc_per_class = roc_auc(y, p)
    out: dict[str, float] = {
        "accuracy": accuracy(y, y_pred),
        "balanced_accuracy": balanced_accuracy(y, y_pred, k),
        "precision_macro": float(prf["precision"].mean()),
        "recall_macro": float(prf["recall"].mean()),
        "f1_macro": float(prf["f1"].mean()),
        "auc": auc,
        "nll": negative_log_likelihood(y, p),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p, bins),
    }
    for c, name in enumerate(names):
        out[f"precision_{name}"] = float(prf["precision"][c])
        out[f"recall_{name}"] = float(prf["recall"][c])
        out[f"f1_{name}"] = float(prf["f1"][c])
        out[f"auc_{name}"] = float(auc_per_class[c])
    return out
