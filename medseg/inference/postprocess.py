"""Morphological post-processing of label maps, 2D and 3D, in physical units.

Pure numpy/scipy functions on integer label maps of shape ``(X, Y[, Z])``. Each returns a new array of the same
shape and dtype and never modifies its input. ``classes=None`` means every foreground label present (``> 0``).
Sizes are given in millimetres and converted with the voxel spacing, so anisotropic images behave physically.

A post-processing spec is an ordered list of plain dicts (the form saved as ``postprocessing.json``)::

    [{"op": "keep_largest_component", "classes": [1]},
     {"op": "remove_small_components", "min_volume_mm3": 50},
     {"op": "fill_holes"},
     {"op": "closing", "radius_mm": 2}]

``load_postprocessing`` reads and validates one; ``apply_postprocessing`` runs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------- helpers


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be a 2D (X, Y) or 3D (X, Y, Z) array, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must be an integer label map, got dtype {labels.dtype}")
    return labels


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    sp = np.asarray(spacing, dtype=float).reshape(-1)
    if sp.size != ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {sp.size} values but the labels are {ndim}D")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    return sp


def _classes(labels: np.ndarray, classes: Sequence[int] | None) -> list[int]:
    if classes is None:
        return [int(c) for c in np.unique(labels) if c > 0]
    if isinstance(classes, (int, np.integer)):
        classes = [int(classes)]
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c <= 0:
            raise ValueError(f"classes must be positive integer labels, got {list(classes)}")
        out.append(int(c))
    return out


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be in 1..{ndim} for {ndim}D labels, got {connectivity}")
    return ndimage.generate_binary_structure(ndim, connectivity)


def _components(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of ``mask``: (component ids (X, Y[, Z]), voxel counts (n + 1,), index 0 = bg)."""
    comp, n = ndimage.label(mask, structure=structure)
    return comp, np.bincount(comp.ravel(), minlength=n + 1)


# ---------------------------------------------------------------------------------------- components


def keep_largest_component(
    labels: np.ndarray,
    classes: Sequence[int] | None = None,
    per_class: bool = True,
    connectivity: int = 1,
) -> np.ndarray:
    """Keep only the largest connected component, per class or of the foreground union.

    Args:
        labels: integer label map, shape (X, Y[, Z]).
        classes: labels to process; None = every foreground label present. Other labels are left alone.
        per_class: True: each class keeps its own largest component. False: the largest component of the
            union of ``classes`` is kept and every other voxel of those classes is set to 0.
        connectivity: 1 = faces only, up to ndim = faces, edges and corners.

    Returns:
        A new label map, shape (X, Y[, Z]), same dtype. Ties keep the component found first in scan order.
    """
    labels = _check_labels(labels)
    structure = _structure(labels.ndim, connectivity)
    out = labels.copy()
    selected = _classes(labels, classes)
    groups = [[c] for c in selected] if per_class else [selected]
    for group in groups:
        mask = np.isin(labels, group)
        comp, counts = _components(mask, structure)
        if counts.size <= 2:  # no component or only one
            continue
        largest = int(np.argmax(counts[1:])) + 1
        out[mask & (comp != largest)] = 0
    return out


