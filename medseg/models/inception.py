"""``inception``: a GoogLeNet-style classifier (Szegedy et al. 2015) built from inception blocks, 2D or 3D.

An inception block runs four branches on the same input and concatenates them along the channels:

* a 1x1 convolution (a quarter of the block's width),
* a 1x1 reduction then a 3x3 convolution (half of the width),
* a 1x1 reduction then a 5x5 convolution, or two 3x3 ones (``factorized``, as in Inception-v2) (an eighth),
* a 3x3 max pooling (stride 1) then a 1x1 convolution (the rest).

The network is a 3x3 stem convolution, ``depth + 1`` stages of ``blocks_per_stage`` inception blocks with a
3x3 stride-2 max pooling between stages, global average pooling and a linear head ``fc``
(:class:`~medseg.models.classification.ClassifierHead`). GoogLeNet's auxiliary classifiers are left out. Any
input size works. Every convolution is followed by the norm and the activation. The encoder, frozen by
:func:`medseg.models.freeze_encoder`, is everything but ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn

from medseg.models.classification import ClassifierHead, classifier_encoder
from medseg.models.registry import (
    LayerArg,
    ModelSpec,
    check_dropout,
    resolve_act,
    resolve_channels,
    resolve_norm,
)

NAME = "inception"
MIN_WIDTH = 4  # one channel per branch


def branch_widths(width: int) -> dict[str, int]:
    """Output widths of the four branches of a block ``width`` wide, and of the two reductions.

    Returns:
        ``{"1x1", "3x3", "5x5", "pool"}`` (summing to ``width``) and ``{"reduce3", "reduce5"}``.
    """
    one, five, pool = max(1, width // 4), max(1, width // 8), max(1, width // 8)
    three = width - one - five - pool
    return {"1x1": one, "3x3": three, "5x5": five, "pool": pool,
            "reduce3": max(1, three // 2), "reduce5": five}


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1, 3x3, 5x5 or two 3x3, pooling), concatenated to ``out_channels``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (at least 4).
        norm: MONAI norm argument.
        act: MONAI activation argument.
        factorized: Two 3x3 convolutions instead of the 5x5 one.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: LayerArg, act: LayerArg,
                 factorized: bool = True) -> None:
        super().__init__()
        widths = branch_widths(out_channels)

        def conv(cin: int, cout: int, kernel: int) -> Convolution:
            return Convolution(spatial_dims, cin, cout, kernel_size=kernel, norm=norm, act=act)

        five = ([conv(widths["reduce5"], widths["5x5"], 3), conv(widths["5x5"], widths["5x5"], 3)]
                if factorized else [conv(widths["reduce5"], widths["5x5"], 5)])
        self.branch1 = conv(in_channels, widths["1x1"], 1)
        self.branch3 = nn.Sequential(conv(in_channels, widths["reduce3"], 1), conv(widths["reduce3"], widths["3x3"], 3))
        self.branch5 = nn.Sequential(conv(in_channels, widths["reduce5"], 1), *five)
        self.branch_pool = nn.Sequential(Pool["max", spatial_dims](kernel_size=3, stride=1, padding=1),
                                         conv(in_channels, widths["pool"], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S)`` -> ``(B, out_channels, *S)``."""
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class InceptionNet(nn.Module):
    """Stem convolution, stages of inception blocks with max pooling between them, average pooling, ``fc``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Number of classes.
        channels: Width of each stage's blocks, top first.
        blocks_per_stage: Inception blocks per stage.
        norm: MONAI norm argument.
        act: MONAI activation argument.
        dropout: Dropout before the linear head.
        factorized: Two 3x3 convolutions instead of 5x5 in every block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 blocks_per_stage: int = 2, norm: LayerArg = "batch", act: LayerArg = "relu",
                 dropout: float = 0.0, factorized: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, norm=norm,
                                               act=act)]
        width = channels[0]
        for stage, stage_width in enumerate(channels):
            if stage > 0:
                layers.append(Pool["max", spatial_dims](kernel_size=3, stride=2, padding=1))
            for _ in range(blocks_per_stage):
                layers.append(InceptionBlock(spatial_dims, width, stage_width, norm, act, factorized))
                width = stage_width
        self.features = nn.Sequential(*layers)
        self.pool = Pool["adaptiveavg", spatial_dims](1)
        self.fc = ClassifierHead(width, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify ``x`` ``(B, in_channels, *S)``, any spatial size: ``(B, out_channels)`` logits."""
        return self.fc(self.pool(self.features(x)).flatten(1))


def build_inception(
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
    blocks_per_stage: int = 2,
    factorized: bool = True,
) -> InceptionNet:
    """GoogLeNet-style classifier (:class:`InceptionNet`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Number of classes.
        channels: Block width per stage, each at least 4; default ``(16, 32, 64, 128)``.
        depth: Pooling steps (default 3), with ``base_channels`` (default 16); ``depth + 1`` stages.
        base_channels: First-stage width when ``channels`` is not given.
        norm: ``"batch"`` (default), ``"instance"`` or ``"group"`` (a group count dividing every branch width).
        act: Activation; default ReLU.
        dropout: Dropout before the linear head.
        blocks_per_stage: Inception blocks per stage (>= 1).
        factorized: Two 3x3 convolutions in place of the 5x5 branch (cheaper, the same receptive field).

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels)``.
    """
    widths = resolve_channels(NAME, channels, depth, base_channels, default_depth=3, default_base=16)
    if min(widths) < MIN_WIDTH:
        raise ValueError(f"Model '{NAME}': every stage width must be >= {MIN_WIDTH} (one channel per branch), "
                         f"got {list(widths)}.")
    if isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
        raise ValueError(f"Model '{NAME}': 'blocks_per_stage' must be a positive int, got {blocks_per_stage!r}.")
    norm_widths = [w for width in widths for w in (width, *branch_widths(width).values())]
    return InceptionNet(
        spatial_dims,
        in_channels,
        out_channels,
        channels=widths,
        blocks_per_stage=blocks_per_stage,
        norm=resolve_norm(NAME, "batch" if norm is None else norm, norm_widths),
        act=resolve_act(NAME, "relu" if act is None else act),
        dropout=check_dropout(NAME, dropout),
        factorized=bool(factorized),
    )


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=NAME,
        task="classification",
        builder=build_inception,
        encoder=classifier_encoder,
        description="GoogLeNet-style classifier of inception blocks (1x1, 3x3, 5x5 as two 3x3, pooling), 2D or 3D.",
    ),
)
