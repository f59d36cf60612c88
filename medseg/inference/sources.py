"""The models a prediction run uses: checkpoints or one exported model folder, checked to form one ensemble, and
the temperature of a ``calibration.json`` fitted for them."""

from __future__ import annotations

import functools
from pathlib import Path

from medseg.inference.native import LoadedModel, load_model


def load_sources(paths: list[str | Path], runtime: str = "auto") -> list[LoadedModel]:
    """The models of checkpoints, or of one exported model folder (all of its members), on the CPU.

    A folder is predicted alone (``medseg predict --model``): its TTA, ensemble mode, post-processing and
    temperature belong to it, so it joins no other source.
    """
    from medseg.deploy.artifact import is_model_folder, load_members

    folders = [path for path in paths if is_model_folder(path)]
    if folders and len(paths) > 1:
        raise ValueError(f"{folders[0]}: an exported model is predicted alone (medseg predict --model DIR): it "
                         "carries its own TTA, ensemble and post-processing; export one folder for the ensemble")
    if folders:
        return load_members(folders[0], runtime)
    if runtime not in ("auto", "torchscript"):
        raise ValueError(f"--runtime {runtime} applies to an exported model folder (medseg export --format onnx)")
    return [load_model(path) for path in paths]


def runtime_of(models: list[LoadedModel], paths: list[str | Path]) -> str | None:
    """What computes an exported folder's networks (``torchscript`` or ``onnx``); ``None`` for checkpoints."""
    from medseg.deploy.artifact import is_model_folder
    from medseg.deploy.networks import OnnxNetwork

    if not any(is_model_folder(path) for path in paths):
        return None
    return "onnx" if isinstance(models[0].net, OnnxNetwork) else "torchscript"


def check_compatible(models: list[LoadedModel], paths: list[str | Path]) -> None:
    """Refuse, naming the file, members that cannot form one ensemble (other classes, channels, dimensions,
    task or output kind than the first)."""
    if len(paths) != len(models):  # an exported folder holds several members: name the folder for each
        paths = [paths[0]] * len(models)
    first = models[0]
    for model, path in zip(models[1:], paths[1:], strict=True):
        for key in ("num_classes", "in_channels", "spatial_dims"):
            if model.hparams[key] != first.hparams[key]:
                raise ValueError(f"{path}: {key} {model.hparams[key]} differs from {paths[0]} ({first.hparams[key]})")
        if model.task != first.task:
            raise ValueError(f"{path}: {model.task} models cannot join an ensemble of {first.task} models")
        if model.task == "segmentation" and model.outputs != first.outputs:
            raise ValueError(f"{path}: its outputs ({_describe(model)}) differ from {paths[0]} ({_describe(first)})")


def _describe(model: LoadedModel) -> str:
    outputs = model.outputs
    kind = f"regions {list(map(list, outputs.regions))}" if outputs.regions else "classes"
    return f"{outputs.activation} {kind} {list(outputs.names)}"


@functools.lru_cache(maxsize=8)
def _temperature_of(calibration: str, task: str, activation: str, stamp: int) -> float:
    """The temperature of a ``calibration.json`` fitted for this task and activation (read once per file and
    modification time ``stamp``)."""
    from medseg.metrics.temperature import load_calibration

    fitted = load_calibration(calibration)
    if fitted.get("task", task) != task:
        raise ValueError(f"{calibration}: fitted for a {fitted['task']} model, but this one is a model of the {task} task")
    if fitted["activation"] != activation:
        raise ValueError(f"{calibration}: fitted on {fitted['activation']} outputs, but this model's are {activation}")
    return float(fitted["temperature"])


def checked_temperature(calibration: str, first: LoadedModel) -> float:
    """The temperature of a ``calibration.json``, refused when it was fitted for another task or another kind of
    output than this model's (softmax or sigmoid)."""
    activation = first.outputs.activation if first.task == "segmentation" else "softmax"
    stamp = Path(calibration).stat().st_mtime_ns if Path(calibration).is_file() else 0
    return _temperature_of(str(calibration), first.task, activation, stamp)
