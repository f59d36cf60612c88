"""The per-case pipeline: preprocess -> window -> TTA -> invert -> accumulate.

Models are grouped by what they share: models with the same preprocessing spec and window (the folds of one
config) form one group. A case is read and preprocessed once per preprocessing spec (:func:`prepare_case`,
which ``medseg predict`` runs in a background thread for the next case). Each group then runs all of its members
(models x test-time flips) on every window in one sliding-window pass on the preprocessed grid, keeping running
statistics there (:mod:`medseg.inference.members`); the stitched statistics are inverted to the input's grid
once per group, one channel at a time, and combined with the other groups'
(:mod:`medseg.inference.accumulate`). Peak memory is therefore set by the image and the number of classes,
not by the number of members.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.data.io import DEFAULT_MAX_VOXELS
from medseg.data.transforms import Preprocessing
from medseg.errors import InputError
from medseg.inference.accumulate import CaseMaps, NativeAccumulator
from medseg.inference.members import ImageClasses, Layout, MemberWindows, autocast_for
from medseg.inference.native import LoadedModel, NonFiniteError, check_files, check_input, preprocess_for
from medseg.inference.window import stitch

PRECISIONS = ("auto", "32", "16", "bf16")
_TRAINED_AT = {"16-mixed": torch.float16, "16": torch.float16, "16-true": torch.float16,
               "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16}


@dataclass
class ModelGroup:
    """Models that preprocess alike and share a window: one input, one sliding-window pass, one inversion.

    ``preprocess`` runs forward in the reader thread and inverts in the main thread. MONAI inverts only with the
    transform instances that ran forward; these transforms are deterministic and keep no per-call state.
    """

    models: list[LoadedModel]
    preprocess: mt.Compose

    @property
    def key(self) -> str:
        return self.models[0].preprocessing_key


def group_models(models: Sequence[LoadedModel], nonfinite: str = "fail") -> list[ModelGroup]:
    """Group ``models`` by preprocessing spec and (segmentation) window, keeping their order; ``nonfinite``
    (``fail`` or ``zero``) is what their preprocessing does with NaN/Inf voxels (:class:`FiniteVoxels`)."""
    groups: dict[tuple[str, Any], ModelGroup] = {}
    for model in models:
        window = model.window if model.task != "classification" else None
        key = (model.preprocessing_key, window, model.precision)
        if key not in groups:
            groups[key] = ModelGroup([], preprocess_for(model, nonfinite))
        groups[key].models.append(model)
    return list(groups.values())


@dataclass
class PreparedCase:
    """A case read and preprocessed: ``inputs`` holds the ``(C, *grid)`` image of each preprocessing key."""

    case: dict[str, Any]
    affine: np.ndarray
    inputs: dict[str, Any]


def prepare_case(case: dict[str, Any], groups: Sequence[ModelGroup],
                 max_voxels: int = DEFAULT_MAX_VOXELS) -> PreparedCase:
    """Read and preprocess a case (``{"id", "image": [files]}``) once for every preprocessing spec.

    The headers are checked first (:func:`~medseg.inference.native.check_files`: dimensionality, channels,
    claimed size against the file and ``max_voxels``), so no transform runs on a file the models cannot take.

    Raises:
        ImageReadError / InputError: naming the file and the reason (for a transform that fails, the
            innermost cause, not MONAI's wrapper).
    """
    affine = check_files(groups[0].models[0], case["image"], max_voxels)
    image = case["image"] if len(case["image"]) > 1 else case["image"][0]
    inputs: dict[str, Any] = {}
    for group in groups:
        if group.key not in inputs:
            try:
                x = group.preprocess({"image": image})["image"]
            except Exception as err:  # MONAI wraps the cause in "applying transform <...>"
                cause = _innermost(err)
                if isinstance(cause, NonFiniteError):
                    raise cause.for_files(case["image"]) from err
                raise InputError(f"{case['image'][0]}: {_reason(cause)}") from err
            check_input(group.models[0], x, case["image"])
            inputs[group.key] = x
    return PreparedCase(case, affine, inputs)


def _innermost(err: BaseException) -> BaseException:
    """The innermost cause of ``err`` (MONAI raises ``RuntimeError("applying transform ...") from`` it)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def _reason(err: BaseException) -> str:
    """medseg's own message as it is, any other with its type."""
    return str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"


def window_dtype(precision: str, device: str | torch.device, trained_at: str | None) -> torch.dtype | None:
    """The autocast dtype of the windows (``None``: float32).

    ``auto`` runs a model at the precision it was trained and validated at (its checkpoint's trainer
    precision, e.g. ``16-mixed``) on a GPU, and in float32 on the CPU; ``32``, ``16`` and ``bf16`` force one.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return _TRAINED_AT.get(str(trained_at)) if torch.device(device).type == "cuda" else None
    return {"32": None, "16": torch.float16, "bf16": torch.bfloat16}[precision]


@torch.no_grad()
def segment(
    prepared: PreparedCase,
    groups: Sequence[ModelGroup],
    flips: Sequence[tuple[int, ...]] = ((),),
    device: str | torch.device = "cpu",
    precision: str = "auto",
    ensemble: str = "mean",
    probabilities: bool = False,
    uncertainty: bool = False,
    temperature: float = 1.0,
    image_classes: ImageClasses | None = None,
) -> CaseMaps:
    """Every member of every group on one case, combined on the input's grid.

    Args:
        prepared: the case from :func:`prepare_case` with these groups; it is used up (each preprocessed image
            is freed once its last group has run).
        groups: the models (their networks already on ``device``).
        flips: test-time flips (``()`` = none).
        device: where the windows run.
        precision: see :func:`window_dtype`.
        ensemble: ``"mean"`` (argmax of the mean probability) or ``"vote"``.
        probabilities: keep the mean probabilities for writing.
        uncertainty: compute entropy, member variance and the case's doubt score.
        temperature: rescales the combined probabilities (``--calibration``; 1 = as predicted).
        image_classes: multitask models: filled with each member's image-level class probabilities, from the
            same window pass (:class:`~medseg.inference.members.ImageClasses`).
    """
    if ensemble not in ("mean", "vote"):
        raise ValueError(f"unknown ensemble mode {ensemble!r}; valid: ['mean', 'vote']")
    outputs = groups[0].models[0].outputs
    members = sum(len(g.models) for g in groups) * len(flips)
    layout = Layout(outputs.channels, variance=uncertainty and members > 1, votes=ensemble == "vote",
                    foreground=uncertainty)
    accumulator = NativeAccumulator(layout, outputs)
    for index, group in enumerate(groups):
        x = prepared.inputs[group.key]
        first = group.models[0]
        autocast = autocast_for(device, window_dtype(precision, device, first.precision))
        predictor = MemberWindows([m.net for m in group.models], flips, outputs, layout, autocast, image_classes)
        stitched = stitch(predictor, x.as_tensor()[None], first.window, layout.size, window_device=device)[0]
        stitched = stitched.cpu()
        if all(later.key != group.key for later in groups[index + 1:]):
            x = prepared.inputs[group.key] = record_only(x)  # the voxels are no longer needed: free them
        spare = stitched.numpy() if stitched.is_contiguous() else None  # may become the accumulator
        coverage = _coverage(stitched.shape[1:], x, group) if may_leave_gaps(first) else None
        channel = functools.partial(_invert_from, stitched, x, group.preprocess)
        accumulator.add_group(channel, predictor.members, spare, coverage)
        del stitched, spare, coverage, channel
    return accumulator.finish(probabilities=probabilities, uncertainty=uncertainty, temperature=temperature)


def may_leave_gaps(model: LoadedModel) -> bool:
    """Whether the preprocessed grid may not cover every input voxel (a foreground crop, or resampling)."""
    spec = Preprocessing.from_dict(model.hparams.get("preprocessing_spec"))
    return bool(spec.crop_foreground or spec.spacing)


def _coverage(grid: Sequence[int], reference: Any, group: ModelGroup) -> np.ndarray:
    """``(*S)``: the share of each input voxel the preprocessed grid covers (1 inside, 0 outside a crop)."""
    covered = invert_channel(torch.ones(tuple(grid)), reference, group.preprocess)
    return np.clip(covered, 0.0, 1.0, out=covered)


def record_only(image: Any) -> MetaTensor:
    """An empty tensor carrying ``image``'s metadata and applied operations: all that inverting needs."""
    record = MetaTensor(torch.empty(0), meta=dict(image.meta))
    record.applied_operations = image.applied_operations
    return record


def _invert_from(stitched: torch.Tensor, reference: Any, preprocess: mt.Compose, c: int) -> np.ndarray:
    return invert_channel(stitched[c], reference, preprocess)


def invert_channel(values: torch.Tensor, reference: Any, preprocess: mt.Compose) -> np.ndarray:
    """Map one channel ``(*grid)`` on the preprocessed grid back to the input file's grid ``(*S)``.

    The channel takes the reference image's metadata and applied operations, and the preprocessing is
    inverted with the image's interpolation (linear: these are probabilities), as MONAI's ``Invertd`` does.
    """
    if not reference.applied_operations:  # nothing to undo (no reorientation, resampling or cropping)
        return np.asarray(values.numpy(), dtype=np.float32)
    channel = MetaTensor(values[None], meta=dict(reference.meta))
    # A deep copy: inverting pops and edits the recorded operations (a crop's padding info), and every channel
    # (and every group sharing this input) inverts from the same record.
    channel.applied_operations = copy.deepcopy(reference.applied_operations)
    inverted = preprocess.inverse({"image": channel})["image"]
    return np.asarray(inverted[0].detach().cpu().numpy(), dtype=np.float32)


@torch.no_grad()
def classify(
    prepared: PreparedCase,
    groups: Sequence[ModelGroup],
    flips: Sequence[tuple[int, ...]] = ((),),
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> list[np.ndarray]:
    """Class probabilities ``(K,)`` of one case, one array per member (model x flip)."""
    members = []
    for group in groups:
        x = prepared.inputs[group.key].as_tensor()[None].to(device)
        for model in group.models:
            autocast = autocast_for(device, window_dtype(precision, device, model.precision))
            for flip in flips:
                with autocast():
                    logits = model.net(torch.flip(x, [a + 2 for a in flip]) if flip else x)
                members.append(torch.softmax(logits.float(), dim=1)[0].cpu().numpy())
    return members
