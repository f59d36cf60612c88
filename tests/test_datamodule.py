"""Tests of the train/validation split and of MedSegDataModule on tiny synthetic datasets."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.augment import AlbumentationsD
from medseg.data.checks import DataCheckError
from medseg.data.datamodule import CACHE_MODES, MedSegDataModule, split_cases
from medseg.data.io import read_image
from medseg.data.synthetic import make_synthetic

SIZE_3D = (16, 16, 8)
PATCH_3D = [8, 8, 4]


@pytest.fixture(scope="module")
def seg3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 cases of 16x16x8, labels 0..2, patients p000 p000 p001 p001 p002 p002."""
    root = tmp_path_factory.mktemp("dm_seg3d")
    make_synthetic(root, dims=3, cases=6, classes=3, size=SIZE_3D, seed=0)
    return root


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dm_seg2d")
    make_synthetic(root, dims=2, cases=4, classes=3, size=(24, 24), seed=1)
    return root


@pytest.fixture(scope="module")
def cls3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dm_cls3d")
    make_synthetic(root, dims=3, cases=4, classes=2, task="cls", size=SIZE_3D, seed=2)
    return root


def _dm(root: Path, **kwargs: Any) -> MedSegDataModule:
    kwargs = {"patch_size": PATCH_3D, "batch_size": 2, "samples_per_volume": 2, **kwargs}
    dm = MedSegDataModule(str(root), **kwargs)
    dm.setup("fit")
    return dm


def _first(loader: Any) -> dict[str, Any]:
    return next(iter(loader))


# ------------------------------------------------------------------------------------------ split_cases


def _cases(n_patients: int, seed: int = 0) -> list[dict[str, Any]]:
    """1..3 cases per patient, plus a few cases without a patient id."""
    rng = random.Random(seed)
    cases = []
    for p in range(n_patients):
        for k in range(rng.randint(1, 3)):
            cases.append({"id": f"p{p}_c{k}", "patient": f"P{p}"})
    cases += [{"id": f"solo{k}", "patient": None} for k in range(3)]
    rng.shuffle(cases)
    return cases


def _patient(case: dict[str, Any]) -> str:
    return case["patient"] or f"case:{case['id']}"


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_never_shares_a_patient(fraction: float, seed: int) -> None:
    cases = _cases(25, seed)
    train, val = split_cases(cases, fraction, None, seed)
    assert {_patient(c) for c in train}.isdisjoint({_patient(c) for c in val})
    # a partition of the cases, in their original order
    assert sorted(c["id"] for c in train + val) == sorted(c["id"] for c in cases)
    assert [c["id"] for c in train] == [c["id"] for c in cases if c in train]
    n_patients = len({_patient(c) for c in cases})  # 25 + 3 without a patient id
    assert len({_patient(c) for c in val}) == max(1, round(fraction * n_patients))


def test_split_is_deterministic_and_depends_on_seed() -> None:
    cases = _cases(30)
    first = split_cases(cases, 0.2, None, seed=7)
    assert split_cases(cases, 0.2, None, seed=7) == first
    val_sets = {frozenset(c["id"] for c in split_cases(cases, 0.2, None, seed=s)[1]) for s in range(5)}
    assert len(val_sets) > 1


def test_split_does_not_depend_on_case_order() -> None:
    cases = _cases(20)
    shuffled = list(reversed(cases))
    val_a = {c["id"] for c in split_cases(cases, 0.3, None, 1)[1]}
    val_b = {c["id"] for c in split_cases(shuffled, 0.3, None, 1)[1]}
    assert val_a == val_b


def test_split_edge_fractions() -> None:
    cases = [{"id": f"c{i}", "patient": None} for i in range(4)]
    train, val = split_cases(cases, 0.0, None, 0)
    assert len(train) == 4 and val == []
    train, val = split_cases(cases, 1.0, None, 0)  # keeps at least one patient for training
    assert len(train) == 1 and len(val) == 3
    train, val = split_cases(cases, 0.01, None, 0)  # at least one validation patient
    assert len(val) == 1


