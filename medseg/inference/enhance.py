"""``medseg predict`` with an enhancement generator: each case's generated image, on its input file's grid.

An image-conditioned generator (:mod:`medseg.models.generator`) maps the preprocessed image to an image in the
target's units. For each group of models that preprocess alike and share a window
(:func:`medseg.inference.pipeline.group_models`), one sliding window (the training patch as roi, its overlap and
window batch, Gaussian blending: :func:`medseg.inference.window.stitch`) runs every member (model x test-time
flip: the input flipped, the output flipped back) on each window batch and keeps their mean. The stitched mean
is inverted to the input file's grid one channel at a time (:func:`medseg.inference.pipeline.invert_channel`,
linear interpolation: these are intensities) and averaged with the other groups' by their member counts.

The image is written as ``<case>.nii.gz`` (float32, the input's affine; several channels as the last axis,
``(X, Y[, Z], C)``, as :func:`medseg.data.io.read_image` reads such files) under the name a segmentation's label
map takes (:class:`~medseg.inference.writers.CaseFiles`), so resume, overwrite and the output folder's
bookkeeping work unchanged. Where a foreground crop leaves out part of the input's grid, the output is 0 there
(inverting a crop pads with zeros), as the input is.

Memory per group: the stitched mean on the preprocessed grid and the running sum on the input grid (the stitched
buffer itself, for the first group when the preprocessing left the grid alone), plus the channel being inverted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.io import write_nifti
from medseg.inference.members import autocast_for
from medseg.inference.native import LoadedModel, network_channels
from medseg.inference.pipeline import ModelGroup, PreparedCase, invert_channel, record_only, window_dtype
from medseg.inference.window import stitch
from medseg.inference.writers import CaseFiles
from medseg.models.generator import generator_output

#: Options of ``medseg predict`` that describe label maps or probabilities, which a generator does not make.
SEGMENTATION_OPTIONS = {"save_probabilities": "--save-probabilities", "save_uncertainty": "--save-uncertainty",
                        "postprocess": "--postprocess", "calibration": "--calibration"}


def check_generators(models: Sequence[LoadedModel], paths: Sequence[str | Path], options: Any) -> None:
    """Refuse, before any case and naming the checkpoint, what an enhancement run cannot do: a label-conditioned
    generator (it makes images from label maps: ``medseg synthesize``), members whose images have other channels,
    and the options of segmentation outputs (``--save-probabilities``, ``--save-uncertainty``, ``--postprocess``,
    ``--calibration``, ``--ensemble vote``)."""
    if len(paths) != len(models):  # an exported folder holds several members: name the folder for each
        paths = [paths[0]] * len(models)
    for model, path in zip(models, paths, strict=True):
        condition = model.hparams.get("condition", "image")
        if condition != "image":
            raise ValueError(f"{path}: a {condition}-conditioned generator makes images from label maps, not from "
                             "images; use medseg synthesize")
        if network_channels(model.hparams)[1] != network_channels(models[0].hparams)[1]:
            raise ValueError(f"{path}: generates {network_channels(model.hparams)[1]}-channel images, but "
                             f"{paths[0]} generates {network_channels(models[0].hparams)[1]}")
    asked = [flag for name, flag in SEGMENTATION_OPTIONS.items() if getattr(options, name, None)]
    asked += ["--ensemble vote"] * (getattr(options, "ensemble", "mean") == "vote")
    if asked:
        raise ValueError(f"{paths[0]}: an enhancement model writes one image per case (the members' mean); "
                         f"{', '.join(asked)} apply to segmentation: drop {'them' if len(asked) > 1 else 'it'}")


class GeneratorWindows:
    """``(N, C_in, *roi)`` windows -> ``(N, C_out, *roi)`` float32: the mean generated image of every member.

    Args:
        models: the group's generators (their networks on the windows' device); each adds its input to the
            network's output when its checkpoint says ``residual``.
        flips: test-time flips, each a tuple of spatial axes (``()`` = no flip).
        autocast: factory of the precision context each forward pass runs in.
    """

    def __init__(self, models: Sequence[LoadedModel], flips: Sequence[tuple[int, ...]],
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        if not models or not flips:
            raise ValueError("an ensemble needs at least one network and one flip")
        self.nets = [(model.net, bool(model.hparams.get("residual", False))) for model in models]
        self.flips, self.autocast = list(flips), autocast

    @property
    def members(self) -> int:
        return len(self.nets) * len(self.flips)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for net, residual in self.nets:
            for flip in self.flips:
                dims = [axis + 2 for axis in flip]
                with self.autocast():
                    out = generator_output(net, torch.flip(window, dims) if dims else window, residual)
                out = out.float()
                if dims:
                    out = torch.flip(out, dims)
                total = out if total is None else total.add_(out)
        assert total is not None
        return total.div_(self.members) if self.members > 1 else total


@torch.no_grad()
def enhance(
    prepared: PreparedCase,
    groups: Sequence[ModelGroup],
    flips: Sequence[tuple[int, ...]] = ((),),
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> np.ndarray:
    """The mean generated image ``(C, *S)`` float32 of every member of every group, on the input file's grid.

    Args:
        prepared: the case from :func:`~medseg.inference.pipeline.prepare_case` with these groups; it is used up
            (each preprocessed image is freed once its last group has run).
        groups: the generators (their networks already on ``device``).
        flips: test-time flips (``()`` = none).
        device: where the windows run.
        precision: see :func:`~medseg.inference.pipeline.window_dtype`.
    """
    total: np.ndarray | None = None
    members = 0
    for index, group in enumerate(groups):
        x = prepared.inputs[group.key]
        first = group.models[0]
        autocast = autocast_for(device, window_dtype(precision, device, first.precision))
        predictor = GeneratorWindows(group.models, flips, autocast)
        channels = network_channels(first.hparams)[1]
        stitched = stitch(predictor, x.as_tensor()[None], first.window, channels, window_device=device)[0].cpu()
        if all(later.key != group.key for later in groups[index + 1:]):
            x = prepared.inputs[group.key] = record_only(x)  # the voxels are no longer needed: free them
        weight = predictor.members if len(groups) > 1 else 1  # one group: its mean is the result
        if total is None and not x.applied_operations and stitched.is_contiguous():
            total = stitched.numpy()  # already on the input's grid: the buffer becomes the sum
            if weight != 1:
                total *= weight
        else:
            for c in range(channels):
                channel = invert_channel(stitched[c], x, group.preprocess)
                if total is None:
                    total = np.zeros((channels, *channel.shape), dtype=np.float32)
                if weight != 1:
                    channel *= weight
                total[c] += channel
                del channel
        members += weight
        del stitched
    assert total is not None
    if members != 1:
        total /= members
    return total


def enhance_job(prepared: PreparedCase, groups: Sequence[ModelGroup], flips: Sequence[tuple[int, ...]],
                options: Any) -> Callable[[], None]:
    """Generate one prepared case now (:func:`enhance`); returns the job that writes ``<case>.nii.gz``."""
    image = enhance(prepared, groups, flips, options.device, options.precision)
    path, affine = CaseFiles.of(prepared.case["id"], options.output).labels, prepared.affine

    def write() -> None:
        write_nifti(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1), affine, path)

    return write
