"""Synthetic multitask phantoms: one lesion to segment per case, and an image-level class its appearance decides.

Each case is a field of tissue (level 0.45-0.55, varying by case) holding one lesion, labelled 1 (``lesion``):

* ``benign`` (class 0): a round lesion (semi-axes within +-8% of one radius), darker than the tissue (level
  0.22-0.34);
* ``malignant`` (class 1): an irregular, elongated lesion (an ellipse or ellipsoid 1.6-2.0 times the radius
  along one in-plane axis and 0.55-0.7 times across, with three small lobes on its border), brighter than the
  tissue (level 0.68-0.80).

The lesion radius is 11-15% of the smallest extent in mm, so both classes cover about as many voxels, and the
lesion lies anywhere in the field: neither the lesion's size nor a pixel at a fixed place tells the class; its
shape and its contrast against the surrounding tissue do. The image gets the segmentation phantoms' partial-volume
blur, smooth bias field and Gaussian noise (:mod:`medseg.data.synthetic`).

Two consecutive cases share a patient id and the patient's class (patient ``k`` is ``benign`` for even ``k``,
``malignant`` for odd ``k``), so classes are balanced and patient-level aggregation is meaningful; held-out test
cases (``imagesTs/``, listed with their label and class) belong to patients of their own. Geometry (flipped first
axis, non-zero origin, anisotropic 3D spacing) and default sizes are the segmentation phantoms'.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.datalist import MULTITASK
from medseg.data.io import write_nifti
from medseg.data.synthetic import (
    DEFAULT_SIZE,
    DEFAULT_SPACING,
    bias_field,
    rasterize,
    render,
    synthetic_affine,
    unit_directions,
    write_description,
)

LABELS = {"0": "background", "1": "lesion"}
CLASSES = {"0": "benign", "1": "malignant"}
_TISSUE = (0.45, 0.55)
_LEVEL = {0: (0.22, 0.34), 1: (0.68, 0.80)}  # benign darker than the tissue, malignant brighter
_RADIUS = (0.11, 0.15)  # of the smallest extent in mm
_LOBES = 3


def patient_class(patient: int) -> int:
    """The image-level class of every case of patient number ``patient``: 0 (benign) when even, 1 when odd."""
    return patient % 2


def make_multitask(
    out: str | Path,
    dims: int = 2,
    cases: int = 8,
    seed: int = 0,
    size: Sequence[int] | None = None,
    test_cases: int = 0,
) -> Path:
    """Write a multitask dataset (images, lesion label maps, image-level classes, ``dataset.json``) under ``out``.

    Layout: ``imagesTr/case_000.nii.gz`` and ``labelsTr/case_000.nii.gz`` per training case, ``imagesTs/`` and
    ``labelsTs/`` for ``test_cases``. Training case ``i`` belongs to patient ``p{i // 2:03d}``; test cases to the
    patients after the training ones. Case ``i`` depends only on ``seed`` and ``i``.

    Args:
        out: dataset root (created).
        dims: 2 or 3 spatial dimensions.
        cases: number of training cases.
        seed: non-negative seed of the numpy Generator.
        size: spatial shape, default ``(64, 64)`` in 2D and ``(48, 48, 24)`` in 3D.
        test_cases: cases written to ``imagesTs`` and listed under ``"test"`` with their label and class.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: inconsistent arguments, or a size too small to hold a lesion.
    """
    if dims not in DEFAULT_SIZE:
        raise ValueError(f"make_multitask: dims must be 2 or 3, got {dims}")
    size = tuple(int(s) for s in (size if size is not None else DEFAULT_SIZE[dims]))
    spacing = DEFAULT_SPACING[dims]
    if len(size) != dims or min(size) < 16:
        raise ValueError(f"make_multitask: size {size} must have {dims} entries, each at least 16")
    if cases < 1 or test_cases < 0 or seed < 0:
        raise ValueError("make_multitask: need cases >= 1, test_cases >= 0, seed >= 0")
    widest = _RADIUS[1] * min(n * s for n, s in zip(size, spacing, strict=True))
    long = np.array([2.0, 2.0, 0.7][:dims]) * widest  # a malignant lesion's largest extent along each axis
    if not (_fits(size, np.asarray(spacing), np.full(dims, 1.08 * widest), None)
            and _fits(size, np.asarray(spacing), long, np.full(dims, 0.4 * widest))):
        raise ValueError(f"make_multitask: size {size} is too small for a lesion; use a larger size")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    affine = synthetic_affine(size, spacing)
    first_test_patient = (cases + 1) // 2
    training = [_write_case(root, "Tr", i, i // 2, size, spacing, affine, seed) for i in range(cases)]
    test = [_write_case(root, "Ts", cases + i, first_test_patient + i // 2, size, spacing, affine, seed)
            for i in range(test_cases)]
    meta = {
        "name": "synthetic_multitask",
        "description": f"medseg synthetic {dims}D multitask phantoms (seed {seed}): a lesion per case, benign "
                       "(round, darker than tissue) or malignant (irregular, elongated, brighter)",
        "task": MULTITASK,
        "labels": dict(LABELS),
        "classes": dict(CLASSES),
        "channel_names": {"0": "MRI"},
    }
    return write_description(root, meta, spacing, training, test)


def _write_case(root: Path, split: str, index: int, patient: int, size: tuple[int, ...],
                spacing: tuple[float, ...], affine: np.ndarray, seed: int) -> dict[str, Any]:
    """Make and write case ``index`` of patient number ``patient``; its ``dataset.json`` entry."""
    rng = np.random.default_rng([seed, index])
    image_class = patient_class(patient)
    lesion = _lesion(rng, size, np.asarray(spacing, dtype=np.float64), malignant=image_class == 1)
    levels = np.array([rng.uniform(*_TISSUE), rng.uniform(*_LEVEL[image_class])])
    image = render(rng, lesion, levels, bias_field(rng, size))
    name = f"case_{index:03d}"
    entry = {"image": f"images{split}/{name}.nii.gz", "label": f"labels{split}/{name}.nii.gz",
             "class": image_class, "patient": f"p{patient:03d}"}
    write_nifti(image, affine, root / entry["image"], dtype=np.float32)
    write_nifti(lesion, affine, root / entry["label"], dtype=np.uint8)
    return entry


def _lesion(rng: np.random.Generator, size: Sequence[int], spacing: np.ndarray, malignant: bool) -> np.ndarray:
    """The lesion mask ``(X, Y[, Z])`` uint8 (1 inside): round, or elongated along axis 0 or 1 with lobes.

    Every part (core and lobes) lies at least one voxel inside the field of view.
    """
    dims = len(size)
    extent = np.asarray(size) * spacing
    radius = rng.uniform(*_RADIUS) * extent.min()
    floor = spacing.max()  # no semi-axis thinner than the coarsest voxel
    if malignant:
        axes = np.full(dims, radius * rng.uniform(0.55, 0.7))
        axes[rng.integers(2)] = radius * rng.uniform(1.6, 2.0)
        lobe_axes = np.full(dims, 0.4 * radius)
    else:
        axes = radius * rng.uniform(0.92, 1.08, size=dims)
        lobe_axes = np.zeros(dims)
    axes, lobe_axes = np.maximum(axes, floor), np.maximum(lobe_axes, floor)
    reach = _reach(spacing, axes, lobe_axes if malignant else None)  # it fits: make_multitask checked the largest
    centre = rng.uniform(reach, extent - spacing - reach)
    blobs = [(centre, axes)]
    if malignant:
        directions = unit_directions(dims)
        for direction in directions[rng.choice(len(directions), size=_LOBES, replace=False)]:
            blobs.append((centre + direction * axes, lobe_axes * rng.uniform(0.8, 1.2, size=dims)))
    return np.minimum(rasterize(size, spacing, blobs), 1).astype(np.uint8)


def _reach(spacing: np.ndarray, axes: np.ndarray, lobe_axes: np.ndarray | None) -> np.ndarray:
    """How far (mm, per axis) a lesion's centre must stay from the border: its semi-axes, lobes sitting on its
    border (at most 1.2 times ``lobe_axes``), and one voxel."""
    floor = spacing.max()
    reach = np.maximum(axes, floor) + spacing
    return reach if lobe_axes is None else reach + 2 * np.maximum(lobe_axes, floor)


def _fits(size: Sequence[int], spacing: np.ndarray, axes: np.ndarray, lobe_axes: np.ndarray | None) -> bool:
    """Whether a lesion of these semi-axes (and lobes) fits in the field of view with its margin."""
    extent = np.asarray(size) * spacing
    reach = _reach(spacing, axes, lobe_axes)
    return bool(np.all(extent - spacing - reach >= reach))
