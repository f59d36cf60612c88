"""The planning rules: pure functions from fingerprint figures to configuration values, each with its reason.

Every rule returns the value and a one-line reason that the config writer puts beside it. The rules follow
nnU-Net's where they are known to work (median spacing, the 3x anisotropy rule, topology from spacing, patch
under a memory budget); the README states each one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ANISOTROPY_RATIO = 3.0
"""An axis whose median spacing is more than this many times the finest is anisotropic."""
DOWNSAMPLE_SPACING_RATIO = 2.0
"""An axis is downsampled only while its spacing is within this factor of the finest."""
MIN_FEATURE_MAP = 4
"""No axis of the coarsest feature map is smaller than this."""
MAX_LEVELS = 6
MIN_LEVELS = 3
CROP_HELPS = 0.75
"""Cropping to non-zero voxels helps when it keeps less than this share of the voxels (nnU-Net's 25% rule)."""
FOREGROUND_SAMPLING = 0.33
VALIDATE_EVERY = 100
"""Steps between validations (a medseg epoch is one pass over the training cases, however many they are)."""


@dataclass(frozen=True)
class Decision:
    """A value and why."""

    value: object
    reason: str


def target_spacing(spacings: np.ndarray) -> Decision:
    """The median spacing per axis. An anisotropic axis (its median more than 3x the largest of the other axes')
    gets its 10th percentile instead, so it is not resampled far coarser than most cases have it, but never
    finer than the other axes' (nnU-Net's rule).

    Args:
        spacings: ``(N, D)`` voxel sizes in mm of the N cases.
    """
    median = np.median(spacings, axis=0)
    coarse = int(np.argmax(median))
    others = float(np.delete(median, coarse).max())
    if median[coarse] > ANISOTROPY_RATIO * others:
        target = median.copy()
        target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), others)
        return Decision(_rounded(target), f"median spacing; axis {coarse} is anisotropic ({median[coarse]:.3g} > "
                                          f"{ANISOTROPY_RATIO:g} x {others:.3g}): its 10th percentile, at least "
                                          f"{others:.3g}")
    return Decision(_rounded(median), f"median spacing of {len(spacings)} cases")


def intensity(channel_names: Sequence[str], stats: dict[str, float], crop_share: float) -> tuple[Decision, Decision]:
    """The intensity preset and whether to crop to non-zero voxels.

    CT (every channel named CT; mixed channels are z-scored per case): clip to the foreground 0.5/99.5 percentiles, then z-score with the dataset's
    foreground mean and std (the same for every case: Hounsfield units mean the same everywhere). Anything else
    (MRI, ultrasound, ...): a z-score per case, inside the non-zero mask when cropping to it helps (it keeps
    less than 75% of the voxels), over the whole image otherwise.

    Args:
        channel_names: the dataset's channel names.
        stats: foreground percentiles, mean and std of the first channel (:meth:`Fingerprint.intensity_stats`).
        crop_share: median share of the voxels the non-zero bounding box keeps.

    Returns:
        ``(preprocessing values, crop_foreground)``.
    """
    crop = crop_share < CROP_HELPS
    crop_reason = (f"cropping to non-zero voxels keeps {crop_share:.0%} of them (< {CROP_HELPS:.0%})" if crop else
                   f"cropping to non-zero voxels would keep {crop_share:.0%} of them: no gain")
    if channel_names and all(str(name).strip().upper() == "CT" for name in channel_names):
        values = {"intensity": "ct_zscore", "clip": [round(stats["p00_5"], 2), round(stats["p99_5"], 2)],
                  "zscore": [round(stats["mean"], 3), round(max(stats["std"], 1e-6), 3)]}
        return (Decision(values, "CT: clip to the foreground 0.5/99.5 percentiles, z-score with the dataset's "
                                 "foreground mean and std"), Decision(crop, crop_reason))
    preset = "mri" if crop else "zscore"
    where = "inside the non-zero mask" if crop else "over the whole image"
    return (Decision({"intensity": preset}, f"{', '.join(channel_names)}: z-score per case, {where}"),
            Decision(crop, crop_reason))


