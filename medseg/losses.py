"""Losses by name: ``create_loss("dice_ce", class_weights=[0.2, 1.0, 1.0])``; ``list_losses()`` names them.

Every loss is called the same way, ``loss(logits, target)``, and returns a scalar (mean reduction).

* ``logits``: raw scores, ``(B, C, *spatial)`` for segmentation or ``(B, C)`` for classification.
* ``target``, either
  - a label map / class indices ``(B, 1, *spatial)``, ``(B, *spatial)`` or ``(B,)``: whole numbers ``0..C-1``
    (floats holding whole numbers are accepted, as MONAI loaders produce them). The loss one-hot encodes it
    over the C channels. With a single sigmoid channel (C = 1) the values are ``{0, 1}`` and 1 is foreground;
  - a dense target ``(B, C, *spatial)`` or ``(B, C)`` with values in ``[0, 1]``: one-/multi-hot for sigmoid,
    class probabilities for softmax.
* ``activation``: ``"softmax"`` (default; classes exclusive, needs C >= 2) or ``"sigmoid"`` (each channel an
  independent binary label: binary or multi-label). ``bce``/``dice_bce`` are sigmoid, ``ce``/``dice_ce``
  softmax, ``dice``/``focal`` take either.

Which likelihood a loss is the negative log of (minimising an NLL fits a probability model of the labels):
``bce`` a Bernoulli per voxel/label; ``ce`` a categorical (multinoulli) per voxel/case; ``focal`` none (a
re-weighted CE); ``dice`` none (a differentiable surrogate of a set-overlap measure); ``dice_ce``/``dice_bce``
the sum of a likelihood term and a non-likelihood term. (Mean squared error, not offered here, would be the
NLL of a Gaussian with fixed variance.)

Options (keyword arguments of ``create_loss``; one that a loss does not use is refused):
``activation``, ``class_weights`` (length C), ``pos_weight`` (length C, BCE terms), ``include_background``
(Dice terms), ``smooth`` (Dice), ``gamma`` (focal), ``lambda_dice``/``lambda_ce`` (compounds), ``num_classes``
(optional: checks lengths at construction and the channel count at call time).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai import losses as monai_losses
from torch import Tensor, nn

__all__ = [
    "BCELoss",
    "CompoundLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "create_loss",
    "deep_supervision_loss",
    "deep_supervision_weights",
    "list_losses",
    "loss_activation",
]

ACTIVATIONS = ("softmax", "sigmoid")


def _as_weights(option: str, values: Sequence[float] | None, num_classes: int | None) -> Tensor | None:
    """Validate per-class weights. Returns ``(C,)`` float tensor or None."""
    if values is None:
        return None
    weights = torch.as_tensor(list(values), dtype=torch.float32)
    if weights.ndim != 1 or weights.numel() == 0:
        raise ValueError(f"{option} must be a non-empty list of floats (one per class), got {values!r}")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError(f"{option} must be finite and >= 0, got {values!r}")
    if num_classes is not None and weights.numel() != num_classes:
        raise ValueError(f"{option} has {weights.numel()} entries but num_classes={num_classes}")
    return weights


def _channel_view(weights: Tensor, ndim: int) -> Tensor:
    """``(C,)`` -> ``(1, C, 1, ...)`` broadcastable against a ``(B, C, *spatial)`` tensor of ``ndim`` dims."""
    return weights.view(1, -1, *([1] * (ndim - 2)))


class _Target:
    """A validated target: ``labels`` ``(B, *spatial)`` long (None if dense was given) and the dense form."""

    def __init__(self, labels: Tensor | None, dense: Tensor | None) -> None:
        self.labels = labels
        self._dense = dense

    def dense(self, logits: Tensor) -> Tensor:
        """One-/multi-hot target ``(B, C, *spatial)`` in the dtype of ``logits``."""
        if self._dense is None:  # labels exist and C >= 2 (with C = 1 a 1-channel target is already dense)
            assert self.labels is not None
            shape = (self.labels.shape[0], logits.shape[1], *self.labels.shape[1:])
            dense = torch.zeros(shape, dtype=logits.dtype, device=logits.device)
            self._dense = dense.scatter_(1, self.labels.unsqueeze(1), 1.0)  # 2.5x faster than F.one_hot + cast
        return self._dense.to(logits.dtype)


def _prepare_target(logits: Tensor, target: Tensor) -> _Target:
    """Check ``target`` against ``logits`` ``(B, C, *spatial)`` and tell label maps from dense targets."""
    batch, num_classes, spatial = logits.shape[0], logits.shape[1], tuple(logits.shape[2:])
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.ndim != logits.ndim or target.shape[0] != batch or tuple(target.shape[2:]) != spatial:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: expected a label "
            f"map {(batch, 1, *spatial)} (or {(batch, *spatial)}) or a dense target "
            f"{(batch, num_classes, *spatial)}"
        )
    if target.dtype == torch.bool:
        target = target.long()
    if target.shape[1] == num_classes:  # dense (includes C = 1 sigmoid, where label map and dense coincide)
        low, high = torch.aminmax(target.float())
        if low < 0 or high > 1:
            raise ValueError(
                f"dense target {tuple(target.shape)} must hold values in [0, 1] (a 1-channel label map for 1 "
                f"sigmoid channel: 0 or 1), found [{low.item()}, {high.item()}]"
            )
        return _Target(labels=None, dense=target)
    if target.shape[1] != 1:
        raise ValueError(
            f"target has {target.shape[1]} channels but logits have {num_classes}: give a label map with 1 "
            f"channel or a dense target with {num_classes}"
        )
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise ValueError("label map target holds non-integer values; give class indices 0..C-1")
    labels = target[:, 0].long()
    low, high = torch.aminmax(labels)
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"label map values must be in 0..{num_classes - 1} (logits have {num_classes} channels), "
            f"found {low.item()}..{high.item()}"
        )
    return _Target(labels=labels, dense=None)


class _LossBase(nn.Module):
    """Shared option checks; subclasses implement ``_loss(logits, target)``."""

    def __init__(
        self, activation: str, class_weights: Sequence[float] | None, num_classes: int | None
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_classes == 1 and activation == "softmax":
            raise ValueError(
                "num_classes=1: softmax needs >= 2 classes; use activation='sigmoid' for one channel"
            )
        self.activation = activation
        self.num_classes = num_classes
        self.register_buffer(
            "class_weights", _as_weights("class_weights", class_weights, num_classes), persistent=False
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``logits`` ``(B, C[, *spatial])`` against ``target`` (module doc). Returns ``()``."""
        self._check_logits(logits)
        return self._loss(logits, _prepare_target(logits, target))

    def _check_logits(self, logits: Tensor) -> None:
        name = type(self).__name__
        if logits.ndim < 2:
            raise ValueError(f"{name}: logits must be (B, C[, *spatial]), got shape {tuple(logits.shape)}")
        channels = logits.shape[1]
        if self.num_classes is not None and channels != self.num_classes:
            raise ValueError(f"{name}: logits have {channels} channels but num_classes={self.num_classes}")
        if self.activation == "softmax" and channels < 2:
            raise ValueError(
                f"{name} uses softmax over channels, which needs >= 2, but logits {tuple(logits.shape)} have "
                "1 channel; for a single output channel use activation='sigmoid' (or 'bce' / 'dice_bce')"
            )
        for option, weights in (
            ("class_weights", self.class_weights),
            ("pos_weight", getattr(self, "pos_weight", None)),
        ):
            if weights is not None and weights.numel() != channels:
                raise ValueError(
                    f"{name}: {option} has {weights.numel()} entries but logits have {channels} channels"
                )

    def _loss(self, logits: Tensor, target: _Target) -> Tensor:
        raise NotImplementedError


