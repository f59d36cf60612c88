"""Lesion simulation: new (image, label map) pairs from a label-conditioned generator (``medseg synthesize``).

Each pair starts from a source label map (a dataset's training label maps, or a folder of them), moved by a
random placement that never interpolates a label (:mod:`medseg.inference.label_sources`: flips, quarter turns in
a plane of equal axes, an integer shift that keeps every structure inside the grid), so the lesions lie at new
places and orientations. The generator (an enhancement checkpoint trained with ``condition: label``,
:mod:`medseg.models.generator`) then draws an image for it, window by window as prediction does (the checkpoint's
roi, overlap and Gaussian blending): each window of the label map becomes its one-hot input there, so no
full-size one-hot is ever held.

Geometry: the label map keeps the source's grid and affine. The generator sees it as training did, after the
checkpoint's reorientation and resampling (nearest neighbour); the generated image is resampled back to the
label map's grid (linearly: it is an image). A foreground crop of the preprocessing has no image to crop on
here and is left out. The image is in the units of the training targets (the intensity preset only ever touched
the generator-side images, never the targets).

The output folder is a segmentation dataset (``imagesTr/synth_XXX.nii.gz``, ``labelsTr/synth_XXX.nii.gz``,
``dataset.json``), optionally listing a real dataset's training cases too, so ``medseg fit --data.root OUT``
trains on both.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from torch import nn
from tqdm import tqdm

from medseg.data.datalist import CLASSIFICATION, load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS, atomic_path, spacing_from_affine, write_nifti
from medseg.data.transforms import _RAS_LABELS, Preprocessing
from medseg.errors import InputError
from medseg.inference.label_sources import LabelSource, label_sources, random_placement, read_label
from medseg.inference.native import LoadedModel, load_model, network_channels
from medseg.inference.window import stitch
from medseg.models.generator import generator_output, one_hot_condition

DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def label_generator(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A label-conditioned enhancement generator, in eval mode but with its dropout active (pix2pix's noise).

    Raises:
        ValueError: naming the checkpoint, for any other checkpoint.
    """
    model = load_model(path, device)
    if model.task != "enhancement":
        raise ValueError(f"{path}: a {model.task} checkpoint, not a generator; medseg synthesize needs an "
                         "enhancement checkpoint trained with condition: label")
    condition = model.hparams.get("condition", "image")
    if condition != "label":
        raise ValueError(f"{path}: an image-to-image enhancement generator (condition: {condition}), not a "
                         "label-conditioned one; enhance images with medseg predict")
    for module in model.net.modules():
        if isinstance(module, DROPOUT):
            module.train()
    return model


@torch.no_grad()
def generate(model: LoadedModel, label: np.ndarray, affine: np.ndarray,
             device: str | torch.device = "cpu") -> np.ndarray:
    """The generator's image ``(C, *S)`` (float32) for ``label`` ``(*S)`` on its grid (``affine``)."""
    spec = Preprocessing.from_dict(model.hparams.get("preprocessing_spec"))
    dims = label.ndim
    source = MetaTensor(torch.from_numpy(label[None]), affine=torch.as_tensor(affine))
    geometry: list[Callable[[Any], Any]] = []
    if spec.orientation:
        geometry.append(mt.Orientation(axcodes=spec.orientation[:dims], labels=_RAS_LABELS))
    if spec.spacing:
        geometry.append(mt.Spacing(pixdim=spec.spacing, mode="nearest"))
    grid = source
    for transform in geometry:
        grid = transform(grid)
    classes, channels = network_channels(model.hparams)

    def windows(x: torch.Tensor) -> torch.Tensor:
        return generator_output(model.net, one_hot_condition(x, classes), residual=False).float()

    image = stitch(windows, grid.as_tensor()[None].float(), model.window, channels, window_device=device)[0].cpu()
    if geometry:
        image = mt.ResampleToMatch(mode="bilinear", padding_mode="border", dtype=torch.float32)(
            MetaTensor(image, affine=grid.affine), source)
    return np.asarray(image.detach().cpu().numpy(), dtype=np.float32)


