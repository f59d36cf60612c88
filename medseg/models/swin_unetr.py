"""``swin_unetr``: MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022) behind medseg's option names, 2D or 3D, never
pretrained (nothing is downloaded). A patch embedding and four Swin stages halve the input five times, so every
side of the patch (``data.patch_size``, the sliding-window roi) must be a multiple of 32, and ``feature_size`` a
multiple of 12; a window it cannot take is refused in one line naming ``data.patch_size`` and the nearest valid
sizes. Registered with the other MONAI networks in :mod:`medseg.models.monai_nets`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from medseg.errors import ConfigError
from medseg.models.registry import LayerArg, check_dropout, monai_norm, resolve_channels

SWIN_HALVINGS = 5  # patch embedding (stride 2) + 4 Swin stages (patch merging)
SWIN_FEATURE_MULTIPLE = 12  # MONAI SwinUNETR: feature_size must be divisible by 12


def swin_roi_problem(roi: Sequence[int]) -> str | None:
    """Why ``swin_unetr`` cannot take windows of ``roi`` voxels (None when it can): every side a multiple of 32."""
    multiple = 2**SWIN_HALVINGS
    wrong = [int(n) for n in roi if int(n) % multiple]
    if not wrong:
        return None
    options = sorted({max(multiple, int(n) // multiple * multiple) for n in wrong}
                     | {(int(n) // multiple + 1) * multiple for n in wrong})
    return (f"data.patch_size {[int(n) for n in roi]} does not suit swin_unetr: every side must be a multiple of "
            f"{multiple} (its patch embedding and 4 Swin stages halve it {SWIN_HALVINGS} times); "
            f"the nearest valid sizes are {', '.join(map(str, options))}")


class SwinUNETRNet(SwinUNETR):
    """MONAI ``SwinUNETR`` that refuses a window size it cannot take in one line naming ``data.patch_size``."""

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        problem = swin_roi_problem(x_in.shape[2:])
        if problem:
            raise ConfigError(problem)
        return super().forward(x_in)


def build_swin_unetr(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    feature_size: int | None = None,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    norm: LayerArg | None = None,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    drop_path: float = 0.0,
    use_v2: bool = False,
) -> SwinUNETRNet:
    """MONAI ``SwinUNETR``: a Swin transformer encoder and a convolutional U-Net decoder; never pretrained.

    Every side of its input (``data.patch_size``) must be a multiple of 32: a forward pass on other sizes is
    refused in one line naming the option and the nearest valid sizes (before training, when the fit probes the
    network with its patch).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        channels: The 5 widths, top first, each double the previous: another way to give ``feature_size``.
        feature_size: Width of the first level, a multiple of 12 (default 12, cheap on a CPU; MONAI's is 24).
        depths: Swin blocks in each of the 4 stages.
        num_heads: Attention heads in each stage; each must divide that stage's width.
        norm: Norm of the convolution blocks: ``"group"`` (default: instance norm refuses, in training, the
            one-voxel bottleneck of a side of 32), ``"instance"`` (MONAI's default), ``"batch"``.
        dropout: Dropout of the transformer (MONAI ``drop_rate``).
        attn_dropout: Dropout of the attention weights.
        drop_path: Stochastic depth rate.
        use_v2: SwinUNETR-V2 (a residual convolution block before each stage).

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """
    name = "swin_unetr"
    if channels is not None:
        if feature_size is not None:
            raise ValueError(f"Model '{name}': give either 'channels' or 'feature_size', not both.")
        widths = resolve_channels(name, channels, None, None, default_depth=4, default_base=1)
        if len(widths) != SWIN_HALVINGS or any(w != widths[0] * 2**i for i, w in enumerate(widths)):
            raise ValueError(f"Model '{name}': 'channels' must be 5 widths, each double the previous, "
                             f"got {list(widths)}.")
        feature_size = widths[0]
    feature_size = 12 if feature_size is None else feature_size
    if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 1 \
            or feature_size % SWIN_FEATURE_MULTIPLE:
        raise ValueError(f"Model '{name}': 'feature_size' must be a positive multiple of {SWIN_FEATURE_MULTIPLE} "
                         f"(MONAI SwinUNETR), e.g. 12, 24 or 48; got {feature_size!r}.")
    widths = [feature_size * 2**i for i in range(SWIN_HALVINGS)]
    if len(depths) != 4 or len(num_heads) != 4:
        raise ValueError(f"Model '{name}': 'depths' and 'num_heads' need 4 values (one per Swin stage), "
                         f"got {list(depths)} and {list(num_heads)}.")
    for stage, heads in enumerate(num_heads):
        if not isinstance(heads, int) or heads < 1 or widths[stage] % heads:
            raise ValueError(f"Model '{name}': num_heads[{stage}]={heads!r} must divide the stage width "
                             f"{widths[stage]} (feature_size * 2**{stage}).")
    return SwinUNETRNet(
        in_channels=in_channels,
        out_channels=out_channels,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        feature_size=feature_size,
        norm_name=monai_norm(name, norm, "group", widths),
        drop_rate=check_dropout(name, dropout),
        attn_drop_rate=check_dropout(name, attn_dropout),
        dropout_path_rate=check_dropout(name, drop_path),
        spatial_dims=spatial_dims,
        use_v2=bool(use_v2),
    )


def swin_unetr_encoder(net: nn.Module) -> list[nn.Module]:
    """Encoder of a ``SwinUNETR``: the Swin transformer and the convolution blocks of the skip connections."""
    if not isinstance(net, SwinUNETR):
        raise TypeError(f"swin_unetr_encoder expects monai SwinUNETR, got {type(net).__name__}.")
    return [net.swinViT, net.encoder1, net.encoder2, net.encoder3, net.encoder4, net.encoder10]