def topology(spacing: Sequence[float], patch: Sequence[int]) -> Decision:
    """Kernels and strides of a planned U-Net for ``patch`` voxels of ``spacing`` mm.

    Per level, an axis is downsampled (stride 2) while its current spacing is within 2x of the finest and its
    feature map stays at least 4 voxels; its kernel is 1 while the axis is still more than 2x coarser than the
    finest (it has not caught up yet), 3 otherwise. The first level has stride 1.

    Returns:
        ``{"kernels": [[k, ...], ...], "strides": [[s, ...], ...]}`` (one entry per level).
    """
    current = [float(s) for s in spacing]
    size = [int(n) for n in patch]
    kernels, strides = [], [[1] * len(size)]
    for _ in range(MAX_LEVELS):
        finest = min(current)
        kernels.append([3 if s <= DOWNSAMPLE_SPACING_RATIO * finest else 1 for s in current])
        stride = [2 if s <= DOWNSAMPLE_SPACING_RATIO * finest and n // 2 >= MIN_FEATURE_MAP else 1
                  for s, n in zip(current, size, strict=True)]
        if not any(s == 2 for s in stride):
            break
        strides.append(stride)
        current = [s * k for s, k in zip(current, stride, strict=True)]
        size = [n // k for n, k in zip(size, stride, strict=True)]
    finest = min(current)
    kernels.append([3 if s <= DOWNSAMPLE_SPACING_RATIO * finest else 1 for s in current])
    kernels = kernels[: len(strides)]
    if len(strides) < MIN_LEVELS:
        raise ValueError(f"a patch of {'x'.join(map(str, patch))} voxels at {spacing} mm allows only "
                         f"{len(strides)} resolution level(s); a U-Net needs {MIN_LEVELS} (images too small to plan)")
    return Decision({"kernels": kernels, "strides": strides},
                    f"{len(strides)} levels: an axis halves while within {DOWNSAMPLE_SPACING_RATIO:g}x of the finest "
                    f"spacing and >= {MIN_FEATURE_MAP} voxels; kernel 1 on an axis until it catches up")


def divisor(strides: Sequence[Sequence[int]]) -> list[int]:
    """What each patch axis must be a multiple of: the product of the strides along it."""
    return [int(np.prod([s[axis] for s in strides])) for axis in range(len(strides[0]))]


def feature_widths(levels: int, features: int = 32, cap: int = 320) -> list[int]:
    """``features`` doubling per level up to ``cap``."""
    return [min(features * 2**level, cap) for level in range(levels)]


def activation_cost(patch: Sequence[int], strides: Sequence[Sequence[int]], widths: Sequence[int]) -> float:
    """Feature-map voxels x channels of one sample through encoder and decoder (a proxy for activation memory
    and compute): the sum over levels of ``width x voxels``, decoder levels counted twice (skip + upsampled)."""
    size = np.array(patch, dtype=np.float64)
    total = 0.0
    for level, (stride, width) in enumerate(zip(strides, widths, strict=True)):
        size = size / np.array(stride)
        total += width * float(np.prod(size)) * (1 if level == len(strides) - 1 else 3)
    return total


def patch_and_batch(median_shape: Sequence[float], spacing: Sequence[float], budget: float, features: int,
                    cap: int, cost_of: Callable[[list[int], dict, list[int]], float] | None = None,
                    cases: int = 1_000_000) -> tuple[Decision, Decision, Decision]:
    """The largest patch whose cost at batch 2 fits ``budget``, its aspect following the median resampled shape
    and clipped to it, each axis a multiple of what the topology needs; then the batch: at least 2, more when
    the whole median shape fits with room to spare, but at most the training ``cases`` and at most 5% of the
    dataset's voxels a step (nnU-Net's cap).

    ``cost_of(patch, topology, widths)`` is the cost of one sample, in the budget's unit: by default
    :func:`activation_cost` (feature-voxels); `medseg plan` passes a measurement on the GPU when there is one.

    Returns:
        ``(patch, batch, topology)`` decisions.

    Raises:
        ValueError: the images are too small for a 3-level U-Net.
    """
    shape = np.maximum(np.round(np.array(median_shape, dtype=np.float64), 3), MIN_FEATURE_MAP)
    chosen = None
    for scale in np.geomspace(1.0, 0.05, 60):
        candidate = [max(MIN_FEATURE_MAP, int(n * scale + 1e-6)) for n in shape]
        try:
            multiple = divisor(topology(spacing, candidate).value["strides"])
            patch = [max(m, (n // m) * m) for n, m in zip(candidate, multiple, strict=True)]
            plan = topology(spacing, patch).value
        except ValueError:
            break  # smaller candidates allow even fewer levels
        widths = feature_widths(len(plan["strides"]), features, cap)
        cost = cost_of(patch, plan, widths) if cost_of else activation_cost(patch, plan["strides"], widths)
        chosen = (scale, patch, plan, cost)
        if 2 * cost <= budget:
            break
    if chosen is None:
        topology(spacing, [int(n) for n in shape])  # raises, naming the sizes
    scale, patch, plan, cost = chosen  # type: ignore[misc]
    whole = all(p >= int(n + 1e-6) for p, n in zip(patch, shape, strict=True))
    five_percent = int(0.05 * cases * float(np.prod(shape)) // float(np.prod(patch)))
    batch = max(2, min(int(budget // cost), cases, five_percent)) if whole else 2
    clipped = "the whole median shape" if whole else f"{scale:.0%} of the median shape per axis"
    fits = "fits the budget at batch 2" if 2 * cost <= budget else "the smallest patch a 3-level U-Net takes"
    return (Decision(patch, f"{clipped} ({'x'.join(str(int(n)) for n in shape)} resampled), multiples of "
                            f"{'x'.join(map(str, divisor(plan['strides'])))}; {fits}"),
            Decision(batch, "at least 2" + (", more while the budget allows (the patch is the whole image), at most "
                                            "the training cases and 5% of the dataset's voxels" if batch > 2 else "")),
            Decision(plan, topology(spacing, patch).reason))


def schedule(cases: int, batch: int, max_time_s: float | None, steps_per_second: float = 2.0) -> dict[str, Decision]:
    """Steps, validation and stopping.

    A medseg epoch is one pass over the training cases, ``batch`` cases a step, one patch from each
    (``samples_per_volume: 1``: every step sees ``batch`` different cases). Validation runs about every
    :data:`VALIDATE_EVERY` steps whatever the dataset size, more often in a run whose ``max_time`` would hold
    fewer than 3 such intervals at ``steps_per_second`` (an assumed pace: 2 on a CPU, 10 on a GPU). Training stops at ``max_time`` when given (the
    learning rate anneals over that time), else after nnU-Net's 1000 x 250 iterations. A third of the patches
    are centred on foreground.
    """
    steps_per_epoch = max(1, math.ceil(cases / batch))
    steps = VALIDATE_EVERY
    if max_time_s:  # at least about 3 validations in a short run, at an assumed pace
        steps = max(1, min(VALIDATE_EVERY, int(max_time_s * steps_per_second / 3)))
    every = max(1, round(steps / steps_per_epoch))
    decisions = {
        "samples_per_volume": Decision(1, f"one patch per case a step: {batch} different cases a step"),
        "check_val_every_n_epoch": Decision(every, f"about every {steps} steps (about {steps_per_epoch} a pass "
                                                   f"over about {cases} training cases)"),
        "pos_fraction": Decision(FOREGROUND_SAMPLING, "a third of the patches centred on foreground"),
        "max_epochs": Decision(-1, "no epoch limit: " + ("the time limit" if max_time_s else "max_steps")
                                   + " ends the run"),
    }
    if max_time_s:
        decisions["max_time"] = Decision(_duration(max_time_s), "--max-time; the learning rate anneals over it")
    else:
        decisions["max_steps"] = Decision(250_000, "nnU-Net's 1000 epochs x 250 iterations; give --max-time to "
                                                   "bound the wall time")
    return decisions


def parse_duration(text: str) -> float:
    """``DD:HH:MM:SS`` (Lightning's ``max_time`` form) -> seconds."""
    parts = str(text).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--max-time {text!r}: give DD:HH:MM:SS, e.g. 00:02:00:00 for two hours")
    days, hours, minutes, seconds = (int(p) for p in parts)
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 86400:02d}:{seconds % 86400 // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]
