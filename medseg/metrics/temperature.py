"""Temperature scaling: one scalar ``T`` fitted on held-out probabilities (Guo et al., 2017), applied at prediction.

``medseg cv`` fits it on the out-of-fold probabilities and writes ``calibration.json``; ``medseg predict
--calibration FILE`` applies it. The logits are recovered from the probabilities (``log p`` for softmax,
``logit p`` for sigmoid), so no network output has to be kept; the decision (argmax, or the 0.5 threshold) is
unchanged, only the confidence moves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logsumexp

from medseg.metrics import calibration
from medseg.metrics.calibration import PROB_EPS, _binary_target

ACTIVATIONS = ("softmax", "sigmoid")
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _logits(p: np.ndarray, activation: str) -> np.ndarray:
    """float64 logits ``log p`` (softmax) or ``logit p`` (sigmoid) of ``p`` clipped to ``[eps, 1 - eps]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    return np.log(q) if activation == "softmax" else np.log(q) - np.log1p(-q)


def _mean_nll(z: np.ndarray, y: np.ndarray, activation: str) -> float:
    """Mean NLL of logits ``z``: ``(N, K)`` softmax, ``y`` ``(N,)`` int; ``(N, R)`` sigmoid, ``y`` bool."""
    if activation == "softmax":
        return float(np.mean(logsumexp(z, axis=1) - z[np.arange(y.size), y]))
    return float(np.mean(np.logaddexp(0.0, np.where(y, -z, z))))


def fit_temperature(probabilities: np.ndarray, target: np.ndarray, activation: str) -> float:
    """The temperature ``T`` in ``[0.05, 20]`` minimising the mean NLL of the rescaled probabilities.

    Logits are recovered as ``log p`` (softmax) or ``logit p`` (sigmoid), ``p`` clipped to
    ``[PROB_EPS, 1 - PROB_EPS]``, and rescaled as ``softmax(z / T)`` or ``sigmoid(z / T)``; the search runs
    over ``log T`` (``scipy.optimize.minimize_scalar``, bounded). Everything is float64, so pass a sample of
    voxels (at most a few million rows), not whole volumes. ``T > 1`` softens an overconfident model.

    Args:
        probabilities: ``(N, K)`` softmax rows, or ``(N, R)`` independent sigmoid probabilities.
        target: ``(N,)`` integer class indices (softmax), or ``(N, R)`` bool (sigmoid).
        activation: ``"softmax"`` or ``"sigmoid"``.
    """
    _check_activation(activation)
    p, y = np.asarray(probabilities), np.asarray(target)
    if activation == "softmax":
        if p.ndim != 2 or y.shape != (p.shape[0],):
            raise ValueError(f"softmax wants probabilities (N, K), target (N,); got {p.shape}, {y.shape}")
        y = y.astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
            raise ValueError(f"target must lie in [0, {p.shape[1]})")
    else:
        if p.ndim != 2 or y.shape != p.shape:
            raise ValueError(f"sigmoid wants probabilities and target (N, R); got {p.shape}, {y.shape}")
        y = _binary_target(y)
    if p.size == 0:
        raise ValueError("no samples to fit a temperature on")
    z = _logits(p, activation)
    bounds = (math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]))
    fit = minimize_scalar(lambda log_t: _mean_nll(z / math.exp(log_t), y, activation), bounds=bounds,
                          method="bounded", options={"xatol": 1e-6})
    return float(math.exp(fit.x))


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and positive, got {temperature!r}")
    return float(temperature)


def apply_temperature(
    probabilities: np.ndarray, temperature: float, activation: str, channel_axis: int = 0
) -> np.ndarray:
    """``softmax(log p / T)`` along ``channel_axis`` or ``sigmoid(logit p / T)``: float32, the input's shape.

    Read in slabs of at most :data:`medseg.metrics.calibration.CHUNK` elements along the last axis (the one before it when that is the
    softmax channel axis). ``T == 1`` returns the input (no copy when it is float32). The decision survives
    the float32 rounding: the softmax argmax (first index on ties) is unchanged, and a sigmoid probability
    stays above, at or below 0.5 as it was.

    Args:
        probabilities: e.g. ``(K, *spatial)`` softmax probabilities or ``(R, *spatial)`` sigmoid ones.
        temperature: ``T > 0``.
        activation: ``"softmax"`` or ``"sigmoid"``.
        channel_axis: the class axis (softmax only).

    Returns:
        float32 probabilities, shaped like ``probabilities``.
    """
    _check_activation(activation)
    t = _check_temperature(temperature)
    p = np.asarray(probabilities)
    if t == 1.0:
        return p.astype(np.float32, copy=False)
    if p.ndim == 0:
        return apply_temperature(p.reshape(1), t, activation).reshape(())
    out = np.empty(p.shape, dtype=np.float32)
    if p.size == 0:
        return out
    c = channel_axis % p.ndim
    axis = p.ndim - 1 if activation == "sigmoid" or c != p.ndim - 1 else p.ndim - 2
    if axis < 0:  # a single softmax vector
        out[...] = _rescale(p, t, activation, c)
        return out
    width = max(1, calibration.CHUNK // max(1, p.size // p.shape[axis]))
    for start in range(0, p.shape[axis], width):
        slab = (slice(None),) * axis + (slice(start, start + width),)
        out[slab] = _rescale(p[slab], t, activation, c)
    return out


def _rescale(p: np.ndarray, t: float, activation: str, c: int) -> np.ndarray:
    """One slab of :func:`apply_temperature`, as float32 with the decision kept."""
    q = p.astype(np.float64)
    z = _logits(q, activation) / t
    if activation == "sigmoid":
        out = expit(z).astype(np.float32)
        half = np.float32(0.5)
        out[(q > 0.5) & (out <= half)] = np.nextafter(half, np.float32(1))
        out[(q < 0.5) & (out >= half)] = np.nextafter(half, np.float32(0))
        return out
    z -= z.max(axis=c, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=c, keepdims=True)
    out = z.astype(np.float32)
    top = np.expand_dims(q.argmax(axis=c), c)
    lost = top != np.expand_dims(out.argmax(axis=c), c)  # ties made by float32 rounding
    if lost.any():
        bumped = np.nextafter(out.max(axis=c, keepdims=True), np.float32(2))
        np.put_along_axis(out, top, np.where(lost, bumped, np.take_along_axis(out, top, axis=c)), axis=c)
    return out


def save_calibration(
    path: str | Path, temperature: float, activation: str, facts: dict[str, Any] | None = None
) -> Path:
    """Write ``{"temperature": T, "activation": ..., **facts}`` as JSON to ``path`` and return it."""
    _check_activation(activation)
    facts = dict(facts or {})
    clash = {"temperature", "activation"} & facts.keys()
    if clash:
        raise ValueError(f"facts may not set {sorted(clash)}")
    path = Path(path)
    payload = {"temperature": _check_temperature(temperature), "activation": activation, **facts}
    from medseg.data.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2) + "\n")
    return path


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_calibration`; ``ValueError`` naming the file if it is not one."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such calibration file")
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON calibration file ({err})") from err
    if not isinstance(data, dict) or not {"temperature", "activation"} <= data.keys():
        raise ValueError(f"{path}: a calibration file needs the keys 'temperature' and 'activation'")
    try:
        _check_temperature(data["temperature"])
        _check_activation(data["activation"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return data
