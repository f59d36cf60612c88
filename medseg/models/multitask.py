"""``multitask_unet``: one encoder, a U-Net segmentation decoder and an image-level classification head.

Encoder level ``i`` (``i = 0 .. depth``, width ``channels[i]``) is two 3x3 convolutions (norm, dropout,
activation) after a 2x max-pool (none at level 0). Decoder stage ``i`` (``i = depth - 1 .. 0``) up-samples the
deeper map with a 2x transposed convolution to ``channels[i]``, concatenates encoder level ``i`` (the skip) and
applies two 3x3 convolutions; a 1x1 convolution maps level 0 to the segmentation logits. The classification
head reads the bottleneck (level ``depth``): global average pool, dropout, linear layer to ``image_classes``
logits. Every spatial size must be divisible by ``2**depth``.

The network answers three calls, each one encoder pass:

* ``forward(x)``: segmentation logits ``(B, out_channels, *S)`` in training and eval mode, so the segmentation
  paths (validation, ``medseg predict``'s sliding window, export) see a segmentation network;
* ``forward_with_class(x)``: ``(segmentation logits, class logits (B, image_classes))`` (training);
* ``classify(x)``: class logits from the encoder alone, the decoder skipped.

A case's image-level class probabilities (:func:`case_class_probabilities`) are the mean of
``softmax(classify(window))`` over the windows of the segmentation's sliding window; validation
(:class:`~medseg.tasks.multitask.MultiTaskModule`) and ``medseg predict`` (:mod:`medseg.inference.multitask`)
both call it.

Encoder (what :func:`medseg.models.freeze_encoder` freezes): ``encoder``, the ``depth + 1`` level blocks; the
decoder and both heads stay trainable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data.utils import dense_patch_slices
from monai.networks.blocks import Convolution
from torch import nn

from medseg.models.registry import (
    LayerArg,
    ModelSpec,
    check_dropout,
    monai_norm,
    resolve_act,
    resolve_channels,
)

NAME = "multitask_unet"
DEFAULT_DEPTH = 3  # channels (16, 32, 64, 128)
DEFAULT_BASE_CHANNELS = 16


def _conv(dims: int, cin: int, cout: int, layers: dict) -> Convolution:
    """3x3 convolution, then norm, dropout and activation (MONAI ``Convolution``)."""
    return Convolution(dims, cin, cout, kernel_size=3, **layers)


def _pool(dims: int) -> nn.Module:
    return (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(kernel_size=2, stride=2)


class DecoderStage(nn.Module):
    """Up-sample the deeper map 2x to ``width`` channels, concatenate the skip, two 3x3 convolutions."""

    def __init__(self, dims: int, deeper: int, width: int, layers: dict) -> None:
        super().__init__()
        self.up = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(deeper, width, kernel_size=2, stride=2)
        self.conv = nn.Sequential(_conv(dims, 2 * width, width, layers), _conv(dims, width, width, layers))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class MultiTaskUNet(nn.Module):
    """A U-Net with a classification head on its bottleneck (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Segmentation output channels (classes, background included).
        image_classes: Image-level classes of the classification head.
        channels: Encoder widths, top level first (``depth + 1`` of them).
        layers: ``norm``/``act``/``dropout`` for MONAI ``Convolution``.
        head_dropout: Dropout between the pooled bottleneck features and the linear layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        image_classes: int,
        channels: Sequence[int],
        layers: dict,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = spatial_dims
        blocks = []
        for i, width in enumerate(channels):
            pool = [_pool(dims)] if i else []
            first = _conv(dims, channels[i - 1] if i else in_channels, width, layers)
            blocks.append(nn.Sequential(*pool, first, _conv(dims, width, width, layers)))
        self.encoder = nn.ModuleList(blocks)
        stages = [DecoderStage(dims, channels[i + 1], channels[i], layers) for i in range(len(channels) - 2, -1, -1)]
        self.decoder = nn.ModuleList(stages)  # deepest stage first
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(channels[0], out_channels, kernel_size=1)
        pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Sequential(pool, nn.Flatten(1), nn.Dropout(head_dropout),
                                        nn.Linear(channels[-1], image_classes))

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every encoder level's output, top level first (the last one is the bottleneck)."""
        levels: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            levels.append(x)
        return levels

    def _decode(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = levels[-1]
        for i, stage in enumerate(self.decoder):
            x = stage(x, levels[len(levels) - 2 - i])
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(B, out_channels, *S)`` of ``x`` ``(B, in_channels, *S)``."""
        return self._decode(self._encode(x))

    @torch.jit.export
    def forward_with_class(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits ``(B, out_channels, *S)`` and class logits ``(B, image_classes)``, one encoder pass."""
        levels = self._encode(x)
        return self._decode(levels), self.classifier(levels[-1])

    @torch.jit.export
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, image_classes)`` of ``x``, from the encoder alone (the decoder does not run)."""
        return self.classifier(self._encode(x)[-1])


def build_multitask_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    image_classes: int = 2,
    channels: Sequence[int] | None = None,
    depth: int | None = None,
    base_channels: int | None = None,
    norm: LayerArg = "instance",
    act: LayerArg = "leakyrelu",
    dropout: float = 0.0,
    head_dropout: float | None = None,
) -> MultiTaskUNet:
    """A U-Net that also classifies the whole image (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Segmentation output channels (classes, background included).
        image_classes: Image-level classes (at least 2); :class:`~medseg.tasks.multitask.MultiTaskModule` sets it
            from the dataset's ``classes``.
        channels: Encoder widths per level, top first; default ``(16, 32, 64, 128)``.
        depth: Down-sampling levels (default 3), with ``base_channels`` (default 16).
        base_channels: Top-level width when ``channels`` is not given.
        norm: ``"batch"``/``"instance"``/``"group"``; default instance norm (affine).
        act: Activation; default leaky ReLU.
        dropout: Dropout after every convolution.
        head_dropout: Dropout before the classification head's linear layer; default ``dropout``.

    Returns:
        The network: ``(B, in_channels, *S) -> (B, out_channels, *S)``, with ``forward_with_class`` and ``classify``.
    """
    widths = resolve_channels(
        NAME, channels, depth, base_channels, default_depth=DEFAULT_DEPTH, default_base=DEFAULT_BASE_CHANNELS
    )
    if len(widths) < 2:
        raise ValueError(f"Model '{NAME}' needs at least one down-sampling level (depth >= 1).")
    if isinstance(image_classes, bool) or not isinstance(image_classes, int) or image_classes < 2:
        raise ValueError(f"Model '{NAME}': 'image_classes' must be an int >= 2, got {image_classes!r}.")
    layers = {
        "norm": monai_norm(NAME, norm, "instance", widths),
        "act": resolve_act(NAME, act),
        "dropout": check_dropout(NAME, dropout) or None,
    }
    head = check_dropout(NAME, dropout if head_dropout is None else head_dropout)
    return MultiTaskUNet(spatial_dims, in_channels, out_channels, image_classes, widths, layers, head)


def multitask_unet_encoder(net: nn.Module) -> list[nn.Module]:
    """The encoder level blocks of a :class:`MultiTaskUNet` (convolutions and pools down to the bottleneck)."""
    if not isinstance(net, MultiTaskUNet):
        raise TypeError(f"multitask_unet_encoder expects MultiTaskUNet, got {type(net).__name__}.")
    return list(net.encoder)


def window_slices(spatial_shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows MONAI's ``sliding_window_inference`` cuts from an image of ``spatial_shape`` (already padded
    to at least ``roi``): a step of ``int(roi * (1 - overlap))`` (at least 1; the whole side where it equals the
    roi), the last window of each axis moved back to end at the border."""
    steps = [r if r == n else max(int(r * (1 - overlap)), 1) for n, r in zip(spatial_shape, roi, strict=True)]
    return dense_patch_slices(list(spatial_shape), list(roi), steps)


def pad_to_roi(image: torch.Tensor, roi: Sequence[int]) -> torch.Tensor:
    """``image`` ``(B, C, *S)`` padded with zeros where a side is shorter than the roi, half before and half after
    (the larger half after), as ``sliding_window_inference`` pads."""
    pad: list[int] = []
    for size, r in reversed(list(zip(image.shape[2:], roi, strict=True))):
        missing = max(int(r) - int(size), 0)
        pad += [missing // 2, missing - missing // 2]
    return torch.nn.functional.pad(image, pad) if any(pad) else image


@torch.no_grad()
def case_class_probabilities(net: nn.Module, image: torch.Tensor, roi: Sequence[int], overlap: float = 0.25,
                             sw_batch_size: int = 4) -> torch.Tensor:
    """A case's image-level class probabilities from a multitask network.

    The image is padded to the roi where it is smaller and cut into the windows of the segmentation's sliding
    window (:func:`window_slices`: same roi and overlap); the case's probabilities are the plain mean over those
    windows of ``softmax(net.classify(window))``, every window counting the same (no Gaussian weighting: each
    window sees its own part of the image whole). The network runs in eval mode (its mode is restored after),
    ``sw_batch_size`` windows at a time, under the caller's autocast.

    Args:
        net: a network with ``classify(x) -> (N, K)`` logits (:class:`MultiTaskUNet`).
        image: ``(1, C, *S)`` preprocessed image, on any device; the windows go to the network's device.
        roi: window shape ``(*spatial)`` (the training patch).
        overlap: fraction of overlap between neighbouring windows.
        sw_batch_size: windows per ``classify`` call.

    Returns:
        ``(K,)`` float32 probabilities summing to 1, on the image's device.
    """
    if image.ndim != len(roi) + 2 or image.shape[0] != 1:
        raise ValueError(f"case_class_probabilities takes one image (1, C, *S) with {len(roi)} spatial axes for "
                         f"roi {list(roi)}, got shape {tuple(image.shape)}")
    padded = pad_to_roi(image, roi)
    slices = window_slices(padded.shape[2:], roi, overlap)
    device = next(net.parameters()).device
    was_training = net.training
    total = torch.zeros((), device=device)
    step = max(int(sw_batch_size), 1)
    try:
        net.eval()
        for start in range(0, len(slices), step):
            windows = [padded[(slice(None), slice(None), *part)] for part in slices[start:start + step]]
            logits = net.classify(torch.cat(windows).to(device))
            total = total + torch.softmax(logits.float(), dim=1).sum(dim=0)
    finally:
        net.train(was_training)
    return (total / len(slices)).to(image.device)


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=NAME,
        task="multitask",
        builder=build_multitask_unet,
        encoder=multitask_unet_encoder,
        description="U-Net with an image-level classification head on its bottleneck (joint segmentation and "
                    "classification).",
    ),
)
