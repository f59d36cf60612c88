"""Segmentation metrics per case and class, in physical units, agreeing with MONAI's definitions.

Surfaces are the voxels of a mask that a 6-/4-connected erosion removes (``mask ^ erode(mask)``, the image
border counting as outside), and surface distances are Euclidean distances in mm from one surface's voxels to
the other surface (``scipy.ndimage.distance_transform_edt`` with the spacing), as MONAI's
``get_mask_edges``/``get_surface_distance`` compute them.

Empty masks follow :mod:`medseg.metrics.conventions` (one set of rules for validation and evaluation):

=====================  ========================  =====================================================
reference / prediction  both empty                one empty
=====================  ========================  =====================================================
dice, iou, nsd          ``rules.both_empty`` (1)  0.0
hd95, assd              0.0                       ``rules.distance_penalty`` (the image diagonal in mm)
sensitivity             NaN (no positives)        0.0 if the prediction is empty, NaN if the reference is
precision               NaN (no predictions)      0.0 if the reference is empty, NaN if the prediction is
volume_diff_ml (3D)     0.0                       predicted minus reference volume (ml), as always
area_diff_mm2 (2D)      0.0                       predicted minus reference area (mm^2), as always
=====================  ========================  =====================================================

The size difference is a volume in ml for 3D masks and an area in mm^2 for 2D masks (a 2D image has no
thickness to make a volume of): :func:`metric_names` gives the metrics, in column order, of either.

Sensitivity and precision are NaN where undefined, and the summaries count those pairs (they are how a missed
or spurious structure is recognised in a table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medseg.metrics.conventions import EmptyMaskRules, dice_from_counts

METRICS_3D = ("dice", "iou", "hd95", "assd", "nsd", "volume_diff_ml", "sensitivity", "precision")
METRICS_2D = ("dice", "iou", "hd95", "assd", "nsd", "area_diff_mm2", "sensitivity", "precision")
METRICS = METRICS_3D  # the metrics of 3D masks; metric_names(ndim) gives those of either dimensionality


def metric_names(ndim: int) -> tuple[str, ...]:
    """The metrics (CSV columns, in order) of ``ndim``-dimensional masks: with ``area_diff_mm2`` in 2D,
    ``volume_diff_ml`` in 3D."""
    if ndim not in (2, 3):
        raise ValueError(f"segmentation metrics are for 2D or 3D masks, not {ndim}D")
    return METRICS_2D if ndim == 2 else METRICS_3D


def size_difference(n_pred: float, n_ref: float, spacing: Sequence[float]) -> dict[str, float]:
    """Predicted minus reference size of masks of ``n_pred`` and ``n_ref`` voxels of size ``spacing`` (mm):
    ``{"area_diff_mm2": mm^2}`` in 2D, ``{"volume_diff_ml": ml}`` in 3D."""
    mm = (n_pred - n_ref) * float(np.prod(spacing))
    return {"area_diff_mm2": mm} if _is_2d(len(spacing)) else {"volume_diff_ml": mm / 1000.0}


def _is_2d(ndim: int) -> bool:
    return metric_names(ndim) is METRICS_2D


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of ``mask`` ``(X, Y[, Z])``: the voxels an erosion removes (border = outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the reference surface, and the other way round.

    Both masks must be non-empty.
    """
    edges_pred, edges_ref = surface(prediction), surface(reference)
    to_ref = ndimage.distance_transform_edt(~edges_ref, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=spacing)
    return to_ref[edges_pred], to_pred[edges_ref]


def binary_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    rules: EmptyMaskRules | None = None,
) -> dict[str, float]:
    """All metrics of one binary mask pair (see the module docstring for the empty-mask conventions).

    Args:
        prediction, reference: masks ``(X, Y[, Z])`` on one grid.
        spacing: voxel size in mm along each axis.
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        rules: the empty-mask rules (default: Metrics Reloaded's, :class:`EmptyMaskRules`).
    """
    pred = np.asarray(prediction, dtype=bool)
    ref = np.asarray(reference, dtype=bool)
    if pred.shape != ref.shape or len(spacing) != pred.ndim:
        raise ValueError(f"shapes {pred.shape} / {ref.shape} and spacing {tuple(spacing)} do not match")
    tp = float(np.logical_and(pred, ref).sum())
    n_pred, n_ref = float(pred.sum()), float(ref.sum())
    out = {
        **size_difference(n_pred, n_ref, spacing),
        "sensitivity": tp / n_ref if n_ref else float("nan"),
        "precision": tp / n_pred if n_pred else float("nan"),
    }
    rules = rules or EmptyMaskRules()
    if not n_pred and not n_ref:
        return both_empty_metrics(rules, pred.ndim)
    out["dice"] = dice_from_counts(tp, n_pred, n_ref, rules.both_empty)
    out["iou"] = tp / (n_pred + n_ref - tp)
    if not n_pred or not n_ref:
        penalty = rules.penalty_mm(pred.shape, spacing)
        return {**out, "hd95": penalty, "assd": penalty, "nsd": 0.0}
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    out["hd95"] = float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))
    out["assd"] = float(np.concatenate([to_ref, to_pred]).mean())
    close = (to_ref <= nsd_tolerance_mm).sum() + (to_pred <= nsd_tolerance_mm).sum()
    out["nsd"] = float(close / (len(to_ref) + len(to_pred)))
    return out


def both_empty_metrics(rules: EmptyMaskRules | None = None, ndim: int = 3) -> dict[str, float]:
    """The metrics of a structure neither ``ndim``-dimensional mask holds (they do not depend on the image,
    only the size difference's name does: area in 2D, volume in 3D)."""
    empty = (rules or EmptyMaskRules()).both_empty
    size = "area_diff_mm2" if _is_2d(ndim) else "volume_diff_ml"
    return {size: 0.0, "sensitivity": float("nan"), "precision": float("nan"), "dice": empty,
            "iou": empty, "hd95": 0.0, "assd": 0.0, "nsd": empty}


def case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    classes: Sequence[int],
    nsd_tolerance_mm: float = 1.0,
    rules: EmptyMaskRules | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics of one case for every foreground class: ``{class: {metric: value}}``.

    Args:
        prediction, reference: label maps ``(X, Y[, Z])`` on one grid.
        spacing: voxel size in mm.
        classes: the foreground label values to score (a class absent from both scores as "both empty").
    """
    return {
        int(c): binary_metrics(prediction == c, reference == c, spacing, nsd_tolerance_mm, rules)
        for c in classes
    }


def region_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    regions: Mapping[str, Sequence[int]],
    nsd_tolerance_mm: float = 1.0,
    rules: EmptyMaskRules | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of one case for every region (a set of label values, e.g. a tumour core {2, 3}):
    ``{region name: {metric: value}}``, the mask of a region being ``label in values`` on both sides."""
    return {
        str(name): binary_metrics(np.isin(prediction, list(values)), np.isin(reference, list(values)), spacing,
                                  nsd_tolerance_mm, rules)
        for name, values in regions.items()
    }
