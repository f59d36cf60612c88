"""Synthetic phantom datasets (NIfTI + ``dataset.json``) for tests, demos and smoke benchmarks.

Segmentation: ``classes - 1`` non-overlapping ellipsoids (ellipses in 2D) of different sizes, random position and
radii per case, every foreground class present in every case. Each class has its own intensity (the largest
structure brightest); the image is slightly blurred (partial volume), multiplied by a smooth bias field and given
Gaussian noise. Class contrast is large against the noise, so a small U-Net reaches a high Dice within a couple of
CPU minutes.

Regions (``regions=True``): three nested ellipsoids per case, labelled 1 (outer shell), 2 (middle) and 3
(inner core), with rising intensity; ``dataset.json`` declares the overlapping regions ``whole`` {1, 2, 3},
``core`` {2, 3} and ``inner`` {3} (as BraTS's whole tumour, tumour core and enhancing tumour) and their order.

Classification: case ``i`` has class ``k = i % classes`` and shows ``k + 1`` separate blobs whose radius (from 45%
to 100% of the largest) and brightness also rise with ``k``: redundant cues (blob size, seen locally; blob count and
bright volume, seen globally; intensity, for unnormalised inputs) on the same noisy, bias-field-modulated
background. A ResNet18 learns it in a few epochs from 16 cases, where blob count alone proved too slow to learn.

CT (``modality="ct"``): Hounsfield units instead of arbitrary MRI units. Air (-1000 HU) surrounds a body: an
ellipsoid centred in the field of view, 76-92% of the image wide in x and y and, in 3D, longer than the image
along z, so every slice cuts through it (an ellipse in 2D). The body is soft tissue at 40 HU; the structures lie
wholly inside it, segmentation classes from 200 HU (the largest) down to 100 HU, nested regions at 100/150/200 HU
and classification blobs from 100 to 200 HU with the class. The image gets the same partial-volume blur and
Gaussian noise of 20 HU, no bias field, and is clipped below at -1024 HU as scanners do. ``channel_names`` is
``{"0": "CT"}``; CT phantoms have one channel.

Structure size (``structure_scale``): multiplies the radii of the structures (segmentation ellipsoids, nested
regions, classification blobs), e.g. 0.4 for small, lesion-like structures (about 0.4**3 = 6% of the foreground
volume in 3D). No axis gets shorter than the coarsest voxel spacing.

Geometry is deliberately not trivial: the affine flips the first axis (LPS-like, negative x), has a non-zero
origin and anisotropic spacing (3D default ``(1, 1, 2)`` mm), and the structures are round in millimetres, so
their radii in voxels differ along z.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from medseg.data.datalist import CLASSIFICATION, SEGMENTATION, TASK_ALIASES
from medseg.data.io import atomic_path, write_nifti

DEFAULT_SIZE: dict[int, tuple[int, ...]] = {3: (48, 48, 24), 2: (64, 64)}
DEFAULT_SPACING: dict[int, tuple[float, ...]] = {3: (1.0, 1.0, 2.0), 2: (0.8, 0.8)}
_ORIGIN_SHIFT = (5.0, -10.0, 20.0)  # mm, added to a centred origin so it is never zero
_BACKGROUND_LEVEL = 0.25
_NOISE_SIGMA = 0.04  # relative to the brightest class level (1.0)
_GAIN = 1000.0  # arbitrary "MRI units"
_NESTED_NAMES = ("outer", "middle", "inner")
MODALITIES = ("mri", "ct")
_AIR_HU = -1000.0
_SOFT_TISSUE_HU = 40.0
_CT_NOISE_HU = 20.0
_CT_FLOOR_HU = -1024.0  # scanners clip there
_STRUCTURE_HU = (200.0, 100.0)  # largest structure / smallest structure (or lowest class)
NESTED_REGIONS = {"whole": [1, 2, 3], "core": [2, 3], "inner": [3]}


def write_forged_header(path: str | Path, shape: Sequence[int], payload: int = 8192) -> Path:
    """An untrustworthy file for robustness tests: a ``.nii.gz`` whose header claims ``shape`` float32 voxels
    but which holds only ``payload`` bytes of them (zeros)."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + bytes(4) + bytes(payload))
    return Path(path)


