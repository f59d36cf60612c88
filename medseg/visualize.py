"""Pictures people look at instead of reading numbers: slices with reference and prediction contours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

REFERENCE_RGB = (40, 220, 60)  # green
PREDICTION_RGB = (235, 50, 50)  # red


def best_slice(label: np.ndarray) -> int:
    """Index along the last axis of the slice with the most foreground in ``label`` ``(X, Y, Z)``."""
    return int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(axis=0)))


def overlay(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, zoom: int = 4) -> np.ndarray:
    """One 2D slice as RGB with the outlines of the reference (green) and the prediction (red).

    Args:
        image: ``(X, Y)`` intensities (windowed to the 1st-99th percentile).
        reference, prediction: ``(X, Y)`` label maps (any non-zero value is foreground).
        zoom: integer upscaling (nearest) so that small images stay readable.

    Returns:
        ``(Y * zoom, X * zoom, 3)`` uint8, x to the right and y upwards.
    """
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-8), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    rgb = rgb.repeat(zoom, 0).repeat(zoom, 1)
    for mask, colour in ((reference, REFERENCE_RGB), (prediction, PREDICTION_RGB)):
        big = (mask > 0).repeat(zoom, 0).repeat(zoom, 1)
        rgb[big & ~ndimage.binary_erosion(big, iterations=max(1, zoom // 2))] = colour
    return np.ascontiguousarray(np.transpose(rgb, (1, 0, 2))[::-1])


def save_montage(tiles: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, columns: int = 4) -> Path:
    """Write RGB tiles ``(H, W, 3)`` side by side (with a title above each) as one PNG."""
    from PIL import Image, ImageDraw

    height = max(t.shape[0] for t in tiles) + 16
    width = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    canvas = Image.new("RGB", (width * min(columns, len(tiles)), height * rows), "black")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        x, y = (i % columns) * width, (i // columns) * height
        canvas.paste(Image.fromarray(tile), (x, y + 16))
        draw.text((x + 3, y + 2), title, fill="white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
