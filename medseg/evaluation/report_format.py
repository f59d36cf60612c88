"""How the benchmark reports show numbers: each metric's name, unit, direction and decimals, p-values, counts.

One place decides the formats so that every table and sentence of ``report.html``/``report.md`` agrees:
scores in [0, 1] with 3 decimals, distances in mm and sizes in ml or mm² with 2, p-values as ``<0.001`` or 3
decimals, counts with thousands separators, and a minus sign (−) rather than a hyphen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

UP, DOWN, ZERO = "↑", "↓", "→0"
MINUS = "−"


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown.

    Args:
        key: the metric's column name (``results.csv``, ``per_case.csv``).
        name: its human name.
        unit: its unit (empty for unitless scores).
        better: ``"higher"``, ``"lower"`` or ``"zero"`` (a signed difference, best at 0).
        decimals: decimals of its values.
        description: one sentence on what it measures.
    """

    key: str
    name: str
    unit: str
    better: str
    decimals: int
    description: str

    @property
    def arrow(self) -> str:
        """``↑`` (higher is better), ``↓`` (lower is better) or ``→0`` (closer to 0 is better)."""
        return {"higher": UP, "lower": DOWN}.get(self.better, ZERO)

    @property
    def direction(self) -> str:
        """The direction in words: ``"higher is better"``, ``"lower is better"`` or ``"closer to 0 is better"``."""
        return "closer to 0 is better" if self.better == "zero" else f"{self.better} is better"

    @property
    def label(self) -> str:
        """Name and unit, e.g. ``"HD95 (mm)"``."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    def value(self, v: Any) -> str:
        """One value, with thousands separators and this metric's decimals; ``"n/a"`` for a missing one."""
        return number(v, self.decimals)

    def signed(self, v: Any) -> str:
        """A difference, always signed (``+0.063``, ``−1.25``)."""
        text = self.value(v)
        return text if text == "n/a" or text.startswith(MINUS) or _is_zero(text) else f"+{text}"

    def estimate(self, mean: Any, std: Any = None, low: Any = None, high: Any = None) -> str:
        """``mean ± std [low, high]``, leaving out the parts that are missing."""
        text = self.value(mean)
        if text == "n/a":
            return text
        if _finite(std):
            text += f" ± {self.value(std)}"
        if _finite(low) and _finite(high):
            text += f" [{self.value(low)}, {self.value(high)}]"
        return text


def _metric(key: str, name: str, unit: str, better: str, decimals: int, description: str) -> MetricInfo:
    return MetricInfo(key, name, unit, better, decimals, description)


METRICS: dict[str, MetricInfo] = {m.key: m for m in (
    _metric("dice", "Dice", "", "higher", 3, "overlap 2|P∩R| / (|P| + |R|)"),
    _metric("iou", "IoU", "", "higher", 3, "overlap |P∩R| / |P∪R|"),
    _metric("nsd", "NSD", "", "higher", 3, "normalised surface Dice: share of both surfaces within the tolerance "
            "(1 mm) of the other"),
    _metric("hd95", "HD95", "mm", "lower", 2, "95th percentile of the symmetric surface distances"),
    _metric("assd", "ASSD", "mm", "lower", 2, "average symmetric surface distance"),
    _metric("volume_diff_ml", "Volume difference", "ml", "zero", 2, "predicted minus reference volume"),
    _metric("area_diff_mm2", "Area difference", "mm²", "zero", 2, "predicted minus reference area"),
    _metric("sensitivity", "Sensitivity", "", "higher", 3, "share of the reference that is predicted"),
    _metric("precision", "Precision", "", "higher", 3, "share of the prediction that is in the reference"),
    _metric("ece", "ECE", "", "lower", 3, "expected calibration error of the voxel probabilities (15 bins)"),
    _metric("brier", "Brier score", "", "lower", 3, "mean squared error of the predicted probabilities"),
    _metric("nll", "NLL", "nats", "lower", 3, "negative log-likelihood of the true label"),
    _metric("correct", "Accuracy", "", "higher", 3, "share of cases whose predicted class is the true one"),
    _metric("auc", "AUC", "", "higher", 3, "area under the ROC curve"),
    _metric("accuracy", "Accuracy", "", "higher", 3, "share of cases whose predicted class is the true one"),
)}


def info(metric: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``metric``; an unknown metric is shown as is, 3 decimals, higher is better."""
    return METRICS.get(metric) or MetricInfo(metric, metric, "", "higher", 3, "")


def number(v: Any, decimals: int) -> str:
    """``v`` with ``decimals`` decimals, thousands separators and a real minus sign; ``"n/a"`` when missing."""
    if not _finite(v):
        return "n/a"
    text = f"{float(v):,.{decimals}f}"
    if text.startswith("-"):
        text = MINUS + text[1:] if not _is_zero(text[1:]) else text[1:]
    return text


def integer(v: Any) -> str:
    """A count with thousands separators (``7,741``); ``"n/a"`` when missing."""
    return f"{int(float(v)):,}" if _finite(v) else "n/a"


def p_value(p: Any) -> str:
    """``"<0.001"`` or the p-value with 3 decimals; ``"n/a"`` when there is none (no common case)."""
    if not _finite(p):
        return "n/a"
    return "<0.001" if float(p) < 0.001 else f"{float(p):.3f}"


def p_phrase(p: Any) -> str:
    """``"p < 0.001"`` or ``"p = 0.110"`` (for sentences)."""
    text = p_value(p)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def effect(r: Any) -> str:
    """A rank-biserial correlation: signed, 2 decimals."""
    text = number(r, 2)
    return text if text == "n/a" or text.startswith(MINUS) or _is_zero(text) else f"+{text}"


def seconds(s: Any) -> str:
    """A duration: ``"12.3 s"``, ``"4 min 05 s"`` or ``"2 h 03 min"`` (:func:`medseg.console.duration`)."""
    from medseg.console import duration

    return duration(float(s), decimals=1) if _finite(s) else "n/a"


def milliseconds(s: Any) -> str:
    """A short duration given in seconds, shown in ms with thousands separators (``"123.4 ms"``)."""
    return f"{number(float(s) * 1000, 1)} ms" if _finite(s) else "n/a"


def _finite(v: Any) -> bool:
    if v is None or v == "":
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _is_zero(text: str) -> bool:
    return not any(c in "123456789" for c in text)
