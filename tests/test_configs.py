"""Every shipped config instantiates and runs one training + validation step on synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.lightning_cli import MedSegCLI
from medseg.models import list_models

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
REQUIRED = [
    "seg2d_unet", "seg3d_unet", "seg2d_unetpp", "seg3d_unetpp", "seg2d_attention_unet", "seg3d_attention_unet",
    "cls2d_resnet18", "cls3d_resnet18", "cls3d_cnn",
]


def test_every_required_config_is_shipped() -> None:
    assert set(REQUIRED) <= {c.stem for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_one_step(config: Path, roots: dict[str, Path], tmp_path: Path) -> None:
    root = roots[config.stem[:5] + ("_regions" if config.stem.endswith("_regions") else "")]
    cli = MedSegCLI(
        args=[
            "fit", "--config", str(config), "--data.root", str(root), "--trainer.fast_dev_run", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
        ]
    )
    model, data = cli.model, cli.datamodule
    assert model.hparams.network in list_models()
    assert model.hparams.num_classes == data.num_classes
    assert model.hparams.label_names == data.label_names
    assert model.hparams.roi_size == data.patch_size
    enhancement = data.task == "enhancement"  # a GAN: one discriminator and one generator step per batch
    assert cli.trainer.global_step == (2 if enhancement else 1)  # one optimiser step ran (each optimiser's)
    loss = cli.trainer.callback_metrics["train/loss_g" if enhancement else "train/loss_step"]
    assert torch.isfinite(loss)
    metric = "val/psnr" if enhancement else "val/dice" if data.is_segmentation else "val/acc"
    assert metric in cli.trainer.callback_metrics
    if data.regions:
        assert model.hparams.regions == data.regions and "val/dice_region3" in cli.trainer.callback_metrics
