"""An exported model folder read back: its spec checked, its networks loaded, its prediction options.

Nothing here unpickles a Python object: the spec is JSON, the networks are TorchScript archives
(``torch.jit.load``) or ONNX graphs (onnxruntime). The spec is checked for its shape before anything is used,
every file it names must lie inside the folder and be listed with its SHA-256, and each network file is checked
against that checksum right before it is loaded: a folder that was edited, cut short or mixed with another
export is refused, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from medseg.data.io import sha256_of
from medseg.deploy.export import FORMAT, FORMAT_VERSION, SPEC_NAME
from medseg.deploy.networks import OnnxNetwork
from medseg.inference.native import LoadedModel

RUNTIMES = ("auto", "torchscript", "onnx")
TASKS = ("segmentation", "classification")


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``medseg export`` (it holds ``medseg_model.json``)."""
    return Path(path).is_dir() and (Path(path) / SPEC_NAME).is_file()


def read_spec(folder: str | Path, verify: bool = False) -> dict[str, Any]:
    """The spec of an exported model folder, after checking its shape (and, with ``verify``, every file's
    checksum; :func:`load_members` checks the files it loads in any case).

    Raises:
        FileNotFoundError / ValueError: naming the folder or the file and the reason.
    """
    folder = Path(folder)
    path = folder / SPEC_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an exported medseg model (no {SPEC_NAME}); make one with medseg export")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable model spec ({type(err).__name__}: {err})") from err
    _check_shape(spec, path)
    if verify:
        for name in spec["files"]:
            verified_file(folder, spec, name)
    return spec


def verified_file(folder: Path, spec: dict[str, Any], name: str) -> Path:
    """The file ``name`` of the folder, after checking it is listed, lies inside the folder and has its checksum.

    Raises:
        FileNotFoundError / ValueError: naming the file.
    """
    if name not in spec["files"]:
        raise ValueError(f"{folder / SPEC_NAME}: names {name!r}, which its list of files (with checksums) does not hold")
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing from the exported model (the spec lists it)")
    if sha256_of(file) != spec["files"][name]:
        raise ValueError(f"{file}: its checksum differs from the one recorded at export; the model folder was "
                         "changed after export; export it again")
    return file


def load_members(folder: str | Path, runtime: str = "auto", device: str | torch.device = "cpu",
                 spec: dict[str, Any] | None = None) -> list[LoadedModel]:
    """The members of an exported model, ready for medseg's prediction pipeline.

    Args:
        runtime: ``torchscript``, ``onnx`` (CPU, float32), or ``auto`` (TorchScript when exported, else ONNX).
        spec: the folder's spec, when already read by :func:`read_spec`.

    Raises:
        ValueError / FileNotFoundError: the runtime was not exported, an unknown runtime, or a file that fails
            its check (naming it).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    folder = Path(folder)
    spec = spec or read_spec(folder)
    members = []
    for member in spec["members"]:
        kind = runtime if runtime != "auto" else ("torchscript" if member.get("torchscript") else "onnx")
        if not member.get(kind):
            exported = [k for k in ("torchscript", "onnx") if member.get(k)]
            raise ValueError(f"{folder}: exported as {' and '.join(exported)}, not {kind}; use --runtime "
                             f"{exported[0]} or export with --format {kind}")
        path = verified_file(folder, spec, member[kind])
        if kind == "torchscript":
            net: Any = torch.jit.load(str(path), map_location=torch.device(device)).eval()
            precision = member.get("precision")
        else:  # onnxruntime computes in float32 whatever the checkpoint trained at
            net, precision = OnnxNetwork(path, threads=torch.get_num_threads()), None
        members.append(LoadedModel(net, dict(member["hparams"]), spec["task"], precision))
    return members


def prediction_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The options ``medseg predict`` takes from an exported model: ``tta``, ``tta_axes``, ``ensemble``,
    ``postprocess`` (the steps) and ``temperature`` (``None``: not calibrated)."""
    inference = spec["inference"]
    return {"tta": bool(inference.get("tta")), "tta_axes": inference.get("tta_axes"),
            "ensemble": inference.get("ensemble") or "mean", "postprocess": inference.get("postprocess"),
            "temperature": inference.get("temperature")}


def _check_shape(spec: Any, path: Path) -> None:
    """Refuse, naming the spec file, a spec that is not what ``medseg export`` writes."""

    def refuse(reason: str) -> ValueError:
        return ValueError(f"{path}: {reason}; export the model again")

    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path}: not a medseg model spec (format {spec.get('format') if isinstance(spec, dict) else None!r})")
    version = spec.get("format_version")
    if not isinstance(version, int):
        raise refuse(f"format_version is {version!r}, not a whole number")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer medseg (model format {version}, this medseg reads up to "
                         f"{FORMAT_VERSION}); upgrade medseg")
    if spec.get("task") not in TASKS:
        raise refuse(f"task is {spec.get('task')!r}, not one of {list(TASKS)}")
    files = spec.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise refuse("it has no list of files with their checksums")
    for name in files:
        if not _inside(name):
            raise refuse(f"it lists {name!r}, which is not a path inside the model folder")
    members = spec.get("members")
    if not isinstance(members, list) or not members:
        raise refuse("it lists no members")
    for k, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("hparams"), dict):
            raise refuse(f"member {k} has no hyperparameters")
        for kind in ("torchscript", "onnx"):
            if member.get(kind) is not None and member[kind] not in files:
                raise refuse(f"member {k}'s {kind} file {member[kind]!r} is not among its checksummed files")
    if not isinstance(spec.get("inference"), dict):
        raise refuse("it has no prediction options (inference)")


def _inside(name: str) -> bool:
    """A relative POSIX path that stays inside the folder (no ``..``, no absolute path, no drive)."""
    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in name and ":" not in name
