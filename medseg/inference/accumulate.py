"""Groups of members combined on the input's grid, and what is written from the result.

Each group of models that shares a preprocessing spec and a window hands over its stitched statistics (see
:mod:`medseg.inference.members`), inverted to the input's grid one channel at a time. Groups are combined with
running sums: means weighted by their member counts, ``M2`` by Chan et al.'s pairwise rule
(``M2 = M2_a + M2_b + |mean_b - mean_a|^2 * n_a * n_b / n``), votes added, the foreground flag as a maximum.
So the full-size arrays of a case are this accumulator plus one channel at a time, whatever the number of
members.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from medseg.inference.members import Layout
from medseg.inference.outputs import OutputSpec


@dataclass
class CaseMaps:
    """What a segmentation case leaves for the writers, on the input's grid.

    Attributes:
        labels: ``(*S)`` label map (uint8 or int16).
        probabilities: ``(P, *S)`` float32 mean probabilities, or ``None`` when not asked for.
        entropy: ``(*S)`` float32 predictive entropy, or ``None``.
        variance: ``(*S)`` float32 member variance averaged over channels (several members only), or ``None``.
        doubt: mean entropy over the voxels any member calls foreground (0 without uncertainty).
        members: number of members (models x flips).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    variance: np.ndarray | None
    doubt: float
    members: int


class NativeAccumulator:
    """Running statistics ``(layout.size, *S)`` float32 on the input's grid, combined group by group."""

    def __init__(self, layout: Layout, outputs: OutputSpec) -> None:
        self.layout, self.outputs = layout, outputs
        self.values: np.ndarray | None = None
        self.members = 0

    def add_group(
        self,
        channel: Callable[[int], np.ndarray],
        members: int,
        spare: np.ndarray | None = None,
        coverage: np.ndarray | None = None,
    ) -> None:
        """Fold in one group's statistics.

        Args:
            channel: ``channel(c)`` gives the group's channel ``c`` of the layout on the input grid ``(*S)``;
                it is called once per channel, in layout order, so only one channel exists at a time.
            members: the group's number of members.
            spare: the group's stitched statistics ``(layout.size, *grid)``, which ``channel`` reads. When they
                come first and their grid has the input's shape (reorientation by flips, no resampling or
                cropping), they become the accumulator: slot ``c`` is overwritten only after ``channel(c)``
                has read it, so no second full-size array is made.
            coverage: ``(*S)`` in [0, 1], how much of each input voxel the group's preprocessed grid covered
                (below 1 outside a foreground crop or at a resampled border; ``None``: all of it). Where it
                did not, the group's members are taken to call background (class 0, its probability and votes),
                so they count there like the other groups' members.
        """
        if coverage is not None and not self.outputs.regions:  # regions: nothing called is already right
            channel = _with_background(channel, self.layout, members, 1.0 - coverage)
        layout = self.layout
        if self.values is None:
            first = channel(0)
            if (spare is not None and spare.dtype == np.float32 and spare.flags.c_contiguous
                    and spare.shape == (layout.size, *first.shape)):
                self.values = spare
            else:
                self.values = np.empty((layout.size, *first.shape), dtype=np.float32)
            self.values[0] = first
            del first
            for c in range(1, layout.size):
                self.values[c] = channel(c)
            self.members = members
            return
        n_a, n_b = self.members, members
        n = n_a + n_b
        spread = np.zeros(self.values.shape[1:], dtype=np.float32) if layout.m2 is not None else None
        for c in range(layout.mean.stop):
            delta = channel(c)
            delta -= self.values[c]
            if spread is not None:
                spread += delta * delta
            delta *= n_b / n
            self.values[c] += delta
        if layout.m2 is not None:
            self.values[layout.m2] += channel(layout.m2)
            self.values[layout.m2] += spread * np.float32(n_a * n_b / n)
        if layout.vote is not None:
            for c in range(layout.vote.start, layout.vote.stop):
                self.values[c] += channel(c)
        if layout.any_foreground is not None:
            np.maximum(self.values[layout.any_foreground], channel(layout.any_foreground),
                       out=self.values[layout.any_foreground])
        self.members = n

    def finish(self, probabilities: bool = False, uncertainty: bool = False, temperature: float = 1.0) -> CaseMaps:
        """The label map and the asked-for maps (views of the accumulator where possible).

        ``temperature`` (``medseg predict --calibration``) rescales the mean probabilities in place, slab by slab,
        after the label map is decoded from them (so it does not change: for sigmoid classes the label is the
        argmax over channels, which a temperature below 1 could tie at 1.0) and before the entropy is taken
        (:mod:`medseg.metrics.temperature`).
        """
        if self.values is None:
            raise ValueError("no group was added")
        layout, outputs, values = self.layout, self.outputs, self.values
        mean = values[layout.mean]
        tensor = torch.from_numpy(mean)
        if layout.vote is not None:
            labels = outputs.decode_votes(torch.from_numpy(values[layout.vote]), tensor, self.members)
        else:
            labels = outputs.decode(tensor)
        if temperature != 1.0 and (probabilities or uncertainty):
            from medseg.arrays import slabs
            from medseg.metrics.temperature import apply_temperature

            for part in slabs(mean.shape[1:], outputs.channels):
                mean[part] = apply_temperature(mean[part], temperature, outputs.activation)
        entropy = variance = None
        doubt = 0.0
        if uncertainty:
            entropy = outputs.entropy(tensor).numpy()
            if layout.any_foreground is not None:
                # The flag is 0/1 per member; blending and inverse resampling smear it, so >= 0.5, not > 0.
                region = values[layout.any_foreground] >= 0.5
                doubt = float(entropy.mean(where=region)) if region.any() else 0.0
            if layout.m2 is not None and self.members > 1:
                variance = values[layout.m2]
                variance /= np.float32(self.members * outputs.channels)
        return CaseMaps(labels.numpy(), mean if probabilities else None, entropy, variance, doubt, self.members)


def _with_background(
    channel: Callable[[int], np.ndarray], layout: Layout, members: int, uncovered: np.ndarray
) -> Callable[[int], np.ndarray]:
    """``channel`` with the uncovered share of each voxel given to background: its mean probability (channel
    0) and its votes (``members`` per uncovered voxel)."""
    vote = layout.vote.start if layout.vote is not None else None

    def filled(c: int) -> np.ndarray:
        values = channel(c)
        if c == 0:
            values = values + uncovered
        elif c == vote:
            values = values + np.float32(members) * uncovered
        return values

    return filled
