"""Classification networks: a plain configurable CNN and MONAI ResNet-18/34/50, 2D or 3D.

Every network maps ``(B, in_channels, *S) -> (B, out_channels)`` logits and ends in a linear head named ``fc``
(a :class:`ClassifierHead`, which applies the ``dropout`` option before the linear layer). The encoder, frozen
by :func:`medseg.models.freeze_encoder`, is every top-level child except ``fc``.

Batch norm needs more than one value per channel in training mode: with ``norm="batch"``, train with a batch
size above 1 or an input large enough that the last stage keeps more than one voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets import ResNet
from torch import nn

from medseg.models.registry import (
    LayerArg,
    ModelSpec,
    check_dropout,
    resolve_act,
    resolve_channels,
    resolve_norm,
)

RESNET_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class ClassifierHead(nn.Linear):
    """Dropout followed by a linear layer; its state-dict keys are those of ``nn.Linear`` (``weight``, ``bias``).

    Args:
        in_features: Feature size ``F``.
        out_features: Number of classes ``K``.
        dropout: Dropout probability applied to the features.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map pooled features ``(B, F)`` to logits ``(B, K)``."""
        return super().forward(self.dropout(x))


class CNNClassifier(nn.Module):
    """Plain CNN: stages of (conv-norm-act) x ``convs_per_stage`` + pooling, global average pooling, linear head.

    Stage ``i`` has ``channels[i]`` features; every stage but the last ends with a 2x pooling (``ceil_mode``, so
    any input size works, down to 1 voxel).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Number of classes.
        channels: Widths per stage.
        kernel_size: Convolution kernel size.
        convs_per_stage: Convolutions per stage.
        norm: MONAI norm argument.
        act: MONAI activation argument.
        dropout: Dropout before the linear head.
        pool: ``"max"`` or ``"avg"`` pooling between stages.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        kernel_size: int = 3,
        convs_per_stage: int = 2,
        norm: LayerArg = "batch",
        act: LayerArg = "relu",
        dropout: float = 0.0,
        pool: str = "max",
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers.append(
                    Convolution(spatial_dims, width, c, kernel_size=kernel_size, act=act, norm=norm)
                )
                width = c
            if i < len(channels) - 1:
                layers.append(Pool[pool, spatial_dims](kernel_size=2, stride=2, ceil_mode=True))
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.pool = Pool["adaptiveavg", spatial_dims](1)
        self.fc = ClassifierHead(width, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify ``x``.

        Args:
            x: ``(B, in_channels, *S)``, any spatial size.

        Returns:
            ``(B, out_channels)`` logits.
        """
        return self.fc(self.pool(self.features(x)).flatten(1))


def build_cnn(
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
    kernel_size: int = 3,
    convs_per_stage: int = 2,
    pool: str = "max",
) -> CNNClassifier:
    """Plain CNN classifier (:class:`CNNClassifier`), registered as ``cnn3d`` (works for 2D too).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Number of classes.
        channels: Widths per stage; default ``(16, 32, 64, 128)``.
        depth: Pooling steps (default 3), with ``base_channels`` (default 16); ``depth + 1`` stages.
        base_channels: First-stage width when ``channels`` is not given.
        norm: Default ``"batch"``.
        act: Default ``"relu"``.
        dropout: Dropout before the linear head.
        kernel_size: Convolution kernel size.
        convs_per_stage: Convolutions per stage (>= 1).
        pool: ``"max"`` or ``"avg"``.

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels)``.
    """
    name = "cnn3d"
    widths = resolve_channels(name, channels, depth, base_channels, default_depth=3, default_base=16)
    if convs_per_stage < 1:
        raise ValueError(f"Model '{name}': convs_per_stage must be >= 1, got {convs_per_stage}.")
    if pool not in ("max", "avg"):
        raise ValueError(f"Model '{name}': pool must be 'max' or 'avg', got {pool!r}.")
    return CNNClassifier(
        spatial_dims,
        in_channels,
        out_channels,
        channels=widths,
        kernel_size=kernel_size,
        convs_per_stage=convs_per_stage,
        norm=resolve_norm(name, norm, widths) or "batch",
        act=resolve_act(name, act) or "relu",
        dropout=check_dropout(name, dropout),
        pool=pool,
    )


def _replace_norm_act(net: nn.Module, spatial_dims: int, norm: LayerArg | None, act: LayerArg | None) -> None:
    """Swap every BatchNorm (if ``norm``) and ReLU (if ``act``) module of ``net`` in place.

    MONAI ResNet (1.6) passes ``norm``/``act`` to the stem only; its blocks and shortcuts hard-code batch norm
    and ReLU. Swapping by module type applies the option to the whole network.
    """
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if norm is not None and isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, child_name, get_norm_layer(norm, spatial_dims, channels=child.num_features))
            elif act is not None and isinstance(child, nn.ReLU):
                setattr(parent, child_name, get_act_layer(act))


def build_resnet(
    arch: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] | None = None,
    base_channels: int | None = None,
    norm: LayerArg | None = None,
    act: LayerArg | None = None,
    dropout: float = 0.0,
    conv1_t_size: int = 7,
    conv1_t_stride: int = 1,
    no_max_pool: bool = False,
    shortcut_type: str = "B",
    bias_downsample: bool = True,
) -> ResNet:
    """MONAI ``ResNet`` (``pretrained=False``; local weights load through :func:`medseg.models.load_pretrained`).

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (bound by the registry).
        spatial_dims: 2 or 3.
        in_channels: Input channels (MONAI ``n_input_channels``).
        out_channels: Number of classes (MONAI ``num_classes``).
        channels: The 4 stage widths (MONAI ``block_inplanes``); default ``(64, 128, 256, 512)``.
        base_channels: First-stage width when ``channels`` is not given (stage ``i`` gets ``base * 2**i``).
        norm: ``"batch"`` (default), ``"instance"`` or ``"group"``, applied to every norm layer.
        act: Activation applied everywhere (default ReLU).
        dropout: Dropout before the linear head.
        conv1_t_size: Stem kernel size.
        conv1_t_stride: Stem stride (MONAI default 1).
        no_max_pool: Skip the stem max pooling.
        shortcut_type: ``"A"`` (zero-padded identity) or ``"B"`` (1x1 convolution) shortcuts.
        bias_downsample: Bias in the ``"B"`` shortcut convolutions (MedicalNet weights use False).

    Returns:
        The network, ``(B, in_channels, *S) -> (B, out_channels)``; ``fc`` is a :class:`ClassifierHead`.
    """
    block, layers = RESNET_LAYOUTS[arch]
    widths = resolve_channels(arch, channels, None, base_channels, default_depth=3, default_base=64)
    if len(widths) != 4:
        raise ValueError(f"Model '{arch}': 'channels' needs 4 stage widths, got {list(widths)}.")
    if shortcut_type not in ("A", "B"):
        raise ValueError(f"Model '{arch}': shortcut_type must be 'A' or 'B', got {shortcut_type!r}.")
    norm_arg = resolve_norm(arch, norm, widths)
    act_arg = resolve_act(arch, act)
    net = ResNet(
        block=block,
        layers=list(layers),
        block_inplanes=list(widths),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=conv1_t_size,
        conv1_t_stride=conv1_t_stride,
        no_max_pool=no_max_pool,
        shortcut_type=shortcut_type,
        bias_downsample=bias_downsample,
        num_classes=out_channels,
    )
    _replace_norm_act(net, spatial_dims, norm_arg, act_arg)
    net.fc = ClassifierHead(net.fc.in_features, out_channels, check_dropout(arch, dropout))
    return net


def classifier_encoder(net: nn.Module) -> list[nn.Module]:
    """Everything but the linear head: all top-level children of ``net`` except ``fc``."""
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        raise TypeError(
            f"classifier_encoder expects a network with a linear 'fc' head, got {type(net).__name__}."
        )
    return [module for child_name, module in net.named_children() if child_name != "fc"]


_RESNET_DEPTH = "the depth of a ResNet is fixed by its name (resnet18, resnet34, resnet50)."

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="cnn3d",
        task="classification",
        builder=build_cnn,
        encoder=classifier_encoder,
        description="Plain CNN classifier (conv-norm-act stages, global average pooling), 2D or 3D.",
    ),
    *(
        ModelSpec(
            name=arch,
            task="classification",
            builder=partial(build_resnet, arch),
            encoder=classifier_encoder,
            unsupported={"depth": _RESNET_DEPTH},
            description=f"MONAI ResNet ({arch}, {block} blocks {list(layers)}).",
        )
        for arch, (block, layers) in RESNET_LAYOUTS.items()
    ),
)
