"""``unet3plus``: UNet 3+ (Huang et al., ICASSP 2020), a U-Net whose decoder nodes see every scale at once.

Encoder level ``i`` (``i = 0 .. depth``, width ``channels[i]``) is two 3x3 convolutions after a 2x max-pool
(none at level 0). Decoder node ``i`` (``i = depth - 1 .. 0``) has *full-scale skip connections*: it takes
every encoder map above or at its level (``e_j``, ``j <= i``, max-pooled by ``2**(i - j)``) and every deeper
decoder map (``d_j``, ``j > i``, up-sampled by ``2**(j - i)``, linear interpolation; ``d_depth`` is the bottom
encoder map), brings each to ``cat_channels`` with one 3x3 convolution, concatenates the ``depth + 1`` of them
(``up_channels = cat_channels * (depth + 1)``) and fuses them with one more 3x3 convolution. A 3x3
convolution maps ``d_0`` to the logits.

Every spatial size must be divisible by ``2**depth``.

Deep supervision (``deep_supervision=True``): in training mode the network returns a list of logits, full
resolution first, then one per deeper level (``d_1 .. d_depth`` through their own 3x3 heads) at that level's
own size ``S // 2**k``; :func:`medseg.losses.deep_supervision_loss` compares each with the label map resized
by nearest neighbour. In eval mode it returns the full-resolution logits only, so validation, prediction and
export see one tensor.

Not built: the paper's classification-guided module (an image-level "organ present" head gating the maps),
which needs an image-level target and loss medseg's segmentation data do not carry.

Encoder (what :func:`medseg.models.freeze_encoder` freezes): ``encoder``, the ``depth + 1`` level blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medseg.models.registry import (
    LayerArg,
    ModelSpec,
    check_dropout,
    resolve_act,
    resolve_channels,
    resolve_norm,
)

NAME = "unet3plus"
DEFAULT_DEPTH = 4  # the paper's five levels
DEFAULT_BASE_CHANNELS = 16
DEFAULT_NORM: LayerArg = "instance"
DEFAULT_ACT: LayerArg = "relu"  # the paper's
_LINEAR = {2: "bilinear", 3: "trilinear"}


class _Conv(Convolution):
    """3x3 convolution, then norm, dropout and activation (MONAI ``Convolution``), or the convolution only."""

    def __init__(self, dims: int, cin: int, cout: int, layers: dict, conv_only: bool = False) -> None:
        super().__init__(dims, cin, cout, kernel_size=3, conv_only=conv_only, **({} if conv_only else layers))


def _pool(dims: int, factor: int) -> nn.Module:
    return (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(kernel_size=factor, stride=factor)


class FullScaleNode(nn.Module):
    """Decoder node at level ``level``: one branch per level (resample + 3x3 conv to ``cat_channels``), fused.

    Args:
        dims: 2 or 3.
        level: This node's level (0 = full resolution).
        sources: Width of each level's input map, top level first (encoder widths above and at ``level``,
            ``up_channels`` for deeper decoder nodes, the bottom encoder width last).
        cat_channels: Width of every branch.
        layers: ``norm``/``act``/``dropout`` for MONAI ``Convolution``.
    """

    def __init__(
        self, dims: int, level: int, sources: Sequence[int], cat_channels: int, layers: dict
    ) -> None:
        super().__init__()
        branches = []
        for j, width in enumerate(sources):
            if j < level:
                resample: nn.Module = _pool(dims, 2 ** (level - j))
            elif j > level:
                resample = nn.Upsample(scale_factor=2 ** (j - level), mode=_LINEAR[dims], align_corners=False)
            else:
                resample = nn.Identity()
            branches.append(nn.Sequential(resample, _Conv(dims, width, cat_channels, layers)))
        self.branches = nn.ModuleList(branches)
        up_channels = cat_channels * len(sources)
        self.fuse = _Conv(dims, up_channels, up_channels, layers)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Fuse ``maps`` (one per level, top first) at this node's resolution."""
        return self.fuse(torch.cat([branch(m) for branch, m in zip(self.branches, maps, strict=True)], dim=1))


