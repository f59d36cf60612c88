"""Synthetic ultrasound-like enhancement pairs (``medseg make-synthetic --task enhance``): a degraded image, its
clean target and the lesion's label map, 2D only.

Depth runs along the second array axis: cases are made with the transducer at ``j = 0`` and written with that axis
reversed (the transducer at the last row), so that a display with the second (anterior) axis up, as medseg's
figures and viewer show images, has the transducer at the top and the shadows falling downwards; geometry (affine, 0.8 mm spacing, first
axis flipped) is that of the other 2D phantoms (:func:`medseg.data.synthetic.synthetic_affine`).

Clean target, values in [0, 1]:

* background tissue at 0.30-0.45 with a smooth texture (Gaussian-filtered noise, a few hundredths);
* two or three tissue regions: rotated ellipses with soft edges, partly out of view, each darker (0.2-0.28) or
  brighter (0.5-0.6) than the background;
* a bright reflector (a bone surface or a calcification): a thin ellipse, elongated across the beam, at 0.95-1.0,
  in the upper third of the depth;
* a lesion, apart from the reflector, with equal odds large and hypo-echoic (0.04-0.12, semi-axes 11-15% of the
  side) or small and hyper-echoic (0.78-0.85, 5-7%), so a generator conditioned on the label map alone can tell
  which from its size; the lesion's mask is the label map (label 1, ``lesion``).

Degraded input, ``clip((m + c * (target * attenuation * shadow - m)) * speckle, 0, 1)``:

* depth attenuation: ``exp(-a * depth)``, ``a`` chosen so the deepest row keeps 40-60% of its echo;
* acoustic shadowing: beneath the reflector (deeper than its lower edge, across its lateral extent, with soft
  edges) the echo keeps only 15-30%;
* low contrast: intensities pulled towards their mean ``m`` by ``c`` = 0.6-0.8;
* multiplicative speckle: gamma-distributed intensity with mean 1 and ``L = 4`` looks (fully developed speckle's
  intensity is exponential, ``L = 1``; compounding averages several looks), smoothed over a resolution cell
  (σ 0.6 px along the depth, 1.2 px across) and rescaled to mean 1.

The input's PSNR against its target is about 14 dB (a constant image of the target's mean scores about 17 dB);
the shipped pix2pix config (``configs/enh2d_pix2pix.yaml``) brings it to about 21 dB.

Case ``i`` depends only on ``(seed, i)``: the same seed always gives the same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from medseg.data.datalist import ENHANCEMENT
from medseg.data.io import write_nifti
from medseg.data.synthetic import DEFAULT_SIZE, DEFAULT_SPACING, synthetic_affine, write_description

MIN_SIDE = 16
_LOOKS = 4.0
_SPECKLE_SIGMA = (1.2, 0.6)  # px across the beam (axis 0), along the depth (axis 1)
REFLECTOR_LEVEL = 0.95  # lowest reflector echo; every other structure stays below 0.9


def make_enhancement(out: str | Path, dims: int = 2, cases: int = 8, seed: int = 0,
                     size: Sequence[int] | None = None, test_cases: int = 0) -> Path:
    """Write an enhancement dataset (degraded images, clean targets, lesion label maps, ``dataset.json``) under
    ``out``.

    Layout: ``imagesTr/case_000.nii.gz`` (degraded), ``targetsTr/`` (clean), ``labelsTr/`` (lesion masks), and
    ``imagesTs/``, ``targetsTs/``, ``labelsTs/`` for ``test_cases``. Two consecutive training cases share a patient
    id (``p000, p000, p001, ...``). See the module docstring for the images.

    Args:
        out: dataset root (created).
        dims: 2 (enhancement phantoms are 2D).
        cases: training cases.
        seed: non-negative seed.
        size: spatial shape ``(X, Y)``, Y the depth; default ``(64, 64)``, each side at least 16.
        test_cases: held-out cases, listed under ``"test"`` with their targets and labels.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: 3D, or inconsistent arguments.
    """
    if dims != 2:
        raise ValueError(f"make_enhancement: enhancement phantoms are 2D, got dims={dims}")
    size = tuple(int(s) for s in (size if size is not None else DEFAULT_SIZE[2]))
    if len(size) != 2 or min(size) < MIN_SIDE:
        raise ValueError(f"make_enhancement: size {size} needs 2 entries of at least {MIN_SIDE}")
    if cases < 1 or test_cases < 0 or seed < 0:
        raise ValueError("make_enhancement: need cases >= 1, test_cases >= 0, seed >= 0")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    spacing = DEFAULT_SPACING[2]
    affine = synthetic_affine(size, spacing)
    training = [{**_write_case(root, "Tr", i, seed, size, affine), "patient": f"p{i // 2:03d}"}
                for i in range(cases)]
    test = [_write_case(root, "Ts", cases + i, seed, size, affine) for i in range(test_cases)]
    meta = {
        "name": "synthetic_enhancement",
        "description": f"medseg synthetic 2D ultrasound-like enhancement pairs (seed {seed}): speckle, shadowing, "
                       "depth attenuation and low contrast; targets are clean, labels mark the lesion",
        "task": ENHANCEMENT,
        "labels": {"0": "background", "1": "lesion"},
        "channel_names": {"0": "US"},
    }
    return write_description(root, meta, spacing, training, test)


def _write_case(root: Path, split: str, index: int, seed: int, size: tuple[int, ...], affine: np.ndarray
                ) -> dict[str, Any]:
    """Make and write case ``index``; its ``dataset.json`` entry with paths relative to ``root``."""
    pair = enhancement_case(np.random.default_rng([seed, index]), size)
    # Written with the depth running towards lower Y: displayed with the Y (anterior) axis up, as medseg's
    # figures and viewer show images, the transducer is at the top and shadows fall downwards.
    target, image, label = (np.ascontiguousarray(array[:, ::-1]) for array in pair)
    name = f"case_{index:03d}.nii.gz"
    entry = {"image": f"images{split}/{name}", "target": f"targets{split}/{name}", "label": f"labels{split}/{name}"}
    write_nifti(image, affine, root / entry["image"], dtype=np.float32)
    write_nifti(target, affine, root / entry["target"], dtype=np.float32)
    write_nifti(label, affine, root / entry["label"], dtype=np.uint8)
    return entry


def enhancement_case(rng: np.random.Generator, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pair and its lesion: ``(target, image, label)``, float32, float32 and uint8 arrays of ``size``."""
    size = tuple(int(s) for s in size)
    coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij")
    extent = np.asarray(size, dtype=np.float64)
    target = np.full(size, rng.uniform(0.30, 0.45))
    for _ in range(int(rng.integers(2, 4))):  # tissue regions, partly out of view
        inside = _ellipse(coords, rng.uniform(0, 1, 2) * extent, rng.uniform(0.15, 0.45, 2) * extent,
                          rng.uniform(0, np.pi))
        target = _paint(target, inside, rng.uniform(0.2, 0.28) if rng.random() < 0.5 else rng.uniform(0.5, 0.6))
    target += 0.03 * _smooth_noise(rng, size, sigma=3.0)
    reflector_centre = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.3)]) * extent
    reflector_axes = np.array([rng.uniform(0.08, 0.15) * extent[0], max(1.2, 0.035 * extent[1])])
    reflector = _ellipse(coords, reflector_centre, reflector_axes, rng.uniform(-0.15, 0.15))
    hyperechoic = rng.random() < 0.5
    scale = rng.uniform(0.05, 0.07) if hyperechoic else rng.uniform(0.11, 0.15)  # small bright, large dark
    lesion_axes = scale * extent.min() * np.array([1.0, rng.uniform(0.75, 1.0)])
    for _try in range(100):  # the lesion lies apart from the reflector
        lesion_centre = rng.uniform(lesion_axes + 2, extent - lesion_axes - 2)
        lesion = _ellipse(coords, lesion_centre, lesion_axes, rng.uniform(0, np.pi))
        if not np.any((lesion <= 1.6) & (reflector <= 1.6)):
            break
    label = (lesion <= 1.0).astype(np.uint8)
    level = rng.uniform(0.78, 0.85) if hyperechoic else rng.uniform(0.04, 0.12)
    target = _paint(target, lesion, level + 0.02 * _smooth_noise(rng, size, sigma=2.0))
    target = np.clip(target, 0.0, 0.88)
    target = _paint(target, reflector, rng.uniform(REFLECTOR_LEVEL, 1.0))
    target = np.clip(target, 0.0, 1.0)
    return target.astype(np.float32), degrade(rng, target, reflector <= 1.0).astype(np.float32), label


