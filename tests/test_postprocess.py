"""Post-processing: hand-made label maps with known answers, 2D and 3D, and spec parsing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.inference.postprocess import (
    apply_postprocessing,
    binary_closing,
    binary_opening,
    fill_holes,
    keep_largest_component,
    load_postprocessing,
    remove_small_components,
    save_postprocessing,
    structuring_element,
)

# ------------------------------------------------------------------------------------- components


def test_keep_largest_per_class_2d() -> None:
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[0:3, 0:3] = 1  # class 1, 9 voxels (largest)
    labels[6:8, 6:8] = 1  # class 1, 4 voxels
    labels[0:2, 6:8] = 2  # class 2, 4 voxels (largest of class 2)
    labels[9, 0] = 2  # class 2, 1 voxel
    out = keep_largest_component(labels)
    expected = labels.copy()
    expected[6:8, 6:8] = 0
    expected[9, 0] = 0
    np.testing.assert_array_equal(out, expected)


def test_keep_largest_only_listed_classes_3d() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.int16)
    labels[0:3, 0:3, 0:3] = 1
    labels[6, 6, 6] = 1
    labels[0:2, 6:8, 0:2] = 2
    labels[7, 0, 7] = 2
    out = keep_largest_component(labels, classes=[1])
    assert out[6, 6, 6] == 0 and out[0, 0, 0] == 1
    assert out[7, 0, 7] == 2  # class 2 not listed: untouched
    assert out.dtype == np.int16


def test_keep_largest_union_differs_from_per_class() -> None:
    labels = np.zeros((12, 12), dtype=np.int32)
    # Blob A: class 1 (6 voxels) touching class 2 (6 voxels): 12 foreground voxels together.
    labels[0:2, 0:3] = 1
    labels[2:4, 0:3] = 2
    # Blob B: class 1 alone, 9 voxels: the largest class-1 component, but smaller than blob A.
    labels[8:11, 8:11] = 1
    per_class = keep_largest_component(labels, per_class=True)
    union = keep_largest_component(labels, per_class=False)
    # Per class: class 1 keeps blob B (9 > 6), loses its part of blob A.
    assert (per_class[8:11, 8:11] == 1).all() and (per_class[0:2, 0:3] == 0).all()
    assert (per_class[2:4, 0:3] == 2).all()
    # Union: blob A (12) wins, blob B goes; labels inside the kept blob are unchanged.
    expected = labels.copy()
    expected[8:11, 8:11] = 0
    np.testing.assert_array_equal(union, expected)


def test_connectivity_joins_diagonal_neighbours() -> None:
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[0, 0] = labels[1, 1] = labels[2, 2] = 1  # diagonal chain of 3
    labels[4:6, 4] = 1  # 2 voxels
    face = keep_largest_component(labels, connectivity=1)
    full = keep_largest_component(labels, connectivity=2)
    assert face.sum() == 2  # four singles/pairs: the face-connected pair is largest
    assert full.sum() == 3 and full[1, 1] == 1
    with pytest.raises(ValueError, match="connectivity"):
        keep_largest_component(labels, connectivity=3)


def test_remove_small_components_anisotropic_spacing() -> None:
    labels = np.zeros((12, 12, 6), dtype=np.uint8)
    labels[0:2, 0:5, 0] = 1  # 10 voxels
    labels[6:12, 6:12, 0:3] = 1  # 108 voxels
    # Spacing (1, 1, 3): the 10-voxel blob is 30 mm^3, kept at a 25 mm^3 threshold, removed at 31.
    kept = remove_small_components(labels, (1.0, 1.0, 3.0), min_volume_mm3=25)
    np.testing.assert_array_equal(kept, labels)
    removed = remove_small_components(labels, (1.0, 1.0, 3.0), min_volume_mm3=31)
    assert removed[0:2, 0:5, 0].sum() == 0 and removed.sum() == 108
    # Same voxels, isotropic 1 mm: 10 mm^3 is below 25, so removed.
    iso = remove_small_components(labels, (1.0, 1.0, 1.0), min_volume_mm3=25)
    assert iso[0:2, 0:5, 0].sum() == 0


def test_remove_small_components_2d_per_class() -> None:
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[0:2, 0:2] = 1  # 4 px * 0.5 mm^2 = 2 mm^2
    labels[4:8, 4:8] = 2  # 16 px = 8 mm^2
    labels[0, 7] = 2  # 1 px = 0.5 mm^2
    out = remove_small_components(labels, (0.5, 1.0), min_volume_mm3=1.5, classes=[2])
    assert out[0, 7] == 0 and (out[4:8, 4:8] == 2).all()
    assert (out[0:2, 0:2] == 1).all()  # class 1 not listed
    with pytest.raises(ValueError, match="spacing"):
        remove_small_components(labels, (1.0, 1.0, 1.0), min_volume_mm3=1)


# ------------------------------------------------------------------------------------------ holes


def test_fill_holes_2d_ring_keeps_other_class() -> None:
    labels = np.zeros((7, 7), dtype=np.uint8)
    labels[1:6, 1:6] = 1
    labels[2:5, 2:5] = 0  # ring with a 3x3 hole
    labels[3, 3] = 2  # another class in the hole
    expected = np.zeros_like(labels)
    expected[1:6, 1:6] = 1
    expected[3, 3] = 2
    np.testing.assert_array_equal(fill_holes(labels), expected)
    np.testing.assert_array_equal(fill_holes(labels, classes=[1]), expected)  # class 2 not re-painted


def test_fill_holes_3d_hollow_cube() -> None:
    labels = np.zeros((7, 7, 7), dtype=np.int32)
    labels[1:6, 1:6, 1:6] = 3
    labels[2:5, 2:5, 2:5] = 0
    out = fill_holes(labels)
    assert (out[1:6, 1:6, 1:6] == 3).all() and out.sum() == 3 * 125
    assert fill_holes(labels, classes=[1]).sum() == labels.sum()  # class 1 absent: nothing to fill


# ------------------------------------------------------------------------------------- morphology


def test_structuring_element_anisotropic() -> None:
    el = structuring_element((1.0, 1.0, 3.0), radius_mm=2)
    assert el.shape == (5, 5, 3)  # radii 2, 2, round(2/3)=1
    assert el[2, 2, 0] and el[2, 2, 2] and el[0, 2, 1] and not el[0, 0, 1]
    flat = structuring_element((1.0, 1.0, 5.0), radius_mm=2)
    assert flat.shape == (5, 5, 1)  # round(0.4) = 0: flat along z
    np.testing.assert_array_equal(flat[:, :, 0], structuring_element((1.0, 1.0), 2))
    assert structuring_element((2.0, 2.0), radius_mm=0).shape == (1, 1)
    with pytest.raises(ValueError, match="radius_mm"):
        structuring_element((1.0, 1.0), -1)


def test_opening_removes_spur_keeps_square_2d() -> None:
    labels = np.zeros((12, 12), dtype=np.uint8)
    labels[2:8, 2:8] = 1  # big square
    labels[4, 8:11] = 1  # 1-pixel-wide spur
    out = binary_opening(labels, (1.0, 1.0), radius_mm=1)
    expected = np.zeros_like(labels)
    expected[2:8, 2:8] = 1
    # A radius-1 cross opening rounds the square's corners off; the spur goes, except the pixel next to
    # the square's edge, which the dilation of the eroded square reaches back to.
    for i, j in [(2, 2), (2, 7), (7, 2), (7, 7)]:
        expected[i, j] = 0
    expected[4, 8] = 1
    np.testing.assert_array_equal(out, expected)


def test_opening_square_at_border_is_not_eroded() -> None:
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[0:4, :] = 2  # touches three image edges
    out = binary_opening(labels, (1.0, 1.0), radius_mm=1)
    np.testing.assert_array_equal(out, labels)


def test_opening_anisotropic_radius_3d() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[2:8, 2:8, 4] = 1  # one slice thick in z
    # Spacing 5 mm in z: radius 2 mm is 0 voxels in z, so the single slice survives (2D opening per slice).
    thin_z = binary_opening(labels, (1.0, 1.0, 5.0), radius_mm=1)
    assert thin_z[3:7, 3:7, 4].all()
    # Isotropic 1 mm: the element spans 3 slices, so a 1-slice plate is removed entirely.
    iso = binary_opening(labels, (1.0, 1.0, 1.0), radius_mm=1)
    assert iso.sum() == 0


def test_closing_bridges_gap_and_keeps_other_class_2d() -> None:
    labels = np.zeros((9, 12), dtype=np.uint8)
    labels[2:7, 1:5] = 1
    labels[2:7, 6:10] = 1  # 1-pixel gap at column 5
    labels[4, 5] = 2  # another class sits in the gap
    out = binary_closing(labels, (1.0, 1.0), radius_mm=1, classes=[1])
    np.testing.assert_array_equal(binary_closing(labels, (1.0, 1.0), radius_mm=1), out)
    # Rows 3..5 are bridged (the end rows 2 and 6 stay open: a cross element does not fill corners).
    assert (out[2:7, 5] == [0, 1, 2, 1, 0]).all()
    np.testing.assert_array_equal(out[labels > 0], labels[labels > 0])  # nothing foreground overwritten
    assert out[0].sum() == 0 and out[:, 0].sum() == 0  # no growth outward


def test_closing_3d_gap_along_anisotropic_axis() -> None:
    labels = np.zeros((10, 10, 7), dtype=np.uint8)
    labels[1:9, 1:9, 0:3] = 1
    labels[1:9, 1:9, 4:7] = 1  # gap at z = 3
    bridged = binary_closing(labels, (1.0, 1.0, 2.0), radius_mm=2)  # element radii (2, 2, 1) voxels
    # The interior of the gap is bridged; a rim as wide as the in-plane radius stays open.
    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[3:7, 3:7] = 1
    np.testing.assert_array_equal(bridged[:, :, 3], expected)
    np.testing.assert_array_equal(np.delete(bridged, 3, axis=2), np.delete(labels, 3, axis=2))
    not_bridged = binary_closing(labels, (1.0, 1.0, 5.0), radius_mm=2)  # z radius 0: flat element
    assert not_bridged[:, :, 3].sum() == 0


# ----------------------------------------------------------------------------- copies and dtypes


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_input_not_modified_and_dtype_preserved(dtype: type) -> None:
    labels = np.zeros((8, 8, 4), dtype=dtype)
    labels[0:4, 0:4, 0:2] = 1
    labels[2:3, 2:3, 1] = 0
    labels[6, 6, 3] = 2
    labels[7, 0, 0] = 1
    before = labels.copy()
    spacing = (1.0, 1.0, 2.0)
    results = [
        keep_largest_component(labels),
        keep_largest_component(labels, per_class=False),
        remove_small_components(labels, spacing, 5),
        fill_holes(labels),
        binary_opening(labels, spacing, 1),
        binary_closing(labels, spacing, 1),
        apply_postprocessing(labels, spacing, []),
    ]
    np.testing.assert_array_equal(labels, before)
    for out in results:
        assert out.dtype == labels.dtype and out.shape == labels.shape
        assert not np.shares_memory(out, labels)


def test_float_labels_rejected() -> None:
    with pytest.raises(TypeError, match="integer"):
        fill_holes(np.zeros((4, 4), dtype=np.float32))


# ---------------------------------------------------------------------------------------- specs

STEPS = [
    {"op": "keep_largest_component", "classes": [1]},
    {"op": "remove_small_components", "min_volume_mm3": 50},
    {"op": "fill_holes"},
    {"op": "closing", "radius_mm": 2},
]


def test_load_from_list_dict_json_string_and_files(tmp_path: Path) -> None:
    assert load_postprocessing(STEPS) == STEPS
    assert load_postprocessing({"steps": STEPS}) == STEPS
    assert load_postprocessing(json.dumps(STEPS)) == STEPS
    assert load_postprocessing(json.dumps({"steps": STEPS})) == STEPS
    json_path = tmp_path / "postprocessing.json"
    json_path.write_text(json.dumps({"steps": STEPS}))
    assert load_postprocessing(json_path) == STEPS
    assert load_postprocessing(str(json_path)) == STEPS
    yaml_path = tmp_path / "pp.yaml"
    yaml_path.write_text(
        "- op: keep_largest_component\n  classes: [1]\n"
        "- op: remove_small_components\n  min_volume_mm3: 50\n"
        "- op: fill_holes\n"
        "- op: closing\n  radius_mm: 2\n"
    )
    assert load_postprocessing(yaml_path) == STEPS
    saved = save_postprocessing(STEPS, tmp_path / "saved.json")
    assert load_postprocessing(saved) == STEPS
    assert load_postprocessing([]) == []


def test_load_returns_copies() -> None:
    steps = [{"op": "fill_holes"}]
    loaded = load_postprocessing(steps)
    loaded[0]["classes"] = [1]
    assert steps == [{"op": "fill_holes"}]


def test_unknown_op_and_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown post-processing op 'dilate'.*fill_holes"):
        load_postprocessing([{"op": "dilate"}])
    with pytest.raises(ValueError, match=r"closing.*unknown option.*radius.*valid options.*radius_mm"):
        load_postprocessing([{"op": "closing", "radius": 2}])
    with pytest.raises(ValueError, match=r"opening.*missing.*radius_mm"):
        load_postprocessing([{"op": "opening"}])
    with pytest.raises(ValueError, match="'op' key"):
        load_postprocessing([{"classes": [1]}])
    with pytest.raises(ValueError, match="'steps' key"):
        load_postprocessing({"ops": []})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_postprocessing(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"op": "fill_holes", "radius_mm": 1}]))
    with pytest.raises(ValueError, match=r"bad\.json.*fill_holes.*radius_mm"):
        load_postprocessing(bad)


def test_apply_postprocessing_in_order_3d() -> None:
    labels = np.zeros((12, 12, 4), dtype=np.uint8)
    labels[1:7, 1:7, 0:4] = 1  # 144 voxels with a hole
    labels[3:5, 3:5, 1:3] = 0
    labels[10, 10, 0] = 1  # stray voxel of class 1
    labels[9:11, 0:2, 0] = 2  # 4 voxels * 2 mm^3 = 8 mm^3 < 50: removed
    labels[0:1, 9:12, 0:4] = 2  # 12 voxels * 2 = 24 mm^3: removed as well
    out = apply_postprocessing(labels, (1.0, 1.0, 2.0), STEPS)
    expected = np.zeros_like(labels)
    expected[1:7, 1:7, 0:4] = 1
    np.testing.assert_array_equal(out, expected)
    # A {"steps": ...} spec with one class-limited step: 8 mm^3 < 10 removed, 24 mm^3 kept, class 1 untouched.
    spec = {"steps": [{"op": "remove_small_components", "min_volume_mm3": 10, "classes": [2]}]}
    out2 = apply_postprocessing(labels, (1.0, 1.0, 2.0), spec)
    assert out2[9:11, 0:2, 0].sum() == 0 and (out2[0, 9:12, :] == 2).all()
    np.testing.assert_array_equal(out2 == 1, labels == 1)
