"""Segmentation metrics against MONAI's implementations and hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

from medseg.metrics.conventions import EmptyMaskRules
from medseg.metrics.segmentation import (
    METRICS,
    binary_metrics,
    both_empty_metrics,
    case_metrics,
    metric_names,
)


def _blob(shape: tuple[int, ...], centre: tuple[float, ...], radius: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True)) <= 1.0


def _monai(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    def onehot(mask: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        return torch.cat([1 - m, m], dim=1)

    p, r = onehot(pred), onehot(ref)
    return {
        "dice": compute_dice(p, r, include_background=False).item(),
        "iou": compute_iou(p, r, include_background=False).item(),
        "hd95": compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing)).item(),
        "assd": compute_average_surface_distance(p, r, symmetric=True, spacing=list(spacing)).item(),
        "nsd": compute_surface_dice(p, r, class_thresholds=[tol], spacing=list(spacing)).item(),
    }


CASES = [
    ((24, 20, 16), (1.0, 1.0, 1.0)),
    ((24, 20, 16), (0.7, 1.3, 2.5)),  # anisotropic
    ((40, 36), (0.8, 1.6)),  # 2D
]


@pytest.mark.parametrize("shape, spacing", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_monai(shape: tuple[int, ...], spacing: tuple[float, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    centre = tuple(s / 2 for s in shape)
    ref = _blob(shape, centre, tuple(s / 4 for s in shape))
    pred = _blob(shape, tuple(c + rng.uniform(-2, 2) for c in centre), tuple(s / 4 + rng.uniform(-1.5, 1.5) for s in shape))
    pred |= rng.random(shape) > 0.995  # a few scattered false positives make the distances interesting
    ours = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.5)
    theirs = _monai(pred, ref, spacing, 1.5)
    for name, value in theirs.items():
        # MONAI returns float32 (about 7 significant digits); ours is float64, so agreement is to 1e-6 relative.
        assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_known_answers_on_two_squares() -> None:
    ref = np.zeros((10, 10), bool)
    ref[2:6, 2:6] = True  # 16 voxels
    pred = np.zeros((10, 10), bool)
    pred[2:6, 3:7] = True  # 16 voxels, shifted by one column: 12 shared
    m = binary_metrics(pred, ref, spacing=(1.0, 2.0))
    assert m["dice"] == pytest.approx(2 * 12 / 32)
    assert m["iou"] == pytest.approx(12 / 20)
    assert m["sensitivity"] == pytest.approx(12 / 16) and m["precision"] == pytest.approx(12 / 16)
    assert m["area_diff_mm2"] == 0.0 and "volume_diff_ml" not in m  # 2D: an area, not a volume
    assert m["hd95"] == pytest.approx(2.0)  # the shift is one voxel along an axis of 2 mm


def test_volume_difference_uses_the_spacing() -> None:
    ref = np.zeros((10, 10, 10), bool)
    ref[:5, :5, :5] = True  # 125 voxels
    pred = np.zeros_like(ref)
    pred[:5, :5, :6] = True  # 150 voxels
    m = binary_metrics(pred, ref, spacing=(2.0, 2.0, 5.0))  # 20 mm^3 a voxel
    assert m["volume_diff_ml"] == pytest.approx(25 * 20 / 1000)
    assert "area_diff_mm2" not in m and set(m) == set(METRICS)


def test_area_difference_in_2d_uses_the_spacing() -> None:
    ref = np.zeros((12, 12), bool)
    ref[2:7, 2:7] = True  # 25 pixels
    pred = ref.copy()
    pred[7, 2:7] = True  # 5 extra pixels
    m = binary_metrics(pred, ref, spacing=(0.5, 2.0))  # 1.0 mm^2 a pixel
    assert m["area_diff_mm2"] == pytest.approx(5 * 0.5 * 2.0)
    assert binary_metrics(ref, pred, spacing=(0.5, 2.0))["area_diff_mm2"] == pytest.approx(-5.0)
    assert set(m) == set(metric_names(2)) and "volume_diff_ml" not in m
    empty = np.zeros((4, 4), bool)
    assert binary_metrics(empty, empty, (0.5, 2.0))["area_diff_mm2"] == 0.0
    assert set(both_empty_metrics(ndim=2)) == set(metric_names(2)) and set(both_empty_metrics()) == set(METRICS)


def test_metric_names_follow_the_dimensionality() -> None:
    assert metric_names(3) == METRICS and metric_names(3)[5] == "volume_diff_ml"
    assert metric_names(2)[5] == "area_diff_mm2"
    assert [m for m in metric_names(2) if m != "area_diff_mm2"] == [m for m in METRICS if m != "volume_diff_ml"]
    with pytest.raises(ValueError, match="2D or 3D"):
        metric_names(4)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5] = True
    both = binary_metrics(empty, empty, (1.0, 1.0))
    assert both["dice"] == 1.0 and both["hd95"] == 0.0 and both["nsd"] == 1.0
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])
    missed = binary_metrics(empty, full, (1.0, 2.0))
    # The default distance penalty is the image diagonal in mm: 8 x 1 mm by 8 x 2 mm, sqrt(8^2 + 16^2).
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0 and missed["hd95"] == pytest.approx(320 ** 0.5)
    spurious = binary_metrics(full, empty, (1.0, 1.0), rules=EmptyMaskRules(distance_penalty=99.0))
    assert spurious["precision"] == 0.0 and spurious["hd95"] == 99.0 and spurious["assd"] == 99.0
    asked = binary_metrics(full, empty, (1.0, 1.0), rules=EmptyMaskRules(float("nan"), "nan"))
    assert math.isnan(asked["hd95"]) and asked["dice"] == 0.0  # a spurious structure is never left out
    assert math.isnan(binary_metrics(empty, empty, (1.0, 1.0), rules=EmptyMaskRules(float("nan"), "nan"))["dice"])


def test_case_metrics_scores_every_class() -> None:
    ref = np.zeros((12, 12), np.uint8)
    ref[1:5, 1:5] = 1
    ref[7:11, 7:11] = 2
    pred = ref.copy()
    pred[7:11, 7:11] = 0  # class 2 missed
    out = case_metrics(pred, ref, (1.0, 1.0), classes=[1, 2, 3])
    assert out[1]["dice"] == 1.0 and out[2]["dice"] == 0.0 and out[3]["dice"] == 1.0  # 3: absent from both
    assert set(out[1]) == set(out[3]) == set(metric_names(2))  # 2D: area_diff_mm2
