"""What a segmentation network's output channels mean, and how they become a label map.

Three kinds of model, told apart by the checkpoint (the loss's activation, the dataset's regions):

* **softmax**: channel ``k`` is the probability of class ``k`` (classes are exclusive); label = argmax.
* **sigmoid**, no regions: channel ``k`` is an independent probability of class ``k`` (a one-hot target trained
  with a sigmoid loss); label = argmax, as the one-hot encoding of training implies.
* **sigmoid with regions** (nnU-Net's region-based training): channel ``r`` is the probability that the voxel
  lies in region ``r``, a set of label values; regions may overlap (BraTS: whole tumour {1, 2, 3} contains
  tumour core {2, 3} contains enhancing tumour {3}). The label map is built as nnU-Net builds it: start from 0,
  then, in the regions' order, every voxel where region ``r`` is above 0.5 gets the label value ``order[r]``
  (later regions overwrite earlier ones).

Validation, ``medseg predict`` and ``medseg evaluate`` all score the same *structures*: a foreground class
(``label == k``) or a region (``label in values``), taken from the label map. Every full-volume operation here
works in slabs along the last axis, so its temporaries stay a small fraction of one probability map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medseg.arrays import slabs
from medseg.losses import loss_activation

_EPS = 1e-7
VOTE_TOLERANCE = 1e-3  # vote counts within this are tied (blending leaves whole counts off by float rounding)


@dataclass(frozen=True)
class OutputSpec:
    """The meaning of a network's output channels.

    Attributes:
        activation: ``"softmax"`` or ``"sigmoid"``.
        names: one name per output channel (class names, background first; or region names).
        regions: for region models, the label values of each region (one tuple per channel).
        region_order: for region models, the label value written for each region, in the order they are applied.
    """

    activation: str = "softmax"
    names: tuple[str, ...] = ()
    regions: tuple[tuple[int, ...], ...] | None = None
    region_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be softmax or sigmoid, got {self.activation!r}")
        if self.regions is not None:
            if self.activation != "sigmoid":
                raise ValueError("region models need a sigmoid output (regions overlap)")
            if len(self.region_order or ()) != len(self.regions) or len(self.names) != len(self.regions):
                raise ValueError(f"{len(self.regions)} regions need as many names and region_order values")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> OutputSpec:
        """The output spec of a model from its saved hyperparameters (``loss``, ``loss_args``, ``label_names``,
        ``num_classes``, ``regions``, ``region_order``)."""
        names = tuple(hparams.get("label_names") or [str(i) for i in range(int(hparams["num_classes"]))])
        regions = hparams.get("regions")
        if regions:
            return cls("sigmoid", names, tuple(tuple(int(v) for v in r) for r in regions),
                       tuple(int(v) for v in hparams["region_order"]))
        return cls(loss_activation(hparams.get("loss", "dice_ce"), hparams.get("loss_args")), names)

    @property
    def channels(self) -> int:
        return len(self.names)

    @property
    def structures(self) -> list[str]:
        """Names of the scored structures: the foreground classes, or every region."""
        return list(self.names) if self.regions else list(self.names[1:])

    @property
    def metric_suffixes(self) -> list[str]:
        """``class1, class2, ...`` or ``region1, region2, ...``: the metric key of each scored structure."""
        kind = "region" if self.regions else "class"
        return [f"{kind}{i}" for i in range(1, len(self.structures) + 1)]

    @property
    def label_dtype(self) -> type:
        """The smallest integer type that holds every label value the model writes."""
        top = max(self.region_order) if self.regions else self.channels - 1
        return np.uint8 if top <= 255 else np.int16

    # ------------------------------------------------------------------------------------------ windows

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(N, P, ...)`` (float32) from logits ``(N, P, ...)``."""
        logits = logits.float()
        return torch.softmax(logits, dim=1) if self.activation == "softmax" else torch.sigmoid(logits)

    def logits_for_loss(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Logits whose activation gives back ``probabilities`` (log for softmax, logit for sigmoid), so a loss
        written for logits scores a blended probability map exactly."""
        if self.activation == "softmax":
            return torch.log(probabilities.clamp_min(_EPS))
        return torch.logit(probabilities, eps=_EPS)

    def votes(self, probabilities: torch.Tensor) -> torch.Tensor:
        """One member's vote per channel ``(N, P, ...)`` (0 or 1): its argmax class, or each region it calls."""
        if self.regions:
            return (probabilities > 0.5).to(probabilities.dtype)
        winner = probabilities.argmax(dim=1, keepdim=True)
        return torch.zeros_like(probabilities).scatter_(1, winner, 1.0)

    def foreground(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Where one member calls anything but background ``(N, 1, ...)`` (0 or 1)."""
        if self.regions:
            called = (probabilities > 0.5).any(dim=1, keepdim=True)
        else:
            called = probabilities.argmax(dim=1, keepdim=True) > 0
        return called.to(probabilities.dtype)

    # ------------------------------------------------------------------------------------- whole volumes

    def decode(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Label map ``(*S)`` (:attr:`label_dtype`) from probabilities ``(P, *S)``."""
        out = torch.empty(probabilities.shape[1:], dtype=_torch_dtype(self.label_dtype), device=probabilities.device)
        for part in slabs(probabilities.shape[1:], self.channels):
            p = probabilities[part]
            out[part] = self._labels_of(p > 0.5 if self.regions else None, p)
        return out

    def decode_votes(self, votes: torch.Tensor, mean: torch.Tensor, members: int) -> torch.Tensor:
        """Label map ``(*S)`` from summed votes ``(P, *S)`` of ``members`` members: the label most members
        chose (a region: called by more than half of them); ties go to the higher mean probability."""
        out = torch.empty(votes.shape[1:], dtype=_torch_dtype(self.label_dtype), device=votes.device)
        for part in slabs(votes.shape[1:], self.channels):
            v, p = votes[part], mean[part]
            if self.regions:
                margin = v - members / 2.0
                called = (margin > VOTE_TOLERANCE) | ((margin.abs() <= VOTE_TOLERANCE) & (p > 0.5))
                out[part] = self._labels_of(called, p)
            else:
                best = v.max(dim=0, keepdim=True).values
                tied = v >= best - VOTE_TOLERANCE
                out[part] = argmax_channels(torch.where(tied, p, torch.full_like(p, -1.0)), out.dtype)
        return out

    def _labels_of(self, called: torch.Tensor | None, probabilities: torch.Tensor) -> torch.Tensor:
        dtype = _torch_dtype(self.label_dtype)
        if called is None:
            return argmax_channels(probabilities, dtype)
        labels = torch.zeros(probabilities.shape[1:], dtype=dtype, device=probabilities.device)
        for region, value in enumerate(self.region_order or ()):
            labels[called[region]] = value
        return labels

    def entropy(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Voxelwise predictive entropy in nats ``(*S)`` float32: of the class distribution (softmax), or the
        sum of each channel's binary entropy (sigmoid). 0 = certain."""
        out = torch.empty(probabilities.shape[1:], dtype=torch.float32, device=probabilities.device)
        for part in slabs(probabilities.shape[1:], self.channels):
            p = probabilities[part].float().clamp(1e-12, 1.0)
            if self.activation == "softmax":
                out[part] = -(p * p.log()).sum(dim=0)
            else:
                q = (1.0 - p).clamp_min(1e-12)
                out[part] = -(p * p.log() + q * q.log()).sum(dim=0)
        return out

    def masks(self, labels: torch.Tensor) -> torch.Tensor:
        """The scored structures of a label map ``(*S)`` as a boolean stack ``(len(structures), *S)``."""
        if self.regions:
            return torch.stack([_isin(labels, values) for values in self.regions])
        return torch.stack([labels == k for k in range(1, self.channels)])


def argmax_channels(values: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values.argmax(dim=0)`` (the first maximum wins) for ``(P, *S)``, as ``P - 1`` elementwise passes: torch's
    argmax over the leading axis of a strided slab is about 20x slower (1.4 s against 0.07 s for 2 x 8.4 M)."""
    best = values[0].clone()
    labels = torch.zeros(values.shape[1:], dtype=dtype, device=values.device)
    for k in range(1, values.shape[0]):
        better = values[k] > best
        labels[better] = k
        torch.maximum(best, values[k], out=best)
    return labels


def _isin(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    return torch.isin(labels, torch.as_tensor(list(values), dtype=labels.dtype, device=labels.device))


def _torch_dtype(dtype: type) -> torch.dtype:
    return torch.uint8 if dtype is np.uint8 else torch.int16
