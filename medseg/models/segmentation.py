"""Segmentation networks: MONAI UNet, BasicUNetPlusPlus and AttentionUnet behind one set of option names.

Every network maps ``(B, in_channels, *S) -> (B, out_channels, *S)`` logits, with ``S = (H, W)`` or
``(H, W, D)``; each spatial size must be divisible by ``2**depth`` (``2**4 = 16`` for ``unetpp``).

Encoders (what :func:`medseg.models.freeze_encoder` freezes):

* ``unet``: MONAI nests ``Sequential(down, SkipConnection(<inner>), up)``; the encoder is every ``down`` layer
  along that nesting plus the innermost bottleneck layer.
* ``attention_unet``: ``model = Sequential(head ConvBlock, AttentionLayer, 1x1 conv)``; each
  ``AttentionLayer.submodule`` is ``Sequential(strided ConvBlock, <inner AttentionLayer>)`` or, at the bottom,
  the bottleneck ``ConvBlock``. The encoder is the head plus those ConvBlocks.
* ``unetpp``: the backbone column ``conv_0_0`` ... ``conv_4_0``.
* ``planned_unet``: see :mod:`medseg.models.planned_unet` (per-level kernels and strides; input sizes must be
  multiples of :func:`~medseg.models.planned_unet.planned_unet_min_size`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, UNet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import nn

from medseg.models import planned_unet
from medseg.models.registry import (
    LayerArg,
    ModelSpec,
    check_dropout,
    resolve_act,
    resolve_channels,
    resolve_norm,
)

DEFAULT_DEPTH = 3
DEFAULT_BASE_CHANNELS = 16
UNETPP_DEPTH = 4  # fixed by MONAI BasicUNetPlusPlus (five encoder levels)


def build_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    depth: int | None = None,
    base_channels: int | None = None,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    num_res_units: int = 0,
    kernel_size: int = 3,
    up_kernel_size: int = 3,
) -> UNet:
    """MONAI ``UNet`` with stride 2 at every level.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (classes, background included).
        channels: Widths per level, top first; default ``(16, 32, 64, 128)``.
        depth: Down-sampling levels (default 3), with ``base_channels`` (default 16).
        base_channels: Top-level width when ``channels`` is not given.
        norm: ``"batch"``/``"instance"``/``"group"``; default MONAI's instance norm.
        act: Activation; default MONAI's PReLU.
        dropout: Dropout after every convolution.
        num_res_units: Residual units per block (0 = plain convolutions).
        kernel_size: Convolution kernel size.
        up_kernel_size: Transposed-convolution kernel size.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """
    name = "unet"
    widths = resolve_channels(
        name, channels, depth, base_channels, default_depth=DEFAULT_DEPTH, default_base=DEFAULT_BASE_CHANNELS
    )
    if len(widths) < 2:
        raise ValueError(f"Model '{name}' needs at least one down-sampling level (depth >= 1).")
    # With residual units MONAI also normalises the top up-sampling output (out_channels wide).
    norm_widths = (*widths, out_channels) if num_res_units > 0 else widths
    options: dict = {}
    if (resolved := resolve_norm(name, norm, norm_widths)) is not None:
        options["norm"] = resolved
    if (resolved := resolve_act(name, act)) is not None:
        options["act"] = resolved
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=widths,
        strides=(2,) * (len(widths) - 1),
        kernel_size=kernel_size,
        up_kernel_size=up_kernel_size,
        num_res_units=num_res_units,
        dropout=check_dropout(name, dropout),
        **options,
    )


def unet_encoder(net: nn.Module) -> list[nn.Module]:
    """Down-sampling path of a MONAI ``UNet``: each level's ``down`` layer and the bottleneck."""
    if not isinstance(net, UNet):
        raise TypeError(f"unet_encoder expects monai UNet, got {type(net).__name__}.")
    modules: list[nn.Module] = []
    block: nn.Module = net.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        modules.append(block[0])
        block = block[1].submodule
    modules.append(block)  # bottleneck
    return modules


def build_attention_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    depth: int | None = None,
    base_channels: int | None = None,
    dropout: float = 0.0,
    kernel_size: int = 3,
    up_kernel_size: int = 3,
) -> AttentionUnet:
    """MONAI ``AttentionUnet`` with stride 2 at every level (batch norm and ReLU are fixed by MONAI).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        channels: Widths per level, top first; default ``(16, 32, 64, 128)``.
        depth: Down-sampling levels (default 3), with ``base_channels`` (default 16).
        base_channels: Top-level width when ``channels`` is not given.
        dropout: Dropout in the convolution blocks.
        kernel_size: Convolution kernel size.
        up_kernel_size: Transposed-convolution kernel size.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """
    name = "attention_unet"
    widths = resolve_channels(
        name, channels, depth, base_channels, default_depth=DEFAULT_DEPTH, default_base=DEFAULT_BASE_CHANNELS
    )
    if len(widths) < 2:
        raise ValueError(f"Model '{name}' needs at least one down-sampling level (depth >= 1).")
    return AttentionUnet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=widths,
        strides=(2,) * (len(widths) - 1),
        kernel_size=kernel_size,
        up_kernel_size=up_kernel_size,
        dropout=check_dropout(name, dropout),
    )