class CrossEntropyLoss(_LossBase):
    """Softmax cross-entropy: negative log-likelihood of a categorical (multinoulli) model of each voxel/case.

    Equals ``torch.nn.functional.cross_entropy(logits, labels, weight=class_weights)``: with a label map and
    class weights the mean divides by the summed weights of the true classes (torch's rule); with a dense
    (probability) target it divides by the number of voxels/cases.
    """

    def __init__(
        self,
        activation: str = "softmax",
        class_weights: Sequence[float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if activation != "softmax":
            raise ValueError("'ce' is softmax cross-entropy; for sigmoid (binary / multi-label) use 'bce'")
        super().__init__(activation, class_weights, num_classes)

    def _loss(self, logits: Tensor, target: _Target) -> Tensor:
        goal = target.labels if target.labels is not None else target.dense(logits)
        weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        return F.cross_entropy(logits, goal, weight=weight)


class BCELoss(_LossBase):
    """Sigmoid binary cross-entropy: negative log-likelihood of a Bernoulli model of each voxel and channel.

    Equals ``F.binary_cross_entropy_with_logits(logits, onehot, weight=w, pos_weight=p)`` with ``w`` =
    ``class_weights`` viewed ``(1, C, 1, ...)`` (rescales every term of channel c) and ``p`` = ``pos_weight``
    viewed ``(C, 1, ...)`` (rescales only the positive term ``-y log sigmoid(x)`` of channel c, as in torch);
    the mean is over all ``B * C * voxels`` terms.
    """

    def __init__(
        self,
        activation: str = "sigmoid",
        class_weights: Sequence[float] | None = None,
        pos_weight: Sequence[float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if activation != "sigmoid":
            raise ValueError(
                "'bce' is sigmoid binary cross-entropy; for softmax (exclusive classes) use 'ce'"
            )
        super().__init__(activation, class_weights, num_classes)
        self.register_buffer(
            "pos_weight", _as_weights("pos_weight", pos_weight, num_classes), persistent=False
        )

    def _loss(self, logits: Tensor, target: _Target) -> Tensor:
        weight = None if self.class_weights is None else _channel_view(self.class_weights, logits.ndim)
        pos = None if self.pos_weight is None else _channel_view(self.pos_weight, logits.ndim)[0]
        return F.binary_cross_entropy_with_logits(logits, target.dense(logits), weight=weight, pos_weight=pos)


class FocalLoss(_LossBase):
    """Focal loss (``monai.losses.FocalLoss``): not a likelihood, a CE re-weighted by ``(1 - p_t)^gamma``.

    softmax: per voxel ``-sum_c w_c y_c (1 - p_c)^gamma log p_c``, averaged like :class:`CrossEntropyLoss`, so
    ``gamma=0`` gives exactly ``ce`` (class weights included). sigmoid: the per-channel binary form, mean over
    all terms, so ``gamma=0`` gives ``bce`` with the same ``class_weights``.
    """

    def __init__(
        self,
        activation: str = "softmax",
        class_weights: Sequence[float] | None = None,
        gamma: float = 2.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(activation, class_weights, num_classes)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.focal = monai_losses.FocalLoss(
            gamma=gamma, use_softmax=activation == "softmax", reduction="none"
        )

    def _loss(self, logits: Tensor, target: _Target) -> Tensor:
        terms = self.focal(logits, target.dense(logits))  # (B, C, *spatial)
        if self.class_weights is not None:
            terms = terms * _channel_view(self.class_weights, terms.ndim)
        if self.activation == "sigmoid":
            return terms.mean()
        per_voxel = terms.sum(1)
        if self.class_weights is not None and target.labels is not None:
            return per_voxel.sum() / self.class_weights[target.labels].sum()
        return per_voxel.mean()


class DiceLoss(_LossBase):
    """Soft Dice loss (``monai.losses.DiceLoss``), segmentation only: not a likelihood but ``1 - Dice``, a
    differentiable surrogate of set overlap. Mean over batch and channels of
    ``1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)``, each channel scaled by its class weight.
    """

    def __init__(
        self,
        activation: str = "softmax",
        class_weights: Sequence[float] | None = None,
        include_background: bool = True,
        smooth: float = 1e-5,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(activation, class_weights, num_classes)
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        if not include_background and num_classes == 1:
            raise ValueError("include_background=False drops channel 0, the only one when num_classes=1")
        weight = self.class_weights
        if weight is not None and not include_background:
            weight = weight[1:]
        self.include_background = include_background
        self.dice = monai_losses.DiceLoss(
            include_background=include_background,
            sigmoid=activation == "sigmoid",
            softmax=activation == "softmax",
            smooth_nr=smooth,
            smooth_dr=smooth,
            weight=weight,
        )

    def _check_logits(self, logits: Tensor) -> None:
        if logits.ndim < 3:
            raise ValueError(
                "Dice losses are for segmentation: logits must be (B, C, *spatial), got "
                f"{tuple(logits.shape)}; for classification use 'ce', 'focal' or 'bce'"
            )
        super()._check_logits(logits)
        if not self.include_background and logits.shape[1] == 1:
            raise ValueError("include_background=False drops channel 0, but logits have only 1 channel")

    def _loss(self, logits: Tensor, target: _Target) -> Tensor:
        return self.dice(logits, target.dense(logits))


class CompoundLoss(nn.Module):
    """``lambda_dice * dice + lambda_ce * nll``: the sum of a non-likelihood term (Dice) and a likelihood term
    (CE: categorical, or BCE: Bernoulli). Called like every loss: ``(logits, target) -> ()``.
    """

    def __init__(
        self,
        dice: DiceLoss,
        nll: CrossEntropyLoss | BCELoss,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0 or lambda_dice + lambda_ce == 0:
            raise ValueError(
                f"lambda_dice and lambda_ce must be >= 0 and not both 0, got {lambda_dice}, {lambda_ce}"
            )
        self.dice, self.nll = dice, nll
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``logits`` ``(B, C, *spatial)`` against ``target`` (see module doc). Returns ``()``."""
        self.dice._check_logits(logits)
        self.nll._check_logits(logits)
        prepared = _prepare_target(logits, target)
        dice = self.dice._loss(logits, prepared)
        return self.lambda_dice * dice + self.lambda_ce * self.nll._loss(logits, prepared)


def _dice_ce(
    activation: str = "softmax",
    class_weights: Sequence[float] | None = None,
    include_background: bool = True,
    smooth: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    num_classes: int | None = None,
) -> CompoundLoss:
    if activation != "softmax":
        raise ValueError("'dice_ce' is softmax Dice + cross-entropy; for sigmoid use 'dice_bce'")
    dice = DiceLoss(activation, class_weights, include_background, smooth, num_classes)
    ce = CrossEntropyLoss(activation, class_weights, num_classes)
    return CompoundLoss(dice, ce, lambda_dice, lambda_ce)


def _dice_bce(
    activation: str = "sigmoid",
    class_weights: Sequence[float] | None = None,
    pos_weight: Sequence[float] | None = None,
    include_background: bool = True,
    smooth: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    num_classes: int | None = None,
) -> CompoundLoss:
    if activation != "sigmoid":
        raise ValueError("'dice_bce' is sigmoid Dice + binary cross-entropy; for softmax use 'dice_ce'")
    dice = DiceLoss(activation, class_weights, include_background, smooth, num_classes)
    bce = BCELoss(activation, class_weights, pos_weight, num_classes)
    return CompoundLoss(dice, bce, lambda_dice, lambda_ce)


def deep_supervision_weights(scales: int) -> list[float]:
    """Weight of each output of a deep-supervision list, full resolution first: ``2**-k``, normalised to sum 1
    (nnU-Net's halving; unlike nnU-Net the lowest resolution keeps its weight)."""
    if scales < 1:
        raise ValueError(f"deep supervision needs at least one output, got {scales}")
    raw = [2.0**-k for k in range(scales)]
    return [w / sum(raw) for w in raw]


def nearest_resize(target: Tensor, size: Sequence[int]) -> Tensor:
    """``target`` ``(..., *spatial)`` resized on its last ``len(size)`` axes by nearest neighbour, any dtype.

    Voxel ``i`` of an axis of length ``n`` resized to ``m`` takes source voxel ``floor(i * n / m)`` (torch's
    ``mode="nearest"``; a factor-2 reduction keeps every even voxel). Labels are picked, never interpolated.
    """
    spatial = tuple(target.shape[target.ndim - len(size):])
    if spatial == tuple(size):
        return target
    for axis, (n, m) in enumerate(zip(spatial, size, strict=True), start=target.ndim - len(size)):
        index = torch.div(torch.arange(m, device=target.device) * n, m, rounding_mode="floor")
        target = target.index_select(axis, index)
    return target


def deep_supervision_loss(loss: nn.Module, logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
    """``loss`` of a network output, in float32: one tensor as is, or a deep-supervision list (full resolution
    first, each ``(B, C, *spatial_k)``) as ``sum_k w_k * loss(logits_k, target resized to spatial_k)``, with
    :func:`deep_supervision_weights` and the target resized by :func:`nearest_resize`.

    Args:
        loss: a loss of :func:`create_loss` (or any ``(logits, target) -> ()`` module).
        logits: ``(B, C, *spatial)`` or a list of them.
        target: the target at full resolution (label map or dense, see the module doc).

    Returns:
        The scalar loss.
    """
    if isinstance(logits, Tensor):
        return loss(logits.float(), target)
    if len(logits) == 0:
        raise ValueError("deep supervision: the network returned an empty list of outputs")
    total = logits[0].new_zeros((), dtype=torch.float32)
    for weight, scale in zip(deep_supervision_weights(len(logits)), logits, strict=True):
        total = total + weight * loss(scale.float(), nearest_resize(target, scale.shape[2:]))
    return total


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "dice": DiceLoss,
    "bce": BCELoss,
    "ce": CrossEntropyLoss,
    "dice_ce": _dice_ce,
    "dice_bce": _dice_bce,
    "focal": FocalLoss,
}


def loss_activation(name: str, options: dict[str, Any] | None = None) -> str:
    """The output activation a loss trains the network for (``"softmax"`` or ``"sigmoid"``): the loss's
    ``activation`` option when given, else that loss's default. Prediction applies the same one.

    Raises:
        ValueError: unknown loss name.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(list_losses())}")
    given = (options or {}).get("activation")
    if given is not None:
        return str(given)
    return str(inspect.signature(_BUILDERS[name]).parameters["activation"].default)


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`, sorted."""
    return sorted(_BUILDERS)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by name.

    Args:
        name: one of :func:`list_losses`.
        **kwargs: options of that loss (see the module docstring); any other option is refused.

    Returns:
        A module called as ``loss(logits, target)`` returning a scalar tensor.

    Raises:
        ValueError: unknown name, unknown option, or options that contradict each other.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(list_losses())}")
    builder = _BUILDERS[name]
    valid = list(inspect.signature(builder).parameters)
    if "softmax" in kwargs or "sigmoid" in kwargs:
        both = (
            "; softmax and sigmoid also contradict each other"
            if kwargs.get("softmax") and kwargs.get("sigmoid")
            else ""
        )
        raise ValueError(
            f"loss {name!r} takes activation='softmax' or activation='sigmoid', not MONAI-style "
            f"softmax=/sigmoid= flags{both}"
        )
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"loss {name!r} does not take option(s) {unknown}; its options: {', '.join(valid)}")
    return builder(**kwargs)