def test_split_explicit_val_cases() -> None:
    cases = _cases(10)
    patients = {_patient(cases[3]), _patient(cases[0])}
    ids = [c["id"] for c in cases if _patient(c) in patients]  # whole patients
    train, val = split_cases(cases, 0.5, ids, seed=0)
    assert {c["id"] for c in val} == set(ids)
    assert len(train) == len(cases) - len(ids) and not {c["id"] for c in train} & set(ids)


def test_split_explicit_val_cases_refuses_a_split_patient() -> None:
    cases = _cases(10)
    shared = [c for c in cases if c["patient"] and sum(_patient(o) == _patient(c) for o in cases) > 1][0]
    with pytest.raises(ValueError, match=str(shared["patient"])):
        split_cases(cases, 0.5, [shared["id"]], seed=0)


def test_split_unknown_val_ids() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        split_cases(_cases(5), 0.2, ["nope", "p0_c0", "also_missing"], 0)
    assert "also_missing" in str(info.value) and "p0_c0" not in str(info.value)


# --------------------------------------------------------------------------------------------- the module


def test_properties(seg3d: Path) -> None:
    dm = MedSegDataModule(str(seg3d), patch_size=PATCH_3D, preprocessing={"intensity": "mri"})
    assert dm.task == "segmentation" and dm.is_segmentation and dm.spatial_dims == 3
    assert dm.num_classes == 3
    assert dm.in_channels == 1
    assert dm.label_names == ["background", "structure1", "structure2"]
    spec = dm.preprocessing_spec
    assert spec["intensity"] == "mri" and spec["orientation"] == "RAS" and spec["resize"] is None
    json.dumps(spec)  # plain data, storable in a checkpoint


def test_split_by_patient_in_module(seg3d: Path) -> None:
    dm = MedSegDataModule(str(seg3d), patch_size=PATCH_3D, val_fraction=0.34, seed=3)
    train_p = {c["patient"] for c in dm.train_cases}
    val_p = {c["patient"] for c in dm.val_cases}
    assert train_p.isdisjoint(val_p)
    assert len(val_p) == 1 and len(dm.val_cases) == 2  # make_synthetic: two cases per patient
    dm2 = MedSegDataModule(str(seg3d), patch_size=PATCH_3D, val_cases=["case_000", "case_001", "case_004", "case_005"])
    assert [c["id"] for c in dm2.val_cases] == ["case_000", "case_001", "case_004", "case_005"]
    assert len(dm2.train_cases) == 2
    with pytest.raises(ValueError, match="case_999"):
        MedSegDataModule(str(seg3d), patch_size=PATCH_3D, val_cases=["case_999"])


def test_train_batch_is_patches(seg3d: Path) -> None:
    dm = _dm(seg3d, batch_size=2, samples_per_volume=3, pos_fraction=1.0, seed=0)
    batch = _first(dm.train_dataloader())
    assert batch["image"].shape == (2 * 3, 1, *PATCH_3D)
    assert batch["label"].shape == (2 * 3, 1, *PATCH_3D)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    assert all(patch.sum() > 0 for patch in batch["label"])  # pos_fraction=1.0: foreground in every patch
    assert batch["image"].dtype == torch.float32


def test_val_batch_is_the_whole_volume(seg3d: Path) -> None:
    dm = _dm(seg3d, val_cases=["case_002", "case_003"])
    batch = _first(dm.val_dataloader())
    assert batch["image"].shape == (1, 1, *SIZE_3D) and batch["label"].shape == (1, 1, *SIZE_3D)
    assert batch["id"] == ["case_002"]
    # synthetic files are stored with the first axis flipped (negative x): RAS flips it back
    image, _ = read_image(seg3d / "imagesTr" / "case_002.nii.gz")
    label, _ = read_image(seg3d / "labelsTr" / "case_002.nii.gz")
    assert np.allclose(batch["image"][0, 0].numpy(), image[::-1])
    assert np.array_equal(batch["label"][0, 0].numpy(), label[::-1])
    assert len(dm.val_dataloader()) == 2


