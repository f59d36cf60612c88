"""MONAI networks behind medseg's option names: ``dynunet``, ``segresnet``, ``swin_unetr`` and ``densenet121``.

* ``dynunet``: MONAI ``DynUNet`` (nnU-Net's network) with medseg's ``channels``/``depth``/``base_channels``; its
  topology is ``planned_unet``'s (:func:`~medseg.models.planned_unet.default_topology`, or ``kernels`` and
  ``strides`` checked as ``planned_unet`` checks them). With ``deep_supervision=True`` it returns, in training
  mode, a list of logits, full resolution first (every head already up-sampled to the input size by MONAI); in
  eval mode one tensor. Input sizes: multiples of the product of the strides (``2**depth`` by default).
* ``segresnet``: MONAI ``SegResNet`` (Myronenko 2018, without the VAE branch); widths ``base_channels * 2**i``.
  Input sizes: multiples of ``2**depth``.
* ``swin_unetr``: MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022), 2D or 3D, never pretrained (nothing is
  downloaded). A patch embedding and four Swin stages halve the input five times, so every side of the patch
  (``data.patch_size``, the sliding-window roi) must be a multiple of 32; ``feature_size`` a multiple of 12.
* ``densenet121``: MONAI ``DenseNet121`` (blocks 6, 12, 24, 16) as a classifier with medseg's ``fc`` head. Its stem
  and transitions halve the input 5 times: every side at least 32.

Encoders (what :func:`medseg.models.freeze_encoder` freezes): ``dynunet`` as ``planned_unet``; ``segresnet``
its first convolution and down-sampling path; ``swin_unetr`` the Swin transformer and the convolution blocks of
its skip connections (``encoder1..4``, ``encoder10``); ``densenet121`` everything but ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DenseNet, DynUNet, SegResNet
from torch import nn

from medseg.models.classification import ClassifierHead, classifier_encoder
from medseg.models.planned_unet import check_topology, default_topology, planned_unet_encoder
from medseg.models.registry import (
    LayerArg,
    ModelSpec,
    check_dropout,
    monai_norm,
    resolve_act,
    resolve_channels,
    resolve_norm,
)
from medseg.models.swin_unetr import build_swin_unetr, swin_unetr_encoder

# -- dynunet --------------------------------------------------------------------------------------------------


class DynUNetNet(DynUNet):
    """MONAI ``DynUNet`` whose deep-supervision output is a list: ``[full resolution, coarser heads...]``
    (each ``(B, C, *S)``) in training mode, one ``(B, C, *S)`` tensor in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = super().forward(x)
        if self.training and self.deep_supervision:
            return list(out.unbind(1))
        return out


def build_dynunet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    depth: int | None = None,
    base_channels: int | None = None,
    kernels: Sequence[Sequence[int]] | None = None,
    strides: Sequence[Sequence[int]] | None = None,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    res_block: bool = False,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
) -> DynUNetNet:
    """MONAI ``DynUNet``, nnU-Net's U-Net: two convolutions per level, strided down-sampling, transposed up-sampling.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (classes, background included).
        channels: Width per level, top first (one per level of ``strides``); default ``(16, 32, 64, 128, 256)``.
        depth: Down-sampling steps (default 4), with ``base_channels`` (default 16). DynUNet needs a strided
            bottleneck below at least one down-sampling block; with ``depth=1`` the bottleneck is not strided.
        base_channels: Top-level width when ``channels`` is not given.
        kernels: Kernel per level and axis, as ``planned_unet`` takes them (e.g. from ``medseg plan``); with
            ``strides``. None: 3 on every axis.
        strides: Stride per level and axis, ``strides[0]`` all 1. None: 2 on every axis below the first level.
        norm: ``"instance"`` (default, affine), ``"batch"``, ``"group"`` or ``(name, {args})``.
        act: Activation; default LeakyReLU(0.01).
        dropout: Dropout in every convolution block.
        res_block: Residual convolution blocks.
        deep_supervision: In training mode, return the full-resolution logits and ``deep_supr_num`` coarser
            heads (up-sampled to the input size) as a list, full resolution first.
        deep_supr_num: Number of coarser heads, at least 1 and below the number of up-sampling levels.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)`` (a list of those with deep supervision
        in training mode).
    """
    name = "dynunet"
    if kernels is not None or strides is not None:
        kernel_grid, stride_grid = check_topology(name, spatial_dims, kernels, strides)
        levels = len(stride_grid)
        if depth is not None and depth != levels - 1:
            raise ValueError(f"Model '{name}': depth={depth} disagrees with the {levels} levels of 'strides'.")
        if channels is not None and len(channels) != levels:
            raise ValueError(f"Model '{name}': 'channels' needs one width per level of 'strides' ({levels}), "
                             f"got {list(channels)}.")
        widths = list(resolve_channels(name, channels, levels - 1, base_channels, default_depth=4, default_base=16))
    else:
        widths = list(resolve_channels(name, channels, depth, base_channels, default_depth=4, default_base=16))
        if len(widths) < 2:
            raise ValueError(f"Model '{name}' needs at least one down-sampling level (depth >= 1).")
        kernel_grid, stride_grid = default_topology(spatial_dims, len(widths))
        if len(widths) == 2:  # DynUNet needs a bottleneck below one down-sampling block: an unstrided one
            kernel_grid.append([3] * spatial_dims)
            stride_grid.append([1] * spatial_dims)
            widths.append(widths[-1])
    upsampling_levels = len(stride_grid) - 1
    if deep_supervision and not 1 <= deep_supr_num < upsampling_levels:
        raise ValueError(f"Model '{name}': deep_supr_num must be between 1 and {upsampling_levels - 1} "
                         f"(below the {upsampling_levels} up-sampling levels), got {deep_supr_num!r}.")
    rate = check_dropout(name, dropout)
    return DynUNetNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_grid,
        strides=stride_grid,
        upsample_kernel_size=stride_grid[1:],
        filters=widths,
        dropout=rate if rate > 0 else None,
        norm_name=monai_norm(name, norm, "instance", widths),
        act_name=resolve_act(name, "leakyrelu" if act is None else act),
        deep_supervision=bool(deep_supervision),
        deep_supr_num=deep_supr_num,
        res_block=bool(res_block),
    )


