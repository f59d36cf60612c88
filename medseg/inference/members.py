"""Ensemble members on a window: every (model, test-time flip) pair of a group, accumulated in place.

A member is one network under one flip. :class:`MemberWindows` is the callable handed to the sliding window:
for a batch of windows it runs each member, flips its probabilities back and folds them into running
statistics, so the memory of a window batch and of the stitched maps does not grow with the number of members
(nnU-Net mirrors each patch in the same way). What is kept per voxel is set by a :class:`Layout`:

* the mean probability of every channel (always): a sum divided by the count, or, when ``M2`` is kept, by
  Welford's update ``mean += (p - mean) / n``;
* the sum over channels of the squared deviations from that mean (``M2``, Welford), with ``--save-uncertainty``
  and several members: the member variance averaged over channels is ``M2 / (n * channels)``;
* each channel's vote count (``--ensemble vote``): a member votes for its argmax class, or for each region it
  calls;
* whether any member calls the voxel foreground (``--save-uncertainty``: where the doubt score is averaged).

The windows are blended by the sliding window afterwards, and each group's statistics are then inverted to the
input grid. So ``M2``, votes and the foreground flag are exact where one window covers a voxel and the
preprocessing keeps the grid (reorientation, cropping); where windows overlap they are a blend of the windows'
values, and under resampling they are interpolated like the probabilities (measured against every member
inverted alone, on a resampled and cropped case: variance within 0.004, vote labels differing at 2% of voxels,
the mean probabilities within 1e-7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medseg.inference.outputs import OutputSpec


@dataclass(frozen=True)
class Layout:
    """The packed per-voxel statistics of a group of members: ``[mean (P) | M2 (1) | votes (P) | any fg (1)]``,
    the optional parts present only when asked for."""

    classes: int
    variance: bool = False
    votes: bool = False
    foreground: bool = False

    @property
    def mean(self) -> slice:
        return slice(0, self.classes)

    @property
    def m2(self) -> int | None:
        return self.classes if self.variance else None

    @property
    def vote(self) -> slice | None:
        start = self.classes + self.variance
        return slice(start, start + self.classes) if self.votes else None

    @property
    def any_foreground(self) -> int | None:
        return self.classes * (1 + self.votes) + self.variance if self.foreground else None

    @property
    def size(self) -> int:
        return self.classes * (1 + self.votes) + self.variance + self.foreground


def autocast_for(device: str | torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    """A factory of the autocast context for windows on ``device`` (none when ``dtype`` is ``None``/float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=dtype)


class ImageClasses:
    """Image-level class probabilities of a multitask model's members, summed over the windows of the
    segmentation's own sliding window (so each window runs the encoder once, for both heads).

    A :class:`MemberWindows` given one calls each network's ``forward_with_class`` and adds, per member, the
    softmax of the class logits of every window; :meth:`probabilities` is then each member's mean over its
    windows, every window counting the same (no Gaussian weighting), as
    :func:`medseg.models.multitask.case_class_probabilities` computes it.
    """

    def __init__(self) -> None:
        self.sums: list[torch.Tensor | None] = []
        self.windows: list[int] = []

    def open(self, members: int) -> int:
        """Room for ``members`` more members; returns the index of the first."""
        self.sums += [None] * members
        self.windows += [0] * members
        return len(self.sums) - members

    def add(self, member: int, class_logits: torch.Tensor) -> None:
        """Fold ``(N, K)`` class logits of ``N`` windows into ``member``'s sum."""
        summed = torch.softmax(class_logits.float(), dim=1).sum(dim=0).cpu()
        self.sums[member] = summed if self.sums[member] is None else self.sums[member] + summed
        self.windows[member] += class_logits.shape[0]

    def probabilities(self) -> list:
        """One ``(K,)`` float32 numpy array per member, in member order."""
        if not self.sums or any(total is None for total in self.sums):
            raise ValueError("no window was classified")
        return [(total / count).numpy() for total, count in zip(self.sums, self.windows, strict=True)]


class MemberWindows:
    """``(N, C, *roi)`` windows -> ``(N, layout.size, *roi)`` float32 statistics of every member.

    Args:
        nets: the group's networks (callables returning logits ``(N, P, *roi)``), on the windows' device.
        flips: test-time flips, each a tuple of spatial axes (``()`` = no flip).
        outputs: how logits become probabilities and votes.
        layout: which statistics to keep.
        autocast: factory of the precision context each forward pass runs in.
        image_classes: for multitask networks (``forward_with_class``): where each member's image-level class
            probabilities are summed, from the same forward pass as the segmentation.
    """

    def __init__(
        self,
        nets: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        flips: Sequence[tuple[int, ...]],
        outputs: OutputSpec,
        layout: Layout,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        image_classes: ImageClasses | None = None,
    ) -> None:
        if not nets or not flips:
            raise ValueError("an ensemble needs at least one network and one flip")
        self.nets, self.flips, self.outputs, self.layout, self.autocast = list(nets), list(flips), outputs, layout, autocast
        self.image_classes = image_classes
        self.first_member = image_classes.open(self.members) if image_classes is not None else 0

    @property
    def members(self) -> int:
        return len(self.nets) * len(self.flips)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        out = torch.zeros((window.shape[0], layout.size, *window.shape[2:]), dtype=torch.float32, device=window.device)
        mean = out[:, layout.mean]
        count = 0
        for net in self.nets:
            for flip in self.flips:
                dims = [axis + 2 for axis in flip]
                with self.autocast():
                    x = torch.flip(window, dims) if dims else window
                    if self.image_classes is None:
                        logits = net(x)
                    else:
                        logits, class_logits = net.forward_with_class(x)
                        self.image_classes.add(self.first_member + count, class_logits)
                p = self.outputs.activate(logits)
                if dims:
                    p = torch.flip(p, dims)
                count += 1
                if layout.m2 is not None:  # Welford: mean and M2 in one pass
                    delta = p - mean
                    mean.add_(delta, alpha=1.0 / count)
                    out[:, layout.m2] += (delta * (p - mean)).sum(dim=1)
                else:
                    mean += p  # a sum, divided once below: one operation per member
                if layout.vote is not None:
                    out[:, layout.vote] += self.outputs.votes(p)
                if layout.any_foreground is not None:
                    index = layout.any_foreground
                    out[:, index] = torch.maximum(out[:, index], self.outputs.foreground(p)[:, 0])
        if layout.m2 is None and count > 1:
            mean /= count
        return out
