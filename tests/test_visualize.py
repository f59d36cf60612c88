"""Overlay pictures: outlines where the masks' borders are, in the expected colours and orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medseg.visualize import (
    BOTH_RGB,
    LEGEND,
    MIN_TILE,
    PREDICTION_RGB,
    REFERENCE_RGB,
    best_slice,
    overlay,
    save_montage,
    upscale,
)


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


def test_coinciding_outlines_are_yellow_not_hidden() -> None:
    mask = np.zeros((12, 12), np.uint8)
    mask[3:9, 3:9] = 1
    rgb = overlay(np.zeros((12, 12)), mask, mask, zoom=1)
    assert np.all(rgb == BOTH_RGB, axis=-1).sum() == 20  # the 6 x 6 square's border
    assert not np.all(rgb == REFERENCE_RGB, axis=-1).any() and not np.all(rgb == PREDICTION_RGB, axis=-1).any()


def test_montage_is_a_png_with_every_tile(tmp_path: Path) -> None:
    colours = [(50, 120, 10), (100, 20, 200), (150, 150, 0)]  # not grey: text is drawn in greys
    tiles = [np.full((20, 30, 3), c, np.uint8) for c in colours]
    path = save_montage(tiles, ["a", "b", "c"], tmp_path / "m.png", columns=2, min_tile=20)
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    for colour in colours:  # every tile is there, whole (20 x 30 at factor 1)
        rows, cols = np.nonzero(np.all(pixels == colour, axis=-1))
        assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 30
    first, second = (np.nonzero(np.all(pixels == c, axis=-1)) for c in colours[:2])
    assert first[0].min() == second[0].min() and first[1].max() < second[1].min()  # side by side


def test_small_tiles_are_upscaled_by_nearest_neighbour(tmp_path: Path) -> None:
    tile = np.zeros((48, 40, 3), np.uint8)
    tile[::2, ::2] = 255  # a checkerboard survives only a nearest-neighbour enlargement
    path = save_montage([tile, tile], ["one", "two"], tmp_path / "m.png")
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    factor = -(-MIN_TILE // 40)  # the short side reaches MIN_TILE pixels
    assert upscale(tile, factor).shape == (48 * factor, 40 * factor, 3)
    assert pixels.shape[1] >= 2 * 40 * factor and pixels.shape[0] >= 48 * factor
    values = set(np.unique(pixels[..., 0]))
    assert {0, 255} <= values
    # find the first tile: a block of factor x factor identical pixels at its top-left
    rows, cols = np.nonzero(np.all(pixels == 0, axis=-1))
    top, left = rows.min(), cols.min()
    block = pixels[top + factor:top + 2 * factor, left:left + factor]  # second tile row: was black
    assert np.all(block == 0) and np.all(pixels[top:top + factor, left:left + factor] == 255)


def test_montage_has_a_legend_and_a_heading(tmp_path: Path) -> None:
    tile_colour = (20, 90, 160)
    tiles = [np.full((64, 64, 3), tile_colour, np.uint8)] * 2
    path = save_montage(tiles, ["best", "worst"], tmp_path / "m.png", heading="Model unet")
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
        assert img.text["Title"] == "Model unet"
        assert img.text["Description"] == ("green: reference outline; red: prediction outline; "
                                           "yellow: both (outlines coincide)")
    tiles_end = np.nonzero(np.all(pixels == tile_colour, axis=-1))[0].max()
    below = pixels[tiles_end + 1:]
    for colour in (REFERENCE_RGB, PREDICTION_RGB, BOTH_RGB):  # a filled swatch of each colour under the tiles
        rows, cols = np.nonzero(np.all(below == colour, axis=-1))
        assert len(rows) >= 100 and rows.max() - rows.min() >= 10
    assert [text for text, _ in LEGEND] == ["reference outline", "prediction outline", "both (outlines coincide)"]
    assert dict((tuple(c), t) for t, c in LEGEND)[REFERENCE_RGB] == "reference outline"  # green = reference
    above = pixels[:np.nonzero(np.all(pixels == tile_colour, axis=-1))[0].min()]
    assert (above < 100).all(axis=-1).sum() > 50  # dark text (heading and titles) above the tiles
    one = save_montage(tiles[:1], ["only"], tmp_path / "one.png", heading="a heading wider than one small tile")
    with Image.open(one) as img:  # the canvas grows (or the legend wraps) so that nothing is cut off
        single = np.asarray(img.convert("RGB"))
    for colour in (REFERENCE_RGB, PREDICTION_RGB, BOTH_RGB):
        rows, cols = np.nonzero(np.all(single == colour, axis=-1))
        assert len(rows) >= 100 and cols.max() < single.shape[1] - 5
    no_legend = save_montage(tiles, ["a", "b"], tmp_path / "plain.png", legend=None)
    with Image.open(no_legend) as img:
        plain = np.asarray(img.convert("RGB"))
    assert not np.all(plain == REFERENCE_RGB, axis=-1).any()
