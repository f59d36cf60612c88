"""``medseg export``: one self-contained folder that predicts what ``medseg predict --ckpt ...`` predicts.

The folder holds::

    medseg_model.json        the spec: task, channels, label names, each member's preprocessing and window,
                             TTA flips, ensemble mode, post-processing, temperature, versions, file checksums
    networks/member_K.ts     each checkpoint's network as TorchScript      (--format torchscript|both)
    networks/member_K.onnx   ... and as ONNX, fixed patch, free batch      (--format onnx|both)
    configs/, models/        a MONAI bundle (medseg.deploy.bundle), where the model can be one

Loading it back (:mod:`medseg.deploy.artifact`) reads JSON and the network files only: no pickled Python object
is unpickled. The folder is built under a temporary name beside ``out`` and renamed when complete.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medseg import __version__
from medseg.data.io import sha256_of
from medseg.data.transforms import Preprocessing
from medseg.deploy.networks import (
    TOLERANCE,
    OnnxNetwork,
    example_input,
    largest_difference,
    to_onnx,
    to_torchscript,
)
from medseg.inference.native import LoadedModel, flip_sets, load_model

logger = logging.getLogger("medseg")

SPEC_NAME = "medseg_model.json"
FORMAT = "medseg-model"
FORMAT_VERSION = 1
FORMATS = ("torchscript", "onnx", "both")


def export_model(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    tta: bool = False,
    tta_axes: Sequence[int] | None = None,
    ensemble: str = "mean",
    postprocess: Any = None,
    calibration: str | Path | None = None,
    formats: str = "torchscript",
    bundle: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export an ensemble of checkpoints with its prediction options into the folder ``out``.

    Args:
        checkpoints: medseg checkpoints (one, or the members of an ensemble).
        out: the folder to create (refused when it exists, unless ``overwrite``).
        tta, tta_axes, ensemble, postprocess, calibration: as ``medseg predict``'s options of the same names
            (``postprocess``: a file, JSON text or a list of steps; ``calibration``: a ``calibration.json``).
        formats: ``torchscript``, ``onnx`` or ``both``.
        bundle: also write a MONAI bundle (when the model can be one; otherwise the reason is recorded).

    Returns:
        ``out``.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: naming the checkpoint or file, before anything is
            written; ``ValueError`` also when an exported network disagrees with its checkpoint.
    """
    from medseg.inference.sources import check_compatible, checked_temperature

    if formats not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {formats!r}")
    if ensemble not in ("mean", "vote"):
        raise ValueError(f"--ensemble must be mean or vote, got {ensemble!r}")
    out = Path(out)
    _check_replaceable(out, overwrite)
    models = [load_model(path) for path in checkpoints]
    check_compatible(models, list(checkpoints))
    first = models[0]
    if first.task not in ("segmentation", "classification"):
        reason = {"multitask": "its network has two outputs, a label map and a class",
                  "enhancement": "its prediction is an image, not a label map or a class"}.get(first.task, "")
        raise ValueError(f"{checkpoints[0]}: {first.task} models cannot be exported yet"
                         f"{f' ({reason})' if reason else ''}; predict with medseg predict --ckpt")
    flips = flip_sets(first.hparams["spatial_dims"], tta_axes) if tta else [()]
    steps = _postprocessing(postprocess)
    temperature = checked_temperature(str(calibration), first) if calibration else None

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "networks").mkdir()
        members = [_export_member(model, Path(path), k, staging, formats) for k, (model, path)
                   in enumerate(zip(models, checkpoints, strict=True))]
        spec = _spec(out.name, models, members, flips, tta_axes if tta else None, ensemble, steps, temperature,
                     calibration)
        spec["bundle"] = _bundle(staging, models, flips, ensemble, out.name) if bundle else {"omitted": "not asked"}
        spec["files"] = {str(p.relative_to(staging)): sha256_of(p) for p in sorted(staging.rglob("*"))
                         if p.is_file()}
        (staging / SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it private; the folder is meant to be shared
        _put_in_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that exists, unless ``overwrite`` and it is an exported model (or an empty folder):
    ``--overwrite`` never deletes anything else."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out}: already exists; give another --out, or --overwrite to replace it")
    if not out.is_dir() or not ((out / SPEC_NAME).is_file() or not any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an exported model; --overwrite replaces only an earlier "
                              "export (or an empty folder); give another --out")