def synthetic_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Voxel-to-world matrix of the phantoms: first axis flipped, anisotropic spacing, non-zero origin.

    Args:
        size: spatial shape ``(X, Y[, Z])``.
        spacing: voxel size in mm, one per axis of ``size``.

    Returns:
        ``(4, 4)`` affine (for 2D the third axis gets spacing 1 mm).
    """
    dims = len(size)
    spacing3 = [float(s) for s in spacing] + [1.0] * (3 - dims)
    size3 = [int(s) for s in size] + [1] * (3 - dims)
    affine = np.diag([-spacing3[0], spacing3[1], spacing3[2], 1.0])
    centre = [(n - 1) * s / 2.0 for n, s in zip(size3, spacing3, strict=True)]
    affine[:3, 3] = [
        centre[0] + _ORIGIN_SHIFT[0],
        -centre[1] + _ORIGIN_SHIFT[1],
        -centre[2] + _ORIGIN_SHIFT[2],
    ]
    return affine


def make_synthetic(
    out: str | Path,
    dims: int = 3,
    cases: int = 8,
    classes: int = 2,
    task: str = "seg",
    seed: int = 0,
    size: Sequence[int] | None = None,
    channels: int = 1,
    test_cases: int = 0,
    spacing: Sequence[float] | None = None,
    regions: bool = False,
    modality: str = "mri",
    structure_scale: float = 1.0,
) -> Path:
    """Write a synthetic dataset (images, labels, ``dataset.json``) under ``out``.

    Layout: ``imagesTr/case_000.nii.gz`` (``case_000_0000.nii.gz``, ``_0001`` ... when ``channels > 1``),
    ``labelsTr/case_000.nii.gz`` (segmentation only), ``imagesTs/`` + ``labelsTs/`` for ``test_cases``.
    Two consecutive cases share a patient id (``p000, p000, p001, ...``). Case ``i`` depends only on ``seed`` and
    ``i``, so the same seed always gives the same files.

    Segmentation cases hold ``classes - 1`` non-overlapping ellipsoids, the largest one brightest. A classification
    case of class ``k`` holds ``k + 1`` blobs that get larger and brighter with ``k`` (see the module docstring).

    Args:
        out: dataset root (created).
        dims: 2 or 3 spatial dimensions. Images are ``(X, Y)`` or ``(X, Y, Z)`` float32 NIfTI arrays.
        cases: number of training cases.
        classes: segmentation: label values ``0..classes-1`` including background; classification: classes.
        task: ``"seg"``/``"segmentation"`` or ``"cls"``/``"classification"``.
        seed: non-negative seed of the numpy Generator.
        size: spatial shape, default ``(48, 48, 24)`` in 3D and ``(64, 64)`` in 2D.
        channels: input channels; each channel maps the classes to intensities differently.
        test_cases: cases written to ``imagesTs`` and listed under ``"test"`` (with their labels).
        spacing: voxel size in mm, default ``(1.0, 1.0, 2.0)`` in 3D and ``(0.8, 0.8)`` in 2D.
        regions: segmentation with nested structures and overlapping regions (``classes`` is then 4).
        modality: ``"mri"`` (arbitrary units, bias field) or ``"ct"`` (Hounsfield units: air around a soft-tissue
            body that holds the structures; one channel, named ``"CT"``).
        structure_scale: factor on the structures' radii, e.g. 0.4 for small (lesion-like) structures.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: for an unknown task or inconsistent arguments.
    """
    if dims not in DEFAULT_SIZE:
        raise ValueError(f"make_synthetic: dims must be 2 or 3, got {dims}")
    if task not in TASK_ALIASES:
        raise ValueError(f"make_synthetic: unknown task {task!r}; use 'seg' or 'cls'")
    task = TASK_ALIASES[task]
    if regions:
        if task != SEGMENTATION:
            raise ValueError("make_synthetic: regions are for segmentation")
        classes = len(_NESTED_NAMES) + 1
    size = tuple(int(s) for s in (size if size is not None else DEFAULT_SIZE[dims]))
    spacing = tuple(float(s) for s in (spacing if spacing is not None else DEFAULT_SPACING[dims]))
    if len(size) != dims or len(spacing) != dims or min(size) < 4 or min(spacing) <= 0:
        raise ValueError(
            f"make_synthetic: size {size} / spacing {spacing} must have {dims} entries, size >= 4"
        )
    if cases < 1 or test_cases < 0 or classes < 2 or channels < 1 or seed < 0:
        raise ValueError(
            "make_synthetic: need cases >= 1, test_cases >= 0, classes >= 2, channels >= 1, seed >= 0"
        )
    if modality not in MODALITIES:
        raise ValueError(f"make_synthetic: unknown modality {modality!r}; use 'mri' or 'ct'")
    if modality == "ct" and channels != 1:
        raise ValueError("make_synthetic: CT phantoms have one channel")
    if not 0.0 < structure_scale <= 2.0:
        raise ValueError(f"make_synthetic: structure_scale must be in (0, 2], got {structure_scale}")

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    affine = synthetic_affine(size, spacing)
    write_case = partial(
        _write_case,
        task=task,
        classes=classes,
        size=size,
        spacing=spacing,
        channels=channels,
        seed=seed,
        affine=affine,
        regions=regions,
        modality=modality,
        structure_scale=structure_scale,
    )
    training = [{**write_case(root, "Tr", i), "patient": f"p{i // 2:03d}"} for i in range(cases)]
    test = [write_case(root, "Ts", cases + i) for i in range(test_cases)]
    label_names = ["background"] + [f"structure{k}" for k in range(1, classes)]
    if task == CLASSIFICATION:
        label_names = [f"class{k}" for k in range(classes)]
    if regions:
        label_names = ["background", *_NESTED_NAMES]
    description = f"medseg synthetic {dims}D {task} phantoms (seed {seed})"
    if modality != "mri" or structure_scale != 1.0:
        description += f" ({modality.upper()}, structure scale {structure_scale:g})"
    channel_names = {str(c): "MRI" if channels == 1 else f"MRI{c}" for c in range(channels)}
    if modality == "ct":
        channel_names = {"0": "CT"}
    meta = {
        "name": "synthetic",
        "description": description,
        "task": task,
        "labels": {str(k): name for k, name in enumerate(label_names)},
        "channel_names": channel_names,
    }
    if regions:
        meta["regions"] = dict(NESTED_REGIONS)
        meta["regions_class_order"] = [1, 2, 3]
    return write_description(root, meta, spacing, training, test)


def write_description(root: Path, meta: dict[str, Any], spacing: Sequence[float], training: list[dict[str, Any]],
                      test: list[dict[str, Any]]) -> Path:
    """Write ``meta`` with the keys every phantom's description has (file ending, spacing, the case lists and
    their counts) as ``root/dataset.json``, atomically; returns its path."""
    meta = {**meta, "file_ending": ".nii.gz", "spacing": list(spacing), "numTraining": len(training),
            "numTest": len(test), "training": training, "test": test}
    path = root / "dataset.json"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _write_case(
    root: Path,
    split: str,
    index: int,
    task: str,
    classes: int,
    size: tuple[int, ...],
    spacing: tuple[float, ...],
    channels: int,
    seed: int,
    affine: np.ndarray,
    regions: bool = False,
    modality: str = "mri",
    structure_scale: float = 1.0,
) -> dict[str, Any]:
    """Make and write case ``index`` (its randomness depends only on ``seed`` and ``index``).

    Returns:
        Its ``dataset.json`` entry ``{"image", "label"}`` with paths relative to ``root``.
    """
    rng = np.random.default_rng([seed, index])
    name = f"case_{index:03d}"
    body = _body(rng, size, spacing) if modality == "ct" else None
    if regions:
        label_map = _nested(rng, size, spacing, structure_scale, body)
        levels = np.array([_BACKGROUND_LEVEL, 0.5, 0.75, 1.0])
        hu = [100.0, 150.0, 200.0]  # rising towards the core, as the MRI levels
        target = f"labels{split}/{name}.nii.gz"
        write_nifti(label_map, affine, root / target, dtype=np.uint8)
    elif task == SEGMENTATION:
        radii = [r * structure_scale for r in _segmentation_radii(size, spacing, classes)]
        label_map = _place_and_rasterize(rng, size, spacing, radii, body)
        levels = np.array([_BACKGROUND_LEVEL, *np.linspace(1.0, 0.5, classes - 1)])  # largest is brightest
        hu = list(np.linspace(*_STRUCTURE_HU, classes - 1))
        target: Any = f"labels{split}/{name}.nii.gz"
        write_nifti(label_map, affine, root / target, dtype=np.uint8)
    else:
        target = index % classes
        radius = _classification_radius(size, spacing, classes, target) * structure_scale
        radii = [radius * rng.uniform(0.95, 1.05) for _ in range(target + 1)]
        label_map = np.minimum(_place_and_rasterize(rng, size, spacing, radii, body), 1)
        levels = np.array([_BACKGROUND_LEVEL, 0.65 + 0.35 * target / max(classes - 1, 1)])
        hu = [_STRUCTURE_HU[1] + (_STRUCTURE_HU[0] - _STRUCTURE_HU[1]) * target / max(classes - 1, 1)]
    if body is not None:
        rel = f"images{split}/{name}.nii.gz"
        body_mask = rasterize(size, np.asarray(spacing, dtype=np.float64), [body]) > 0
        write_nifti(_render_ct(rng, label_map, body_mask, np.array(hu)), affine, root / rel, dtype=np.float32)
        return {"image": rel, "label": target}
    bias = bias_field(rng, size)
    files = []
    for c in range(channels):
        image = render(rng, label_map, _channel_levels(levels, c), bias)
        rel = f"images{split}/{name}.nii.gz" if channels == 1 else f"images{split}/{name}_{c:04d}.nii.gz"
        write_nifti(image, affine, root / rel, dtype=np.float32)
        files.append(rel)
    return {"image": files[0] if channels == 1 else files, "label": target}


def _segmentation_radii(size: Sequence[int], spacing: Sequence[float], classes: int) -> list[float]:
    """Base radius (mm) per foreground class, largest first: from 18% to 10% of the smallest extent."""
    extent = min(n * s for n, s in zip(size, spacing, strict=True))
    fractions = np.linspace(0.18, 0.10, classes - 1) if classes > 2 else np.array([0.18])
    return [float(f * extent) for f in fractions]


def _nested(
    rng: np.random.Generator,
    size: Sequence[int],
    spacing: Sequence[float],
    structure_scale: float = 1.0,
    body: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Three nested ellipsoids, labelled 1 (outer) to 3 (inner): ``(X, Y[, Z])`` uint8.

    The outer one's semi-axes are 22-30% of the smallest extent (times ``structure_scale``); the middle and inner
    ones are 60% and 30% of their parent, centred within it with a small random offset, so each stays inside its
    parent. With a ``body`` (centre, semi-axes in mm) the outer one lies inside it.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(size) * spacing_arr
    axes = np.maximum(
        0.26 * extent.min() * structure_scale * rng.uniform(0.85, 1.15, size=len(size)), 3 * spacing_arr.max()
    )
    gap = float(spacing_arr.max())
    centre = rng.uniform(axes + gap, extent - spacing_arr - axes - gap)
    if body is not None:
        for _try in range(500):
            if _inside(body, centre, axes, gap):
                break
            centre = rng.uniform(axes + gap, extent - spacing_arr - axes - gap)
        else:
            raise ValueError(
                f"make_synthetic: cannot fit the nested structures into the body of size {tuple(size)}"
            )
    blobs = [(centre, axes)]
    for share in (0.6, 0.5):
        parent_centre, parent_axes = blobs[-1]
        child_axes = np.maximum(parent_axes * share, spacing_arr.max())
        slack = np.maximum(parent_axes - child_axes - gap, 0.0)
        blobs.append((parent_centre + rng.uniform(-0.3, 0.3, size=len(size)) * slack, child_axes))
    return rasterize(size, spacing_arr, blobs)


def _classification_radius(size: Sequence[int], spacing: Sequence[float], classes: int, k: int) -> float:
    """Blob radius (mm) of class ``k``: grows from 45% to 100% of a radius at which ``classes`` blobs fill 25%."""
    extents = np.array([n * s for n, s in zip(size, spacing, strict=True)])
    dims = len(extents)
    unit_ball = 4.0 / 3.0 * np.pi if dims == 3 else np.pi
    largest = min(0.2 * extents.min(), (0.25 * np.prod(extents) / classes / unit_ball) ** (1.0 / dims))
    return float(largest * (0.45 + 0.55 * k / (classes - 1)))


def _place_and_rasterize(
    rng: np.random.Generator,
    size: Sequence[int],
    spacing: Sequence[float],
    radii: Sequence[float],
    body: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Non-overlapping ellipsoids labelled ``1..len(radii)`` in order.

    Args:
        rng: random generator.
        size: spatial shape ``(X, Y[, Z])``.
        spacing: voxel size in mm.
        radii: mean radius in mm of each ellipsoid.
        body: ``(centre, semi-axes)`` in mm of an ellipsoid every structure must lie inside (CT), or ``None``.

    Returns:
        ``(X, Y[, Z])`` uint8 label map; every ellipsoid covers at least one voxel.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(size) * spacing_arr
    min_axis, gap = float(spacing_arr.max()), float(spacing_arr.min())
    scale = 1.0
    for _ in range(30):
        blobs: list[tuple[np.ndarray, np.ndarray]] = []
        for radius in radii:
            axes = np.maximum(radius * scale * rng.uniform(0.8, 1.2, size=len(size)), min_axis)
            low, high = axes + gap, extent - spacing_arr - axes - gap
            if np.any(high < low):
                break
            for _try in range(200):
                centre = rng.uniform(low, high)
                if all(np.linalg.norm(centre - c) > axes.max() + a.max() + gap for c, a in blobs) and (
                    body is None or _inside(body, centre, axes, gap)
                ):
                    blobs.append((centre, axes))
                    break
            else:
                break
        if len(blobs) == len(radii):
            return rasterize(size, spacing_arr, blobs)
        scale *= 0.9
    raise ValueError(
        f"make_synthetic: cannot fit {len(radii)} structures into size {tuple(size)}; use a larger size"
    )


def _body(
    rng: np.random.Generator, size: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The CT body: ``(centre, semi-axes)`` in mm, centred within 2% of the extent; semi-axes 38-46% of the extent
    in x and y and, in 3D, 90% of it along z (longer than the image, so every slice holds body)."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(size) * spacing_arr
    axes = extent * rng.uniform(0.38, 0.46, size=len(size))
    if len(size) == 3:
        axes[2] = 0.9 * extent[2]
    centre = (extent - spacing_arr) / 2.0 + extent * rng.uniform(-0.02, 0.02, size=len(size))
    return centre, axes


def unit_directions(dims: int) -> np.ndarray:
    """Directions spread evenly over the unit circle (2D, 90) or sphere (3D, 400, Fibonacci lattice): ``(N, dims)``."""
    if dims == 2:
        angle = np.linspace(0.0, 2.0 * np.pi, 90, endpoint=False)
        return np.stack([np.cos(angle), np.sin(angle)], axis=1)
    n = 400
    k = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * k / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * k
    return np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1)


def _inside(body: tuple[np.ndarray, np.ndarray], centre: np.ndarray, axes: np.ndarray, gap: float) -> bool:
    """Whether the ellipsoid ``(centre, axes)``, grown by ``gap`` mm, lies inside the ellipsoid ``body``
    (checked on a dense set of its surface points)."""
    body_centre, body_axes = body
    surface = centre + unit_directions(len(centre)) * (axes + gap)
    return bool(np.all((((surface - body_centre) / body_axes) ** 2).sum(axis=1) <= 1.0))


def rasterize(
    size: Sequence[int], spacing: np.ndarray, blobs: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Label map ``(X, Y[, Z])`` with ellipsoid ``i`` (centre, semi-axes in mm) drawn as value ``i + 1``."""
    label = np.zeros(tuple(size), dtype=np.uint8)
    grid = np.ogrid[tuple(slice(0, n) for n in size)]
    for value, (centre, axes) in enumerate(blobs, start=1):
        dist = sum(((g * s - c) / a) ** 2 for g, s, c, a in zip(grid, spacing, centre, axes, strict=True))
        label[dist <= 1.0] = value
        if not np.any(label == value):  # cannot happen with axes >= spacing, kept as a guard
            label[tuple(np.clip(np.round(centre / spacing).astype(int), 0, np.asarray(size) - 1))] = value
    return label


