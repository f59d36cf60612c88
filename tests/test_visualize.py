"""Overlay pictures: outlines where the masks' borders are, in the expected colours and orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medseg.visualize import PREDICTION_RGB, REFERENCE_RGB, best_slice, overlay, save_montage


def test_best_slice_has_most_foreground() -> None:
    label = np.zeros((8, 8, 5), np.uint8)
    label[2:4, 2:4, 1] = 1
    label[1:6, 1:6, 3] = 2
    assert best_slice(label) == 3


def test_overlay_outlines_in_place_and_orientation() -> None:
    image = np.zeros((10, 6))
    reference = np.zeros((10, 6), np.uint8)
    reference[0:3, 0:2] = 1  # low x, low y: must appear bottom-left (x right, y up)
    prediction = np.zeros((10, 6), np.uint8)
    prediction[7:10, 4:6] = 1  # high x, high y: top-right
    rgb = overlay(image, reference, prediction, zoom=1)
    assert rgb.shape == (6, 10, 3)
    green = np.all(rgb == REFERENCE_RGB, axis=-1)
    red = np.all(rgb == PREDICTION_RGB, axis=-1)
    rows, cols = np.nonzero(green)
    assert rows.min() >= 4 and cols.max() <= 2  # bottom-left block
    rows, cols = np.nonzero(red)
    assert rows.max() <= 1 and cols.min() >= 7  # top-right block
    assert not np.any(green & red)


def test_montage_is_a_png_with_every_tile(tmp_path: Path) -> None:
    tiles = [np.full((20, 30, 3), v, np.uint8) for v in (50, 100, 150)]
    path = save_montage(tiles, ["a", "b", "c"], tmp_path / "m.png", columns=2)
    with Image.open(path) as img:
        assert img.size == (60, 2 * (20 + 16))
        assert img.getpixel((45, 30)) == (100, 100, 100)  # second tile, first row
