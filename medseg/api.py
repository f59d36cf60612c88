"""medseg from Python: ``medseg.load(folder or checkpoint).predict(image)`` for notebooks and services.

::

    import medseg

    model = medseg.load("exported_model/")            # medseg export's folder, or a .ckpt (or a list of them)
    result = model.predict("case_001.nii.gz")         # a NIfTI/PNG file, a DICOM series folder, or an array
    result.labels, result.probabilities, result.affine, result.summary

Prediction runs medseg's own pipeline (:mod:`medseg.inference.pipeline`), the one ``medseg predict`` runs:
the model's preprocessing, sliding window, test-time flips, ensemble, inversion to the input's grid,
post-processing and temperature. So ``predict`` gives the label map ``medseg predict`` writes for that file.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import DEFAULT_MAX_VOXELS, spacing_from_affine, write_nifti


@dataclass
class Prediction:
    """One predicted case.

    Attributes:
        labels: segmentation: the label map on the input's grid (``(X, Y[, Z])``); ``None`` for a classifier.
        probabilities: segmentation: ``(K, X, Y[, Z])`` float32 mean probabilities (``None`` when not asked
            for); classification: ``(K,)``.
        affine: the input's ``(4, 4)`` voxel-to-world matrix (the grid ``labels`` lies on).
        summary: JSON-ready facts: ``model``, ``task``, ``seconds``, ``shape``, ``spacing_mm``, per structure its
            label, voxels and ``volume_ml`` (3D) or ``area_mm2`` (2D), ``doubt`` (mean entropy where any member
            calls foreground), ``members``; a classifier's ``prediction`` and ``probabilities`` by class name.
    """

    labels: np.ndarray | None
    probabilities: np.ndarray | None
    affine: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


class Model:
    """A loaded model (see :func:`load`); :meth:`predict` may be called from several threads at once."""

    def __init__(self, name: str, models: list, options: dict[str, Any], spec: dict[str, Any], device: str) -> None:
        from medseg.inference.native import flip_sets

        self.name, self.spec, self.device = name, spec, device
        self._models = [m.to(device) for m in models]
        first = self._models[0]
        self.task: str = first.task
        self.spatial_dims: int = int(first.hparams["spatial_dims"])
        self.in_channels: int = int(first.hparams["in_channels"])
        self.label_names: list[str] = first.label_names
        self._flips = flip_sets(self.spatial_dims, options.get("tta_axes")) if options.get("tta") else [()]
        self._ensemble = options.get("ensemble") or "mean"
        self._postprocess = options.get("postprocess")
        self._temperature = float(options.get("temperature") or 1.0)
        self._groups: dict[str, list] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"medseg.Model({self.name!r}: {self.task}, {self.spatial_dims}D, {len(self._models)} member(s), "
                f"labels {self.label_names})")

    @property
    def regions(self) -> list[list[int]] | None:
        """A region model's label values of each region (``None`` for a class model or a classifier)."""
        outputs = self._models[0].outputs if self.task == "segmentation" else None
        return [list(r) for r in outputs.regions] if outputs is not None and outputs.regions else None

    @property
    def structures(self) -> list[str]:
        """The names of what is measured: the foreground classes (or regions) of a segmentation model."""
        return self._models[0].outputs.structures if self.task == "segmentation" else list(self.label_names)

    def predict(self, image: str | Path | Sequence[str | Path] | np.ndarray, affine: np.ndarray | None = None, *,
                probabilities: bool = True, nonfinite: str = "fail",
                max_voxels: int = DEFAULT_MAX_VOXELS) -> Prediction:
        """Predict one case.

        Args:
            image: a NIfTI/PNG/JPG file, a DICOM series folder, one file per channel, or an array: ``(*S)`` for
                one channel, ``(C, *S)`` for several, with ``S`` the spatial shape indexed as medseg reads files,
                ``(X, Y[, Z])`` (nibabel's order; an image from Pillow, ``(H, W)``, is ``array.T``).
            affine: the array's ``(4, 4)`` voxel-to-world matrix (default identity: 1 mm voxels); a file carries
                its own, so giving one with a file is refused.
            probabilities: keep the mean probabilities (segmentation; a classifier always returns them).
            nonfinite: ``fail`` (NaN/Inf voxels refuse the case) or ``zero`` (they are predicted as 0).
            max_voxels: the most voxels an input header may claim.

        Raises:
            medseg.errors.InputError / medseg.data.io.ImageReadError: an input the model cannot take, naming
                the file and the reason.
        """
        from medseg.inference.pipeline import prepare_case

        start = time.perf_counter()
        groups = self._groups_for(nonfinite)
        with _as_files(image, affine, self.in_channels, self.spatial_dims) as files:
            prepared = prepare_case({"id": "case", "image": files}, groups, max_voxels)
            result = (self._segment if self.task == "segmentation" else self._classify)(prepared, groups, probabilities)
        result.summary["seconds"] = round(time.perf_counter() - start, 4)
        return result

    def _groups_for(self, nonfinite: str) -> list:
        from medseg.inference.pipeline import group_models

        with self._lock:
            if nonfinite not in self._groups:
                self._groups[nonfinite] = group_models(self._models, nonfinite)
            return self._groups[nonfinite]

    def _segment(self, prepared: Any, groups: list, probabilities: bool) -> Prediction:
        from medseg.inference.pipeline import segment

        maps = segment(prepared, groups, self._flips, self.device, "auto", self._ensemble, probabilities=probabilities,
                       uncertainty=True, temperature=self._temperature)
        labels, affine = maps.labels, prepared.affine
        spacing = spacing_from_affine(affine, labels.ndim)
        if self._postprocess:
            from medseg.inference.postprocess import apply_postprocessing

            labels = apply_postprocessing(labels, spacing, self._postprocess)
        summary = self._base_summary(labels.shape, spacing)
        summary.update(structures=structure_sizes(labels, self._models[0].outputs, spacing),
                       doubt=round(float(maps.doubt), 6), members=maps.members)
        return Prediction(labels, maps.probabilities, affine, summary)

    def _classify(self, prepared: Any, groups: list, probabilities: bool) -> Prediction:
        from medseg.inference.ensemble import combine
        from medseg.inference.pipeline import classify
        from medseg.metrics.temperature import apply_temperature

        members = classify(prepared, groups, self._flips, self.device, "auto")
        p, label = combine([m.reshape(-1, 1) for m in members], self._ensemble)
        p = apply_temperature(p, self._temperature, "softmax")[:, 0]
        summary = self._base_summary(None, None)
        summary.update(prediction=self.label_names[int(label[0])], members=len(members),
                       probabilities={name: round(float(v), 6) for name, v in zip(self.label_names, p, strict=True)})
        return Prediction(None, p.astype(np.float32), prepared.affine, summary)

    def _base_summary(self, shape: Sequence[int] | None, spacing: np.ndarray | None) -> dict[str, Any]:
        summary: dict[str, Any] = {"model": self.name, "task": self.task}
        if shape is not None:
            summary.update(shape=[int(s) for s in shape], spacing_mm=[round(float(s), 6) for s in spacing])
        return summary


