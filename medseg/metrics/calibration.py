"""Calibration of predicted probabilities: ECE, Brier and NLL accumulated in chunks (temperature scaling is in
:mod:`medseg.metrics.temperature`).

Pure numpy, for whole CT volumes (512x512x300 voxels, several classes): inputs are read in chunks of at
most :data:`CHUNK` elements, so no float64 copy of a volume is ever made.

Binning (one implementation, shared with :mod:`medseg.metrics.classification`) is torchmetrics' rule
(``BinaryCalibrationError`` / ``MulticlassCalibrationError``, ``norm="l1"``): the edges are
``torch.linspace(0, 1, B + 1)`` in float32 (:func:`calibration_edges`), a confidence ``c`` is compared with
them as a float32 value, bin ``b`` holds ``edges[b] <= c < edges[b + 1]``, and ``c == 1`` exactly falls in an
extra slot ``B`` of its own. So there are ``B + 1`` slots, and ``ECE = sum_b |sum(y)_b - sum(c)_b| / N``.
torchmetrics' multiclass metric casts confidences to float32 too; its binary one bins a float64 tensor with
float64 edges, so :class:`BinaryCalibration` agrees with it on float32 (and float16-valued) probabilities.
"""

from __future__ import annotations

import numpy as np

PROB_EPS = 1e-7  # clip for log p: 1 - 1e-7 rounds to 0.99999988 in float32, still below 1
CHUNK = 1 << 22  # elements read at a time (~4M)


def calibration_edges(bins: int) -> np.ndarray:
    """The ``(B + 1,)`` float32 bin edges, bit-identical to ``torch.linspace(0, 1, B + 1)`` on the CPU.

    torch computes ``step = float32(1) / B`` and, in one rounding, ``step * i`` for the first half of the
    indices and ``1 - step * (B - i)`` for the rest; the products are exact in float64.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    step = np.float64(np.float32(1.0) / np.float32(bins))
    i = np.arange(bins + 1, dtype=np.float64)
    return np.where(i < (bins + 1) // 2, step * i, 1.0 - step * (bins - i)).astype(np.float32)


def calibration_bins(
    confidence: np.ndarray, outcome: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slot count, sum of confidences and sum of outcomes, each ``(B + 1,)`` (slot ``B``: ``c == 1``).

    Args:
        confidence: ``(N,)`` values in ``[0, 1]``; binned by their float32 value, summed as given (float64).
        outcome: ``(N,)`` bool or 0/1 (the target, or whether the top label is right).
        bins: number of equal-width bins ``B``.
    """
    c = np.asarray(confidence)
    if c.size and not (c.min() >= 0.0 and c.max() <= 1.0):  # also refuses NaN
        raise ValueError("probabilities must lie in [0, 1] (apply the sigmoid/softmax first)")
    index = np.searchsorted(calibration_edges(bins), c.astype(np.float32, copy=False), side="right") - 1
    count = np.bincount(index, minlength=bins + 1)
    sum_conf = np.bincount(index, weights=c.astype(np.float64, copy=False), minlength=bins + 1)
    sum_out = np.bincount(index, weights=np.asarray(outcome, dtype=np.float64), minlength=bins + 1)
    return count, sum_conf, sum_out


def calibration_error(count: np.ndarray, sum_conf: np.ndarray, sum_out: np.ndarray) -> float:
    """ECE ``sum_b |mean(y)_b - mean(c)_b| n_b / N = sum_b |sum(y)_b - sum(c)_b| / N``; NaN if ``N == 0``.

    Args:
        count: ``(S,)`` samples per slot.
        sum_conf: ``(S,)`` confidence sums.
        sum_out: ``(S,)`` outcome sums.
    """
    total = int(np.sum(count))
    return float(np.sum(np.abs(sum_out - sum_conf)) / total) if total else float("nan")


class _Accumulator:
    """Sums shared by :class:`BinaryCalibration` and :class:`MulticlassCalibration`."""

    _SUMS = ("count", "sum_conf", "sum_out", "brier_sum", "nll_sum", "total")

    def __init__(self, bins: int = 15) -> None:
        calibration_edges(bins)  # validates
        self.bins = bins
        self.count = np.zeros(bins + 1, dtype=np.int64)
        self.sum_conf = np.zeros(bins + 1)
        self.sum_out = np.zeros(bins + 1)
        self.brier_sum = 0.0
        self.nll_sum = 0.0
        self.total = 0

    def _add_bins(self, confidence: np.ndarray, outcome: np.ndarray) -> None:
        count, sum_conf, sum_out = calibration_bins(confidence, outcome, self.bins)
        self.count += count
        self.sum_conf += sum_conf
        self.sum_out += sum_out
        self.total += confidence.size

    def _compatible(self, other: _Accumulator) -> bool:
        return type(other) is type(self) and other.bins == self.bins

    def merge(self, other: _Accumulator) -> None:
        """Add ``other``'s sums (same class, bins and classes), e.g. to pool per-case accumulators."""
        if not self._compatible(other):
            raise ValueError(f"cannot merge {other!r} into {self!r}")
        for name in self._SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def __iadd__(self, other: _Accumulator) -> _Accumulator:
        self.merge(other)
        return self

    def result(self) -> dict[str, float]:
        """``{"ece", "brier", "nll", "voxels"}``: the metrics over everything added (NaN when nothing was)."""
        n, nan = self.total, float("nan")
        ece = calibration_error(self.count, self.sum_conf, self.sum_out)
        return {"ece": ece, "brier": self.brier_sum / n if n else nan, "nll": self.nll_sum / n if n else nan,
                "voxels": float(n)}

    def curve(self) -> dict[str, np.ndarray]:
        """Reliability diagram data of the ``M`` non-empty slots.

        Returns:
            Each ``(M,)``: ``bin`` (slot index, ``B`` for ``c == 1``), ``lower`` (its lower edge),
            ``confidence`` (mean confidence), ``frequency`` (mean outcome) and ``count``.
        """
        filled = np.flatnonzero(self.count)
        n = self.count[filled]
        return {
            "bin": filled,
            "lower": calibration_edges(self.bins)[np.minimum(filled, self.bins)].astype(np.float64),
            "confidence": self.sum_conf[filled] / n,
            "frequency": self.sum_out[filled] / n,
            "count": n,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bins={self.bins}, voxels={self.total})"