def test_cache_modes_give_the_same_val_batch(seg3d: Path, tmp_path: Path) -> None:
    batches = {}
    for mode in CACHE_MODES:
        dm = _dm(
            seg3d,
            cache=mode,
            cache_dir=str(tmp_path / "cache"),
            val_cases=["case_002", "case_003", "case_004", "case_005"],
            preprocessing={"intensity": "mri", "spacing": [1.5, 1.5, 1.0]},
        )
        batches[mode] = [_first(dm.val_dataloader()) for _ in range(2)]  # disk: second pass reads the cache
    assert any((tmp_path / "cache").iterdir())
    reference = batches["none"][0]
    # resampled from (1, 1, 2) mm to (1.5, 1.5, 1) mm: (16 - 1) / 1.5 + 1 = 11, (8 - 1) * 2 / 1 + 1 = 15
    assert reference["image"].shape == (1, 1, 11, 11, 15)
    for mode, runs in batches.items():
        for batch in runs:
            assert batch["id"] == reference["id"], mode
            assert torch.allclose(torch.as_tensor(batch["image"]), torch.as_tensor(reference["image"])), mode
            assert torch.equal(torch.as_tensor(batch["label"]), torch.as_tensor(reference["label"])), mode


def test_disk_cache_follows_preprocessing(seg3d: Path, tmp_path: Path) -> None:
    shapes = []
    for spacing in (None, [2.0, 2.0, 2.0]):
        dm = _dm(
            seg3d,
            cache="disk",
            cache_dir=str(tmp_path / "cache"),
            val_cases=["case_000", "case_001"],
            preprocessing={"spacing": spacing},
        )
        shapes.append(tuple(_first(dm.val_dataloader())["image"].shape))
    assert shapes == [(1, 1, 16, 16, 8), (1, 1, 8, 8, 8)]


def test_bad_arguments_rejected(seg3d: Path) -> None:
    with pytest.raises(ValueError, match="cache") as info:
        MedSegDataModule(str(seg3d), patch_size=PATCH_3D, cache="ram")
    assert all(mode in str(info.value) for mode in CACHE_MODES)
    with pytest.raises(ValueError, match="spatial_dims"):
        MedSegDataModule(str(seg3d), spatial_dims=4)
    with pytest.raises(ValueError, match="patch_size"):
        MedSegDataModule(str(seg3d), patch_size=[8, 8])
    with pytest.raises(ValueError, match="bogus"):
        MedSegDataModule(str(seg3d), patch_size=PATCH_3D, preprocessing={"bogus": 1})


def test_check_data_refuses_missing_label_before_training(seg3d: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(seg3d, root)
    missing = root / "labelsTr" / "case_004.nii.gz"
    missing.unlink()
    dm = MedSegDataModule(str(root), patch_size=PATCH_3D, check_data=True)
    with pytest.raises(DataCheckError) as info:
        dm.setup("fit")
    assert any(p.file == str(missing.resolve()) for p in info.value.problems)
    assert "case_004.nii.gz" in str(info.value)
    # check_data: false still reads every header: a missing file is refused before training ...
    with pytest.raises(DataCheckError, match="case_004.nii.gz: file not found"):
        MedSegDataModule(str(root), patch_size=PATCH_3D, check_data=False).setup("fit")
    # ... but no voxel is read: NaN voxels pass (they would only show in training)
    shutil.copy(seg3d / "labelsTr" / "case_004.nii.gz", missing)
    image = root / "imagesTr" / "case_001.nii.gz"
    img = nib.load(image)
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), image)
    MedSegDataModule(str(root), patch_size=PATCH_3D, check_data=False).setup("fit")
    with pytest.raises(DataCheckError, match="1 NaN voxel"):
        MedSegDataModule(str(root), patch_size=PATCH_3D, check_data=True).setup("fit")


