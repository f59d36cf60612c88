"""Dataset descriptions of the multitask and enhancement tasks: parsing, refusals, the data checks and the data
module's case items (the networks and modules have their own test files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.data.checks import check_dataset
from medseg.data.datalist import ENHANCEMENT, MULTITASK, DatasetError, load_dataset
from medseg.data.io import write_nifti
from medseg.data.transforms import interpolation_modes, keys_for

AFFINE = np.diag([0.8, 0.8, 1.0, 1.0])


def _files(root: Path, name: str, shape: tuple[int, ...] = (16, 16), affine: np.ndarray = AFFINE,
           channels: int = 1) -> dict[str, str]:
    """A 2D image, target and label map named ``name`` under ``root`` (relative paths)."""
    rng = np.random.default_rng(len(name))
    image = rng.random(shape + ((channels,) if channels > 1 else ()), dtype=np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:8, 4:8] = 1
    out = {}
    for folder, array in (("imagesTr", image), ("targetsTr", image * 0.5), ("labelsTr", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        write_nifti(array, affine, root / folder / f"{name}.nii.gz")
        out[folder] = f"{folder}/{name}.nii.gz"
    return out


def _write(root: Path, meta: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _multitask(root: Path, **changes: Any) -> Path:
    a, b = _files(root, "a"), _files(root, "b")
    meta = {"task": "multitask", "labels": {"0": "background", "1": "lesion"},
            "classes": {"0": "benign", "1": "malignant"}, "channel_names": {"0": "US"},
            "training": [{"image": a["imagesTr"], "label": a["labelsTr"], "class": 1, "patient": "p1"},
                         {"image": b["imagesTr"], "label": b["labelsTr"], "class": "0", "patient": "p1"}]}
    return _write(root, {**meta, **changes})


def _enhancement(root: Path, with_labels: bool = True, **changes: Any) -> Path:
    a = _files(root, "a")
    entry = {"image": a["imagesTr"], "target": a["targetsTr"]}
    if with_labels:
        entry["label"] = a["labelsTr"]
    meta = {"task": "enhancement", "channel_names": {"0": "US"}, "training": [entry]}
    if with_labels:
        meta["labels"] = {"0": "background", "1": "lesion"}
    return _write(root, {**meta, **changes})


def test_multitask_cases_carry_their_class(tmp_path: Path) -> None:
    spec = load_dataset(_multitask(tmp_path))
    assert spec.task == MULTITASK and spec.class_names == ["benign", "malignant"]
    assert [case["class"] for case in spec.training] == [1, 0]
    assert all(case["label"].endswith(".nii.gz") for case in spec.training)
    assert check_dataset(tmp_path, spatial_dims=2) == []


@pytest.mark.parametrize(("changes", "message"), [
    ({"classes": None}, "missing 'classes'"),
    ({"classes": {"0": "only"}}, "at least two"),
    ({"classes": {"0": "a", "2": "b"}}, "classes indices must be 0..K-1"),
])
def test_multitask_class_names_are_required_and_complete(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(_multitask(tmp_path, **changes))


def test_multitask_training_case_needs_a_class(tmp_path: Path) -> None:
    meta = json.loads((_multitask(tmp_path) / "dataset.json").read_text())
    del meta["training"][1]["class"]
    with pytest.raises(DatasetError, match=r"training\[1\].*has no 'class'"):
        load_dataset(_write(tmp_path, meta))
    meta["training"][1]["class"] = "high"
    with pytest.raises(DatasetError, match="class 'high' is not a class index"):
        load_dataset(_write(tmp_path, meta))


def test_undeclared_class_is_a_data_problem(tmp_path: Path) -> None:
    meta = json.loads((_multitask(tmp_path) / "dataset.json").read_text())
    meta["training"][0]["class"] = 5
    problems = check_dataset(_write(tmp_path, meta), spatial_dims=2)
    assert len(problems) == 1 and "class index 5 is not declared in 'classes'" in problems[0].message


def test_classes_outside_a_multitask_dataset_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'classes'.*multitask"):
        load_dataset(_multitask(tmp_path, task="segmentation"))


def test_enhancement_pairs_image_and_target(tmp_path: Path) -> None:
    spec = load_dataset(_enhancement(tmp_path))
    assert spec.task == ENHANCEMENT and spec.training[0]["target"].endswith("targetsTr/a.nii.gz")
    assert check_dataset(tmp_path, spatial_dims=2) == []
    unlabelled = load_dataset(_enhancement(tmp_path / "plain", with_labels=False))
    assert unlabelled.labels == {0: "background"} and unlabelled.training[0]["label"] is None


def test_enhancement_training_case_needs_a_target(tmp_path: Path) -> None:
    meta = json.loads((_enhancement(tmp_path) / "dataset.json").read_text())
    del meta["training"][0]["target"]
    with pytest.raises(DatasetError, match="has no 'target'"):
        load_dataset(_write(tmp_path, meta))


@pytest.mark.parametrize(("shape", "affine", "message"), [
    ((16, 12), AFFINE, "target shape (16, 12) does not match image shape (16, 16)"),
    ((16, 16), np.diag([0.5, 0.8, 1.0, 1.0]), "target spacing (0.5, 0.8) differs from image spacing (0.8, 0.8)"),
    ((16, 16, 2), AFFINE, "target has 2 channel(s), the image 1"),
])
def test_target_on_another_grid_or_with_other_channels_is_reported(tmp_path: Path, shape: tuple, affine: np.ndarray,
                                                                   message: str) -> None:
    _enhancement(tmp_path)
    write_nifti(np.zeros(shape, np.float32), affine, tmp_path / "targetsTr/a.nii.gz")
    problems = check_dataset(tmp_path)  # (a 2D NIfTI with channels has 3 axes: no spatial_dims=2 here)
    assert [p.file for p in problems] == [str(tmp_path / "targetsTr/a.nii.gz")]
    assert message in problems[0].message


def test_keys_and_interpolation_by_task() -> None:
    assert keys_for("multitask") == ("image", "label")
    assert keys_for("enhancement") == ("image", "target")
    assert keys_for("enhancement", with_label=True) == ("image", "target", "label")
    # targets are images (linear), label maps are never interpolated (nearest), whatever the key order
    assert interpolation_modes(("image", "target", "label"), "bilinear", "nearest") == ("bilinear", "bilinear",
                                                                                        "nearest")


def test_data_module_items_and_paired_patches(tmp_path: Path) -> None:
    from medseg.data.datamodule import MedSegDataModule

    dm = MedSegDataModule(str(_enhancement(tmp_path)), spatial_dims=2, patch_size=[8, 8], samples_per_volume=3,
                          val_fraction=0.0, preprocessing={"intensity": "none"})
    item = dm._item(dm.spec.training[0])
    assert set(item) == {"id", "image", "target", "label"}
    samples = dm.transforms(train=True)(item)
    assert len(samples) == 3
    for sample in samples:  # image, target and label cut at the same place: the target is half the image here
        assert sample["image"].shape == sample["target"].shape == (1, 8, 8) and sample["label"].shape == (1, 8, 8)
        np.testing.assert_allclose(sample["target"].numpy(), 0.5 * sample["image"].numpy(), rtol=1e-6)
    mt_dm = MedSegDataModule(str(_multitask(tmp_path / "mt")), spatial_dims=2, patch_size=[8, 8], val_fraction=0.0)
    assert mt_dm.class_names == ["benign", "malignant"] and mt_dm._item(mt_dm.spec.training[0])["class"] == 1
    assert all(s["class"] == 1 for s in mt_dm.transforms(train=True)(mt_dm._item(mt_dm.spec.training[0])))


def test_enhancement_refuses_augmentation(tmp_path: Path) -> None:
    from medseg.data.datamodule import MedSegDataModule
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="enhancement dataset trains without augmentation"):
        MedSegDataModule(str(_enhancement(tmp_path)), spatial_dims=2, patch_size=[8, 8],
                         augmentation={"flip": {"prob": 0.5}})


def test_a_segmentation_config_on_a_multitask_dataset_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medseg.cli import main

    root = _multitask(tmp_path / "data")
    config = Path(__file__).resolve().parents[1] / "configs" / "seg2d_unet.yaml"
    assert main(["fit", "--config", str(config), "--data.root", str(root)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{(root / 'dataset.json').resolve()}: a multitask dataset, but the model is SegmentationModule" in lines[0]
    assert "use a multitask config" in lines[0]