# -- segresnet ------------------------------------------------------------------------------------------------

SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4)  # MONAI's default: residual blocks per level (deeper levels repeat 4)


def build_segresnet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    depth: int | None = None,
    base_channels: int | None = None,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    blocks_down: Sequence[int] | None = None,
    blocks_up: Sequence[int] | None = None,
    upsample: str = "nontrainable",
) -> SegResNet:
    """MONAI ``SegResNet``: residual blocks, strided-convolution down-sampling, additive skip connections.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        depth: Down-sampling steps (default 3, or ``len(blocks_down) - 1``).
        base_channels: Top-level width (MONAI ``init_filters``, default 8); level ``i`` has ``base * 2**i``.
        norm: ``"group"`` (default; the largest group count <= 8 dividing every width), ``"batch"``,
            ``"instance"`` or ``(name, {args})``.
        act: Activation; default ReLU.
        dropout: Dropout after the first convolution (MONAI ``dropout_prob``).
        blocks_down: Residual blocks per level, top first; default ``(1, 2, 2, 4)`` cut or extended to ``depth``.
        blocks_up: Residual blocks per decoder level; default one each.
        upsample: ``"nontrainable"`` (trilinear/bilinear), ``"deconv"`` or ``"pixelshuffle"``.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """
    name = "segresnet"
    if blocks_down is not None:
        if depth is not None and depth != len(blocks_down) - 1:
            raise ValueError(f"Model '{name}': depth={depth} disagrees with blocks_down={list(blocks_down)} "
                             f"(len(blocks_down) must be depth + 1).")
        depth = len(blocks_down) - 1
    widths = resolve_channels(name, None, depth, base_channels, default_depth=3, default_base=8)
    depth = len(widths) - 1
    if depth < 1:
        raise ValueError(f"Model '{name}' needs at least one down-sampling level (depth >= 1).")
    down = tuple(blocks_down) if blocks_down is not None else (SEGRESNET_BLOCKS_DOWN + (4,) * depth)[: depth + 1]
    up = tuple(blocks_up) if blocks_up is not None else (1,) * depth
    if len(up) != depth or not all(isinstance(b, int) and b >= 1 for b in (*down, *up)):
        raise ValueError(f"Model '{name}': blocks_down ({list(down)}) and blocks_up ({list(up)}) need positive "
                         f"ints, {depth + 1} and {depth} of them.")
    if upsample not in ("nontrainable", "deconv", "pixelshuffle"):
        raise ValueError(f"Model '{name}': upsample must be nontrainable, deconv or pixelshuffle, got {upsample!r}.")
    rate = check_dropout(name, dropout)
    return SegResNet(
        spatial_dims=spatial_dims,
        init_filters=widths[0],
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=rate if rate > 0 else None,
        act=resolve_act(name, "relu" if act is None else act),
        norm=monai_norm(name, norm, "group", widths),
        blocks_down=down,
        blocks_up=up,
        upsample_mode=upsample,
    )


def segresnet_encoder(net: nn.Module) -> list[nn.Module]:
    """Encoder of a MONAI ``SegResNet``: its first convolution and every down-sampling level."""
    if not isinstance(net, SegResNet):
        raise TypeError(f"segresnet_encoder expects monai SegResNet, got {type(net).__name__}.")
    return [net.convInit, net.down_layers]


# -- densenet121 ----------------------------------------------------------------------------------------------

