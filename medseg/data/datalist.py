"""Dataset descriptions: a Decathlon-style ``dataset.json`` (or a CSV) turned into a list of case dicts.

``dataset.json`` at the dataset root::

    {
      "name": "...",
      "task": "segmentation" | "classification" | "multitask" | "enhancement",   # optional, default segmentation
      "labels": {"0": "background", "1": "tumour"},   # index -> name (names -> index is accepted too)
      "channel_names": {"0": "T1"},                   # or "modality" (the Decathlon key)
      "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "patient": "p1"}, ...],
      "test": ["imagesTs/b.nii.gz", ...]               # optional; entries may also be {"image": ...}
    }

Region-based segmentation (overlapping targets, e.g. BraTS whole tumour > tumour core > enhancing tumour) is
declared either with ``"regions"`` beside the usual ``labels``::

      "labels": {"0": "background", "1": "edema", "2": "necrosis", "3": "enhancing"},
      "regions": {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing_tumour": [3]},
      "regions_class_order": [1, 2, 3]

or in nnU-Net v2's own form, where ``labels`` maps each region name to its label value(s)::

      "labels": {"background": 0, "whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing_tumour": 3},
      "regions_class_order": [1, 2, 3]

``regions_class_order`` gives the label value each region writes when predictions are turned back into one
label map, applied in order (later regions overwrite earlier ones).

``image`` may be a list of files (one per channel), and an image may be a folder holding one DICOM series
(:mod:`medseg.data.dicom`). For classification ``label`` is an integer class index.

Joint segmentation and classification (``"task": "multitask"``): each case has a label map *and* an image-level
class, named by ``"classes"``::

      "labels": {"0": "background", "1": "lesion"},
      "classes": {"0": "benign", "1": "malignant"},
      "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "class": 1, "patient": "p1"}, ...]

Image enhancement (``"task": "enhancement"``): each training case pairs the degraded ``image`` with its clean
``target`` (same grid and channels); ``label`` (a label map) is optional, and ``labels`` may be left out when no
case has one::

      "training": [{"image": "imagesTr/a.nii.gz", "target": "targetsTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]
A CSV with ``image,label[,patient]`` columns describes a classification dataset (paths relative to the CSV).

Each case is a plain dict ``{"id": str, "image": list[str], "label": str | int | None, "patient": str | None}``
with absolute paths, so MONAI transforms and the checks can use it directly; multitask cases add ``"class":
int | None`` and enhancement cases ``"target": str | None``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
MULTITASK = "multitask"
ENHANCEMENT = "enhancement"
TASK_ALIASES = {"seg": SEGMENTATION, "segmentation": SEGMENTATION, "cls": CLASSIFICATION, "classification": CLASSIFICATION,
                "multitask": MULTITASK, "enhance": ENHANCEMENT, "enhancement": ENHANCEMENT}
#: Tasks whose ``label`` is a label-map file (classification's is a class index).
LABEL_MAP_TASKS = (SEGMENTATION, MULTITASK, ENHANCEMENT)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """The dataset description itself is wrong (missing keys, bad JSON, ...). The message names the file."""


@dataclass
class DatasetSpec:
    """What a dataset description says.

    Attributes:
        source: the ``dataset.json`` or CSV file read.
        task: ``"segmentation"`` or ``"classification"``.
        labels: class index -> class name, sorted by index (background included for segmentation).
        channel_names: one name per input channel.
        training: case dicts of the training list.
        test: case dicts of the optional test list (``label`` is ``None`` when unknown).
        regions: for region-based segmentation, ``(name, label values)`` of each region, in order.
        region_order: the label value each region writes when a label map is rebuilt.
        classes: multitask datasets: image-level class index -> name, sorted by index.
    """

    source: Path
    task: str
    labels: dict[int, str]
    channel_names: list[str]
    training: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    regions: list[tuple[str, tuple[int, ...]]] | None = None
    region_order: list[int] | None = None
    classes: dict[int, str] | None = None

    @property
    def root(self) -> Path:
        return self.source.parent

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_names(self) -> list[str]:
        return [self.labels[k] for k in sorted(self.labels)]

    @property
    def class_names(self) -> list[str] | None:
        """Multitask datasets: the image-level class names, index order; ``None`` for other tasks."""
        return [self.classes[k] for k in sorted(self.classes)] if self.classes else None


def case_id(path: str | Path) -> str:
    """Case identifier from an image file name: ``a/b/case_001_0000.nii.gz`` -> ``case_001_0000``; a folder (a
    DICOM series) keeps its whole name (``1.2.840.1`` stays ``1.2.840.1``)."""
    name = Path(path).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if Path(path).is_dir() else Path(name).stem


def find_description(root: str | Path) -> Path:
    """The description file for ``root``: the file itself, or ``root/dataset.json``, or ``root/dataset.csv``."""
    root = Path(root)
    if root.is_file():
        return root
    for name in ("dataset.json", "dataset.csv"):
        if (root / name).is_file():
            return root / name
    for path in (root, root / "dataset.json"):
        if path.is_symlink() and not path.exists():
            raise DatasetError(f"{path}: a symbolic link to nothing (or a symlink loop): {os.readlink(path)}")
    raise DatasetError(f"{root}: no dataset.json or dataset.csv found (is this the dataset root?)")


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read a dataset description.

    Args:
        root: dataset folder holding ``dataset.json`` / ``dataset.csv``, or the description file itself.

    Raises:
        DatasetError: naming the file, when the description is unreadable or lacks what is needed.
    """
    source = find_description(root)
    try:
        source = source.resolve()
    except (OSError, RuntimeError) as err:
        raise DatasetError(f"{source}: cannot resolve the path ({err})") from err
    if source.suffix.lower() == ".csv":
        return _load_csv(source)
    try:
        meta = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{source}: cannot read dataset description: {err}") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{source}: expected a JSON object at the top level")
    task = _task(meta.get("task", SEGMENTATION), source)
    if task == ENHANCEMENT and meta.get("labels") is None:
        meta = {**meta, "labels": {"0": "background"}}
    labels, regions, order = _labels_and_regions(meta, source, task)
    classes = None
    if task == MULTITASK:
        classes = _labels(meta.get("classes"), source, "classes")
        if len(classes) < 2:
            raise DatasetError(f"{source}: 'classes' needs at least two image-level classes, got {classes}")
    elif meta.get("classes") is not None:
        raise DatasetError(f"{source}: 'classes' (image-level classes) is for \"task\": \"multitask\" datasets")
    channels = _channels(meta.get("channel_names", meta.get("modality", {"0": "image"})), source)
    if "training" not in meta or not isinstance(meta["training"], list):
        raise DatasetError(f"{source}: missing 'training' list")
    training = [_case(entry, source, task, i, "training") for i, entry in enumerate(meta["training"])]
    test = [_case(entry, source, task, i, "test") for i, entry in enumerate(meta.get("test", []) or [])]
    _unique_ids(training, source, "training")
    _unique_ids(test, source, "test")
    spec = DatasetSpec(source, task, labels, channels, training, test, regions, order, classes)
    if task in (MULTITASK, ENHANCEMENT) and regions:
        raise DatasetError(f"{source}: regions are for segmentation datasets, not {task}")
    return spec


