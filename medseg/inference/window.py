"""The one inference path: sliding-window probabilities of a callable, stitched where they fit.

Validation (``SegmentationModule``) and ``medseg predict`` both call :func:`stitch` with the model's
:class:`Window` (the training patch as roi, its overlap and window batch, Gaussian blending). The callable
activates each window (softmax or sigmoid) before blending, so what is blended, averaged over test-time flips
and over ensemble members is always probabilities. Precision is the caller's autocast context: Lightning's
``trainer.precision`` in training, ``--precision`` in ``medseg predict``.

On a GPU the windows always run there; the stitched maps (every output channel plus MONAI's count map, float32,
for the whole image) go to the GPU when they take at most half of its free memory, else to the CPU, as
``sliding_window_inference(sw_device=..., device=...)`` allows. :func:`stitch_device` makes that choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

logger = logging.getLogger(__name__)

STITCH_SHARE = 0.5  # largest share of the free accelerator memory the stitched maps may take


@dataclass(frozen=True)
class Window:
    """Sliding-window settings.

    Attributes:
        roi: window shape ``(*spatial)`` (the training patch).
        overlap: fraction of overlap between neighbouring windows.
        batch_size: windows per forward pass.
        blend: ``"gaussian"`` (down-weights window borders) or ``"constant"``.
    """

    roi: tuple[int, ...]
    overlap: float = 0.25
    batch_size: int = 4
    blend: str = "gaussian"

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> Window:
        """The window of a segmentation model (``roi_size``, ``overlap``, ``sw_batch_size``)."""
        return cls(tuple(int(s) for s in hparams["roi_size"]), float(hparams.get("overlap", 0.25)),
                   int(hparams.get("sw_batch_size", 4)))


def stitched_bytes(spatial_shape: Sequence[int], channels: int, batch: int = 1) -> int:
    """Bytes of the stitched output ``(batch, channels, *spatial)`` plus MONAI's count map, in float32."""
    voxels = int(np.prod([int(s) for s in spatial_shape], dtype=np.int64))
    return 4 * voxels * (batch * channels + 1)


def stitch_device(
    spatial_shape: Sequence[int], channels: int, window_device: str | torch.device, batch: int = 1,
    free_bytes: int | None = None,
) -> torch.device:
    """Where the stitched maps of an image go: the window device, unless that is a GPU on which they would
    take more than :data:`STITCH_SHARE` of the free memory; then the CPU.

    Args:
        spatial_shape: the image's spatial shape.
        channels: output channels the predictor returns.
        window_device: where the windows run.
        batch: images in the batch.
        free_bytes: free accelerator memory (default: ``torch.cuda.mem_get_info``).
    """
    device = torch.device(window_device)
    if device.type != "cuda":
        return device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    need = stitched_bytes(spatial_shape, channels, batch)
    if need <= STITCH_SHARE * free_bytes:
        logger.debug("stitching %s on %s (%.2f GB of %.2f GB free)", tuple(spatial_shape), device, need / 1e9,
                     free_bytes / 1e9)
        return device
    logger.info("windows on %s, stitching on the CPU: the %s image's %d stitched maps need %.2f GB, "
                "%.2f GB of GPU memory is free", device, "x".join(map(str, spatial_shape)), channels,
                need / 1e9, free_bytes / 1e9)
    return torch.device("cpu")


def stitch(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: Window,
    channels: int,
    window_device: str | torch.device | None = None,
) -> torch.Tensor:
    """Probabilities (or any per-window statistics) of a whole image from overlapping windows.

    Args:
        predictor: maps a window batch ``(N, C, *roi)`` on ``window_device`` to ``(N, channels, *roi)``
            float32 values (probabilities: the activation is the predictor's).
        image: ``(B, C, *spatial)`` on any device; images smaller than the roi are padded and cropped back.
        window: roi, overlap, window batch and blending.
        channels: the predictor's output channels (sizes the stitched maps for :func:`stitch_device`).
        window_device: where the windows run (default: the image's device).

    Returns:
        ``(B, channels, *spatial)`` on :func:`stitch_device`.
    """
    sw_device = torch.device(window_device) if window_device is not None else image.device
    device = stitch_device(image.shape[2:], channels, sw_device, batch=image.shape[0])
    return sliding_window_inference(
        image, roi_size=list(window.roi), sw_batch_size=window.batch_size, predictor=predictor,
        overlap=window.overlap, mode=window.blend, sw_device=sw_device, device=device,
    )