DENSENET121_BLOCKS = (6, 12, 24, 16)


class DenseNetClassifier(nn.Module):
    """MONAI ``DenseNet``'s dense blocks (``features``), its final activation and global pooling (``pool``) and a
    :class:`~medseg.models.classification.ClassifierHead` (``fc``) in place of MONAI's ``class_layers.out``."""

    def __init__(self, net: DenseNet, out_channels: int, dropout: float) -> None:
        super().__init__()
        head = net.class_layers
        self.features = net.features
        self.pool = nn.Sequential(*[module for key, module in head.named_children() if key != "out"])
        self.fc = ClassifierHead(head.out.in_features, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S)`` -> ``(B, out_channels)`` logits."""
        return self.fc(self.pool(self.features(x)))


def densenet_widths(init: int, growth: int, bn_size: int, blocks: Sequence[int]) -> list[int]:
    """Every channel count a norm layer of a DenseNet sees (for the group count of ``norm="group"``)."""
    widths, width = [init, bn_size * growth], init
    for index, layers in enumerate(blocks):
        widths += [width + layer * growth for layer in range(layers + 1)]
        width += layers * growth
        if index < len(blocks) - 1:
            width //= 2
    return widths


def build_densenet121(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    base_channels: int | None = None,
    growth_rate: int | None = None,
    bn_size: int = 4,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    dense_dropout: float = 0.0,
) -> DenseNetClassifier:
    """MONAI ``DenseNet121`` (dense blocks of 6, 12, 24, 16 layers) as a classifier; never pretrained.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Number of classes.
        base_channels: Width of the stem (MONAI ``init_features``, default 64).
        growth_rate: Channels each dense layer adds; default ``base_channels // 2`` (32 for the default stem, as
            DenseNet-121's stem is twice its growth rate).
        bn_size: Bottleneck width of a dense layer, in multiples of ``growth_rate``.
        norm: ``"batch"`` (default), ``"instance"`` or ``"group"``.
        act: Activation; default ReLU.
        dropout: Dropout before the linear head.
        dense_dropout: Dropout after every dense layer (MONAI ``dropout_prob``).

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels)``; ``fc`` is a ``ClassifierHead``.
    """
    name = "densenet121"
    init = resolve_channels(name, None, 0, base_channels, default_depth=0, default_base=64)[0]
    growth_rate = max(1, init // 2) if growth_rate is None else growth_rate
    for option, value in (("growth_rate", growth_rate), ("bn_size", bn_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Model '{name}': '{option}' must be a positive int, got {value!r}.")
    widths = densenet_widths(init, growth_rate, bn_size, DENSENET121_BLOCKS)
    net = DenseNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        init_features=init,
        growth_rate=growth_rate,
        block_config=DENSENET121_BLOCKS,
        bn_size=bn_size,
        act=resolve_act(name, "relu" if act is None else act),
        norm=resolve_norm(name, "batch" if norm is None else norm, widths),
        dropout_prob=check_dropout(name, dense_dropout),
    )
    return DenseNetClassifier(net, out_channels, check_dropout(name, dropout))


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="dynunet",
        task="segmentation",
        builder=build_dynunet,
        encoder=planned_unet_encoder,
        description="nnU-Net's U-Net (MONAI DynUNet), optional residual blocks and deep supervision.",
    ),
    ModelSpec(
        name="segresnet",
        task="segmentation",
        builder=build_segresnet,
        encoder=segresnet_encoder,
        unsupported={"channels": "SegResNet doubles its width per level: set 'base_channels' (MONAI init_filters) "
                                 "and 'depth'."},
        description="SegResNet (Myronenko, MONAI): residual encoder-decoder with additive skips.",
    ),
    ModelSpec(
        name="swin_unetr",
        task="segmentation",
        builder=build_swin_unetr,
        encoder=swin_unetr_encoder,
        unsupported={
            "depth": "SwinUNETR always halves its input 5 times (patch embedding + 4 Swin stages); set 'depths' "
                     "(blocks per stage) instead.",
            "base_channels": "SwinUNETR's first width is 'feature_size' (a multiple of 12).",
            "act": "MONAI SwinUNETR fixes GELU in its transformer and LeakyReLU in its convolution blocks.",
        },
        description="Swin UNETR (MONAI SwinUNETR): Swin transformer encoder, U-Net decoder; patches of 32k.",
    ),
    ModelSpec(
        name="densenet121",
        task="classification",
        builder=build_densenet121,
        encoder=classifier_encoder,
        unsupported={
            "channels": "DenseNet widths grow by 'growth_rate' per layer: set 'base_channels' and 'growth_rate'.",
            "depth": "the depth of DenseNet121 is fixed by its name (dense blocks of 6, 12, 24, 16 layers).",
        },
        description="DenseNet-121 classifier (MONAI DenseNet121), 2D or 3D.",
    ),
)
