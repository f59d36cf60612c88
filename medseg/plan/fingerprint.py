"""The dataset fingerprint: what `medseg plan` derives a configuration from.

Per case (read once, cached in ``DATASET/fingerprint.json`` by each file's path, size and modification time):
spacing and shape in RAS axis order (the order the shipped preprocessing reorients to), the shape after cropping
to non-zero voxels, a seeded sample of foreground intensities per channel, and per foreground class its voxel
count and the sizes (mm^3) of its connected components. The summary pools the cases: spacing percentiles,
intensity percentiles 0.5/50/99.5, mean and std of the foreground, class fractions and component sizes.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from medseg.data.cache import CACHE_FILE, DatasetCache
from medseg.data.datalist import SEGMENTATION, DatasetSpec, load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS, read_image, spacing_from_affine

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10_000


@dataclass
class Fingerprint:
    """Per-case records and what the dataset spec says (modality names, classes).

    Attributes:
        spec: the dataset description.
        cases: one record per training case (see :func:`case_record`).
    """

    spec: DatasetSpec
    cases: list[dict[str, Any]]

    @property
    def spacings(self) -> np.ndarray:
        """``(N, D)`` voxel sizes in mm, RAS order."""
        return np.array([c["spacing"] for c in self.cases], dtype=np.float64)

    @property
    def shapes(self) -> np.ndarray:
        """``(N, D)`` shapes after cropping to non-zero voxels, RAS order."""
        return np.array([c["cropped_shape"] for c in self.cases], dtype=np.float64)

    def foreground_intensities(self, channel: int) -> np.ndarray:
        """The pooled foreground sample of ``channel`` (float64)."""
        samples = [np.asarray(c["foreground"][channel], dtype=np.float64) for c in self.cases]
        return np.concatenate(samples) if samples else np.zeros(0)

    def intensity_stats(self, channel: int) -> dict[str, float]:
        """Percentiles 0.5/50/99.5, mean and std of the pooled foreground sample of ``channel``."""
        values = self.foreground_intensities(channel)
        if not values.size:
            return {"p00_5": 0.0, "p50": 0.0, "p99_5": 0.0, "mean": 0.0, "std": 1.0}
        low, mid, high = np.percentile(values, [0.5, 50, 99.5])
        return {"p00_5": float(low), "p50": float(mid), "p99_5": float(high), "mean": float(values.mean()),
                "std": float(values.std())}

    def class_stats(self) -> dict[int, dict[str, float]]:
        """Per foreground class: mean voxel fraction and the median / 10th percentile component size (mm^3)."""
        stats = {}
        for label in (k for k in self.spec.labels if k > 0):
            fractions = [c["classes"].get(str(label), {}).get("fraction", 0.0) for c in self.cases]
            sizes = [s for c in self.cases for s in c["classes"].get(str(label), {}).get("components_mm3", [])]
            stats[label] = {
                "fraction": float(np.mean(fractions)) if fractions else 0.0,
                "component_mm3_median": float(np.median(sizes)) if sizes else 0.0,
                "component_mm3_p10": float(np.percentile(sizes, 10)) if sizes else 0.0,
                "components_per_case": len(sizes) / max(len(self.cases), 1),
            }
        return stats


def fingerprint_dataset(root: str | Path, spatial_dims: int | None = None, progress: bool = True,
                        max_voxels: int = DEFAULT_MAX_VOXELS) -> Fingerprint:
    """Fingerprint the training cases of the dataset at ``root``; unchanged cases come from the cache.

    Args:
        root: dataset folder or description file.
        spatial_dims: 2 for 2D files; default from the first label's number of axes.
        progress: a progress bar on stderr over the cases read.
        max_voxels: the most voxels an image header may claim.
    """
    spec = load_dataset(root)
    if spec.task != SEGMENTATION:
        raise ValueError(f"{spec.source}: medseg plan plans segmentation datasets (this one is {spec.task})")
    cache = DatasetCache(spec.root / CACHE_FILE)
    records, todo = [], []
    declared = json.dumps([sorted(spec.labels), spatial_dims])
    for case in spec.training:
        files = [*case["image"], case["label"]]
        key = f"fingerprint/{FINGERPRINT_VERSION}/{declared}/{case['id']}"
        cached, stamp = cache.lookup(key, files)
        records.append(cached)
        if cached is None:
            todo.append((len(records) - 1, case, key, stamp))
    for index, case, key, stamp in tqdm(todo, desc="fingerprinting", unit="case", file=sys.stderr,
                                        disable=not progress or not todo):
        records[index] = case_record(case, spec, spatial_dims, max_voxels)
        cache.put(key, stamp, records[index])
    cache.save()
    return Fingerprint(spec, records)


def case_record(case: dict[str, Any], spec: DatasetSpec, spatial_dims: int | None = None,
                max_voxels: int = DEFAULT_MAX_VOXELS) -> dict[str, Any]:
    """Read one case and describe it (see the module docstring). Channels come from the case's files: one file
    per channel, or the last axis of a single file beyond the label's axes."""
    label, label_affine = read_image(case["label"], max_voxels=max_voxels)
    dims = spatial_dims or label.ndim
    channels = _channels(case["image"], dims, max_voxels)
    order = _ras_order(label_affine, dims)
    spacing = spacing_from_affine(label_affine, dims)[order]
    label = np.transpose(np.rint(label).astype(np.int32), order)
    channels = [np.transpose(c, order) for c in channels]
    nonzero = np.any([c != 0 for c in channels], axis=0)
    box = _bounding_box(nonzero)
    foreground = label > 0
    rng = np.random.default_rng(zlib.crc32(case["id"].encode()))  # the same sample in every process
    picked = np.flatnonzero(foreground)
    if picked.size > SAMPLES_PER_CASE:
        picked = rng.choice(picked, SAMPLES_PER_CASE, replace=False)
    voxel_mm3 = float(np.prod(spacing))
    classes = {}
    for value in (k for k in spec.labels if k > 0):
        mask = label == value
        components, count = ndimage.label(mask)
        sizes = np.bincount(components.ravel())[1:] * voxel_mm3 if count else np.zeros(0)
        classes[str(value)] = {"fraction": float(mask.mean()), "components_mm3": [round(float(s), 3) for s in sizes]}
    return {
        "spacing": [float(s) for s in spacing],
        "shape": list(label.shape),
        "cropped_shape": [int(hi - lo) for lo, hi in box],
        "foreground": [[round(float(v), 4) for v in c.ravel()[picked]] for c in channels],
        "classes": classes,
    }


def _channels(files: list[str], dims: int, max_voxels: int) -> list[np.ndarray]:
    arrays = []
    for path in files:
        array, _ = read_image(path, max_voxels=max_voxels)
        if array.ndim > dims:  # channels last
            arrays += [array[..., k] for k in range(int(np.prod(array.shape[dims:])))]
        else:
            arrays.append(array)
    return arrays


def _ras_order(affine: np.ndarray, dims: int) -> list[int]:
    """The array axis that runs along each RAS axis (R-L, A-P, S-I), for the first ``dims`` axes."""
    if dims == 2:
        return [0, 1]
    codes = nib.aff2axcodes(affine)
    axis_of = {code: i for i, code in enumerate(codes)}
    return [next(axis_of[c] for c in pair if c in axis_of) for pair in (("R", "L"), ("A", "P"), ("S", "I"))]


def _bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop)]`` per axis of the non-zero voxels (the whole array when there are none)."""
    if not mask.any():
        return [(0, n) for n in mask.shape]
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box
