"""Pictures people look at instead of reading numbers: slices with reference and prediction contours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

REFERENCE_RGB = (40, 220, 60)  # green
PREDICTION_RGB = (235, 50, 50)  # red
BOTH_RGB = (250, 200, 30)  # yellow: where the two outlines coincide (else red would hide green)


def best_slice(label: np.ndarray) -> int:
    """Index along the last axis of the slice with the most foreground in ``label`` ``(X, Y, Z)``."""
    return int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(axis=0)))


def overlay(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, zoom: int = 4) -> np.ndarray:
    """One 2D slice as RGB with the outlines of the reference (green) and the prediction (red); yellow where
    the two outlines coincide.

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
    outlines = []
    for mask in (reference, prediction):
        big = (mask > 0).repeat(zoom, 0).repeat(zoom, 1)
        outlines.append(big & ~ndimage.binary_erosion(big, iterations=max(1, zoom // 2)))
    rgb[outlines[0] & ~outlines[1]] = REFERENCE_RGB
    rgb[outlines[1] & ~outlines[0]] = PREDICTION_RGB
    rgb[outlines[0] & outlines[1]] = BOTH_RGB
    return np.ascontiguousarray(np.transpose(rgb, (1, 0, 2))[::-1])


LEGEND = (("reference outline", REFERENCE_RGB), ("prediction outline", PREDICTION_RGB),
          ("both (outlines coincide)", BOTH_RGB))
MIN_TILE = 256  # pixels: smaller tiles are upscaled (nearest neighbour) to at least this on their short side
BACKGROUND, INK = (255, 255, 255), (25, 25, 25)


def upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    """``tile`` ``(H, W, ...)`` enlarged ``factor`` times along both axes by repeating pixels (nearest)."""
    return tile.repeat(factor, 0).repeat(factor, 1) if factor > 1 else tile


def save_montage(
    tiles: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path,
    columns: int = 4,
    *,
    heading: str | None = None,
    legend: Sequence[tuple[str, tuple[int, int, int]]] | None = LEGEND,
    min_tile: int = MIN_TILE,
) -> Path:
    """Write RGB tiles ``(H, W, 3)`` in a grid, a title above each, as one PNG on white.

    Args:
        tiles: the pictures (e.g. from :func:`overlay`).
        titles: one per tile.
        path: the PNG to write (its folder is created).
        columns: tiles per row.
        heading: a line above everything (e.g. which model the tiles show).
        legend: ``(text, colour)`` swatches drawn below the tiles (default: what green and red outlines mean);
            ``None`` for none. The heading and legend are also stored in the PNG's ``Title``/``Description``.
        min_tile: tiles whose short side is smaller are upscaled by a whole factor (nearest neighbour, no
            smoothing) to at least this many pixels, all by the same factor.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    factor = max(1, -(-min_tile // max(1, min(min(t.shape[:2]) for t in tiles))))
    tiles = [upscale(np.asarray(t, dtype=np.uint8), factor) for t in tiles]
    width, height = max(t.shape[1] for t in tiles), max(t.shape[0] for t in tiles)
    size = max(14, min(28, width // 16))
    font, pad, line = _font(size), max(6, size // 2), int(size * 1.6)
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    entries = [(text, tuple(colour), size + pad + int(font.getlength(text))) for text, colour in legend or ()]
    canvas_width = max(pad + columns * (width + pad), 2 * pad + int(font.getlength(heading or "")),
                       2 * pad + max((w for *_, w in entries), default=0))
    placed, x, legend_rows = [], pad, 1  # legend entries flow into as many lines as the width needs
    for text, colour, w in entries:
        if x > pad and x + w + pad > canvas_width:
            x, legend_rows = pad, legend_rows + 1
        placed.append((text, colour, x, legend_rows - 1))
        x += w + 3 * pad
    top = line + pad if heading else 0
    bottom = legend_rows * line + pad if entries else 0
    canvas = Image.new("RGB", (canvas_width, top + rows * (line + height + pad) + bottom + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if heading:
        draw.text((pad, pad), heading, fill=INK, font=font)
    for i, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        x, y = pad + (i % columns) * (width + pad), top + pad + (i // columns) * (line + height + pad)
        draw.text((x, y), _fit(title, font, width), fill=INK, font=font)
        canvas.paste(Image.fromarray(tile), (x, y + line))
    for text, colour, x, row in placed:
        y = canvas.height - bottom + row * line + (line - size) // 2
        draw.rectangle((x, y, x + size, y + size), fill=colour, outline=INK)
        draw.text((x + size + pad, y), text, fill=INK, font=font)
    info = PngInfo()
    info.add_text("Title", heading or "")
    info.add_text("Description", "; ".join(f"{_colour_name(c)}: {t}" for t, c in legend or ()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)
    return path


def _font(size: int):  # noqa: ANN202 - PIL font types
    """Pillow's built-in font at ``size`` pixels (the small bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:  # noqa: ANN001 - PIL font types
    """``text``, cut with an ellipsis where it is wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _colour_name(colour: tuple[int, int, int]) -> str:
    names = {REFERENCE_RGB: "green", PREDICTION_RGB: "red", BOTH_RGB: "yellow"}
    return names.get(tuple(colour), "rgb" + str(tuple(colour)))