def remove_small_components(
    labels: np.ndarray,
    spacing: Sequence[float],
    min_volume_mm3: float,
    classes: Sequence[int] | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Set to background every component whose physical volume is below ``min_volume_mm3``.

    Args:
        labels: integer label map, shape (X, Y[, Z]).
        spacing: voxel size in mm per axis, length ndim (in 2D the result is an area in mm^2).
        min_volume_mm3: components with ``voxel count * prod(spacing) < min_volume_mm3`` are removed.
        classes: labels to process (each class separately); None = every foreground label present.
        connectivity: 1 = faces only, up to ndim = faces, edges and corners.

    Returns:
        A new label map, shape (X, Y[, Z]), same dtype.
    """
    labels = _check_labels(labels)
    voxel_volume = float(np.prod(_check_spacing(spacing, labels.ndim)))
    if not np.isfinite(min_volume_mm3) or min_volume_mm3 < 0:
        raise ValueError(f"min_volume_mm3 must be a non-negative number, got {min_volume_mm3}")
    structure = _structure(labels.ndim, connectivity)
    out = labels.copy()
    for c in _classes(labels, classes):
        mask = labels == c
        comp, counts = _components(mask, structure)
        small = counts * voxel_volume < min_volume_mm3
        small[0] = False
        out[small[comp]] = 0
    return out


def fill_holes(labels: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """Fill the holes inside each class's mask, writing only into background voxels.

    Args:
        labels: integer label map, shape (X, Y[, Z]).
        classes: labels to process, in order; None = every foreground label present.

    Returns:
        A new label map, shape (X, Y[, Z]), same dtype. Voxels of another foreground class lying inside a
        hole keep their label.
    """
    labels = _check_labels(labels)
    out = labels.copy()
    for c in _classes(labels, classes):
        filled = ndimage.binary_fill_holes(labels == c)
        out[filled & (out == 0)] = c
    return out


# ---------------------------------------------------------------------------------------- morphology


def structuring_element(spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Ellipsoidal structuring element of physical radius ``radius_mm``.

    The radius in voxels along axis ``i`` is ``round(radius_mm / spacing[i])``; an axis whose radius rounds
    to 0 gets extent 1 (the element is flat along it).

    Args:
        spacing: voxel size in mm per axis, length ndim (2 or 3).
        radius_mm: radius in mm, >= 0.

    Returns:
        Boolean array of shape ``(2 * r_0 + 1, ..., 2 * r_{ndim-1} + 1)``.
    """
    sp = np.asarray(spacing, dtype=float).reshape(-1)
    sp = _check_spacing(sp, sp.size)
    if not np.isfinite(radius_mm) or radius_mm < 0:
        raise ValueError(f"radius_mm must be a non-negative number, got {radius_mm}")
    radii = [max(0, int(round(radius_mm / s))) for s in sp]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radii], indexing="ij")
    dist = np.zeros(grids[0].shape)
    for g, r in zip(grids, radii, strict=True):
        if r > 0:
            dist += (g / r) ** 2
    return dist <= 1.0