class UNet3Plus(nn.Module):
    """UNet 3+ (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        channels: Encoder widths, top level first (``depth + 1`` of them).
        cat_channels: Width of each full-scale branch.
        layers: ``norm``/``act``/``dropout`` for MONAI ``Convolution``.
        deep_supervision: Return every level's logits in training mode (full resolution first).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        cat_channels: int,
        layers: dict,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        dims, depth = spatial_dims, len(channels) - 1
        self.deep_supervision = deep_supervision
        blocks = []
        for i, width in enumerate(channels):
            pool = [_pool(dims, 2)] if i else []
            first = _Conv(dims, channels[i - 1] if i else in_channels, width, layers)
            blocks.append(nn.Sequential(*pool, first, _Conv(dims, width, width, layers)))
        self.encoder = nn.ModuleList(blocks)
        up_channels = cat_channels * (depth + 1)
        nodes = []
        for level in range(depth - 1, -1, -1):
            sources = [*channels[: level + 1], *[up_channels] * (depth - 1 - level), channels[-1]]
            nodes.append(FullScaleNode(dims, level, sources, cat_channels, layers))
        self.decoder = nn.ModuleList(nodes)  # deepest node first
        self.head = _Conv(dims, up_channels, out_channels, layers, conv_only=True)
        side = [*[up_channels] * (depth - 1), channels[-1]]  # d_1 .. d_{depth-1}, then the bottom encoder map
        heads = [_Conv(dims, width, out_channels, layers, conv_only=True) for width in side]
        self.side_heads = nn.ModuleList(heads if deep_supervision else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, in_channels, *S)``, each spatial size divisible by ``2**depth``.

        Returns:
            ``(B, out_channels, *S)`` logits; with deep supervision in training mode, the list of those and
            ``(B, out_channels, *S // 2**k)`` for ``k = 1 .. depth``.
        """
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        deeper = [skips[-1]]  # decoder maps below the current node, shallowest first
        for node in self.decoder:
            level = len(skips) - 1 - len(deeper)
            deeper.insert(0, node(skips[: level + 1] + deeper))
        logits = self.head(deeper[0])
        if self.deep_supervision and self.training:
            return [logits] + [head(m) for head, m in zip(self.side_heads, deeper[1:], strict=True)]
        return logits


def build_unet3plus(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    depth: int | None = None,
    base_channels: int | None = None,
    cat_channels: int | None = None,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    deep_supervision: bool = False,
) -> UNet3Plus:
    """UNet 3+ with full-scale skip connections.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (classes, background included).
        channels: Encoder widths per level, top first; default ``(16, 32, 64, 128, 256)``.
        depth: Down-sampling levels (default 4), with ``base_channels`` (default 16).
        base_channels: Top-level width when ``channels`` is not given.
        cat_channels: Width of each full-scale branch; default ``channels[0]`` (the paper's 64 of 64).
        norm: ``"batch"``/``"instance"``/``"group"``; default instance norm (the paper: batch).
        act: Activation; default ReLU.
        dropout: Dropout after every convolution.
        deep_supervision: In training mode return a list of logits, full resolution first, one per level.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)`` (in eval mode, or without deep
        supervision).
    """
    widths = resolve_channels(
        NAME, channels, depth, base_channels, default_depth=DEFAULT_DEPTH, default_base=DEFAULT_BASE_CHANNELS
    )
    if len(widths) < 2:
        raise ValueError(f"Model '{NAME}' needs at least one down-sampling level (depth >= 1).")
    cat = widths[0] if cat_channels is None else cat_channels
    if isinstance(cat, bool) or not isinstance(cat, int) or cat < 1:
        raise ValueError(f"Model '{NAME}': 'cat_channels' must be a positive int, got {cat!r}.")
    if not isinstance(deep_supervision, bool):
        raise ValueError(
            f"Model '{NAME}': 'deep_supervision' must be true or false, got {deep_supervision!r}."
        )
    norm_widths = (*widths, cat, cat * len(widths))
    layers = {
        "norm": resolve_norm(NAME, norm if norm is not None else DEFAULT_NORM, norm_widths),
        "act": resolve_act(NAME, act if act is not None else DEFAULT_ACT),
        "dropout": check_dropout(NAME, dropout) or None,
    }
    return UNet3Plus(spatial_dims, in_channels, out_channels, widths, cat, layers, deep_supervision)


def unet3plus_encoder(net: nn.Module) -> list[nn.Module]:
    """The encoder level blocks of a :class:`UNet3Plus` (convolutions and pools down to the bottom level)."""
    if not isinstance(net, UNet3Plus):
        raise TypeError(f"unet3plus_encoder expects UNet3Plus, got {type(net).__name__}.")
    return list(net.encoder)


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=NAME,
        task="segmentation",
        builder=build_unet3plus,
        encoder=unet3plus_encoder,
        description="UNet 3+ (Huang et al. 2020), full-scale skip connections, optional deep supervision.",
    ),
)
