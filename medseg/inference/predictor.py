"""The one inference path: sliding-window prediction on a callable.

Validation, ``medseg demo`` and (later) ``medseg predict`` call these functions, so the numbers seen in
training are the numbers users get. Test-time augmentation and ensembles wrap the *callable*, not the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference


def sliding_window_logits(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mode: str = "gaussian",
) -> torch.Tensor:
    """Logits of a whole image from overlapping windows.

    Args:
        predictor: maps a window batch ``(N, C, *roi)`` to logits ``(N, K, *roi)``.
        image: ``(B, C, *spatial)``; images smaller than ``roi_size`` are padded and cropped back.
        roi_size: window shape ``(*spatial)``.
        sw_batch_size: windows per forward pass.
        overlap: fraction of overlap between neighbouring windows.
        mode: window blending, ``"gaussian"`` (down-weights window borders) or ``"constant"``.

    Returns:
        ``(B, K, *spatial)`` logits on the grid of ``image``.
    """
    return sliding_window_inference(
        image, roi_size=list(roi_size), sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode=mode
    )


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Label map ``(B, 1, *spatial)`` (int64) from logits ``(B, K, *spatial)``."""
    return torch.argmax(logits, dim=1, keepdim=True)
