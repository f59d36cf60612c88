"""The source label maps of ``medseg synthesize`` and where their structures go.

A source is a dataset's training label map or a file of a folder of label maps (:func:`label_sources`), read as
integers the generator knows (:func:`read_label`), and moved by a random :class:`Placement` that never
interpolates a label: flips, quarter turns in a plane of equal axes, an integer shift that keeps every structure
inside the grid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.arrays import slabs
from medseg.data.datalist import CLASSIFICATION, case_id, load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS, is_image_file, read_image
from medseg.errors import InputError


@dataclass(frozen=True)
class LabelSource:
    """A source label map and the patient its pairs belong to (a split keeps them with their source)."""

    path: str
    patient: str


@dataclass(frozen=True)
class Placement:
    """Where a source label map's structures go: flips along ``flips``, then ``turns`` quarter turns in
    ``plane``, then a roll by ``shift`` voxels (only background wraps around: the shift keeps every non-zero
    voxel inside). Every step permutes voxels, so no label value is ever interpolated or lost."""

    flips: tuple[int, ...] = ()
    plane: tuple[int, int] | None = None
    turns: int = 0
    shift: tuple[int, ...] = ()

    def apply(self, label: np.ndarray) -> np.ndarray:
        out = np.flip(label, self.flips) if self.flips else label
        if self.plane is not None and self.turns % 4:
            out = np.rot90(out, self.turns, axes=self.plane)
        if any(self.shift):
            out = np.roll(out, self.shift, axis=tuple(range(len(self.shift))))
        return np.ascontiguousarray(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``dataset.json``."""
        return {"flip": list(self.flips), "rot90_plane": list(self.plane) if self.plane else None,
                "rot90_turns": self.turns, "shift": list(self.shift)}


def random_placement(rng: np.random.Generator, label: np.ndarray, spacing: np.ndarray) -> Placement:
    """A random :class:`Placement` of ``label``: each axis flipped with probability 1/2; quarter turns (0-3) in
    one plane whose two axes have the same size and voxel size (a turn elsewhere would stretch the lesion or
    leave the grid); a shift drawn per axis among those keeping the non-zero voxels inside the grid."""
    dims = label.ndim
    flips = tuple(axis for axis in range(dims) if rng.random() < 0.5)
    planes = [(a, b) for a, b in itertools.combinations(range(dims), 2)
              if label.shape[a] == label.shape[b] and math.isclose(spacing[a], spacing[b], rel_tol=1e-3)]
    plane = planes[int(rng.integers(len(planes)))] if planes else None
    turns = int(rng.integers(4)) if plane else 0
    plane = plane if turns else None
    moved = Placement(flips, plane, turns).apply(label) != 0
    shift = []
    for axis in range(dims):
        occupied = np.flatnonzero(moved.any(axis=tuple(a for a in range(dims) if a != axis)))
        low, high = (-int(occupied[0]), label.shape[axis] - 1 - int(occupied[-1])) if occupied.size else (0, 0)
        shift.append(int(rng.integers(low, high + 1)))
    return Placement(flips, plane, turns, tuple(shift))


def label_sources(source: str | Path) -> list[LabelSource]:
    """The label maps of ``source``: a dataset (its training cases' label maps) or a folder of label maps.

    Raises:
        InputError / DatasetError / FileNotFoundError: naming ``source``, when it holds no label map.
    """
    path = Path(source)
    if path.is_file() or (path / "dataset.json").is_file() or (path / "dataset.csv").is_file():
        spec = load_dataset(path)
        if spec.task == CLASSIFICATION:
            raise InputError(f"{spec.source}: a classification dataset has no label maps to synthesize from")
        found = [LabelSource(case["label"], case["patient"] or case["id"])
                 for case in spec.training if isinstance(case["label"], str)]
        where = spec.source
    elif path.is_dir():
        found = [LabelSource(str(file.resolve()), case_id(file)) for file in sorted(path.iterdir())
                 if file.is_file() and is_image_file(file) and not file.name.startswith(".")]
        where = path
    else:
        raise FileNotFoundError(f"{path}: no such dataset or folder of label maps")
    if not found:
        raise InputError(f"{where}: no label maps (a dataset's training label maps, or a folder of label map files)")
    return found


def read_label(path: str, classes: int, names: list[str], spatial_dims: int,
               max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """A source label map ``(*S)`` as integers (uint8 up to 256 classes) and its affine, refused unless every value
    is one of the generator's ``classes`` (``names``). Read in the file's own type and checked in slabs: no
    float copy and no sort of the whole map.

    Raises:
        ImageReadError / InputError: naming the file.
    """
    array, affine = read_image(path, None, max_voxels)
    if array.ndim != spatial_dims:
        raise InputError(f"{path}: a label map with {array.ndim} axes {array.shape}, but the generator is "
                         f"{spatial_dims}D")
    unknown: set[float] = set()
    for index in slabs(array.shape):
        part = array[index]
        bad = ~((part >= 0) & (part < classes))
        if part.dtype.kind == "f":
            bad |= part != np.rint(part)  # NaN is caught here too
        if bad.any():
            unknown.update(float(v) for v in np.unique(part[bad])[:10])
    if unknown:
        values = sorted(unknown, key=lambda v: (math.isnan(v), v))
        shown = ", ".join(f"{v:g}" for v in values[:10]) + (" ..." if len(values) > 10 else "")
        known = ", ".join(f"{k} {name}" for k, name in enumerate(names[:classes]))
        raise InputError(f"{path}: label values [{shown}] the generator does not know (it knows {known})")
    return array.astype(np.uint8 if classes <= 256 else np.int32, copy=False), affine