def _morph(mask: np.ndarray, element: np.ndarray, op: Callable[..., np.ndarray]) -> np.ndarray:
    """Apply ``op`` with the image border treated as continuing the edge (no erosion from the border)."""
    pad = [(s // 2, s // 2) for s in element.shape]
    result = op(np.pad(mask, pad, mode="edge"), structure=element)
    return result[tuple(slice(p, p + n) for (p, _), n in zip(pad, mask.shape, strict=True))]


def binary_opening(
    labels: np.ndarray,
    spacing: Sequence[float],
    radius_mm: float,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """Morphological opening per class: removes spurs and bridges thinner than the element.

    Args:
        labels: integer label map, shape (X, Y[, Z]).
        spacing: voxel size in mm per axis, length ndim.
        radius_mm: element radius in mm (see ``structuring_element``).
        classes: labels to process; None = every foreground label present.

    Returns:
        A new label map, shape (X, Y[, Z]), same dtype; removed voxels become 0.
    """
    labels = _check_labels(labels)
    element = structuring_element(_check_spacing(spacing, labels.ndim), radius_mm)
    out = labels.copy()
    for c in _classes(labels, classes):
        mask = labels == c
        out[mask & ~_morph(mask, element, ndimage.binary_opening)] = 0
    return out


def binary_closing(
    labels: np.ndarray,
    spacing: Sequence[float],
    radius_mm: float,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """Morphological closing per class: bridges gaps narrower than the element, writing only background.

    Args:
        labels: integer label map, shape (X, Y[, Z]).
        spacing: voxel size in mm per axis, length ndim.
        radius_mm: element radius in mm (see ``structuring_element``).
        classes: labels to process, in order; None = every foreground label present.

    Returns:
        A new label map, shape (X, Y[, Z]), same dtype; other foreground classes are never overwritten.
    """
    labels = _check_labels(labels)
    element = structuring_element(_check_spacing(spacing, labels.ndim), radius_mm)
    out = labels.copy()
    for c in _classes(labels, classes):
        closed = _morph(labels == c, element, ndimage.binary_closing)
        out[closed & (out == 0)] = c
    return out


# ---------------------------------------------------------------------------------------------- specs

# op name -> (function, takes spacing, required options, optional options)
OPS: dict[str, tuple[Callable[..., np.ndarray], bool, tuple[str, ...], tuple[str, ...]]] = {
    "keep_largest_component": (keep_largest_component, False, (), ("classes", "per_class", "connectivity")),
    "remove_small_components": (
        remove_small_components,
        True,
        ("min_volume_mm3",),
        ("classes", "connectivity"),
    ),
    "fill_holes": (fill_holes, False, (), ("classes",)),
    "opening": (binary_opening, True, ("radius_mm",), ("classes",)),
    "closing": (binary_closing, True, ("radius_mm",), ("classes",)),
}


def _validate_step(step: Any, index: int) -> dict[str, Any]:
    if not isinstance(step, dict) or "op" not in step:
        raise ValueError(f"post-processing step {index} must be a dict with an 'op' key, got {step!r}")
    op = step["op"]
    if op not in OPS:
        raise ValueError(f"step {index}: unknown post-processing op {op!r}; valid ops: {sorted(OPS)}")
    _, _, required, optional = OPS[op]
    options = {k: v for k, v in step.items() if k != "op"}
    unknown = sorted(set(options) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"step {index} ({op}): unknown option(s) {unknown}; valid options: {list(required + optional)}"
        )
    missing = [k for k in required if k not in options]
    if missing:
        raise ValueError(f"step {index} ({op}): missing required option(s) {missing}")
    return {"op": op, **options}


def load_postprocessing(source: str | Path | list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    """Read and validate a post-processing spec.

    Args:
        source: a ``.json`` / ``.yaml`` / ``.yml`` file path, a JSON string, a list of step dicts, or a dict
            ``{"steps": [...]}`` (in any of these forms).

    Returns:
        The validated steps: a new list of new dicts, each ``{"op": name, **options}``.

    Raises:
        ValueError: unknown op, unknown or missing option, or a malformed spec.
        FileNotFoundError: a path-like string or Path that does not exist.
    """
    spec: Any = source
    origin = "post-processing spec"
    if isinstance(source, Path) or (
        isinstance(source, str) and source.strip()[:1] not in ("[", "{") and source.strip() != ""
    ):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: post-processing spec file not found")
        origin = str(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
        else:
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
    elif isinstance(source, str):
        try:
            spec = json.loads(source)
        except json.JSONDecodeError as err:
            raise ValueError(f"post-processing spec string is not valid JSON ({err})") from err
    if spec is None:
        spec = []
    if isinstance(spec, dict):
        if "steps" not in spec:
            raise ValueError(f"{origin}: a dict spec needs a 'steps' key, got keys {sorted(spec)}")
        spec = spec["steps"] or []
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{origin}: expected a list of steps, got {type(spec).__name__}")
    try:
        return [_validate_step(step, i) for i, step in enumerate(spec)]
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from err


def save_postprocessing(steps: Any, path: str | Path) -> Path:
    """Validate ``steps`` (any form ``load_postprocessing`` accepts) and write them as JSON ``{"steps": [...]}``."""
    path = Path(path)
    path.write_text(json.dumps({"steps": load_postprocessing(steps)}, indent=2) + "\n")
    return path


def apply_postprocessing(labels: np.ndarray, spacing: Sequence[float], steps: Any) -> np.ndarray:
    """Apply a post-processing spec in order.

    Args:
        labels: integer label map, shape (X, Y[, Z]).
        spacing: voxel size in mm per axis, length ndim.
        steps: any form ``load_postprocessing`` accepts (list, ``{"steps": ...}``, JSON string, file path).

    Returns:
        A new label map, shape (X, Y[, Z]), same dtype (a copy even when there are no steps).
    """
    labels = _check_labels(labels)
    _check_spacing(spacing, labels.ndim)
    out = labels.copy()
    for step in load_postprocessing(steps):
        fn, takes_spacing, _, _ = OPS[step["op"]]
        options = {k: v for k, v in step.items() if k != "op"}
        out = fn(out, spacing, **options) if takes_spacing else fn(out, **options)
    return out
