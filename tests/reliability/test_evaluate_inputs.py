"""``medseg evaluate`` never scores silently what it cannot score."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def _predictions(seg3d_root: Path, tmp_path: Path) -> Path:
    """Perfect predictions of the labelled test cases (case_006, case_007, which dataset.json scores)."""
    return Path(shutil.copytree(seg3d_root / "labelsTs", tmp_path / "pred"))


def _paint(path: Path, value: int, where: tuple) -> None:
    """Set the voxels ``where`` of the label map ``path`` to ``value``."""
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[where] = value
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_an_undeclared_label_value_in_a_prediction_is_warned_and_counted(seg3d_root: Path, tmp_path: Path,
                                                                         medseg: Callable) -> None:
    pred = _predictions(seg3d_root, tmp_path)
    path = pred / "case_006.nii.gz"
    _paint(path, 4, np.s_[:2, :2, :2])  # the dataset declares 0 and 1
    result = medseg("evaluate", "--pred", pred, "--truth", seg3d_root / "dataset.json", "--output", tmp_path / "ev")
    assert result.code == 0
    assert f"{path}: label value(s) [4] (8 voxel(s)) are not among the scored labels [0, 1]; they count as " \
        "background" in result.err
    assert "undeclared label values: 8 voxel(s) in 1 case(s)" in result.err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["undeclared_labels"] == {"cases": 1, "voxels": 8, "by_case": {"case_006": {"4": 8}}}


def test_a_clean_prediction_folder_reports_no_undeclared_values(seg3d_root: Path, tmp_path: Path,
                                                                medseg: Callable) -> None:
    pred = _predictions(seg3d_root, tmp_path)
    result = medseg("evaluate", "--pred", pred, "--truth", seg3d_root / "dataset.json", "--output", tmp_path / "ev")
    assert result.code == 0 and "undeclared" not in result.err
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["undeclared_labels"]["cases"] == 0


def test_a_missing_prediction_is_listed_and_fails_the_command(seg3d_root: Path, tmp_path: Path,
                                                              medseg: Callable) -> None:
    pred = _predictions(seg3d_root, tmp_path)
    (pred / "case_007.nii.gz").unlink()
    result = medseg("evaluate", "--pred", pred, "--truth", seg3d_root / "dataset.json", "--output", tmp_path / "ev")
    assert result.code == 1 and "missing predictions: case_007" in result.err


def test_a_prediction_on_another_grid_is_one_line(seg3d_root: Path, tmp_path: Path, medseg: Callable) -> None:
    pred = _predictions(seg3d_root, tmp_path)
    path = pred / "case_006.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 6), np.uint8), nib.load(path).affine), path)
    result = medseg("evaluate", "--pred", pred, "--truth", seg3d_root / "dataset.json", "--output", tmp_path / "ev")
    assert result.code == 2 and f"{path}: grid (24, 24, 6) does not match" in result.refusal("evaluate")


def test_a_truncated_prediction_is_one_line(seg3d_root: Path, tmp_path: Path, medseg: Callable) -> None:
    pred = _predictions(seg3d_root, tmp_path)
    path = pred / "case_007.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = medseg("evaluate", "--pred", pred, "--truth", seg3d_root / "dataset.json", "--output", tmp_path / "ev")
    assert result.code == 2 and f"{path}: truncated" in result.refusal("evaluate")


def test_with_a_folder_of_labels_a_value_no_label_file_holds_is_warned(seg3d_root: Path, tmp_path: Path,
                                                                       medseg: Callable) -> None:
    pred = _predictions(seg3d_root, tmp_path)
    path = pred / "case_007.nii.gz"
    _paint(path, 9, np.s_[-1, -1, -3:])
    result = medseg("evaluate", "--pred", pred, "--truth", seg3d_root / "labelsTs", "--output", tmp_path / "ev")
    assert result.code == 0
    assert f"{path}: label value(s) [9] (3 voxel(s)) are not among the scored labels [0, 1]; they count as " \
        "background" in result.err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["undeclared_labels"]["by_case"] == {"case_007": {"9": 3}}
    # Scored as with a dataset.json: class 1 only (the 9s are background), not a phantom class 9.
    assert list(summary["per_class"]) == ["1"] and summary["classes"] == [1]
