"""Dataset checks run before training: every case is read in full and every problem is reported with its file.

Results are cached per case in ``DATASET/fingerprint.json`` (shared with ``medseg plan``), valid while the case's
files keep their path, size and modification time and the description and settings stay the same: `fit`, `cv`
and `benchmark` read a file's voxels again only after it changed.

What is checked: the description (``dataset.json``/CSV) loads and lists training cases; every image and label file
exists and reads (not truncated); no NaN/Inf voxels; the channel count matches ``channel_names`` (channel files,
a 4D NIfTI's last axis, a colour PNG); channel files of a case agree in shape and geometry; labels match their
image in spatial shape, spacing and affine; label values are declared in ``labels``; classification class indices
are declared; the ``test`` list reads too. A failed check does not stop the other checks of the case.

Channel layout of a single image file: PNG/JPG are ``(X, Y)`` grey or ``(X, Y, C)`` colour. A NIfTI file's spatial
axes are the first ``n`` where ``n`` is the number of axes of the case's label (of the first label seen for cases
without one; 3 for datasets without label files); any further axes hold channels. A DICOM series folder is one
3D channel; its refusals (mixed series, missing slices, ...) are reported as the folder's problems, and its cached
result is valid while each of its files is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medseg.data import sampling
from medseg.data.cache import CACHE_FILE, DatasetCache
from medseg.data.datalist import (
    CLASSIFICATION,
    LABEL_MAP_TASKS,
    DatasetError,
    DatasetSpec,
    find_description,
    load_dataset,
)
from medseg.data.dicom import expand_series, is_dicom_series
from medseg.data.io import (
    DEFAULT_MAX_VOXELS,
    ImageReadError,
    is_nifti,
    read_header,
    read_image,
    spacing_from_affine,
)

CHECKS_VERSION = 1
"""Part of every cached check result's key: raise it when a check is added or changed."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: the file it concerns and what is wrong with it."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class DataCheckError(ValueError):
    """A dataset failed :func:`check_dataset`; ``problems`` lists what is wrong, the message is the report."""

    def __init__(self, problems: list[Problem], n_cases: int = 0, root: str | Path = "") -> None:
        self.problems = list(problems)
        self.n_cases = n_cases
        self.root = str(root)
        self.report = format_report(self.problems, n_cases)
        super().__init__(f"{self.root}: the dataset has problems; fix them before training.\n{self.report}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (DDP, multiprocessing)
        return (DataCheckError, (self.problems, self.n_cases, self.root))


@dataclass
class _Image:
    """A read image file: ``spatial`` shape, channel count and ``(4, 4)`` affine."""

    path: str
    spatial: tuple[int, ...]
    channels: int
    affine: np.ndarray


def check_dataset(
    root: str | Path, tolerance: float = 1e-3, progress: bool = False, spatial_dims: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> list[Problem]:
    """Check a dataset completely and report every problem found (:func:`check_counted` also gives the number
    of cases checked).

    Args:
        root: dataset folder (holding ``dataset.json``/``dataset.csv``) or the description file.
        tolerance: largest accepted absolute difference (mm) between image and label spacings / affine entries.
        progress: show a progress bar over the cases on stderr.
        spatial_dims: the dimensionality a training config expects (2 or 3): NIfTI files with other axes are
            reported (a 2D config needs 2D files, channels as separate files; a 3D one 3D or 4D channels-last).
        max_voxels: the most voxels an image header may claim (checked before its voxels are read).

    Returns:
        The problems, in case order; an empty list when the dataset is fine.
    """
    return check_counted(root, tolerance, progress, spatial_dims, max_voxels)[0]


def check_counted(
    root: str | Path, tolerance: float = 1e-3, progress: bool = False, spatial_dims: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> tuple[list[Problem], int]:
    """:func:`check_dataset`'s problems and the number of cases checked (training and test)."""
    return _run_checks(root, tolerance, progress, spatial_dims, max_voxels=max_voxels)


def assert_dataset_ok(
    root: str | Path,
    tolerance: float = 1e-3,
    progress: bool = False,
    spatial_dims: int | None = None,
    shard: tuple[int, int] = (0, 1),
    max_voxels: int = DEFAULT_MAX_VOXELS,
    headers_only: bool = False,
) -> None:
    """Raise :class:`DataCheckError` (with the full report) when :func:`check_dataset` finds problems.

    With ``shard=(rank, world_size)`` this process checks only every ``world_size``-th case from ``rank``;
    when torch.distributed is running, the processes then share what they found, so each one raises the
    same full report (and none waits forever for a process that stopped alone). ``headers_only`` reads only
    the headers (existence, readability, a claimed size the file can hold): what ``check_data: false`` keeps.
    """
    problems, n_cases = _run_checks(root, tolerance, progress, spatial_dims, shard, max_voxels, headers_only)
    if shard[1] > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        found: list[Any] = [None] * shard[1]
        torch.distributed.all_gather_object(found, (problems, n_cases))
        problems = list(dict.fromkeys(p for rank_problems, _ in found for p in rank_problems))
        n_cases = sum(n for _, n in found)
    if problems:
        raise DataCheckError(problems, n_cases, root)


def format_report(problems: list[Problem], n_cases: int) -> str:
    """Human summary: ``"checked N case(s): no problems found"`` or one line per problem and the totals."""
    if not problems:
        return f"checked {n_cases} case(s): no problems found"
    files = {p.file for p in problems}
    lines = [f"checked {n_cases} case(s):"]
    lines += [f"  {p}" for p in problems]
    lines.append(f"{len(problems)} problem(s) in {len(files)} file(s)")
    return "\n".join(lines)


def _run_checks(
    root: str | Path,
    tolerance: float,
    progress: bool,
    spatial_dims: int | None = None,
    shard: tuple[int, int] = (0, 1),
    max_voxels: int = DEFAULT_MAX_VOXELS,
    headers_only: bool = False,
) -> tuple[list[Problem], int]:
    """The problems of the dataset at ``root`` (of the cases of ``shard=(rank, world_size)``) and the number
    of cases checked."""
    try:
        source = str(find_description(root).resolve())
    except DatasetError as err:
        return [_description_problem(str(root), err)], 0
    try:
        spec = load_dataset(source)
    except DatasetError as err:
        return [_description_problem(source, err)], 0
    problems: list[Problem] = []
    rank, world_size = shard
    if not spec.training and rank == 0:
        problems.append(Problem(source, "no training cases (the 'training' list is empty)"))
    checker = _CaseChecker(spec, tolerance, spatial_dims, max_voxels)
    cases = [("training", c) for c in spec.training] + [("test", c) for c in spec.test]
    cases = sampling.shard(cases, rank, world_size)
    cache = DatasetCache(spec.root / CACHE_FILE)
    context = _context(spec, tolerance, spatial_dims, max_voxels, headers_only)
    for where, case in tqdm(cases, desc="checking cases", unit="case", file=sys.stderr, disable=not progress):
        labelled = isinstance(case["label"], str)
        # The case's own entry is in the key (a class index lives there); a case without a label file takes its
        # layout from the labels seen before it (see the module docstring).
        key = f"checks/{CHECKS_VERSION}/{context}/{where}/{_digest(case)}" + (
            "" if labelled else f"/{checker.spatial_ndim}")
        files = expand_series([*case["image"], *([case["label"]] if labelled else [])])  # a series: its files
        cached, stamp = cache.lookup(key, files)
        if cached is not None:  # the files are as they were when checked with these settings
            problems += [Problem(*problem) for problem in cached["problems"]]
            checker.spatial_ndim = checker.spatial_ndim or cached["label_ndim"]
            continue
        found = _header_problems(case, max_voxels) if headers_only else checker.check(case, where)
        cache.put(key, stamp, {"problems": [[p.file, p.message] for p in found], "label_ndim": checker.spatial_ndim})
        problems += found
    cache.save()
    return problems, len(cases)


def _context(spec: DatasetSpec, *settings: Any) -> str:
    """A digest of what a case's check result depends on besides its files and its entry: the description's
    declarations and the check settings."""
    return _digest([spec.task, spec.labels, spec.channel_names, spec.regions, spec.classes, settings])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _CaseChecker:
    """Checks one case at a time; remembers the label dimensionality seen so far."""

    def __init__(self, spec: DatasetSpec, tolerance: float, spatial_dims: int | None = None,
                 max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        self.spec = spec
        self.max_voxels = max_voxels
        self.tolerance = tolerance
        self.spatial_dims = spatial_dims
        self.spatial_ndim: int | None = spatial_dims

    def check(self, case: dict[str, Any], where: str) -> list[Problem]:
        """All problems of one case dict (``where`` is ``"training"`` or ``"test"``)."""
        problems: list[Problem] = []
        label: tuple[np.ndarray, np.ndarray] | None = None
        if self.spec.task in LABEL_MAP_TASKS and isinstance(case["label"], str):
            label = _read(case["label"], problems, self.max_voxels)
            if label is not None:
                self.spatial_ndim = self.spatial_ndim or label[0].ndim
                problems += self._label_values(case["label"], label[0])
        elif self.spec.task == CLASSIFICATION and case["label"] is not None:
            problems += self._class_index(case, where)
        if case.get("class") is not None and case["class"] not in (self.spec.classes or {}):
            problems.append(Problem(str(self.spec.source), f"{where} case {case['id']!r} ({case['image'][0]}): class "
                                    f"index {case['class']} is not declared in 'classes' "
                                    f"(declared: {sorted(self.spec.classes or {})})"))
        ndim = label[0].ndim if label is not None else self.spatial_ndim
        images = []
        for path in case["image"]:
            loaded = _read(path, problems, self.max_voxels)
            if loaded is not None:
                images.append(_layout(path, loaded[0].shape, loaded[1], ndim))
                problems += self._dimensionality(path, loaded[0].ndim)
        if label is not None:
            problems += self._dimensionality(case["label"], label[0].ndim)
        problems += self._channels(case, images)
        if images and label is not None:
            problems += self._geometry(case["label"], label[0].shape, label[1], images[0], "label", "image")
        if case.get("target"):
            problems += self._target(case["target"], images, ndim)
        return problems

    def _target(self, path: str, images: list[_Image], ndim: int | None) -> list[Problem]:
        """An enhancement target: readable, finite, on the image's grid, with the image's channels."""
        problems: list[Problem] = []
        loaded = _read(path, problems, self.max_voxels)
        if loaded is None or not images:
            return problems
        target = _layout(path, loaded[0].shape, loaded[1], ndim or len(images[0].spatial))
        problems += self._dimensionality(path, loaded[0].ndim)
        problems += self._geometry(path, target.spatial, target.affine, images[0], "target", "image")
        channels = sum(image.channels for image in images)
        if not problems and target.channels != channels:
            problems.append(Problem(path, f"target has {target.channels} channel(s), the image {channels}; "
                                          "enhancement maps an image to a target with the same channels"))
        return problems

    def _dimensionality(self, path: str, ndim: int) -> list[Problem]:
        """A NIfTI file or DICOM series whose axes do not suit the configured ``spatial_dims`` (PNG/JPG are
        always 2D)."""
        if self.spatial_dims is None or not (is_nifti(path) or is_dicom_series(path)):
            return []
        allowed = (2,) if self.spatial_dims == 2 else (3, 4)
        if ndim in allowed:
            return []
        return [Problem(path, f"has {ndim} axes but the config says spatial_dims={self.spatial_dims} "
                              f"(expected {' or '.join(map(str, allowed))} axes)")]

    def _class_index(self, case: dict[str, Any], where: str) -> list[Problem]:
        if case["label"] in self.spec.labels:
            return []
        message = (
            f"{where} case {case['id']!r} ({case['image'][0]}): class index {case['label']} is not declared in "
            f"'labels' (declared: {sorted(self.spec.labels)})"
        )
        return [Problem(str(self.spec.source), message)]

    def _label_values(self, path: str, array: np.ndarray) -> list[Problem]:
        declared = self.spec.labels
        finite = array[np.isfinite(array)]
        if finite.size == 0 or (
            finite.min() >= 0 and finite.max() <= max(declared) and np.all(finite == np.rint(finite))
        ):
            return []
        values = np.unique(finite)
        fractional = values[values != np.rint(values)]
        undeclared = [int(v) for v in values[values == np.rint(values)] if int(v) not in declared]
        problems = []
        if undeclared:
            shown = ", ".join(map(str, undeclared[:20])) + (" ..." if len(undeclared) > 20 else "")
            problems.append(
                Problem(
                    path, f"label values [{shown}] not declared in 'labels' (declared: {sorted(declared)})"
                )
            )
        if fractional.size:
            problems.append(
                Problem(path, f"{fractional.size} non-integer label value(s), e.g. {fractional[0]:g}")
            )
        return problems

    def _channels(self, case: dict[str, Any], images: list[_Image]) -> list[Problem]:
        expected, names = self.spec.in_channels, self.spec.channel_names
        problems = []
        for other in images[1:]:
            problems += self._geometry(
                other.path, other.spatial, other.affine, images[0], "channel file", "first channel file"
            )
        if not images:
            return problems  # unreadable files are already reported
        unread = len(case["image"]) - len(images)  # counted as one channel each
        found = sum(image.channels for image in images) + unread
        if found != expected:
            if len(case["image"]) > 1:
                what = f"case {case['id']!r} has {len(case['image'])} channel files ({found} channels)"
            else:
                shape = images[0].spatial + ((found,) if found > 1 else ())
                what = f"image has {found} channel(s) (shape {shape})"
            problems.append(Problem(images[0].path, f"{what} but channel_names declares {expected}: {names}"))
        return problems

    def _geometry(
        self, path: str, shape: tuple[int, ...], affine: np.ndarray, ref: _Image, what: str, ref_what: str
    ) -> list[Problem]:
        """Shape, spacing and affine of ``path`` against the reference image ``ref``."""
        ref_name = Path(ref.path).name
        if tuple(shape) != ref.spatial:
            return [
                Problem(
                    path,
                    f"{what} shape {tuple(shape)} does not match {ref_what} shape {ref.spatial} ({ref_name})",
                )
            ]
        ndim = min(len(shape), 3)
        mine, theirs = spacing_from_affine(affine, ndim), spacing_from_affine(ref.affine, ndim)
        if np.max(np.abs(mine - theirs)) > self.tolerance:
            return [
                Problem(
                    path,
                    f"{what} spacing {_fmt(mine)} differs from {ref_what} spacing {_fmt(theirs)} ({ref_name})",
                )
            ]
        diff = float(np.max(np.abs(np.asarray(affine) - ref.affine)))
        if diff > self.tolerance:
            return [
                Problem(
                    path,
                    f"{what} affine differs from {ref_what} affine ({ref_name}) by up to {diff:.4g} "
                    f"(origin/orientation mismatch, tolerance {self.tolerance:g})",
                )
            ]
        return []


def _header_problems(case: dict[str, Any], max_voxels: int) -> list[Problem]:
    """The files of ``case`` whose header is missing, unreadable or claims more than its file can hold."""
    files = [*case["image"], *([case["label"]] if isinstance(case["label"], str) else []),
             *([case["target"]] if case.get("target") else [])]
    problems = []
    for path in files:
        try:
            read_header(path, max_voxels)
        except ImageReadError as err:
            problems.append(Problem(path, err.reason))
    return problems


def _description_problem(file: str, err: DatasetError) -> Problem:
    """A :class:`DatasetError` as a problem of the description file (without repeating the file name)."""
    message = str(err)
    return Problem(file, message[len(file) + 2 :] if message.startswith(f"{file}: ") else message)


def _read(path: str, problems: list[Problem], max_voxels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """All voxels and the affine of ``path``; read errors and NaN/Inf voxels are appended to ``problems``."""
    try:
        array, affine = read_image(path, max_voxels=max_voxels)
    except ImageReadError as err:
        problems.append(Problem(path, err.reason))
        return None
    if not np.isfinite(array).all():
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        for count, kind in ((n_nan, "NaN"), (n_inf, "Inf (infinite)")):
            if count:
                problems.append(Problem(path, f"{count} {kind} voxel(s) out of {array.size}"))
    return array, affine


def _layout(path: str, shape: tuple[int, ...], affine: np.ndarray, spatial_ndim: int | None) -> _Image:
    """Split an array shape into spatial shape and channel count (see the module docstring)."""
    if is_dicom_series(path):  # (X, Y, Z), one channel
        return _Image(path, tuple(shape), 1, affine)
    if not is_nifti(path):
        return _Image(path, tuple(shape[:2]), int(np.prod(shape[2:], dtype=int)), affine)
    n = spatial_ndim or 3
    return _Image(path, tuple(shape[:n]), int(np.prod(shape[n:], dtype=int)), affine)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