def bias_field(rng: np.random.Generator, size: Sequence[int]) -> np.ndarray:
    """Smooth multiplicative field ``(X, Y[, Z])``: ``exp`` of a random quadratic.

    It stays within [0.68, 1.48] even in the corners and varies by about +-10% over most of the image, less than
    the intensity steps between classes.
    """
    coords = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in size], indexing="ij", sparse=True)
    log_field = sum(rng.uniform(-0.08, 0.08) * c + rng.uniform(-0.05, 0.05) * c**2 for c in coords)
    return np.exp(log_field).astype(np.float32)


def _channel_levels(levels: np.ndarray, channel: int) -> np.ndarray:
    """Intensity of each class in ``channel``: odd channels invert the contrast, later ones add a gamma and a gain."""
    mapped = 1.25 - levels if channel % 2 else levels
    return (1.0 + 0.25 * channel) * mapped ** (1.0 + 0.5 * (channel // 2))


def _render_ct(rng: np.random.Generator, label: np.ndarray, body: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """CT image ``(X, Y[, Z])`` float32 in HU: air, soft-tissue body, structure ``k`` at ``hu[k - 1]``;
    partial-volume blur, Gaussian noise, no bias field, clipped below at -1024."""
    levels = np.array([_AIR_HU, _SOFT_TISSUE_HU, *hu], dtype=np.float32)
    tissue = np.where(label > 0, label.astype(np.int64) + 1, body.astype(np.int64))
    clean = gaussian_filter(levels[tissue], sigma=0.4)
    noise = rng.normal(0.0, _CT_NOISE_HU, size=label.shape).astype(np.float32)
    return np.maximum(clean + noise, _CT_FLOOR_HU).astype(np.float32)


def render(rng: np.random.Generator, label: np.ndarray, levels: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Image ``(X, Y[, Z])`` float32: class intensities, partial-volume blur, bias field, Gaussian noise."""
    clean = gaussian_filter(levels[label].astype(np.float32), sigma=0.4)
    noise = rng.normal(0.0, _NOISE_SIGMA, size=label.shape).astype(np.float32)
    return (_GAIN * (clean * bias + noise)).astype(np.float32)
