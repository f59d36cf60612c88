"""``medseg evaluate`` for enhancement: generated images against their clean targets -> PSNR and SSIM.

The truth is an enhancement ``dataset.json``: the cases of its ``test`` list that have a ``target``, else those of
its ``training`` list (as segmentation scores labelled test cases, and as ``medseg predict`` predicts the test
list when the description has one). Each prediction ``<pred>/<case>.nii.gz`` (from ``medseg predict``) must lie
on its target's grid (shape and affine, :func:`medseg.evaluation.evaluate.read_on_one_grid`); the case's degraded ``image`` is scored against the
same target as the baseline, so ``psnr_gain = psnr - psnr_input`` is what the model adds.

* **Data range** (PSNR's peak and SSIM's constants), one value for the whole evaluation: 1 when every target
  voxel of the scored cases (those above, predicted or not) lies in [0, 1], else the largest minus the smallest
  of their target voxels; or the value given. ``summary.json`` records it.
* **PSNR** = ``10 log10(range^2 / MSE)``, the MSE over every voxel and channel (MONAI's ``PSNRMetric`` with
  ``max_val = range``); infinite for a prediction equal to its target (``null`` in ``summary.json``).
* **SSIM**: Gaussian window 11 (per axis at most the image's size, odd), sigma 1.5, K1 0.01, K2 0.03 (MONAI's
  ``SSIMMetric``, torchmetrics and scikit-image's ``gaussian_weights``), the map's mean over the positions where
  the whole window fits and over the channels. Computed in float64, in slabs along the last axis.

Memory: one case's prediction, target and degraded image as float32 arrays, plus float64 slabs of about
:data:`SSIM_SLAB_VALUES` values (a few of them at once while SSIM is computed).

Refused, in one line naming the file: NaN or infinite voxels in a prediction, a target or a degraded image, and a
prediction whose voxels are all whole numbers when its target's are not (a folder of label maps given instead of
enhanced images).

Writes ``per_case.csv``, ``summary.json``, ``summary.csv`` and ``enhancement.png`` (input | enhanced | target for
up to three cases; the middle slice of 3D images, the first channel), each atomically.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import correlate1d
from tqdm import tqdm

from medseg.arrays import slabs
from medseg.data.datalist import case_id, load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path, is_image_file, read_image, write_csv
from medseg.errors import InputError
from medseg.evaluation.evaluate import GridMismatch, read_on_one_grid

METRICS = ("psnr", "ssim", "psnr_input", "ssim_input", "psnr_gain")
DATA_RANGE_RULE = ("1 when every target voxel of the scored cases lies in [0, 1], else the largest minus the "
                   "smallest of their target voxels")
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
SSIM_SLAB_VALUES = 1 << 22  # values of each float64 slab (about eight arrays of its size at once)
FIGURE_CASES = 3


def evaluate_enhancement(predictions: str | Path, truth: str | Path, output: str | Path,
                         max_voxels: int = DEFAULT_MAX_VOXELS, data_range: float | None = None) -> dict[str, Any]:
    """Score every prediction ``<predictions>/<case>.nii.gz`` against its target; write the tables and figure.

    Args:
        predictions: the prediction folder.
        truth: the enhancement dataset (its folder or ``dataset.json``): its test cases with a target, else its
            training cases.
        output: folder for ``per_case.csv``, ``summary.json``/``summary.csv`` and ``enhancement.png``.
        max_voxels: the most voxels an image header may claim.
        data_range: PSNR's peak and SSIM's range (default: the module docstring's rule).

    Returns:
        The summary written to ``summary.json``.

    Raises:
        GridMismatch: a prediction (or a degraded image) not on its target's grid, naming that file.
        InputError: NaN or infinite voxels in a prediction, a target or a degraded image, or a prediction that
            is a label map (:func:`check_images`), naming that file.
    """
    predictions, output = Path(predictions), Path(output)
    spec = load_dataset(truth)
    cases = [c for c in spec.test if c.get("target")] or [c for c in spec.training if c.get("target")]
    references = {c["id"]: c for c in cases}
    multichannel = len(spec.channel_names) > 1  # then the last axis of every image holds the channels
    found = {case_id(p): p for p in predictions.glob("*") if is_image_file(p) and not p.name.startswith(".")}
    matched = sorted(set(references) & set(found))
    if not matched:
        raise InputError(f"{predictions}: none of its {len(found)} prediction image(s) ({_some(found)}) is a case "
                         f"of {spec.source} ({_some(references)}); give the folder medseg predict wrote for that "
                         "dataset's images")
    if data_range is not None and not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"--data-range must be a positive number (the targets' intensity range), got {data_range}")
    if data_range is None:
        data_range = target_range([references[c]["target"] for c in sorted(references)], max_voxels)
    rows, shown = [], []
    for case in tqdm(matched, desc="evaluating", unit="case"):
        prediction, target, affine = read_on_one_grid(found[case], references[case]["target"], max_voxels)
        check_images(found[case], prediction, references[case]["target"], target)
        degraded = degraded_image(references[case], target, affine, max_voxels)
        dims = target.ndim - multichannel
        row = {"case": case, "psnr": psnr(prediction, target, data_range),
               "ssim": ssim(prediction, target, dims, data_range),
               "psnr_input": psnr(degraded, target, data_range), "ssim_input": ssim(degraded, target, dims, data_range)}
        rows.append({**row, "psnr_gain": row["psnr"] - row["psnr_input"]})
        if len(shown) < FIGURE_CASES:
            shown.append((case, row, [middle_slice(a, dims) for a in (degraded, prediction, target)]))
        del prediction, target, degraded
    summary: dict[str, Any] = {m: _stats([row[m] for row in rows]) for m in METRICS}
    summary.update(cases=len(matched), missing_predictions=sorted(set(references) - set(found)),
                   unmatched_predictions=sorted(set(found) - set(references)), data_range=float(data_range),
                   data_range_rule=DATA_RANGE_RULE,
                   ssim_settings={"window": SSIM_WINDOW, "sigma": SSIM_SIGMA, "k1": SSIM_K1, "k2": SSIM_K2})
    output.mkdir(parents=True, exist_ok=True)
    write_csv(output / "per_case.csv", rows, ["case", *METRICS])
    write_csv(output / "summary.csv", [{"metric": m, **summary[m]} for m in METRICS], ["metric", "mean", "median", "n"])
    with atomic_path(output / "summary.json") as tmp, open(tmp, "w") as handle:
        json.dump(_finite_or_none(summary), handle, indent=2)
    if shown:
        comparison_figure(shown, output / "enhancement.png")
    return summary


def report_enhancement(summary: dict[str, Any], output: str | Path) -> int:
    """Print the evaluation in one line (missing and unmatched predictions on stderr); 1 when predictions are
    missing, else 0."""
    mean = {m: summary[m]["mean"] for m in METRICS}
    print(f"{summary['cases']} case(s): PSNR {mean['psnr']:.2f} dB (input {mean['psnr_input']:.2f} dB, "
          f"{mean['psnr_gain']:+.2f} dB), SSIM {mean['ssim']:.4f} (input {mean['ssim_input']:.4f}); tables and "
          f"figure in {output}")
    for key in ("missing_predictions", "unmatched_predictions"):
        if summary[key]:
            print(f"  {key.replace('_', ' ')}: {', '.join(summary[key])}", file=sys.stderr)
    return 1 if summary["missing_predictions"] else 0


def target_range(targets: list[str], max_voxels: int = DEFAULT_MAX_VOXELS) -> float:
    """The data range of :data:`DATA_RANGE_RULE` over the ``targets`` files (each read once)."""
    low, high = math.inf, -math.inf
    for file in targets:
        values, _ = read_image(file, max_voxels=max_voxels)
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if (low >= 0.0 and high <= 1.0) or low > high:
        return 1.0
    return high - low if high > low else 1.0  # a constant target: any positive range, 1 as MONAI's default


def check_images(prediction_file: str | Path, prediction: np.ndarray, target_file: str | Path,
                 target: np.ndarray) -> None:
    """Refuse, naming the file, a prediction or a target with NaN or infinite voxels, and a prediction whose
    voxels are all whole numbers when its target's are not (a label map given for an enhanced image). Reads
    both arrays in slabs.

    Raises:
        InputError: one line naming the file and the reason.
    """
    prediction_whole = _finite_and_whole(prediction, prediction_file)
    target_whole = _finite_and_whole(target, target_file)
    if prediction_whole and not target_whole:
        raise InputError(f"{prediction_file}: every voxel is a whole number ({_value_span(prediction)}), as in a "
                         f"label map, but its target {target_file} holds an image's values; evaluate enhanced "
                         "images (medseg predict with an enhancement checkpoint writes float32 images)")


def _finite_and_whole(image: np.ndarray, file: str | Path) -> bool:
    """Whether every voxel of ``image`` is a whole number; refuses NaN or infinite voxels, naming ``file``."""
    whole = True
    for index in slabs(image.shape):
        part = image[index]
        if not np.isfinite(part).all():
            raise InputError(f"{file}: NaN or infinite voxels; PSNR and SSIM need finite values")
        whole = whole and bool(np.array_equal(part, np.rint(part)))
    return whole


def _some(names: dict[str, Any], shown: int = 3) -> str:
    """The first ``shown`` of ``names`` in order, then how many more; "none" when there are none."""
    first = sorted(names)[:shown]
    return (", ".join(first) + (f", ... {len(names) - shown} more" if len(names) > shown else "")) if first else "none"


def _value_span(image: np.ndarray) -> str:
    return f"{float(image.min()):g}..{float(image.max()):g}" if image.size else "no voxels"


def degraded_image(case: dict[str, Any], target: np.ndarray, affine: np.ndarray,
                   max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """The case's degraded ``image`` (one file per channel stacked as the last axis), on its target's grid.

    Raises:
        GridMismatch: naming the image file that is not on the target's grid.
    """
    parts = []
    for file in case["image"]:
        values, file_affine = read_image(file, max_voxels=max_voxels)
        _finite_and_whole(values, file)
        if not np.allclose(file_affine, affine, atol=1e-3):
            raise GridMismatch(f"{file}: its affine is not that of its target {case['target']}")
        parts.append(values)
    image = parts[0] if len(parts) == 1 else np.stack(parts, axis=-1)
    if image.shape != target.shape:
        raise GridMismatch(f"{case['image'][0]}: grid {image.shape} does not match its target {case['target']} "
                           f"{target.shape}")
    return image


def psnr(prediction: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """``10 log10(data_range^2 / MSE)`` over every voxel and channel (float64 sums, in slabs)."""
    squares = 0.0
    for index in slabs(target.shape):
        difference = prediction[index].astype(np.float64) - target[index]
        squares += float(np.dot(difference.ravel(), difference.ravel()))
    mse = squares / max(1, target.size)
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(prediction: np.ndarray, target: np.ndarray, spatial_dims: int, data_range: float) -> float:
    """Mean SSIM of two images ``(*S[, C])`` (``spatial_dims`` leading spatial axes); see the module docstring.

    The valid positions along the last spatial axis are taken in slabs, each read with the window's overlap, and
    filtered one axis at a time (``scipy.ndimage.correlate1d``, cut to the valid positions after each axis), so
    the float64 temporaries stay a few slabs whatever the image's size.
    """
    x, y = (np.moveaxis(a, -1, 0) if a.ndim > spatial_dims else a[None] for a in (prediction, target))
    windows = [min(SSIM_WINDOW, s if s % 2 else s - 1) for s in x.shape[1:]]
    kernels = [_gaussian(w) for w in windows]
    depth, last = x.shape[-1], windows[-1]
    step = max(1, SSIM_SLAB_VALUES // max(1, int(np.prod(x.shape[:-1], dtype=np.int64))))
    total, count = 0.0, 0
    for start in range(0, depth - last + 1, step):
        stop = min(start + step, depth - last + 1) + last - 1
        mapped = _ssim_map(*(np.array(a[..., start:stop], dtype=np.float64) for a in (x, y)), kernels, data_range)
        total, count = total + float(mapped.sum()), count + mapped.size
    return total / count


def _gaussian(size: int) -> np.ndarray:
    """The normalised 1D Gaussian of ``size`` taps and sigma :data:`SSIM_SIGMA` (float64)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return weights / weights.sum()


def _filtered(values: np.ndarray, kernels: list[np.ndarray]) -> np.ndarray:
    """``values`` ``(C, *S)`` filtered by the separable window, at the positions where the whole window fits."""
    for axis, kernel in enumerate(kernels, start=1):
        half = kernel.size // 2
        values = correlate1d(values, kernel, axis=axis, mode="constant")
        values = values[(slice(None),) * axis + (slice(half, values.shape[axis] - half),)]
    return values


def _ssim_map(x: np.ndarray, y: np.ndarray, kernels: list[np.ndarray], data_range: float) -> np.ndarray:
    """The SSIM map of ``(C, *S)`` float64 slabs at the positions where the whole window fits."""
    mu_x, mu_y = _filtered(x, kernels), _filtered(y, kernels)
    var_x, var_y, cov = (_filtered(a * b, kernels) for a, b in ((x, x), (y, y), (x, y)))
    var_x -= mu_x * mu_x
    var_y -= mu_y * mu_y
    cov -= mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def middle_slice(image: np.ndarray, spatial_dims: int) -> np.ndarray:
    """What the figure shows of an image ``(*S[, C])``: the first channel, the middle slice of a 3D one."""
    first = image[..., 0] if image.ndim > spatial_dims else image
    return np.array(first[..., first.shape[-1] // 2] if spatial_dims == 3 else first, dtype=np.float32)


def comparison_figure(shown: list[tuple[str, dict[str, float], list[np.ndarray]]], path: Path) -> Path:
    """One row per case: input | enhanced | target, on the target's grey levels, with the scores above."""
    from medseg.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(shown), 3, figsize=(9, 3 * len(shown)), squeeze=False)
    for row_axes, (case, row, tiles) in zip(axes, shown, strict=True):
        low, high = float(tiles[2].min()), float(tiles[2].max())
        titles = (f"{case}: input\nPSNR {row['psnr_input']:.2f} dB, SSIM {row['ssim_input']:.3f}",
                  f"enhanced\nPSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}", "target")
        for ax, tile, title in zip(row_axes, tiles, titles, strict=True):
            ax.imshow(tile.T, origin="lower", cmap="gray", vmin=low, vmax=high if high > low else low + 1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    return save_figure(fig, path)


def _stats(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        return {"mean": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(array.mean()), "median": float(np.median(array)), "n": int(array.size)}


def _finite_or_none(value: Any) -> Any:
    """NaN and infinities are not JSON: they become ``null``."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