def degrade(rng: np.random.Generator, target: np.ndarray, reflector: np.ndarray) -> np.ndarray:
    """The degraded image of a clean ``target`` ``(X, Y)`` (Y the depth) whose reflector covers the mask
    ``reflector``: depth attenuation, shadowing beneath the reflector, low contrast, speckle (module docstring)."""
    depth = np.arange(target.shape[1], dtype=np.float64) / max(target.shape[1] - 1, 1)
    attenuation = np.exp(np.log(rng.uniform(0.4, 0.6)) * depth)[None, :]
    echo = target * attenuation * (1.0 - (1.0 - rng.uniform(0.15, 0.3)) * shadow_mask(reflector))
    mean = float(echo.mean())
    echo = mean + rng.uniform(0.6, 0.8) * (echo - mean)
    speckle = gaussian_filter(rng.gamma(_LOOKS, 1.0 / _LOOKS, size=target.shape), sigma=_SPECKLE_SIGMA)
    return np.clip(echo * speckle / speckle.mean(), 0.0, 1.0)


def shadow_mask(reflector: np.ndarray) -> np.ndarray:
    """Where the reflector shadows, in [0, 1]: every voxel deeper (larger second index) than the reflector's
    lower edge in its column, with a soft lateral edge and a soft onset."""
    columns = np.any(reflector, axis=1)
    lower = np.where(columns, reflector.shape[1] - 1 - np.argmax(reflector[:, ::-1], axis=1), 0)
    depth = np.arange(reflector.shape[1])[None, :]
    hard = (columns[:, None] & (depth > lower[:, None])).astype(np.float64)
    return np.clip(gaussian_filter(hard, sigma=(1.0, 0.7)), 0.0, 1.0)


def _ellipse(coords: Sequence[np.ndarray], centre: np.ndarray, axes: np.ndarray, angle: float) -> np.ndarray:
    """Normalised distance to the ellipse ``(centre, semi-axes, angle)`` in voxels: <= 1 inside."""
    dx, dy = coords[0] - centre[0], coords[1] - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return ((cos * dx + sin * dy) / axes[0]) ** 2 + ((-sin * dx + cos * dy) / axes[1]) ** 2


def _paint(image: np.ndarray, distance: np.ndarray, level: float | np.ndarray) -> np.ndarray:
    """``image`` with ``level`` inside the ellipse of normalised ``distance``, over a soft edge about a voxel
    wide."""
    weight = np.clip((1.15 - distance) / 0.3, 0.0, 1.0)
    return image * (1.0 - weight) + level * weight


def _smooth_noise(rng: np.random.Generator, size: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian noise smoothed with ``sigma`` voxels and rescaled to unit standard deviation."""
    noise = gaussian_filter(rng.standard_normal(size), sigma=sigma)
    return noise / (noise.std() or 1.0)
