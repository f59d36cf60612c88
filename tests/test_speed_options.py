"""Speed options change the time, not the numbers: mixed precision, torch.compile, channels-last, thread loading."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai import transforms as mt

from medseg.data.datamodule import MedSegDataModule
from medseg.lightning_cli import MedSegCLI
from medseg.resume import saved_checkpoint
from medseg.tasks.segmentation import SegmentationModule

CONFIGS = Path(__file__).parents[1] / "configs"


def small_module(dims: int = 2, **options: object) -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(
        network="unet", network_args={"channels": [8, 16, 32]}, spatial_dims=dims, num_classes=3,
        roi_size=[32] * dims, **options,
    )


def batch(dims: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, *[32] * dims, generator=generator)
    return {"image": image, "label": (image > 0.5).long() + (image > 1.5).long()}


def test_bf16_autocast_loss_is_float32_and_close_to_the_fp32_loss() -> None:
    module = small_module()
    full = module.training_step(batch(), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.training_step(batch(), 0)
    assert mixed.dtype == torch.float32  # the Dice sums and the softmax run in float32
    assert mixed.item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_same_logits(dims: int) -> None:
    plain, fast = small_module(dims), small_module(dims, channels_last=True)
    fast.configure_model()
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert fast.net.model[0].conv.weight.is_contiguous(memory_format=layout)
    x = batch(dims)["image"]
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), atol=1e-5)


def test_compiled_network_keeps_plain_weight_names_and_logits() -> None:
    plain, compiled = small_module(), small_module(compile={"backend": "eager"})
    compiled.configure_model()
    compiled.configure_model()  # Lightning may call it again (fit, then test): compiled once
    assert compiled.net._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no "_orig_mod." prefix in checkpoints
    x = batch()["image"]
    with torch.no_grad():
        assert torch.equal(compiled(x), plain(x))


def fit_one_epoch(seg2d_root: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(seg2d_root),
        "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--data.patch_size", "[48, 48]", "--model.init_args.network_args", '{"channels": [8, 16, 32]}', *extra,
    ])
    return torch.load(saved_checkpoint(cli.trainer), weights_only=True)["state_dict"]


def test_thread_loader_and_worker_processes_train_the_same_weights(seg2d_root: Path, tmp_path: Path) -> None:
    # The order and the augmentation of each case are seeded by (seed, epoch, case), not by the loader.
    reference = fit_one_epoch(seg2d_root, tmp_path / "process")
    for name, extra in {"thread": ["--data.loader", "thread"], "workers": ["--data.num_workers", "2"]}.items():
        weights = fit_one_epoch(seg2d_root, tmp_path / name, *extra)
        for key, tensor in reference.items():
            assert torch.equal(weights[key], tensor), (name, key)


@pytest.mark.slow
def test_bf16_mixed_precision_fit_learns(seg2d_root: Path, tmp_path: Path) -> None:
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(seg2d_root),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.precision",
        "bf16-mixed", "--trainer.max_epochs", "25", "--trainer.check_val_every_n_epoch", "5",
        "--model.init_args.network_args", '{"channels": [8, 16, 32, 64]}',
        "--model.init_args.optimizer.init_args.lr", "0.01", "--data.patch_size", "[48, 48]",
        "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
    ])
    assert float(cli.trainer.checkpoint_callback.best_model_score) >= 0.8  # as the fp32 fit in test_training


@pytest.mark.slow
def test_inductor_compiled_training_step_matches_eager() -> None:
    eager, compiled = small_module(), small_module(compile=True)
    compiled.configure_model()
    assert compiled.training_step(batch(), 0).item() == pytest.approx(eager.training_step(batch(), 0).item(), rel=1e-4)


def test_augment_on_device_moves_the_augmentation_from_the_loader_to_the_batch(seg3d_root: Path) -> None:
    dm = MedSegDataModule(
        str(seg3d_root), patch_size=[16, 16, 8], augmentation={"flip": {"prob": 1.0}, "noise": {"prob": 0.5}},
        augment_on_device=True, check_data=False,
    )
    loader_chain = dm.transforms(train=True).flatten().transforms
    assert not any(isinstance(t, (mt.RandFlipd, mt.RandGaussianNoised)) for t in loader_chain)
    image = torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    collated = {"image": image, "label": (image > 1).float(), "id": ["case_000", "case_001"]}
    dm.trainer = SimpleNamespace(training=True, current_epoch=3)
    out = dm.on_after_batch_transfer(collated, 0)
    assert type(out["image"]) is torch.Tensor  # no MONAI MetaTensor reaches the network
    # flip with prob 1 on every axis: label and image flipped together, label values untouched
    assert torch.equal(out["label"], torch.flip(collated["label"], dims=(2, 3, 4)))
    noise = out["image"] - torch.flip(image, dims=(2, 3, 4))
    assert torch.equal(dm.augment_batch(collated, 3)["image"], out["image"])  # seeded by (seed, epoch, case)
    assert not torch.equal(dm.augment_batch(collated, 4)["image"], out["image"])
    assert noise.abs().max() < 1  # noise std 0.1 at most, when drawn
    dm.trainer = SimpleNamespace(training=False, current_epoch=3)
    assert dm.on_after_batch_transfer(collated, 0) is collated  # validation batches are left alone
    with pytest.raises(ValueError, match="for 3D data"):
        MedSegDataModule(str(seg3d_root), spatial_dims=2, patch_size=[16, 16], augment_on_device=True)
