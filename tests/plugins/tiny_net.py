"""A network from "another package": a factory medseg knows only by its import path."""

from __future__ import annotations

from torch import nn


def build(spatial_dims: int, in_channels: int, out_channels: int, width: int = 4) -> nn.Module:
    """Two convolutions: ``(B, in_channels, *S) -> (B, out_channels, *S)`` logits."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, out_channels, 1))


def not_a_network(spatial_dims: int, in_channels: int, out_channels: int) -> str:
    """Returns no module: refused when built."""
    return "not a network"


def no_dimensions(width: int = 4) -> nn.Module:
    """Does not take spatial_dims/in_channels/out_channels: refused before it is called."""
    return nn.Identity()


NOT_CALLABLE = 3
