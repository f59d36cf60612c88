"""Cases to predict: from a dataset description or a folder of images, and a deterministic share of them.

A folder is searched recursively; hidden files, ``labelsTr``/``labelsTs`` folders and an excluded folder (the
output folder, when it lies inside the input) are skipped. Multi-channel cases in a folder use nnU-Net's naming,
``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...

A DICOM series folder (:mod:`medseg.data.dicom`) is one case named after the folder: the input itself, or each
series folder found under it. A folder that holds DICOM files directly is a series and nothing else: one that
also holds other images (the input folder: anywhere under it; a folder under it: directly) is refused, since
neither reading it as one series nor skipping its DICOM files is surely what was meant (a stray ``.dcm`` among
NIfTI cases, or a NIfTI copy beside the slices).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from medseg.data.datalist import case_id, load_dataset
from medseg.data.dicom import dicom_files, is_dicom_series
from medseg.data.io import is_image_file

LABEL_FOLDERS = ("labelsTr", "labelsTs")
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def find_cases(source: str | Path, in_channels: int, exclude: Path | None = None) -> list[dict[str, Any]]:
    """Cases to predict: ``{"id", "image": [files]}``.

    Args:
        source: a ``dataset.json``/CSV (its ``test`` list, else its ``training`` list), a folder of images and
            DICOM series folders, or one series folder.
        in_channels: input channels the models expect (more than one: nnU-Net's channel naming).
        exclude: a folder never read as input (the output folder, when it lies inside ``source``).

    Raises:
        FileNotFoundError: no such source, or a folder without images.
        ValueError: a description without cases, two cases that would get the same id (their outputs would
            overwrite each other), or a folder holding both DICOM files and other images.
    """
    source = Path(source)
    if source.is_file() and not is_image_file(source):
        spec = load_dataset(source)
        cases = [{"id": c["id"], "image": list(c["image"])} for c in (spec.test or spec.training)]
        if not cases:
            raise ValueError(f"{source}: no cases to predict (its 'test' and 'training' lists are empty)")
    elif source.is_dir():
        if exclude is not None and exclude.resolve() == source.resolve():
            raise ValueError(f"{source}: the output folder is the input folder; give another --output, so "
                             "predictions are never mixed with (or read back as) input images")
        cases = _folder_cases(source, in_channels, exclude.resolve() if exclude else None)
    else:
        raise FileNotFoundError(f"{source}: no such folder or dataset description")
    for case in cases:
        case["id"] = re.sub(r"[\\/]+", "_", case["id"]).lstrip(".") or "case"  # ids name files in the output
    seen: dict[str, str] = {}
    for case in cases:
        if case["id"] in seen:
            raise ValueError(f"{case['image'][0]} and {seen[case['id']]} would both be written as {case['id']}.nii.gz")
        seen[case["id"]] = case["image"][0]
    return cases


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: part ``K`` (counted from 0, as nnU-Net's part id and SLURM array indices) of
    ``N`` parts.

    Raises:
        ValueError: not ``K/N`` with ``0 <= K < N``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--shard {text!r}: give K/N with 0 <= K < N, e.g. 0/3, 1/3 and 2/3 for three parts")
    return int(match.group(1)), int(match.group(2))


def shard_cases(cases: list[dict[str, Any]], index: int, count: int) -> list[dict[str, Any]]:
    """Part ``index`` of ``count`` of ``cases``: every ``count``-th case, in id order, from the ``index``-th.

    The parts are disjoint and together hold every case, whatever order the cases were found in.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= K < N")
    return sorted(cases, key=lambda case: case["id"])[index::count]


def _folder_cases(source: Path, in_channels: int, exclude: Path | None) -> list[dict[str, Any]]:
    found = [
        p for p in source.rglob("*")
        if (is_image_file(p) or p.is_dir())
        and not any(part.startswith(".") or part in LABEL_FOLDERS for part in p.relative_to(source).parts)
        and not (exclude and p.resolve().is_relative_to(exclude))
    ]
    files = sorted(p for p in found if p.is_file() and is_image_file(p))
    if is_dicom_series(source):  # the input is one series (series in folders under it are not looked at)
        _refuse_mix(source, files)
        return [{"id": source.resolve().name, "image": [str(source)]}]
    series = sorted(p for p in found if p.is_dir() and is_dicom_series(p))
    for folder in series:
        _refuse_mix(folder, [p for p in files if p.parent == folder])
    if not files and not series:
        raise FileNotFoundError(f"{source}: no .nii/.nii.gz/.png/.jpg images or DICOM series folders found")
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in files:
        name = case_id(path)
        match = CHANNEL_SUFFIX.match(name) if in_channels > 1 else None
        groups[(path.parent, match.group("case") if match else name)].append(path)
    cases = [(folder, name, sorted(paths)) for (folder, name), paths in groups.items()]
    cases += [(folder.parent, folder.name, [folder]) for folder in series]  # one case, one channel each
    counts: dict[str, int] = defaultdict(int)
    for _, name, _ in cases:
        counts[name] += 1
    return [
        {"id": name if counts[name] == 1 else "__".join((*folder.relative_to(source).parts, name)),
         "image": [str(p) for p in paths]}
        for folder, name, paths in sorted(cases)
    ]


def _refuse_mix(series: Path, images: list[Path]) -> None:
    """Refuse a series folder that also holds ``images`` (NIfTI, PNG or JPG files)."""
    if images:
        dicom = dicom_files(series)[0]
        raise ValueError(f"{series}: holds DICOM files ({dicom.name}, ...) and other images "
                         f"({images[0].relative_to(series)}, ...): a folder with DICOM files is read as one series; "
                         "move the DICOM files into a folder of their own (or remove them) and predict again")