class BinaryCalibration(_Accumulator):
    """Calibration of one binary problem (a class against the rest, or one sigmoid region).

    ECE bins the probability ``p`` of the positive class against the target (torchmetrics'
    ``BinaryCalibrationError``), Brier is ``mean((p - y)^2)``, NLL ``mean -(y log p + (1 - y) log(1 - p))``
    with ``p`` clipped to ``[PROB_EPS, 1 - PROB_EPS]``.

    Args:
        bins: equal-width bins ``B`` on ``[0, 1]``.
    """

    def update(self, probability: np.ndarray, target: np.ndarray) -> None:
        """Add ``probability`` (any shape, float in ``[0, 1]``) and ``target`` (same shape, bool or 0/1)."""
        p, y = np.asarray(probability), np.asarray(target)
        if p.shape != y.shape:
            raise ValueError(f"probability {p.shape} and target {y.shape} differ in shape")
        p, y = p.ravel(), y.ravel()  # views for contiguous input
        for start in range(0, p.size, CHUNK):
            pc = p[start:start + CHUNK].astype(np.float64)
            yc = _binary_target(y[start:start + CHUNK])
            self._add_bins(p[start:start + CHUNK], yc)
            self.brier_sum += float(np.sum(np.square(pc - yc)))
            np.clip(pc, PROB_EPS, 1.0 - PROB_EPS, out=pc)
            self.nll_sum -= float(np.sum(np.where(yc, np.log(pc), np.log1p(-pc))))


class MulticlassCalibration(_Accumulator):
    """Calibration of a ``K``-class softmax output.

    ECE bins the top-label confidence ``max_k p_k`` against ``argmax_k p_k == y`` (first index on ties;
    torchmetrics' ``MulticlassCalibrationError``). Brier is ``mean_i sum_k (p_ik - onehot_ik)^2`` (range
    ``[0, 2]``, also for ``K == 2``), NLL ``mean_i -log p_i,y_i`` with ``p`` clipped to
    ``[PROB_EPS, 1 - PROB_EPS]``.

    Args:
        num_classes: ``K``.
        bins: equal-width bins ``B`` on ``[0, 1]``.
    """

    def __init__(self, num_classes: int, bins: int = 15) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(bins)
        self.num_classes = num_classes

    def _compatible(self, other: _Accumulator) -> bool:
        return super()._compatible(other) and getattr(other, "num_classes", None) == self.num_classes

    def update(self, probabilities: np.ndarray, target: np.ndarray, channel_axis: int = 0) -> None:
        """Add a case or a batch.

        Args:
            probabilities: ``K`` along ``channel_axis``: ``(K, *spatial)`` by default, ``(N, K)`` with
                ``channel_axis=1``.
            target: integer class indices shaped like the other axes: ``(*spatial)`` or ``(N,)``.
            channel_axis: the class axis of ``probabilities``.
        """
        p = np.moveaxis(np.asarray(probabilities), channel_axis, 0)
        y = np.asarray(target)
        if p.shape[0] != self.num_classes or p.shape[1:] != y.shape:
            raise ValueError(f"probabilities {p.shape} (classes first) do not match {self.num_classes} "
                             f"classes and target {y.shape}")
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise ValueError(f"target must hold integer class indices, got {y.dtype}")
        p, y = p.reshape(self.num_classes, -1), y.reshape(-1)  # views unless the layout forbids
        step = max(1, CHUNK // self.num_classes)
        for start in range(0, y.size, step):
            pc = p[:, start:start + step].astype(np.float64)  # (K, m)
            yc = y[start:start + step].astype(np.int64)
            if yc.size and (yc.min() < 0 or yc.max() >= self.num_classes):
                raise ValueError(f"target must lie in [0, {self.num_classes}), got {yc.min()}..{yc.max()}")
            columns = np.arange(yc.size)
            self._add_bins(pc.max(axis=0), pc.argmax(axis=0) == yc)
            p_true = np.clip(pc[yc, columns], PROB_EPS, 1.0 - PROB_EPS)
            self.nll_sum -= float(np.sum(np.log(p_true)))
            pc[yc, columns] -= 1.0
            self.brier_sum += float(np.sum(np.square(pc)))


def _binary_target(y: np.ndarray) -> np.ndarray:
    """``y`` as bool, refusing anything but bool or integer 0/1."""
    if y.dtype == np.bool_:
        return y
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() > 1)):
        raise ValueError(f"target must be bool or 0/1 integers, got {y.dtype}")
    return y.astype(bool)