def test_2d_with_albumentations(seg2d: Path) -> None:
    aug = {"flip": {"prob": 0.5}, "rotate": {"prob": 1.0, "degrees": 30}, "gamma": {"prob": 0.5}}
    dm = _dm(seg2d, spatial_dims=2, patch_size=[16, 12], augmentation=aug, val_cases=["case_000", "case_001"])
    assert any(isinstance(t, AlbumentationsD) for t in dm.transforms(train=True).transforms)
    assert not any(isinstance(t, AlbumentationsD) for t in dm.transforms(train=False).transforms)
    batch = _first(dm.train_dataloader())
    assert batch["image"].shape == (4, 1, 16, 12) and batch["label"].shape == (4, 1, 16, 12)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    val = _first(dm.val_dataloader())
    assert val["image"].shape == (1, 1, 24, 24)
    assert dm.num_classes == 3


def test_multi_channel(tmp_path: Path) -> None:
    make_synthetic(tmp_path, dims=3, cases=4, classes=2, size=SIZE_3D, channels=2, seed=3)
    dm = _dm(tmp_path, val_cases=["case_000_0000", "case_001_0000"])  # ids come from the first channel file
    assert dm.in_channels == 2
    batch = _first(dm.train_dataloader())
    assert batch["image"].shape == (4, 2, *PATCH_3D)
    val = _first(dm.val_dataloader())
    assert val["image"].shape == (1, 2, *SIZE_3D)
    assert not torch.allclose(val["image"][:, 0], val["image"][:, 1])  # two different channels


def test_classification_resize_from_patch_size(cls3d: Path) -> None:
    dm = _dm(cls3d, patch_size=[8, 8, 4], val_cases=["case_000", "case_001"])
    assert dm.task == "classification" and not dm.is_segmentation
    assert dm.preprocessing_spec["resize"] == [8, 8, 4]
    assert dm.num_classes == 2 and dm.label_names == ["class0", "class1"]
    batch = _first(dm.train_dataloader())
    assert batch["image"].shape == (2, 1, 8, 8, 4)
    assert batch["label"].dtype in (torch.int64, torch.int32)
    assert set(batch["label"].tolist()) <= {0, 1}
    val = _first(dm.val_dataloader())
    assert val["image"].shape == (2, 1, 8, 8, 4)
    assert sorted(val["label"].tolist()) == [0, 1]  # make_synthetic: case i has class i % 2
    # an explicit resize wins over the patch size
    explicit = MedSegDataModule(str(cls3d), patch_size=[8, 8, 4], preprocessing={"resize": [6, 6, 6]})
    assert explicit.preprocessing_spec["resize"] == [6, 6, 6]


def test_rotate90_with_non_square_patch_is_refused_before_training(seg3d: Path, cls3d: Path) -> None:
    """rotate90 turns axes 0 and 1: a patch (segmentation) or resize (classification) with unequal first two
    axes would change the batch shape, so the module refuses it when built, naming the size."""
    with pytest.raises(ValueError, match=r"rotate90 .*needs them equal.*\[16, 8, 4\]"):
        MedSegDataModule(str(seg3d), patch_size=[16, 8, 4], augmentation={"rotate90": {"prob": 1.0}})
    with pytest.raises(ValueError, match=r"rotate90 .*\[8, 6, 6\]"):  # classification: the resize counts ...
        MedSegDataModule(str(cls3d), patch_size=[6, 6, 6], preprocessing={"resize": [8, 6, 6]},
                         augmentation={"rotate90": {"prob": 1.0}})
    # ... not the patch size
    MedSegDataModule(str(cls3d), patch_size=[8, 6, 6], preprocessing={"resize": [6, 6, 8]},
                     augmentation={"rotate90": {"prob": 1.0}})


def test_rotate90_with_square_patch_keeps_the_shape(seg3d: Path) -> None:
    torch.manual_seed(0)
    dm = _dm(seg3d, patch_size=[8, 8, 4], augmentation={"rotate90": {"prob": 1.0}}, val_cases=["case_000", "case_001"])
    rotations = [t for t in dm.transforms(train=True).transforms if type(t).__name__ == "RandRotate90d"]
    assert len(rotations) == 1 and rotations[0].prob == 1.0
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 4 training cases, batch_size 2
    for batch in batches:
        assert batch["image"].shape == (4, 1, 8, 8, 4) and batch["label"].shape == (4, 1, 8, 8, 4)
