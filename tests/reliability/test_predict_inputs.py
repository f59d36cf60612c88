"""``medseg predict`` on inputs the model cannot take: the case fails with its file and the real reason, checked
from the header before any transform, and no wrong answer is reported as a success."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.synthetic import write_forged_header
from tests.reliability.conftest import Result, set_voxels


def _one_case(seg3d_root: Path, tmp_path: Path, name: str = "case_000.nii.gz") -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(seg3d_root / "imagesTr" / name, folder / name)
    return folder / name


def _failed_line(result: Result, case: str) -> str:
    """The one line that reports the failed case (printed once, not again in the summary)."""
    assert result.code == 1 and "Traceback" not in result.err, result.err[-3000:]
    lines = [line for line in result.err.splitlines() if line.startswith(f"{case} FAILED: ")]
    assert len(lines) == 1, result.err
    assert "applying transform" not in result.err and "monai.transforms" not in result.err
    return lines[0]


def test_nan_voxels_fail_the_case_naming_the_file_and_the_count(seg3d_checkpoint: Path, seg3d_root: Path,
                                                                  tmp_path: Path, medseg: Callable) -> None:
    image = _one_case(seg3d_root, tmp_path)
    set_voxels(image, np.nan, 9)
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", image.parent, "--output", tmp_path / "out")
    line = _failed_line(result, "case_000")
    assert str(image) in line and "9 of 6912 voxels are NaN or infinite" in line and "--nonfinite zero" in line
    assert not (tmp_path / "out" / "case_000.nii.gz").exists()  # no all-background "success"


def test_inf_voxels_fail_the_case(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                  medseg: Callable) -> None:
    image = _one_case(seg3d_root, tmp_path)
    set_voxels(image, -np.inf, 2)
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", image.parent, "--output", tmp_path / "out")
    assert "2 of 6912 voxels are NaN or infinite" in _failed_line(result, "case_000")


def test_nonfinite_zero_predicts_them_as_zero(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                              medseg: Callable) -> None:
    image = _one_case(seg3d_root, tmp_path)
    changed = set_voxels(image, np.nan, 40)
    clean = tmp_path / "clean" / image.name
    clean.parent.mkdir()
    shutil.copy(image, clean)
    set_voxels(clean, 0.0, 40)  # the same voxels, set to 0 by hand
    assert len(changed) == 40
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", image.parent, "--output", tmp_path / "zero",
                    "--nonfinite", "zero")
    assert result.code == 0 and "40 NaN/infinite voxel(s) set to 0" in result.err
    assert medseg("predict", "--ckpt", seg3d_checkpoint, "--input", clean.parent, "--output",
                  tmp_path / "by_hand").code == 0
    ours = np.asarray(nib.load(tmp_path / "zero" / image.name).dataobj)
    by_hand = np.asarray(nib.load(tmp_path / "by_hand" / image.name).dataobj)
    assert np.array_equal(ours, by_hand)


def test_a_truncated_image_reports_the_innermost_cause(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                       medseg: Callable) -> None:
    image = _one_case(seg3d_root, tmp_path)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", image.parent, "--output", tmp_path / "out")
    line = _failed_line(result, "case_000")
    assert str(image) in line and "EOFError: Compressed file ended before the end-of-stream marker" in line


def test_a_3d_image_into_a_2d_model_is_refused_from_its_header(cls2d_checkpoint: Path, seg3d_root: Path,
                                                               tmp_path: Path, medseg: Callable) -> None:
    image = _one_case(seg3d_root, tmp_path)
    result = medseg("predict", "--ckpt", cls2d_checkpoint, "--input", image.parent, "--output", tmp_path / "out")
    line = _failed_line(result, "case_000")
    assert f"{image}: a 3D image, but the model is 2D (shape (24, 24, 12))" in line
    assert "axcodes" not in result.err


def test_a_two_channel_image_into_a_one_channel_model(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                      medseg: Callable) -> None:
    image = _one_case(seg3d_root, tmp_path)
    img = nib.load(image)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), image)
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", image.parent, "--output", tmp_path / "out")
    assert f"{image}: 2 channel(s), but the model expects 1" in _failed_line(result, "case_000")


def test_a_forged_header_is_refused_before_any_voxel_is_read(seg3d_checkpoint: Path, tmp_path: Path,
                                                             medseg: Callable) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    forged = write_forged_header(folder / "forged.nii.gz", (2000, 2000, 100))  # 4e8 voxels in ~9 KB
    huge = write_forged_header(folder / "huge.nii.gz", (4000, 4000, 400))  # 6.4e9 voxels: over --max-voxels
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", folder, "--output", tmp_path / "out")
    assert "more than a" in _failed_line(result, "forged") and str(forged) in result.err
    assert f"{huge}: the header claims 4000x4000x400 = 6,400,000,000 voxels" in _failed_line(result, "huge")


def test_a_dataset_json_without_cases_is_an_error(seg3d_checkpoint: Path, seg3d: Path, tmp_path: Path,
                                                  medseg: Callable) -> None:
    meta = json.loads((seg3d / "dataset.json").read_text())
    meta["training"], meta["test"] = [], []
    (seg3d / "dataset.json").write_text(json.dumps(meta))
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", seg3d / "dataset.json", "--output",
                    tmp_path / "out")
    assert result.code == 2 and "no cases to predict" in result.refusal("predict")


def test_an_empty_folder_is_an_error(seg3d_checkpoint: Path, tmp_path: Path, medseg: Callable) -> None:
    (tmp_path / "empty").mkdir()
    result = medseg("predict", "--ckpt", seg3d_checkpoint, "--input", tmp_path / "empty", "--output",
                    tmp_path / "out")
    assert result.code == 2 and "no .nii/.nii.gz/.png/.jpg images or DICOM series folders found" in result.refusal("predict")


def test_case_ids_cannot_escape_the_output_folder(seg3d_checkpoint: Path, seg3d: Path, tmp_path: Path,
                                                  medseg: Callable) -> None:
    meta = json.loads((seg3d / "dataset.json").read_text())
    meta["test"] = [{"image": "imagesTs/case_006.nii.gz", "id": "../../escaped"},
                    {"image": "imagesTs/case_007.nii.gz", "id": "/etc/escaped"}]
    (seg3d / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "deep" / "er" / "out"
    assert medseg("predict", "--ckpt", seg3d_checkpoint, "--input", seg3d / "dataset.json", "--output", out).code == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*escaped*"))
    assert len(written) == 2 and all(p.parent == out.relative_to(tmp_path) for p in written), written


def test_nan_voxels_in_the_second_channel_file_name_that_file(seg3d_checkpoint: Path, seg3d_root: Path,
                                                              tmp_path: Path) -> None:
    import pytest

    from medseg.errors import InputError
    from medseg.inference.native import load_model
    from medseg.inference.pipeline import group_models, prepare_case

    files = [tmp_path / f"case_000_000{k}.nii.gz" for k in range(2)]
    for path in files:
        shutil.copy(seg3d_root / "imagesTr" / "case_000.nii.gz", path)
    set_voxels(files[1], np.nan, 4)
    model = load_model(seg3d_checkpoint)
    model.hparams["in_channels"] = 2  # only the preprocessing runs here, not the network
    with pytest.raises(InputError, match=rf"^{files[1]}: 4 of 6912 voxels are NaN or infinite"):
        prepare_case({"id": "case_000", "image": [str(p) for p in files]}, group_models([model]))
