"""``medseg check-data`` and ``medseg fit`` name every defect of a dataset, with its file, before training."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.synthetic import write_forged_header
from tests.reliability.conftest import Result, set_voxels

CONFIGS = Path(__file__).parents[2] / "configs"


def _edit_description(root: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _resave(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data,
                             img.affine if affine is None else affine), path)


def _missing_image(root: Path) -> tuple[str, str]:
    (root / "imagesTr/case_001.nii.gz").unlink()
    return "imagesTr/case_001.nii.gz", "file not found"


def _missing_label(root: Path) -> tuple[str, str]:
    (root / "labelsTr/case_002.nii.gz").unlink()
    return "labelsTr/case_002.nii.gz", "file not found"


def _truncated_image(root: Path) -> tuple[str, str]:
    path = root / "imagesTr/case_003.nii.gz"
    path.write_bytes(path.read_bytes()[:400])
    return "imagesTr/case_003.nii.gz", "truncated"


def _garbage_label(root: Path) -> tuple[str, str]:
    (root / "labelsTr/case_000.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    return "labelsTr/case_000.nii.gz", "unreadable"


def _nan_voxels(root: Path) -> tuple[str, str]:
    set_voxels(root / "imagesTr/case_004.nii.gz", np.nan, 7)
    return "imagesTr/case_004.nii.gz", "7 NaN voxel(s)"


def _inf_voxels(root: Path) -> tuple[str, str]:
    set_voxels(root / "imagesTr/case_005.nii.gz", np.inf, 3)
    return "imagesTr/case_005.nii.gz", "3 Inf"


def _label_shape(root: Path) -> tuple[str, str]:
    _resave(root / "labelsTr/case_001.nii.gz", np.zeros((24, 24, 10), np.uint8))
    return "labelsTr/case_001.nii.gz", "label shape (24, 24, 10) does not match"


def _label_spacing(root: Path) -> tuple[str, str]:
    path = root / "labelsTr/case_002.nii.gz"
    _resave(path, affine=nib.load(path).affine @ np.diag([1.5, 1, 1, 1]))
    return "labelsTr/case_002.nii.gz", "spacing"


def _label_affine(root: Path) -> tuple[str, str]:
    path = root / "labelsTr/case_003.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[:3, 3] += 5.0
    _resave(path, affine=affine)
    return "labelsTr/case_003.nii.gz", "affine differs"


def _undeclared_label(root: Path) -> tuple[str, str]:
    path = root / "labelsTr/case_000.nii.gz"
    data = np.asarray(nib.load(path).dataobj).copy()
    data[0, 0, 0] = 7
    _resave(path, data)
    return "labelsTr/case_000.nii.gz", "label values [7] not declared"


def _fractional_label(root: Path) -> tuple[str, str]:
    path = root / "labelsTr/case_001.nii.gz"
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    data[1, 1, 1] = 0.5
    _resave(path, data)
    return "labelsTr/case_001.nii.gz", "non-integer label value"


def _two_channels(root: Path) -> tuple[str, str]:
    path = root / "imagesTr/case_002.nii.gz"
    data = np.asarray(nib.load(path).dataobj)
    _resave(path, np.stack([data, data], axis=-1))
    return "imagesTr/case_002.nii.gz", "2 channel(s)"


def _empty_training(root: Path) -> tuple[str, str]:
    _edit_description(root, lambda meta: meta.update(training=[]))
    return "dataset.json", "no training cases"


def _bad_json(root: Path) -> tuple[str, str]:
    (root / "dataset.json").write_text('{"labels": {"0": "background",')
    return "dataset.json", "cannot read dataset description"


def _duplicate_ids(root: Path) -> tuple[str, str]:
    _edit_description(root, lambda meta: meta["training"].append(dict(meta["training"][0])))
    return "dataset.json", "share the id"


def _symlink_loop(root: Path) -> tuple[str, str]:
    os.symlink(root / "imagesTr/loop_b", root / "imagesTr/loop_a")
    os.symlink(root / "imagesTr/loop_a", root / "imagesTr/loop_b")
    _edit_description(root, lambda meta: meta["training"][0].update(image="imagesTr/loop_a"))
    return "dataset.json", "imagesTr/loop_a: cannot resolve the path"


def _forged_header(root: Path) -> tuple[str, str]:
    write_forged_header(root / "imagesTr/case_004.nii.gz", (20000, 20000, 1))
    return "imagesTr/case_004.nii.gz", "more than a"


def _test_list_image(root: Path) -> tuple[str, str]:
    path = root / "imagesTs/case_006.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    return "imagesTs/case_006.nii.gz", "truncated"


DEFECTS = [_missing_image, _missing_label, _truncated_image, _garbage_label, _nan_voxels, _inf_voxels, _label_shape,
           _label_spacing, _label_affine, _undeclared_label, _fractional_label, _two_channels, _empty_training,
           _bad_json, _duplicate_ids, _symlink_loop, _forged_header, _test_list_image]


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.__name__.strip("_") for d in DEFECTS])
def test_check_data_names_the_file_and_the_defect(defect: Callable[[Path], tuple[str, str]], seg3d: Path,
                                                   medseg: Callable[..., Result]) -> None:
    file, reason = defect(seg3d)
    result = medseg("check-data", seg3d)
    assert result.code == 1 and "Traceback" not in result.err
    lines = [line for line in result.out.splitlines() if line.strip().startswith("/")]
    assert any(line.strip().startswith(str(seg3d / file) + ":") and reason in line for line in lines), result.out


def test_check_data_counts_the_cases_it_checked(seg3d: Path, medseg: Callable[..., Result]) -> None:
    result = medseg("check-data", seg3d)
    assert result.code == 0 and "checked 8 case(s)" in result.out  # 6 training + 2 test, all read


def test_max_voxels_refuses_a_larger_real_image(seg3d: Path, medseg: Callable[..., Result]) -> None:
    result = medseg("check-data", seg3d, "--max-voxels", 1000)  # the images have 24 x 24 x 12 = 6912
    assert result.code == 1 and "6,912 voxels, more than the limit of 1,000" in result.out
    assert "raise --max-voxels" in result.out


def test_fit_refuses_bad_data_before_training(seg3d: Path, tmp_path: Path, medseg: Callable[..., Result]) -> None:
    set_voxels(seg3d / "imagesTr/case_001.nii.gz", np.nan, 4)
    result = medseg("fit", "--config", CONFIGS / "seg3d_unet.yaml", "--data.root", seg3d,
                    "--trainer.default_root_dir", tmp_path / "runs", "--trainer.accelerator", "cpu")
    assert result.code == 2 and "Traceback" not in result.err
    assert f"{seg3d / 'imagesTr/case_001.nii.gz'}: 4 NaN voxel(s)" in result.err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_fit_refuses_a_forged_header_before_reading_it(seg3d: Path, tmp_path: Path,
                                                       medseg: Callable[..., Result]) -> None:
    write_forged_header(seg3d / "labelsTr/case_002.nii.gz", (4000, 4000, 400))  # 6.4e9 voxels
    result = medseg("fit", "--config", CONFIGS / "seg3d_unet.yaml", "--data.root", seg3d,
                    "--trainer.default_root_dir", tmp_path / "runs", "--trainer.accelerator", "cpu")
    assert result.code == 2
    assert f"{seg3d / 'labelsTr/case_002.nii.gz'}: the header claims 4000x4000x400" in result.err


def test_a_dataset_json_that_is_a_dangling_link_is_named(tmp_path: Path, medseg: Callable[..., Result]) -> None:
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    result = medseg("check-data", tmp_path / "a")
    assert result.code == 1 and "symlink loop" in result.out and "Traceback" not in result.err
