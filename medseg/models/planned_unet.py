"""``planned_unet``: an nnU-Net-style U-Net whose topology (kernels and strides per level) comes from a plan.

The network is MONAI ``DynUNet``: one input block (two convolutions at full resolution), one strided block per
down-sampling level, a strided bottleneck, transposed-convolution up-sampling blocks and a 1x1 output block.
Level ``i`` uses ``kernels[i]`` and ``strides[i]`` (one value per spatial axis); ``strides[0]`` is all 1, so
the output has the input's spatial size. ``medseg plan`` writes ``kernels`` and ``strides`` from the data set's
spacing, e.g. for 0.7 x 0.7 x 5 mm voxels::

    kernels = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]

Input sizes: every spatial size must be a multiple of :func:`planned_unet_min_size` (the product of the strides
along that axis). At that exact size the bottleneck is a single voxel, which instance norm refuses in training;
use patches of at least twice the minimum along one axis.

Encoder (what :func:`medseg.models.freeze_encoder` freezes): ``input_block``, every ``downsamples`` block and
the ``bottleneck``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import DynUNet
from torch import nn

from medseg.models.registry import LayerArg, check_dropout, resolve_act, resolve_norm

NAME = "planned_unet"
DEFAULT_LEVELS = 4  # resolution levels of the default topology (3 down-sampling steps)
DEFAULT_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}  # nnU-Net's width caps per spatial_dims
DEFAULT_NORM = "instance"
DEFAULT_ACT = "leakyrelu"
MIN_LEVELS = 3  # DynUNet: input block, at least one down-sampling block, bottleneck

Grid = list[list[int]]


def default_topology(spatial_dims: int, levels: int = DEFAULT_LEVELS) -> tuple[Grid, Grid]:
    """Isotropic topology used when no plan is given: 3-wide kernels, stride 2 below the first level.

    Args:
        spatial_dims: 2 or 3.
        levels: Number of resolution levels (``levels - 1`` down-sampling steps).

    Returns:
        ``(kernels, strides)``, each ``levels`` lists of ``spatial_dims`` ints.
    """
    kernels = [[3] * spatial_dims for _ in range(levels)]
    strides = [[1] * spatial_dims] + [[2] * spatial_dims for _ in range(levels - 1)]
    return kernels, strides


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_grid(option: str, grid: object, spatial_dims: int) -> Grid:
    """Validate ``grid`` as per-level lists of ``spatial_dims`` positive ints and return it as lists.

    Raises:
        ValueError: Not a non-empty sequence of sequences, a wrong entry length, or a non-positive value.
    """
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise ValueError(
            f"Model '{NAME}': '{option}' must be a non-empty list of per-level lists, got {grid!r}."
        )
    result: Grid = []
    for level, entry in enumerate(grid):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != spatial_dims:
            raise ValueError(
                f"Model '{NAME}': {option}[{level}] must have {spatial_dims} values (spatial_dims={spatial_dims}), "
                f"got {entry!r}."
            )
        if not all(_is_int(v) and v >= 1 for v in entry):
            raise ValueError(
                f"Model '{NAME}': {option}[{level}] must hold positive ints, got {list(entry)!r}."
            )
        result.append(list(entry))
    return result


def planned_unet_min_size(strides: Sequence[Sequence[int]]) -> list[int]:
    """Size every input axis of ``planned_unet`` must be a multiple of: the product of the strides per axis.

    Patch sizes (training patches and sliding-window ROIs) must be multiples of this; DynUNet's skip
    connections do not line up otherwise.

    Args:
        strides: Per-level strides as given to ``planned_unet`` (``len(strides[0])`` = spatial_dims).

    Returns:
        One int per spatial axis, e.g. ``[8, 8, 4]`` for strides ``[[1,1,1],[2,2,1],[2,2,2],[2,2,2]]``.

    Raises:
        ValueError: ``strides`` is empty, ragged or holds non-positive values.
    """
    if isinstance(strides, (str, bytes)) or not isinstance(strides, Sequence) or len(strides) == 0:
        raise ValueError(
            f"Model '{NAME}': 'strides' must be a non-empty list of per-level lists, got {strides!r}."
        )
    first = strides[0]
    spatial_dims = len(first) if isinstance(first, Sequence) else 0
    grid = _check_grid("strides", strides, spatial_dims)
    return [math.prod(level[axis] for level in grid) for axis in range(spatial_dims)]


def planned_unet_widths(levels: int, features: int, max_features: int) -> list[int]:
    """Feature widths per level: ``features * 2**i``, capped at ``max_features``.

    Args:
        levels: Number of resolution levels.
        features: Width of the first level.
        max_features: Cap on every width.

    Returns:
        ``levels`` widths, top level first.
    """
    return [min(features * 2**i, max_features) for i in range(levels)]


def _check_topology(spatial_dims: int, kernels: object, strides: object) -> tuple[Grid, Grid]:
    """Validate a plan's kernels and strides (or fill in the default) and return them as lists.

    Raises:
        ValueError: Only one of the two given, unequal lengths, fewer than 3 levels, wrong entry lengths,
            a first stride other than all 1, even kernels, or a stride too large for its kernel.
    """
    if kernels is None and strides is None:
        return default_topology(spatial_dims)
    if kernels is None or strides is None:
        raise ValueError(
            f"Model '{NAME}': give both 'kernels' and 'strides' (one list per level) or neither."
        )
    kernel_grid = _check_grid("kernels", kernels, spatial_dims)
    stride_grid = _check_grid("strides", strides, spatial_dims)
    if len(kernel_grid) != len(stride_grid):
        raise ValueError(
            f"Model '{NAME}': 'kernels' has {len(kernel_grid)} levels but 'strides' has {len(stride_grid)}; "
            f"give one kernel and one stride per level."
        )
    if len(stride_grid) < MIN_LEVELS:
        raise ValueError(
            f"Model '{NAME}': 'kernels'/'strides' need at least {MIN_LEVELS} levels (input, one down-sampling "
            f"level, bottleneck), got {len(stride_grid)}."
        )
    if any(s != 1 for s in stride_grid[0]):
        raise ValueError(
            f"Model '{NAME}': strides[0] must be all 1 (the first level does not down-sample), got {stride_grid[0]}."
        )
    for level, (kernel, stride) in enumerate(zip(kernel_grid, stride_grid, strict=True)):
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"Model '{NAME}': kernels[{level}] must be odd on every axis, got {kernel}.")
        if any(s > k + 1 for k, s in zip(kernel, stride, strict=True)):
            raise ValueError(
                f"Model '{NAME}': strides[{level}]={stride} is too large for kernels[{level}]={kernel} "
                f"(each stride must be <= kernel + 1)."
            )
    return kernel_grid, stride_grid


def check_topology(model: str, spatial_dims: int, kernels: object, strides: object) -> tuple[Grid, Grid]:
    """The checks of ``planned_unet``'s kernels and strides for another DynUNet-based model, errors naming ``model``.

    Raises:
        ValueError: as :func:`build_planned_unet` does for a bad topology, starting ``Model '<model>': ``.
    """
    try:
        return _check_topology(spatial_dims, kernels, strides)
    except ValueError as err:
        raise ValueError(str(err).replace(f"Model '{NAME}'", f"Model '{model}'", 1)) from None


def _positive_int(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Model '{NAME}': '{option}' must be a positive int, got {value!r}.")
    return value


def _check_widths(spatial_dims: int, features: object, max_features: object) -> tuple[int, int]:
    """Validate ``features``/``max_features`` (None = nnU-Net's cap for ``spatial_dims``) and return both.

    Raises:
        ValueError: Non-positive values, or ``max_features < features``.
    """
    first = _positive_int("features", features)
    cap = _positive_int("max_features", MAX_FEATURES[spatial_dims] if max_features is None else max_features)
    if cap < first:
        raise ValueError(f"Model '{NAME}': 'max_features' ({cap}) must be >= 'features' ({first}).")
    return first, cap


def _norm_name(norm: LayerArg | None, widths: Sequence[int]) -> LayerArg:
    """Shared norm vocabulary in DynUNet's ``norm_name`` form (None = instance); instance norm is affine."""
    resolved = resolve_norm(NAME, DEFAULT_NORM if norm is None else norm, widths)
    name, args = (resolved, {}) if isinstance(resolved, str) else resolved
    if name == "instance":
        args = {"affine": True, **args}
    return (name, args) if args else name


def build_planned_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    kernels: Sequence[Sequence[int]] | None = None,
    strides: Sequence[Sequence[int]] | None = None,
    features: int = DEFAULT_FEATURES,
    max_features: int | None = None,
    norm: LayerArg | None = DEFAULT_NORM,
    act: LayerArg | None = DEFAULT_ACT,
    dropout: float = 0.0,
    deep_supervision: bool = False,
) -> DynUNet:
    """nnU-Net-style U-Net (MONAI ``DynUNet``) with per-level kernels and strides from ``medseg plan``.

    Deep supervision: MONAI ``DynUNet(deep_supervision=True)`` returns, in training mode only, one stacked
    tensor ``(B, 1 + n_heads, C, *S)``: index 0 of dim 1 is the full-resolution output, the others are the
    lower-resolution heads interpolated (nearest) up to ``S``; a loss would ``torch.unbind(out, dim=1)`` and
    weight the terms. In eval mode it returns ``(B, C, *S)``. medseg's training step computes one loss on a
    ``(B, C, *S)`` output, so ``deep_supervision=True`` is refused until the losses consume the stack.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (classes, background included).
        kernels: Kernel size per level, one value per spatial axis, all odd; e.g.
            ``[[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]``. None (with ``strides`` None): 4 levels of 3s.
        strides: Stride per level, same length as ``kernels``; ``strides[0]`` all 1, each stride at most
            ``kernel + 1``. None: ``[[1, ...], [2, ...], [2, ...], [2, ...]]``. Inputs must be multiples of
            :func:`planned_unet_min_size` per axis.
        features: Width of the first level; doubles per level.
        max_features: Cap on the width; None = 320 in 3D, 512 in 2D (nnU-Net).
        norm: ``"instance"`` (affine, as nnU-Net), ``"batch"``, ``"group"`` or ``(name, {args})``; None = default.
        act: Activation name or ``(name, {args})``; default LeakyReLU(0.01) as nnU-Net; None = default.
        dropout: Dropout in every convolution block (0 = none).
        deep_supervision: Must be False for now (see above).

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)`` logits.

    Raises:
        ValueError: A bad option; the message names it.
    """
    if deep_supervision is not False:
        raise ValueError(
            f"Model '{NAME}': deep_supervision=True is not wired into medseg's losses yet (training computes one "
            f"loss on a (B, C, *S) output); leave 'deep_supervision' False."
        )
    kernel_grid, stride_grid = _check_topology(spatial_dims, kernels, strides)
    first, cap = _check_widths(spatial_dims, features, max_features)
    widths = planned_unet_widths(len(stride_grid), first, cap)
    rate = check_dropout(NAME, dropout)
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_grid,
        strides=stride_grid,
        upsample_kernel_size=stride_grid[1:],
        filters=widths,
        dropout=rate if rate > 0 else None,
        norm_name=_norm_name(norm, widths),
        act_name=resolve_act(NAME, DEFAULT_ACT if act is None else act),
    )


def planned_unet_encoder(net: nn.Module) -> list[nn.Module]:
    """Down-sampling path of a ``DynUNet``: the input block, every down-sampling block and the bottleneck."""
    if not isinstance(net, DynUNet):
        raise TypeError(f"planned_unet_encoder expects monai DynUNet, got {type(net).__name__}.")
    return [net.input_block, *net.downsamples, net.bottleneck]


UNSUPPORTED: dict[str, str] = {
    "channels": "planned_unet widths are 'features' (first level) doubling per level up to 'max_features'.",
    "base_channels": "use 'features' (first level width) and 'max_features' (width cap).",
    "depth": "the number of levels is len(kernels) == len(strides), as written by 'medseg plan'.",
}
DESCRIPTION = "nnU-Net-style U-Net (MONAI DynUNet) with planned per-level kernels and strides."
