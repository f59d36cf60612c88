"""The results the service keeps for download and for the viewer: the last ``keep`` predictions, each in its
own folder under the server's temporary folder (older ones deleted).

A result's folder holds ``labels.nii.gz`` (the label map with the input's affine), ``labels.dcm`` (a DICOM SEG,
when a DICOM series came in), ``image.nii.gz``/``image.nii``/``image.png`` (the input, for the viewer),
``summary.json`` and, once asked for, ``view.json`` (:func:`view_data`).
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import atomic_path

RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
VIEW_MAX_VOXELS = 8_000_000
"""The most voxels per array the viewer is sent: larger volumes are subsampled in-plane (every n-th row and
column, labels picked, never interpolated)."""


@dataclass
class Result:
    """One kept prediction.

    Attributes:
        id: the request id (32 hex characters).
        folder: its folder.
        summary: the response's JSON (summary, model, latency, links).
        input: ``"nifti"``, ``"png"`` or ``"dicom"``.
        spatial_dims: 2 or 3.
        label_names: name of each label value (index = value).
        files: ``"labels"`` (NIfTI), ``"dicom_seg"`` (when written), ``"image"`` (for the viewer) -> path.
    """

    id: str
    folder: Path
    summary: dict[str, Any]
    input: str
    spatial_dims: int
    label_names: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held while ``view.json`` is made: concurrent requests for it wait for the one computation."""


class ResultStore:
    """The last ``keep`` results under ``folder``; thread-safe."""

    def __init__(self, folder: Path, keep: int = 32) -> None:
        self.folder, self.keep = Path(folder), max(1, int(keep))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._results: OrderedDict[str, Result] = OrderedDict()
        self._lock = threading.Lock()

    def folder_for(self, result_id: str) -> Path:
        """A new, empty folder for the result ``result_id``."""
        path = self.folder / result_id
        path.mkdir()
        return path

    def add(self, result: Result) -> None:
        """Keep ``result``; the oldest results beyond ``keep`` are deleted (blocking: call it off the event
        loop)."""
        with self._lock:
            self._results[result.id] = result
            old = [self._results.popitem(last=False)[1] for _ in range(len(self._results) - self.keep)]
        for result in old:
            shutil.rmtree(result.folder, ignore_errors=True)

    def get(self, result_id: str) -> Result | None:
        """The result ``result_id``, or ``None`` (unknown, deleted, or not an id at all)."""
        if not RESULT_ID.match(result_id):
            return None
        with self._lock:
            return self._results.get(result_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._results)


def view_data(result: Result) -> dict[str, Any]:
    """What the viewer draws, cached as the result's ``view.json``.

    3D volumes are turned to the closest RAS orientation (axis flips and swaps only) and sent as axial slices,
    radiological convention (the patient's right on the left, anterior at the top); 2D images as one slice
    with rows along ``y``. Returns ``shape`` ``[slices, rows, columns]``, ``spacing_mm`` of those axes, the
    image windowed to uint8 (0.5-99.5 percentiles) and the labels, both base64, C order; the labels are uint8, or
    uint16 (little-endian) when a value exceeds 255 (``labels_dtype``).

    Computed once per result (the result's lock: concurrent callers wait for that computation) and written
    atomically, so a reader never meets a half-written cache.
    """
    cached = result.folder / "view.json"
    with result.lock:
        if cached.exists():
            return json.loads(cached.read_text())
        view = _view(result)
        with atomic_path(cached) as tmp:
            Path(tmp).write_text(json.dumps(view))
    return view


def _view(result: Result) -> dict[str, Any]:
    from medseg.data.io import read_image, spacing_from_affine

    labels, affine = read_image(result.files["labels"], dtype=np.int16)
    image = None
    if "image" in result.files:
        image, _ = read_image(result.files["image"], dtype=np.float32)
        image = image.reshape(*labels.shape, -1)[..., 0] if image.size != labels.size else image.reshape(labels.shape)
    spacing = spacing_from_affine(affine, labels.ndim)
    if labels.ndim == 3:
        labels, spacing_out = _axial(labels, affine, spacing)
        image = _axial(image, affine, spacing)[0] if image is not None else None
    else:
        labels, spacing_out = labels.T[None], [1.0, float(spacing[1]), float(spacing[0])]
        image = image.T[None] if image is not None else None
    step = max(1, math.ceil(math.sqrt(labels.size / VIEW_MAX_VOXELS)))
    labels = labels[:, ::step, ::step]
    spacing_out = [spacing_out[0], spacing_out[1] * step, spacing_out[2] * step]
    pixels = _window(image[:, ::step, ::step]) if image is not None else np.zeros(labels.shape, np.uint8)
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.dtype("<u2")
    return {"id": result.id, "shape": list(labels.shape), "spacing_mm": [round(float(s), 6) for s in spacing_out],
            "step": step, "input": result.input, "label_names": result.label_names,
            "image": _b64(pixels), "labels": _b64(np.clip(labels, 0, np.iinfo(dtype).max).astype(dtype)),
            "labels_dtype": np.dtype(dtype).name, "summary": result.summary}


def _axial(volume: np.ndarray, affine: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """``volume`` as ``(S, rows, columns)``: closest RAS, then slices along S, rows from anterior, columns from
    the patient's right (radiological)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    ras_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        ras_spacing[int(target)] = float(spacing[axis])
    display = np.ascontiguousarray(np.transpose(ras[::-1, ::-1, :], (2, 1, 0)))
    return display, [ras_spacing[2], ras_spacing[1], ras_spacing[0]]


def _window(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    sample = finite[:: max(1, finite.size // 1_000_000)]
    low, high = np.percentile(sample, [0.5, 99.5])
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((np.nan_to_num(image, nan=low) - low) * scale, 0, 255).astype(np.uint8)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