def attention_unet_encoder(net: nn.Module) -> list[nn.Module]:
    """Encoder of a MONAI ``AttentionUnet``: the head ConvBlock and every strided ConvBlock below it."""
    if not isinstance(net, AttentionUnet):
        raise TypeError(f"attention_unet_encoder expects monai AttentionUnet, got {type(net).__name__}.")
    modules: list[nn.Module] = [net.model[0]]
    layer: nn.Module = net.model[1]
    while isinstance(layer, AttentionLayer):
        sub = layer.submodule
        if isinstance(sub, nn.Sequential):
            modules.append(sub[0])
            layer = sub[1]
        else:
            modules.append(sub)  # bottleneck ConvBlock
            break
    return modules


class UNetPlusPlus(BasicUNetPlusPlus):
    """MONAI ``BasicUNetPlusPlus`` returning one tensor, or with ``deep_supervision`` in training mode the list
    of its four heads, deepest decoder first (``x_0_4, x_0_3, x_0_2, x_0_1``, all full resolution).

    Without deep supervision MONAI returns a one-element list and still computes three unused heads; those heads
    are replaced by ``nn.Identity`` so every parameter takes part in the output. Other state-dict keys match
    MONAI's.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, deep_supervision: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, deep_supervision=deep_supervision, **kwargs)
        if not deep_supervision:
            self.final_conv_0_1 = nn.Identity()
            self.final_conv_0_2 = nn.Identity()
            self.final_conv_0_3 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, in_channels, *S)``, each spatial size divisible by 16.

        Returns:
            ``(B, out_channels, *S)`` logits (with deep supervision in training mode, four of them, final first).
        """
        outputs = super().forward(x)
        if self.deep_supervision and self.training:
            return outputs[::-1]
        return outputs[-1]


def build_unetpp(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    base_channels: int | None = None,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    upsample: str = "deconv",
    deep_supervision: bool = False,
) -> UNetPlusPlus:
    """UNet++ (MONAI ``BasicUNetPlusPlus``), depth fixed at 4 down-sampling levels.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        channels: 5 encoder widths, optionally plus a 6th for the last decoder node (MONAI ``features``; the
            6th defaults to ``channels[0]``). Default ``(16, 32, 64, 128, 256)``.
        base_channels: Top-level width when ``channels`` is not given (level ``i`` gets ``base * 2**i``).
        norm: ``"batch"``/``"instance"``/``"group"``; default MONAI's affine instance norm.
        act: Activation; default MONAI's LeakyReLU(0.1).
        dropout: Dropout after every convolution.
        upsample: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``.
        deep_supervision: In training mode return the four heads' logits, final first (see
            :func:`medseg.losses.deep_supervision_loss`); eval mode returns the final one only.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """
    name = "unetpp"
    widths = resolve_channels(
        name, channels, None, base_channels, default_depth=UNETPP_DEPTH, default_base=DEFAULT_BASE_CHANNELS
    )
    if len(widths) not in (UNETPP_DEPTH + 1, UNETPP_DEPTH + 2):
        raise ValueError(
            f"Model '{name}': 'channels' needs 5 or 6 widths (MONAI features), got {list(widths)}."
        )
    features = widths if len(widths) == UNETPP_DEPTH + 2 else (*widths, widths[0])
    if upsample not in ("deconv", "pixelshuffle", "nontrainable"):
        raise ValueError(
            f"Model '{name}': upsample must be deconv, pixelshuffle or nontrainable, got {upsample!r}."
        )
    options: dict = {}
    if (resolved := resolve_norm(name, norm, features)) is not None:
        options["norm"] = resolved
    if (resolved := resolve_act(name, act)) is not None:
        options["act"] = resolved
    return UNetPlusPlus(
        spatial_dims,
        in_channels,
        out_channels,
        features=features,
        dropout=check_dropout(name, dropout),
        upsample=upsample,
        deep_supervision=bool(deep_supervision),
        **options,
    )


def unetpp_encoder(net: nn.Module) -> list[nn.Module]:
    """Backbone column of UNet++: ``conv_0_0`` (two convolutions) and ``conv_1_0`` ... ``conv_4_0`` (pool + convs)."""
    if not isinstance(net, BasicUNetPlusPlus):
        raise TypeError(f"unetpp_encoder expects BasicUNetPlusPlus, got {type(net).__name__}.")
    return [net.conv_0_0, net.conv_1_0, net.conv_2_0, net.conv_3_0, net.conv_4_0]


_NO_NORM_ACT = "MONAI AttentionUnet hard-codes batch norm and ReLU."

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="unet",
        task="segmentation",
        builder=build_unet,
        encoder=unet_encoder,
        description="MONAI UNet (Kerfoot et al.), optional residual units.",
    ),
    ModelSpec(
        name="unetpp",
        task="segmentation",
        builder=build_unetpp,
        encoder=unetpp_encoder,
        unsupported={
            "depth": "MONAI BasicUNetPlusPlus has a fixed depth of 4; set 'channels' (5 or 6 widths) "
            "or 'base_channels' instead.",
        },
        description="UNet++ (MONAI BasicUNetPlusPlus), nested skip connections, depth 4.",
    ),
    ModelSpec(
        name="attention_unet",
        task="segmentation",
        builder=build_attention_unet,
        encoder=attention_unet_encoder,
        unsupported={"norm": _NO_NORM_ACT, "act": _NO_NORM_ACT},
        description="Attention U-Net (Oktay et al., MONAI AttentionUnet).",
    ),
    ModelSpec(
        name=planned_unet.NAME,
        task="segmentation",
        builder=planned_unet.build_planned_unet,
        encoder=planned_unet.planned_unet_encoder,
        unsupported=planned_unet.UNSUPPORTED,
        description=planned_unet.DESCRIPTION,
    ),
)