def _put_in_place(staging: Path, out: Path) -> None:
    """Move the finished export to ``out``; an earlier export there is moved aside first and deleted last, so
    ``out`` always holds a whole model."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "model")
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_member(model: LoadedModel, checkpoint: Path, index: int, folder: Path, formats: str) -> dict[str, Any]:
    """Write one member's network files; returns its entry of the spec (with the measured differences)."""
    shape = _input_shape(model)
    example = example_input(model.hparams["in_channels"], shape)
    checks = [example, example_input(model.hparams["in_channels"], shape, batch=3, seed=1)]
    entry: dict[str, Any] = {
        "checkpoint": checkpoint.name, "checkpoint_sha256": sha256_of(checkpoint), "precision": model.precision,
        "hparams": plain(model.hparams),
    }
    net = model.net.cpu().eval()
    if formats in ("torchscript", "both"):
        scripted, how = to_torchscript(net, example)
        path = folder / "networks" / f"member_{index}.ts"
        scripted.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        entry.update(torchscript=str(path.relative_to(folder)), torchscript_by=how,
                     torchscript_max_abs_diff=_agreeing(net, loaded, checks, checkpoint, "TorchScript"))
    if formats in ("onnx", "both"):
        path = folder / "networks" / f"member_{index}.onnx"
        to_onnx(net, example, path, spatial_free=model.task != "segmentation" and not _resize(model))
        entry.update(onnx=str(path.relative_to(folder)),
                     onnx_max_abs_diff=_agreeing(net, OnnxNetwork(path), checks, checkpoint, "ONNX"))
    return entry


def _agreeing(net: torch.nn.Module, exported: Any, inputs: list[torch.Tensor], checkpoint: Path, kind: str) -> float:
    """The largest logit difference of an export, refused above :data:`TOLERANCE`."""
    difference = largest_difference(net, exported, inputs)
    if not difference <= TOLERANCE:
        raise ValueError(f"{checkpoint}: the {kind} export differs from the checkpoint's network by {difference:.3g} "
                         f"in logits (at most {TOLERANCE:g} is accepted); this network cannot be exported as {kind}")
    return difference


def _input_shape(model: LoadedModel) -> list[int]:
    """What the exported network is run on: the window (segmentation) or the resized image (classification)."""
    return [int(s) for s in (_resize(model) or model.hparams["roi_size"])]


def _resize(model: LoadedModel) -> list[int] | None:
    return Preprocessing.from_dict(model.hparams.get("preprocessing_spec")).resize


def _spec(name: str, models: list[LoadedModel], members: list[dict[str, Any]], flips: list[tuple[int, ...]],
          tta_axes: Sequence[int] | None, ensemble: str, steps: list[dict[str, Any]] | None,
          temperature: float | None, calibration: str | Path | None) -> dict[str, Any]:
    first = models[0]
    outputs = first.outputs if first.task == "segmentation" else None
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"medseg": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "task": first.task, "spatial_dims": first.hparams["spatial_dims"],
        "in_channels": first.hparams["in_channels"], "label_names": first.label_names,
        "structures": outputs.structures if outputs else first.label_names,
        "activation": outputs.activation if outputs else "softmax",
        "inference": {
            "tta": len(flips) > 1, "tta_axes": list(tta_axes) if tta_axes is not None else None,
            "flips": [list(f) for f in flips], "ensemble": ensemble, "postprocess": steps,
            "temperature": temperature,
            "calibration": {"file": Path(calibration).name, "sha256": sha256_of(Path(calibration))}
            if calibration else None,
        },
        "members": members,
    }


def _bundle(folder: Path, models: list[LoadedModel], flips: list[tuple[int, ...]], ensemble: str,
            name: str) -> dict[str, Any]:
    """Write the MONAI bundle when the model can be one; the spec records where it is, or why not."""
    from medseg.deploy.bundle import BundleUnsupported, write_bundle

    if ensemble != "mean":
        return {"omitted": "a MONAI bundle averages probabilities; a vote ensemble cannot be one"}
    try:
        write_bundle(folder, [m.to("cpu") for m in models], flips, name)
    except BundleUnsupported as err:
        logger.warning("%s: no MONAI bundle: %s", name, err)
        return {"omitted": str(err)}
    return {"config": "configs/inference.json", "metadata": "configs/metadata.json", "network": "models/model.ts"}


def _postprocessing(source: Any) -> list[dict[str, Any]] | None:
    """The post-processing steps as JSON data (the spec is JSON), refused, naming the source, when they are not."""
    if not source:
        return None
    from medseg.inference.postprocess import load_postprocessing

    steps = load_postprocessing(source)
    try:
        return json.loads(json.dumps(steps, allow_nan=False))
    except (TypeError, ValueError) as err:
        where = source if isinstance(source, (str, Path)) and len(str(source)) < 200 else "--postprocess"
        raise ValueError(f"{where}: the post-processing steps are not plain JSON values ({err})") from err


def plain(value: Any) -> Any:
    """``value`` as JSON data: tuples become lists, anything else JSON cannot hold becomes its text."""
    return json.loads(json.dumps(value, default=str))
