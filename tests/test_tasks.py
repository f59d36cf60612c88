"""The Lightning modules: Dice bookkeeping, saved hyperparameters, early refusal of unsuitable patches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from medseg.data.checks import check_dataset
from medseg.data.datalist import load_dataset
from medseg.data.datamodule import MedSegDataModule
from medseg.lightning_cli import MedSegCLI
from medseg.tasks.segmentation import SegmentationModule, dice_summary

CONFIGS = Path(__file__).parents[1] / "configs"


def test_dice_summary_skips_absent_classes_instead_of_counting_zero() -> None:
    # Two cases, three foreground classes; class 3 is absent from both references, class 2 from case 0.
    per_case = torch.tensor([[0.8, float("nan"), float("nan")], [0.6, 0.5, float("nan")]])
    mean, per_class = dice_summary(per_case)
    assert per_class[0].item() == pytest.approx(0.7) and per_class[1].item() == pytest.approx(0.5)
    assert math.isnan(per_class[2].item())
    assert mean.item() == pytest.approx((0.7 + 0.5) / 2)  # not (0.7 + 0.5 + 0) / 3


def test_dice_summary_matches_monai_on_label_maps() -> None:
    pred = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    truth = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    truth[0, 0, 2:6, 2:6] = 1  # 16 voxels
    pred[0, 0, 2:6, 2:5] = 1  # 12 voxels inside: Dice = 2*12 / (12 + 16)
    truth[1, 0, 0:2, 0:2] = 2
    pred[1, 0, 0:2, 0:2] = 2  # perfect class 2 in case 1; class 1 absent from case 1's reference
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    metric(one_hot(pred, 3), one_hot(truth, 3))
    mean, per_class = dice_summary(metric.aggregate())
    assert per_class.tolist() == pytest.approx([24 / 28, 1.0])
    assert mean.item() == pytest.approx((24 / 28 + 1.0) / 2)


def test_hparams_hold_what_prediction_needs_even_with_defaults(tmp_path: Path) -> None:
    module = SegmentationModule(network="unet", spatial_dims=2, network_args={"channels": [4, 8]},
                                pretrained=None)
    assert module.hparams.roi_size == [96, 96]
    assert "pretrained" not in module.hparams and "optimizer" not in module.hparams


def test_patch_not_suiting_the_network_is_refused_before_training(seg2d_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not suit network 'unet'"):
        MedSegCLI(args=["fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(seg2d_root),
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
                        "--data.patch_size", "[36, 36]"])


def test_an_image_too_small_for_a_classifier_is_refused_in_one_line(cls2d_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """densenet121 halves its input 5 times: 16x16 images leave nothing to pool (was a traceback mid-fit)."""
    from medseg.cli import main

    code = main(["fit", "--config", str(CONFIGS / "cls2d_densenet121.yaml"), "--data.root", str(cls2d_root),
                 "--data.patch_size", "[16, 16]", "--data.preprocessing", "{resize: [16, 16]}",
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("medseg fit: input size [16, 16] is too small for network 'densenet121'")
    assert "\n" not in err


def test_test_stage_uses_the_labelled_test_list(seg3d_root: Path, seg2d_root: Path) -> None:
    dm = MedSegDataModule(str(seg3d_root), patch_size=[16, 16, 8])
    dm.setup("test")
    ids = [batch["id"][0] for batch in dm.test_dataloader()]
    assert ids == [c["id"] for c in load_dataset(seg3d_root).test] and len(ids) == 2
    assert not set(ids) & {c["id"] for c in dm.train_cases + dm.val_cases}
    with pytest.raises(ValueError, match="'test' list with labels"):
        MedSegDataModule(str(seg2d_root), spatial_dims=2, patch_size=[16, 16]).setup("test")


def test_datamodule_state_records_split_and_refuses_other_classes(seg3d_root: Path, seg2d_root: Path) -> None:
    dm = MedSegDataModule(str(seg3d_root), patch_size=[16, 16, 8])
    state = dm.state_dict()
    assert sorted(state["train_ids"] + state["val_ids"]) == sorted(c["id"] for c in dm.spec.training)
    assert state["label_names"] == dm.label_names and state["channel_names"] == dm.spec.channel_names
    other = MedSegDataModule(str(seg2d_root), spatial_dims=2, patch_size=[16, 16])  # 3 classes, not 2
    with pytest.raises(ValueError, match="label_names"):
        other.load_state_dict(state)


def test_checks_report_files_of_the_wrong_dimensionality(seg3d_root: Path) -> None:
    problems = check_dataset(seg3d_root, spatial_dims=2)
    assert problems and all("spatial_dims=2" in p.message for p in problems)
    assert {Path(p.file).name for p in problems} >= {"case_000.nii.gz"}
    assert check_dataset(seg3d_root, spatial_dims=3) == []