def _task(value: Any, source: Path) -> str:
    if value not in TASK_ALIASES:
        raise DatasetError(f"{source}: unknown task {value!r}; use 'segmentation', 'classification', 'multitask' "
                           "or 'enhancement'")
    return TASK_ALIASES[value]


def _labels(value: Any, source: Path, key_name: str = "labels") -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise DatasetError(f"{source}: missing '{key_name}' (index -> name)")
    labels: dict[int, str] = {}
    for key, name in value.items():
        index, label = (key, name) if _is_int(key) else (name, key)  # nnU-Net v2 writes name -> index
        if not _is_int(index):
            raise DatasetError(f"{source}: {key_name} entry {key!r}: {name!r} has no integer index")
        labels[int(index)] = str(label)
    if sorted(labels) != list(range(len(labels))):
        raise DatasetError(f"{source}: {key_name} indices must be 0..K-1 without gaps, got {sorted(labels)}")
    return dict(sorted(labels.items()))


def _labels_and_regions(
    meta: dict[str, Any], source: Path, task: str
) -> tuple[dict[int, str], list[tuple[str, tuple[int, ...]]] | None, list[int] | None]:
    """The label values and, for region-based datasets, the regions and their order (module docstring)."""
    raw = meta.get("labels")
    nnunet_form = isinstance(raw, dict) and any(isinstance(v, list) for v in raw.values())
    if not nnunet_form and meta.get("regions") is None:
        if meta.get("regions_class_order") is not None:
            raise DatasetError(f"{source}: 'regions_class_order' without regions")
        return _labels(raw, source), None, None
    if task != SEGMENTATION:
        raise DatasetError(f"{source}: regions are for segmentation datasets")
    if nnunet_form:
        if meta.get("regions") is not None:
            raise DatasetError(f"{source}: declare regions either in 'labels' (nnU-Net v2) or in 'regions', not both")
        entries = {str(name): value if isinstance(value, list) else [value] for name, value in raw.items()}
        background = [name for name, values in entries.items() if values == [0]]
        regions = [(name, values) for name, values in entries.items() if values != [0]]
        named = {int(values[0]): name for name, values in regions if len(values) == 1 and _is_int(values[0])}
        used = {int(v) for _, values in regions for v in values if _is_int(v)}
        labels = {0: background[0] if background else "background"}
        labels.update({v: named.get(v, f"label{v}") for v in sorted(used)})
    else:
        labels = _labels(raw, source)
        if not isinstance(meta["regions"], dict) or not meta["regions"]:
            raise DatasetError(f"{source}: 'regions' must map each region name to a list of label values")
        regions = [(str(name), v if isinstance(v, list) else [v]) for name, v in meta["regions"].items()]
    checked = []
    for name, values in regions:
        if not values or not all(_is_int(v) and int(v) in labels and int(v) > 0 for v in values):
            raise DatasetError(f"{source}: region {name!r}: {values} must be foreground label values of 'labels' "
                               f"(declared: {sorted(labels)})")
        checked.append((name, tuple(int(v) for v in values)))
    order = meta.get("regions_class_order")
    if (not isinstance(order, list) or len(order) != len(checked)
            or not all(_is_int(v) and int(v) in labels and int(v) > 0 for v in order)):
        raise DatasetError(f"{source}: 'regions_class_order' must give one foreground label value per region "
                           f"({len(checked)}), the value each region writes into the label map; got {order!r}")
    if sorted(labels) != list(range(len(labels))):
        raise DatasetError(f"{source}: label values must be 0..K-1 without gaps, got {sorted(labels)}")
    return labels, checked, [int(v) for v in order]