def structure_sizes(labels: np.ndarray, outputs: Any, spacing: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Each scored structure's label (or region values), voxel count, and volume in ml (3D) or area in mm² (2D)."""
    import torch

    voxel = float(np.prod(spacing))
    masks = outputs.masks(torch.from_numpy(np.asarray(labels)))
    sizes = {}
    for k, (name, mask) in enumerate(zip(outputs.structures, masks, strict=True)):
        count = int(mask.sum())
        entry: dict[str, Any] = {"label": list(outputs.regions[k]) if outputs.regions else k + 1, "voxels": count}
        if labels.ndim == 3:
            entry["volume_ml"] = round(count * voxel / 1000.0, 6)
        else:
            entry["area_mm2"] = round(count * voxel, 6)
        sizes[name] = entry
    return sizes


def load(source: str | Path | Sequence[str | Path], device: str = "auto", runtime: str = "auto", *,
         tta: bool = False, tta_axes: Sequence[int] | None = None, ensemble: str = "mean",
         postprocess: Any = None, calibration: str | Path | None = None) -> Model:
    """Load a model for prediction.

    Args:
        source: a folder written by ``medseg export`` (it brings its own TTA, ensemble mode, post-processing and
            temperature), or a checkpoint, or a list of checkpoints (an ensemble; the options below apply).
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda[:N]``.
        runtime: an exported folder's networks: ``auto``, ``torchscript`` or ``onnx`` (CPU).
        tta, tta_axes, ensemble, postprocess, calibration: as ``medseg predict``'s options (checkpoints only).

    Raises:
        FileNotFoundError / ValueError: naming the file and the reason.
    """
    from medseg.console import hide_library_noise
    from medseg.deploy.artifact import is_model_folder, load_members, prediction_options, read_spec
    from medseg.inference.batch import resolve_device
    from medseg.inference.native import load_model
    from medseg.inference.sources import check_compatible, checked_temperature

    hide_library_noise()
    device = resolve_device(device)
    if tta_axes is not None and not tta:
        raise ValueError("tta_axes needs tta=True")
    if not isinstance(source, (list, tuple)) and is_model_folder(source):
        if tta or tta_axes or ensemble != "mean" or postprocess or calibration:
            raise ValueError(f"{source}: an exported model carries its own TTA, ensemble mode, post-processing and "
                             "calibration; export again to change them")
        spec = read_spec(source)
        return Model(Path(source).name, load_members(source, runtime, spec=spec), prediction_options(spec), spec,
                     device)
    if runtime not in ("auto", "torchscript"):
        raise ValueError(f"runtime {runtime!r} applies to an exported model folder (medseg export --format onnx)")
    paths = [Path(p) for p in (source if isinstance(source, (list, tuple)) else [source])]
    folders = [path for path in paths if is_model_folder(path)]
    if folders:
        raise ValueError(f"{folders[0]}: an exported model is loaded alone: medseg.load({str(folders[0])!r})")
    models = [load_model(path) for path in paths]
    check_compatible(models, list(paths))
    if models[0].task not in ("segmentation", "classification"):
        raise ValueError(f"{paths[0]}: {models[0].task} models predict with `medseg predict --ckpt` for now; "
                         "medseg.load takes segmentation and classification models")
    steps = None
    if postprocess:
        from medseg.inference.postprocess import load_postprocessing

        steps = load_postprocessing(postprocess)
    temperature = checked_temperature(str(calibration), models[0]) if calibration else None
    options = {"tta": tta, "tta_axes": tta_axes, "ensemble": ensemble, "postprocess": steps, "temperature": temperature}
    first = models[0]
    spec = {"task": first.task, "spatial_dims": first.hparams["spatial_dims"],
            "in_channels": first.hparams["in_channels"], "label_names": first.label_names,
            "members": [{"checkpoint": str(p)} for p in paths],
            "inference": {**options, "flips": None}}
    return Model(paths[0].stem if len(paths) == 1 else f"{paths[0].stem}+{len(paths) - 1}", models, options, spec,
                 device)


@contextlib.contextmanager
def _as_files(image: Any, affine: np.ndarray | None, channels: int, dims: int) -> Iterator[list[str]]:
    """The input as files: paths as given; an array written to a temporary NIfTI per channel (removed after,
    and named ``array`` in any error)."""
    from medseg.errors import InputError

    if not isinstance(image, np.ndarray):
        paths = list(image) if isinstance(image, (list, tuple)) else [image]
        if not all(isinstance(p, (str, Path)) for p in paths):
            raise InputError("image: give a file, a DICOM series folder, a list of files (one per channel), or one "
                             "array (C, *S) for several channels")
        if affine is not None:
            raise InputError(f"{paths[0]}: a file carries its own affine; give affine only with an array")
        yield [str(p) for p in paths]
        return
    array = image[None] if image.ndim == dims else image
    if array.ndim != dims + 1:
        raise InputError(f"array: shape {image.shape} is neither (*S) nor (C, *S) for this {dims}D model")
    if array.shape[0] != channels:
        raise InputError(f"array: {array.shape[0]} channel(s) (shape {image.shape}), but the model expects {channels}")
    matrix = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise InputError(f"affine: expected a finite, invertible (4, 4) voxel-to-world matrix, got shape {matrix.shape}")
    with tempfile.TemporaryDirectory(prefix="medseg-array-") as folder:
        files = [str(write_nifti(np.asarray(c, dtype=np.float32), matrix, Path(folder) / f"array_{k:04d}.nii"))
                 for k, c in enumerate(array)]
        try:
            yield files
        except Exception as err:
            message = str(err)
            if folder not in message:
                raise
            for k, file in enumerate(files):  # the temporary files are gone: name the array instead
                message = message.replace(file, "array" if len(files) == 1 else f"array channel {k}")
            raise InputError(message.replace(folder, "array")) from err
