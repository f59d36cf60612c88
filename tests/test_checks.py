"""Tests of the dataset checks: a clean dataset passes, each kind of bad input is reported on the right file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.checks import DataCheckError, Problem, assert_dataset_ok, check_dataset, format_report
from medseg.data.io import read_image, write_nifti
from medseg.data.synthetic import make_synthetic

SMALL = (16, 16, 8)


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    """A clean 3D segmentation dataset: 4 training cases, 3 classes, 1 test case."""
    make_synthetic(tmp_path / "seg", cases=4, classes=3, size=SMALL, test_cases=1)
    return (tmp_path / "seg").resolve()


def _edit_json(root: Path, change) -> None:
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _rewrite(path: Path, change, affine: np.ndarray | None = None, dtype: type = np.float32) -> None:
    """Replace the NIfTI at ``path`` by ``change(array)`` (with ``affine`` if given)."""
    array, old_affine = read_image(path)
    write_nifti(change(array.copy()), old_affine if affine is None else affine, path, dtype=dtype)


def _only(problems: list[Problem], file: Path, *words: str) -> Problem:
    """The single problem reported, checked to concern ``file`` and to mention all ``words``."""
    assert len(problems) == 1, "\n".join(map(str, problems))
    problem = problems[0]
    assert problem.file == str(file)
    for word in words:
        assert word.lower() in problem.message.lower(), problem.message
    return problem


def _with_nan(array: np.ndarray, count: int = 5, value: float = np.nan) -> np.ndarray:
    array.reshape(-1)[:count] = value
    return array


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classes": 3, "test_cases": 1},
        {"channels": 2, "test_cases": 1},
        {"task": "cls", "classes": 3},
        {"dims": 2, "size": (24, 24), "test_cases": 1},
    ],
)
def test_clean_dataset_has_no_problems(tmp_path: Path, kwargs: dict) -> None:
    make_synthetic(tmp_path, cases=4, **({"size": SMALL} | kwargs))
    assert check_dataset(tmp_path) == []
    assert_dataset_ok(tmp_path)  # does not raise


def test_missing_image(seg: Path) -> None:
    (seg / "imagesTr/case_001.nii.gz").unlink()
    _only(check_dataset(seg), seg / "imagesTr/case_001.nii.gz", "not found")


def test_missing_label(seg: Path) -> None:
    (seg / "labelsTr/case_002.nii.gz").unlink()
    _only(check_dataset(seg), seg / "labelsTr/case_002.nii.gz", "not found")


def test_missing_label_does_not_stop_the_image_checks(seg: Path) -> None:
    (seg / "labelsTr/case_002.nii.gz").unlink()
    _rewrite(seg / "imagesTr/case_002.nii.gz", _with_nan)
    problems = check_dataset(seg)
    assert [(p.file, "not found" in p.message, "NaN" in p.message) for p in problems] == [
        (str(seg / "labelsTr/case_002.nii.gz"), True, False),
        (str(seg / "imagesTr/case_002.nii.gz"), False, True),
    ]


def test_truncated_nifti(seg: Path) -> None:
    path = seg / "imagesTr/case_003.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _only(check_dataset(seg), path, "truncated")


def test_garbage_bytes(seg: Path) -> None:
    path = seg / "labelsTr/case_000.nii.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    _only(check_dataset(seg), path, "unreadable")


def test_nan_voxels_are_counted(seg: Path) -> None:
    path = seg / "imagesTr/case_001.nii.gz"
    _rewrite(path, lambda a: _with_nan(a, 7))
    _only(check_dataset(seg), path, "7 NaN")


def test_inf_voxels_are_counted(seg: Path) -> None:
    path = seg / "imagesTr/case_001.nii.gz"
    _rewrite(path, lambda a: _with_nan(a, 3, -np.inf))
    _only(check_dataset(seg), path, "3 Inf")


def test_shape_mismatch(seg: Path) -> None:
    path = seg / "labelsTr/case_002.nii.gz"
    _rewrite(path, lambda a: a[:, :, :7], dtype=np.uint8)
    _only(check_dataset(seg), path, "shape", "(16, 16, 7)", "(16, 16, 8)", "case_002.nii.gz")


def test_spacing_mismatch(seg: Path) -> None:
    path = seg / "labelsTr/case_001.nii.gz"
    affine = read_image(path)[1]
    affine[2, 2] = 3.0
    _rewrite(path, lambda a: a, affine=affine, dtype=np.uint8)
    _only(check_dataset(seg), path, "spacing", "(1, 1, 3)", "(1, 1, 2)")


def test_affine_mismatch_beyond_tolerance(seg: Path) -> None:
    path = seg / "labelsTr/case_001.nii.gz"
    affine = read_image(path)[1]
    affine[0, 3] += 5.0  # origin moved by 5 mm
    _rewrite(path, lambda a: a, affine=affine, dtype=np.uint8)
    _only(check_dataset(seg), path, "affine", "5")
    assert check_dataset(seg, tolerance=10.0) == []


def test_affine_difference_within_tolerance_is_accepted(seg: Path) -> None:
    path = seg / "labelsTr/case_001.nii.gz"
    affine = read_image(path)[1]
    affine[0, 3] += 1e-4
    _rewrite(path, lambda a: a, affine=affine, dtype=np.uint8)
    assert check_dataset(seg) == []


def test_undeclared_label_values(seg: Path) -> None:
    path = seg / "labelsTr/case_003.nii.gz"

    def add_values(a: np.ndarray) -> np.ndarray:
        a[0, 0, 0], a[1, 0, 0] = 7, 5
        return a

    _rewrite(path, add_values, dtype=np.uint8)
    _only(check_dataset(seg), path, "[5, 7]", "not declared")


def test_non_integer_label_values(seg: Path) -> None:
    path = seg / "labelsTr/case_003.nii.gz"
    _rewrite(path, lambda a: a + 0.5, dtype=np.float32)
    _only(check_dataset(seg), path, "non-integer")


def test_too_many_channel_files(seg: Path) -> None:
    def two_files(meta: dict) -> None:
        meta["training"][1]["image"] = ["imagesTr/case_001.nii.gz", "imagesTr/case_000.nii.gz"]

    _edit_json(seg, two_files)
    _only(check_dataset(seg), seg / "imagesTr/case_001.nii.gz", "2 channel files", "declares 1")


def test_4d_nifti_with_wrong_channel_count(seg: Path) -> None:
    path = seg / "imagesTr/case_000.nii.gz"
    _rewrite(path, lambda a: np.stack([a, a], axis=-1))
    _only(check_dataset(seg), path, "2 channel(s)", "declares 1")


def test_rgb_png_for_a_one_channel_dataset(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    (tmp_path / "images").mkdir()
    Image.fromarray(rgb).save(tmp_path / "images/a.png")
    Image.fromarray(grey).save(tmp_path / "images/b.png")
    meta = {"task": "cls", "labels": {"0": "no", "1": "yes"}, "channel_names": {"0": "US"}}
    meta["training"] = [{"image": "images/a.png", "label": 0}, {"image": "images/b.png", "label": 1}]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    _only(check_dataset(tmp_path), (tmp_path / "images/a.png").resolve(), "3 channel(s)", "declares 1")


def test_channel_files_disagreeing_in_shape(tmp_path: Path) -> None:
    make_synthetic(tmp_path, cases=3, size=SMALL, channels=2)
    path = (tmp_path / "imagesTr/case_001_0001.nii.gz").resolve()
    _rewrite(path, lambda a: a[:15])
    _only(check_dataset(tmp_path), path, "channel file shape", "(15, 16, 8)", "case_001_0000.nii.gz")


def test_classification_label_out_of_range(tmp_path: Path) -> None:
    make_synthetic(tmp_path, cases=4, classes=2, task="cls", size=SMALL)
    _edit_json(tmp_path, lambda meta: meta["training"][2].update(label=5))
    _only(
        check_dataset(tmp_path),
        (tmp_path / "dataset.json").resolve(),
        "case_002",
        "class index 5",
        "not declared",
    )


def test_empty_training_list(seg: Path) -> None:
    _edit_json(seg, lambda meta: meta.update(training=[], test=[]))
    _only(check_dataset(seg), seg / "dataset.json", "no training cases")


def test_bad_json(seg: Path) -> None:
    (seg / "dataset.json").write_text('{"labels": {"0": "background"}, "training": [')
    _only(check_dataset(seg), seg / "dataset.json", "cannot read dataset description")


def test_description_error_becomes_one_problem(seg: Path) -> None:
    _edit_json(seg, lambda meta: meta.pop("labels"))
    problem = _only(check_dataset(seg), seg / "dataset.json", "labels")
    assert not problem.message.startswith(str(seg))  # the file is not repeated in the message


def test_no_description_at_all(tmp_path: Path) -> None:
    _only(check_dataset(tmp_path), tmp_path, "no dataset.json")


def test_test_list_images_are_checked(seg: Path) -> None:
    path = seg / "imagesTs/case_004.nii.gz"
    _rewrite(path, _with_nan)
    _only(check_dataset(seg), path, "5 NaN")
    path.unlink()
    _only(check_dataset(seg), path, "not found")


def test_many_problems_are_all_reported(seg: Path) -> None:
    (seg / "imagesTr/case_000.nii.gz").unlink()
    _rewrite(seg / "imagesTr/case_002.nii.gz", _with_nan)
    (seg / "labelsTr/case_003.nii.gz").write_bytes(b"not a nifti")
    files = [p.file for p in check_dataset(seg)]
    assert files == [
        str(seg / f)
        for f in ("imagesTr/case_000.nii.gz", "imagesTr/case_002.nii.gz", "labelsTr/case_003.nii.gz")
    ]


def test_format_report() -> None:
    assert format_report([], 5) == "checked 5 case(s): no problems found"
    problems = [
        Problem("a.nii.gz", "file not found"),
        Problem("b.nii.gz", "2 NaN voxel(s)"),
        Problem("b.nii.gz", "x"),
    ]
    report = format_report(problems, 4)
    assert "a.nii.gz: file not found" in report and "b.nii.gz: 2 NaN voxel(s)" in report
    assert report.splitlines()[-1] == "3 problem(s) in 2 file(s)"
    assert str(problems[0]) == "a.nii.gz: file not found"


def test_assert_dataset_ok_raises_with_the_report(seg: Path) -> None:
    (seg / "labelsTr/case_001.nii.gz").unlink()
    with pytest.raises(DataCheckError) as info:
        assert_dataset_ok(seg)
    err = info.value
    assert isinstance(err, ValueError)
    assert [p.file for p in err.problems] == [str(seg / "labelsTr/case_001.nii.gz")]
    assert "checked 5 case(s)" in str(err) and "labelsTr/case_001.nii.gz: file not found" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems and str(copy) == str(err)


def test_progress_bar_goes_to_stderr(seg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_dataset(seg, progress=True)
    captured = capsys.readouterr()
    assert "checking cases" in captured.err and "5/5" in captured.err
    assert captured.out == ""
    check_dataset(seg)
    assert capsys.readouterr().err == ""