def _channels(value: Any, source: Path) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict) and value and all(_is_int(k) for k in value):
        return [str(value[k]) for k in sorted(value, key=int)]
    raise DatasetError(f"{source}: 'channel_names' must map 0..C-1 to names")


def _case(entry: Any, source: Path, task: str, index: int, where: str) -> dict[str, Any]:
    if isinstance(entry, (str, list)):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise DatasetError(f"{source}: {where}[{index}] has no 'image'")
    images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    if not images:
        raise DatasetError(f"{source}: {where}[{index}] has an empty image list")
    label = entry.get("label")
    if where == "training" and label is None and task != ENHANCEMENT:
        raise DatasetError(f"{source}: {where}[{index}] ({images[0]}) has no 'label'")
    if label is not None:
        if task == CLASSIFICATION:
            if not _is_int(label):
                raise DatasetError(f"{source}: {where}[{index}] ({images[0]}) label {label!r} is not a class index")
            label = int(label)
        else:
            label = _resolve(source, label, where, index)
    case = {
        "id": str(entry.get("id") or case_id(images[0])),
        "image": [_resolve(source, p, where, index) for p in images],
        "label": label,
        "patient": None if entry.get("patient") is None else str(entry["patient"]),
    }
    if task == MULTITASK:
        case["class"] = _image_class(entry.get("class"), source, where, index, images[0])
    if task == ENHANCEMENT:
        target = entry.get("target")
        if where == "training" and target is None:
            raise DatasetError(f"{source}: {where}[{index}] ({images[0]}) has no 'target' (the clean image)")
        case["target"] = None if target is None else _resolve(source, target, where, index)
    return case


def _image_class(value: Any, source: Path, where: str, index: int, image: str) -> int | None:
    """A multitask case's image-level class index (required in the training list)."""
    if value is None:
        if where == "training":
            raise DatasetError(f"{source}: {where}[{index}] ({image}) has no 'class' (the image-level class index)")
        return None
    if not _is_int(value):
        raise DatasetError(f"{source}: {where}[{index}] ({image}) class {value!r} is not a class index")
    return int(value)


def _resolve(source: Path, path: Any, where: str, index: int) -> str:
    """The absolute path of a file the description names (relative to the description's folder)."""
    try:
        return str((source.parent / str(path)).resolve())
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise DatasetError(f"{source}: {where}[{index}]: {path}: cannot resolve the path ({err})") from err


def _load_csv(source: Path) -> DatasetSpec:
    try:
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise DatasetError(f"{source}: cannot read: {err}") from err
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise DatasetError(f"{source}: a classification CSV needs 'image' and 'label' columns and at least one row")
    training = [_case(row, source, CLASSIFICATION, i, "training") for i, row in enumerate(rows)]
    _unique_ids(training, source, "training")
    classes = sorted({case["label"] for case in training})
    labels = {k: str(k) for k in range(max(classes) + 1)}
    return DatasetSpec(source, CLASSIFICATION, labels, ["image"], training, [])


def _unique_ids(cases: list[dict[str, Any]], source: Path, where: str) -> None:
    """Case ids name output files (``<id>.nii.gz``), so two cases of one list must not share one."""
    seen: dict[str, str] = {}
    for case in cases:
        if case["id"] in seen:
            raise DatasetError(
                f"{source}: two {where} cases share the id {case['id']!r}: {seen[case['id']]} and {case['image'][0]}"
            )
        seen[case["id"]] = case["image"][0]


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()
