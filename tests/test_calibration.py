"""Calibration metrics (agreement with torchmetrics and torch's losses) and temperature scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from medseg.metrics import calibration
from medseg.metrics.calibration import PROB_EPS, BinaryCalibration, MulticlassCalibration, calibration_edges
from medseg.metrics.temperature import apply_temperature, fit_temperature, load_calibration, save_calibration

TOL = 1e-6


def _edge_values() -> np.ndarray:
    """float32 probabilities on and next to torch's 15-bin edges, plus 0, 1/15, 0.5, 1 and the exact k/15."""
    edges = calibration_edges(15)
    near = np.r_[np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(1))]
    exact = (np.arange(16) / 15).astype(np.float32)
    values = np.r_[edges, near, exact, np.float32([0.0, 1 / 15, 0.5, 1.0])]
    return np.clip(values, 0, 1).astype(np.float32)


def _binary_case(seed: int, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """``(n + edges,)`` float32 probabilities (random and edge values) and bool targets."""
    rng = np.random.default_rng(seed)
    p = np.r_[rng.random(n).astype(np.float32), np.repeat(_edge_values(), 20)]
    return p, rng.random(p.size) < p**1.5  # miscalibrated on purpose


def _softmax_volume(seed: int, k: int, shape: tuple[int, ...] = (20, 20, 30)) -> tuple[np.ndarray, np.ndarray]:
    """``(K, *shape)`` float32 softmax probabilities (with a slab of exact ties and 1.0s) and ``(*shape)`` labels."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(k, *shape)) * 2.0
    p = np.exp(z) / np.exp(z).sum(axis=0)
    p[:, 0, 0, :10] = 1.0 / k  # all tied: top label is class 0
    p[:, 0, 1, :10] = np.eye(k)[rng.integers(0, k, 10)].T  # confidence exactly 1
    return p.astype(np.float32), rng.integers(0, k, shape)


def test_edges_are_torch_linspace() -> None:
    for bins in range(1, 301):
        torch_edges = torch.linspace(0, 1, bins + 1, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(calibration_edges(bins), torch_edges)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_ece_matches_torchmetrics(seed: int) -> None:
    p, y = _binary_case(seed)
    acc = BinaryCalibration(bins=15)
    acc.update(p, y)
    ref = BinaryCalibrationError(n_bins=15, norm="l1")(torch.from_numpy(p), torch.from_numpy(y).long())
    assert acc.result()["ece"] == pytest.approx(ref.item(), abs=TOL)


def test_binary_ece_on_edge_values_only_matches_torchmetrics() -> None:
    # Every probability sits on or next to an edge: one sample in the wrong bin moves the ECE by ~1e-3.
    rng = np.random.default_rng(3)
    p = np.repeat(_edge_values(), 7)
    y = rng.random(p.size) < 0.5
    acc = BinaryCalibration()
    acc.update(p, y)
    ref = BinaryCalibrationError(n_bins=15, norm="l1")(torch.from_numpy(p), torch.from_numpy(y).long())
    assert acc.result()["ece"] == pytest.approx(ref.item(), abs=TOL)


def test_binary_brier_and_nll_match_torch() -> None:
    p, y = _binary_case(4)
    p[:5], y[:5] = [0.0, 1.0, 0.0, 1.0, 0.5], [True, False, False, True, True]  # clipped extremes
    acc = BinaryCalibration()
    acc.update(p.reshape(-1, 2), y.reshape(-1, 2))  # any shape
    result = acc.result()
    p64, y64 = torch.from_numpy(p.astype(np.float64)), torch.from_numpy(y.astype(np.float64))
    assert result["brier"] == pytest.approx(torch.mean((p64 - y64) ** 2).item(), abs=TOL)
    bce = F.binary_cross_entropy(p64.clamp(PROB_EPS, 1 - PROB_EPS), y64)
    assert result["nll"] == pytest.approx(bce.item(), abs=TOL)
    assert result["voxels"] == p.size


@pytest.mark.parametrize("k", [2, 3, 5])
def test_multiclass_matches_torchmetrics_and_torch_losses(k: int) -> None:
    p, y = _softmax_volume(k, k)
    acc = MulticlassCalibration(k, bins=15)
    acc.update(p, y)  # (K, D, H, W), channel_axis=0
    result = acc.result()
    # torchmetrics takes (N, C, ...): one "batch" of the whole volume
    ref = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(
        torch.from_numpy(p)[None], torch.from_numpy(y)[None]
    )
    assert result["ece"] == pytest.approx(ref.item(), abs=TOL)
    rows = torch.from_numpy(p.reshape(k, -1).T.astype(np.float64))  # (N, K)
    labels = torch.from_numpy(y.reshape(-1))
    brier = torch.mean(torch.sum((rows - F.one_hot(labels, k)) ** 2, dim=1))
    assert result["brier"] == pytest.approx(brier.item(), abs=TOL)
    nll = F.nll_loss(torch.log(rows.clamp(PROB_EPS, 1 - PROB_EPS)), labels)
    assert result["nll"] == pytest.approx(nll.item(), abs=TOL)
    # The (N, K) layout gives the same sums.
    other = MulticlassCalibration(k)
    other.update(rows.numpy().astype(np.float32), labels.numpy(), channel_axis=1)
    assert other.result() == pytest.approx(result, abs=1e-12)


def test_float64_confidences_are_binned_as_float32_like_torchmetrics() -> None:
    # MulticlassCalibrationError casts confidences to float32: a float64 value just below an edge rounds onto it.
    edges = calibration_edges(15).astype(np.float64)[6:]  # top-label confidences above 1/3
    top = np.r_[edges - 1e-10, edges + 1e-10, np.arange(6, 16) / 15]
    top = np.repeat(np.clip(top, 0, 1), 3)
    p = np.stack([top, (1 - top) / 2, (1 - top) / 2], axis=1)  # (N, 3) float64
    y = np.random.default_rng(5).integers(0, 3, top.size)
    acc = MulticlassCalibration(3)
    acc.update(p, y, channel_axis=1)
    ref = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")(torch.from_numpy(p), torch.from_numpy(y))
    assert acc.result()["ece"] == pytest.approx(ref.item(), abs=TOL)


def test_pieces_merged_equal_one_update() -> None:
    p, y = _softmax_volume(7, 3)
    whole = MulticlassCalibration(3)
    whole.update(p, y)
    pooled = MulticlassCalibration(3)
    for d in range(0, 20, 6):  # uneven pieces along the first spatial axis
        case = MulticlassCalibration(3)
        case.update(p[:, d:d + 6], y[d:d + 6])
        pooled += case
    np.testing.assert_array_equal(pooled.count, whole.count)
    assert pooled.result() == pytest.approx(whole.result(), abs=1e-12)

    pb, yb = _binary_case(8)
    one, merged = BinaryCalibration(), BinaryCalibration()
    one.update(pb, yb)
    for part in np.array_split(np.arange(pb.size), 5):
        piece = BinaryCalibration()
        piece.update(pb[part], yb[part])
        merged.merge(piece)
    assert merged.result() == pytest.approx(one.result(), abs=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(BinaryCalibration(bins=10))
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(MulticlassCalibration(4))


def test_small_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    p, y = _softmax_volume(9, 4)
    big = MulticlassCalibration(4)
    big.update(p, y)
    pb, yb = _binary_case(9)
    big_binary = BinaryCalibration()
    big_binary.update(pb, yb)
    monkeypatch.setattr(calibration, "CHUNK", 1000)
    small = MulticlassCalibration(4)
    small.update(p, y)
    small_binary = BinaryCalibration()
    small_binary.update(pb, yb)
    assert small.result() == pytest.approx(big.result(), abs=1e-12)
    assert small_binary.result() == pytest.approx(big_binary.result(), abs=1e-12)


def test_input_above_the_chunk_size() -> None:
    n = calibration.CHUNK + 300_001  # two chunks
    rng = np.random.default_rng(10)
    p = rng.random(n, dtype=np.float32)
    y = rng.random(n) < p
    acc = BinaryCalibration()
    acc.update(p, y)
    # Reference: torch.bucketize (torchmetrics' rule) with float64 sums.
    index = torch.bucketize(torch.from_numpy(p), torch.linspace(0, 1, 16), right=True).numpy() - 1
    gap = np.bincount(index, weights=y - p.astype(np.float64), minlength=16)
    result = acc.result()
    assert result["ece"] == pytest.approx(np.abs(gap).sum() / n, abs=1e-9)
    assert result["brier"] == pytest.approx(np.mean((p.astype(np.float64) - y) ** 2), abs=1e-9)
    assert result["voxels"] == n
    k_acc = MulticlassCalibration(2)
    k_acc.update(np.stack([1 - p, p]), y.astype(np.int64))  # (2, n): 2 * n elements
    assert k_acc.result()["voxels"] == n


def test_empty_accumulator_is_nan_and_curve_is_per_bin() -> None:
    assert all(np.isnan(v) for k, v in BinaryCalibration().result().items() if k != "voxels")
    acc = BinaryCalibration(bins=15)
    acc.update(np.float32([0.1, 0.1, 0.5, 1.0]), np.array([False, True, True, True]))
    curve = acc.curve()
    np.testing.assert_array_equal(curve["bin"], [1, 7, 15])  # .1 in [1/15, 2/15); .5 in [7/15, 8/15); 1 alone
    np.testing.assert_array_equal(curve["count"], [2, 1, 1])
    np.testing.assert_allclose(curve["confidence"], [0.1, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(curve["frequency"], [0.5, 1.0, 1.0])
    # |.5 - .1| * 2 + |1 - .5| + |1 - 1| over 4 samples
    assert acc.result()["ece"] == pytest.approx((0.8 + 0.5) / 4, abs=1e-7)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BinaryCalibration().update(np.float32([0.5, 1.5]), np.array([True, False]))
    with pytest.raises(ValueError, match="differ in shape"):
        BinaryCalibration().update(np.float32([0.5, 0.5]), np.array([True]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        MulticlassCalibration(3).update(np.full((3, 4), 1 / 3), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="do not match"):
        MulticlassCalibration(3).update(np.full((2, 4), 0.5), np.array([0, 1, 1, 0]))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sample(rng: np.random.Generator, activation: str, scale: float, n: int = 20_000) -> tuple[np.ndarray, ...]:
    """Labels drawn from calibrated probabilities of logits ``z``; the model reports ``z * scale``."""
    z = rng.normal(size=(n, 4)) * 1.5
    if activation == "softmax":
        true_p = _softmax(z)
        y = (rng.random((n, 1)) > np.cumsum(true_p, axis=1)).sum(axis=1)
        return _softmax(z * scale).astype(np.float32), y
    y = rng.random(z.shape) < 1 / (1 + np.exp(-z))
    return (1 / (1 + np.exp(-z * scale))).astype(np.float32), y


def _torch_nll(p: np.ndarray, y: np.ndarray, activation: str) -> float:
    q = torch.from_numpy(p.astype(np.float64)).clamp(PROB_EPS, 1 - PROB_EPS)
    if activation == "softmax":
        return F.nll_loss(torch.log(q), torch.from_numpy(y)).item()
    return F.binary_cross_entropy(q, torch.from_numpy(y.astype(np.float64))).item()


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("scale", "low", "high"), [(3.0, 2.5, 3.5), (0.5, 0.4, 0.6)])
def test_temperature_undoes_over_and_underconfidence(activation: str, scale: float, low: float,
                                                     high: float) -> None:
    rng = np.random.default_rng(11)
    fit_p, fit_y = _sample(rng, activation, scale)
    t = fit_temperature(fit_p, fit_y, activation)
    assert low < t < high  # ~scale: overconfident (x3) gives T > 1, underconfident (x0.5) T < 1
    held_p, held_y = _sample(rng, activation, scale)  # a separate sample, made the same way
    scaled = apply_temperature(held_p, t, activation, channel_axis=1)
    assert scaled.dtype == np.float32 and scaled.shape == held_p.shape
    before, after = _torch_nll(held_p, held_y, activation), _torch_nll(scaled, held_y, activation)
    assert after < before - 0.01


def test_calibrated_model_keeps_temperature_near_one() -> None:
    p, y = _sample(np.random.default_rng(12), "softmax", 1.0)
    assert 0.9 < fit_temperature(p, y, "softmax") < 1.1


def test_apply_temperature_matches_torch_and_keeps_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    p, _ = _softmax_volume(13, 3, shape=(6, 8, 10))
    # Two classes one float32 step apart: at T = 20 both round to 0.5 in float32.
    a = np.nextafter(np.float32(0.5), np.float32(0))
    p[:, 0, 0, 0] = [a, 1 - a, 0]
    for t in (0.3, 5.0, 20.0):
        out = apply_temperature(p, t, "softmax", channel_axis=0)
        np.testing.assert_array_equal(out.argmax(axis=0), p.argmax(axis=0))
        ref = torch.softmax(torch.log(torch.from_numpy(p).double().clamp_min(PROB_EPS)) / t, dim=0)
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-6)
        monkeypatch.setattr(calibration, "CHUNK", 50)  # many slabs along the last axis
        np.testing.assert_array_equal(apply_temperature(p, t, "softmax"), out)
        monkeypatch.undo()
    last = np.moveaxis(p, 0, -1)  # classes last: slabs along the axis before
    np.testing.assert_array_equal(apply_temperature(last, 20.0, "softmax", channel_axis=-1),
                                  np.moveaxis(apply_temperature(p, 20.0, "softmax"), 0, -1))
    assert apply_temperature(p, 1.0, "softmax") is p  # identity without a copy


def test_sigmoid_temperature_keeps_the_half_threshold() -> None:
    rng = np.random.default_rng(14)
    p = rng.random((2, 5, 7)).astype(np.float32)
    p[0, 0, :3] = [np.nextafter(np.float32(0.5), np.float32(1)), np.float32(0.5),
                   np.nextafter(np.float32(0.5), np.float32(0))]
    for t in (0.2, 3.0, 20.0):
        out = apply_temperature(p, t, "sigmoid")
        np.testing.assert_array_equal(out > 0.5, p > 0.5)
        np.testing.assert_array_equal(out < 0.5, p < 0.5)
        q = torch.from_numpy(p).double().clamp(PROB_EPS, 1 - PROB_EPS)
        np.testing.assert_allclose(out, torch.sigmoid(torch.logit(q) / t).numpy(), atol=1e-6)


def test_calibration_file_round_trip(tmp_path: Path) -> None:
    path = save_calibration(tmp_path / "calibration.json", 2.5, "softmax", {"samples": 1000, "nll_before": 0.7})
    assert load_calibration(path) == {"temperature": 2.5, "activation": "softmax", "samples": 1000,
                                      "nll_before": 0.7}
    with pytest.raises(ValueError, match="finite and positive"):
        save_calibration(tmp_path / "bad.json", 0.0, "softmax")
    with pytest.raises(ValueError, match="may not set"):
        save_calibration(tmp_path / "bad.json", 1.0, "softmax", {"temperature": 3})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json {", "not a JSON"),
        ("[1, 2]", "needs the keys"),
        ('{"temperature": 2.0}', "needs the keys"),
        ('{"activation": "softmax"}', "needs the keys"),
        ('{"temperature": "2", "activation": "softmax"}', "must be a number"),
        ('{"temperature": true, "activation": "softmax"}', "must be a number"),
        ('{"temperature": -1.0, "activation": "softmax"}', "finite and positive"),
        ('{"temperature": 0, "activation": "softmax"}', "finite and positive"),
        ('{"temperature": NaN, "activation": "softmax"}', "finite and positive"),
        ('{"temperature": Infinity, "activation": "softmax"}', "finite and positive"),
        ('{"temperature": 2.0, "activation": "relu"}', "activation"),
    ],
)
def test_load_calibration_refusals_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "my_calibration.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_calibration(path)
    assert "my_calibration.json" in str(err.value)
