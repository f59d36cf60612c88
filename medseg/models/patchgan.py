"""pix2pix's PatchGAN discriminator (Isola et al., 2017), 2D and 3D.

A stack of 4-voxel convolutions with LeakyReLU(0.2): every block but the last halves the size (stride 2), the
first has no normalisation, and a final 1-channel convolution gives a map of real/fake logits, one per patch of
the input (the receptive field, :func:`receptive_field`). With ``channels=(64, 128, 256, 512)`` it is pix2pix's
70x70 PatchGAN; the default ``(32, 64, 128)`` is its 34x34 sibling, for small images. Each output side is
``floor(side / 2**(len(channels) - 1)) - 2``: sides of at least ``3 * 2**(len(channels) - 1)`` give a map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Act, Conv
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from medseg.models.registry import LayerArg, resolve_norm

KERNEL = 4


class PatchDiscriminator(nn.Module):
    """``(B, in_channels, *S) -> (B, 1, *S')`` real/fake logits, one per input patch.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (a conditional discriminator sees the condition and the image, concatenated).
        channels: widths of the convolution blocks; all but the last use stride 2.
        norm: ``"instance"`` (pix2pix), ``"batch"``, ``"group"`` or ``None``; never on the first block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int] = (32, 64, 128),
                 norm: LayerArg | None = "instance") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"PatchDiscriminator: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        widths = [int(c) for c in channels]
        if not widths or min(widths) < 1:
            raise ValueError(f"PatchDiscriminator: channels must be positive widths, got {list(channels)}")
        norm = None if norm in (None, "none") else resolve_norm("patchgan", norm, widths[1:] or widths)
        conv = Conv[Conv.CONV, spatial_dims]
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            stride = 2 if i < len(widths) - 1 else 1
            layers.append(conv(previous, width, KERNEL, stride=stride, padding=1, bias=i == 0 or norm is None))
            if i > 0 and norm is not None:
                layers.append(get_norm_layer(norm, spatial_dims, width))
            layers.append(Act[Act.LEAKYRELU](negative_slope=0.2))
            previous = width
        layers.append(conv(previous, 1, KERNEL, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.strides = [2] * (len(widths) - 1) + [1, 1]

    @property
    def receptive_field(self) -> int:
        """Side of the input patch each output logit sees, in voxels (70 for pix2pix's widths)."""
        return receptive_field(self.strides)

    def min_size(self) -> int:
        """The smallest input side that gives an output of at least one voxel."""
        return 3 * 2 ** (len(self.strides) - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def receptive_field(strides: Sequence[int], kernel: int = KERNEL) -> int:
    """Receptive field of a stack of ``kernel``-wide convolutions with ``strides``, first layer first."""
    field = 1
    for stride in reversed(strides):
        field = (field - 1) * stride + kernel
    return field