def real_cases(root: str | Path, model: LoadedModel, channels: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training cases of the dataset ``root`` as segmentation entries with absolute paths (an enhancement
    dataset's clean ``target`` as the image, since the generator imitates those; cases without a label map left
    out), and what the output description takes from ``root`` (channel names, regions).

    Raises:
        InputError: naming ``root``'s description, when its classes or channels are not the generator's.
    """
    spec = load_dataset(root)
    if spec.task == CLASSIFICATION:
        raise InputError(f"{spec.source}: a classification dataset; --dataset needs label maps")
    names = model.label_names[: network_channels(model.hparams)[0]]
    if spec.label_names != names:
        raise InputError(f"{spec.source}: its labels {spec.label_names} are not the generator's {names}")
    if spec.in_channels != channels:
        raise InputError(f"{spec.source}: {spec.in_channels} channel(s), the generator draws {channels}")
    entries = []
    for case in spec.training:
        if isinstance(case["label"], str):
            images = [case["target"]] if spec.task == "enhancement" else list(case["image"])
            entries.append({"id": case["id"], "image": images if len(images) > 1 else images[0],
                            "label": case["label"], "patient": case["patient"] or case["id"]})
    if not entries:
        raise InputError(f"{spec.source}: no training case with a label map")
    extra: dict[str, Any] = {"channel_names": {str(c): name for c, name in enumerate(spec.channel_names)}}
    if spec.regions:
        extra["regions"] = {name: list(values) for name, values in spec.regions}
        extra["regions_class_order"] = list(spec.region_order or [])
    return entries, extra


def synthesize(checkpoint: str | Path, source: str | Path, count: int, out: str | Path, seed: int = 0,
               dataset: str | Path | None = None, device: str = "cpu", overwrite: bool = False,
               max_voxels: int = DEFAULT_MAX_VOXELS, progress: bool = True) -> dict[str, Any]:
    """Write ``count`` synthetic pairs and ``dataset.json`` under ``out``; returns the description written.

    Args:
        checkpoint: a label-conditioned enhancement generator (:func:`label_generator`).
        source: a dataset (its training label maps) or a folder of label maps (:func:`~medseg.inference.label_sources.label_sources`).
        count: pairs to write; each picks a source (every source once before any twice, in a seeded order).
        out: the output folder; refused when it holds anything, unless ``overwrite`` (files are replaced).
        seed: the sources' order, the placements and the generator's dropout follow it alone.
        dataset: a dataset whose training cases ``dataset.json`` lists too (:func:`real_cases`).
        device: where the windows run.
        max_voxels: the most voxels a label map header may claim.

    Raises:
        FileExistsError / ValueError (InputError, DatasetError) / ImageReadError: one line, naming the file;
        every source label map is checked before anything is written.
    """
    out = Path(out)
    for given in (source, dataset):  # --overwrite must not replace an input's own dataset.json
        folder = None if given is None else Path(given).resolve()
        if folder is not None and out.resolve() == (folder.parent if folder.is_file() else folder):
            raise FileExistsError(f"{out}: the folder of the input {given}; write the pairs to another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; give a new folder, or --overwrite to replace files")
    model = label_generator(checkpoint, device)
    sources = label_sources(source)
    channels = network_channels(model.hparams)[1]
    real, extra = real_cases(dataset, model, channels) if dataset is not None else ([], {})
    rng = np.random.default_rng(seed)
    picks = [int(i) for _ in range(-(-count // len(sources))) for i in rng.permutation(len(sources))][:count]
    for index in sorted(set(picks)):
        _read_label(sources[index].path, model, max_voxels)
    width = max(3, len(str(count - 1)))
    names = [f"synth_{i:0{width}d}" for i in range(count)]
    clash = sorted(set(names) & {entry["id"] for entry in real})
    if clash:
        raise InputError(f"{dataset}: case id(s) {clash} would collide with the synthetic pairs' names")
    entries = []
    for name, index in tqdm(list(zip(names, picks, strict=True)), desc=f"synthesizing [{device}]", unit="pair",
                            disable=not progress):
        entries.append(_pair(model, sources[index], name, rng, out, device, max_voxels))
    described = description(model, checkpoint, entries, real, extra, seed)
    with atomic_path(out / "dataset.json") as tmp:
        Path(tmp).write_text(json.dumps(described, indent=2) + "\n")
    return described


def _pair(model: LoadedModel, source: LabelSource, name: str, rng: np.random.Generator, out: Path,
          device: str, max_voxels: int) -> dict[str, Any]:
    """Place one source label map anew, draw its image, write both (the label map last); its entry."""
    label, affine = _read_label(source.path, model, max_voxels)
    placement = random_placement(rng, label, spacing_from_affine(affine, label.ndim))
    label = placement.apply(label)
    with _seeded(int(rng.integers(2**31)), device):
        image = generate(model, label, affine, device)
    files = [f"imagesTr/{name}.nii.gz"] if len(image) == 1 else \
        [f"imagesTr/{name}_{c:04d}.nii.gz" for c in range(len(image))]
    for channel, file in zip(image, files, strict=True):
        write_nifti(channel, affine, out / file, dtype=np.float32)
    write_nifti(label, affine, out / "labelsTr" / f"{name}.nii.gz")
    return {"image": files[0] if len(files) == 1 else files, "label": f"labelsTr/{name}.nii.gz",
            "patient": source.patient, "synthetic": True, "source": source.path, "placement": placement.to_dict()}


def _read_label(path: str, model: LoadedModel, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """A source label map checked against the generator's classes (:func:`~medseg.inference.label_sources.read_label`)."""
    classes = network_channels(model.hparams)[0]
    return read_label(path, classes, model.label_names, model.hparams["spatial_dims"], max_voxels)


@contextlib.contextmanager
def _seeded(seed: int, device: str | torch.device) -> Iterator[None]:
    """Torch's random state set to ``seed`` (the generator's dropout), restored afterwards."""
    where = torch.device(device)
    devices = [where.index if where.index is not None else torch.cuda.current_device()] if where.type == "cuda" \
        else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def description(model: LoadedModel, checkpoint: str | Path, synthetic: list[dict[str, Any]],
                real: list[dict[str, Any]], extra: dict[str, Any], seed: int) -> dict[str, Any]:
    """The output folder's ``dataset.json``: a segmentation dataset of the real cases and the synthetic pairs
    (each marked ``"synthetic": true`` and naming its ``source`` label map and its placement)."""
    classes, channels = network_channels(model.hparams)
    channel_names = {str(c): "image" if channels == 1 else f"image{c}" for c in range(channels)}
    return {
        "name": "synthetic",
        "description": f"medseg synthesize: {len(synthetic)} pair(s) drawn by {Path(checkpoint).resolve()} "
                       f"(seed {seed})" + (f" and {len(real)} real case(s)" if real else ""),
        "task": "segmentation",
        "labels": {str(k): name for k, name in enumerate(model.label_names[:classes])},
        "channel_names": channel_names,
        **extra,
        "file_ending": ".nii.gz",
        "numTraining": len(synthetic) + len(real),
        "training": [*real, *synthetic],
    }
