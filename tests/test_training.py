"""End-to-end training through the CLI: models that learn, checkpoints that reload, bad data refused up front."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.data.io import read_header
from medseg.inference.native import load_model, predict_segmentation
from medseg.lightning_cli import MedSegCLI
from medseg.resume import saved_checkpoint
from medseg.tasks.segmentation import SegmentationModule

CONFIGS = Path(__file__).parents[1] / "configs"


def _fit(config: str, root: Path, out: Path, *extra: str) -> MedSegCLI:
    return MedSegCLI(
        args=[
            "fit", "--config", str(CONFIGS / config), "--data.root", str(root),
            "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", *extra,
        ]
    )


class SpoilBeforeLastValidation(pl.Callback):
    """Zero every weight just before the last validation: that validation is then the worst (Dice 0), so the
    best checkpoint is necessarily an earlier one and the in-memory model is not it."""

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.zero_()


SPOIL = json.dumps({"class_path": f"{__name__}.SpoilBeforeLastValidation"})
STEPS_PER_EPOCH = 3  # 10 training cases (12 minus 2 validation patients' cases), batches of 4


@pytest.fixture(scope="module")
def trained_seg2d(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> MedSegCLI:
    """A small 2D U-Net trained for 25 epochs on 3-class synthetic data (validated every 5), its weights
    spoiled before the last validation."""
    out = tmp_path_factory.mktemp("fit2d")
    return _fit(
        "seg2d_unet.yaml", seg2d_root, out,
        "--trainer.max_epochs", "25", "--trainer.check_val_every_n_epoch", "5",
        "--model.init_args.network_args", '{"channels": [8, 16, 32, 64]}',
        "--model.init_args.optimizer.init_args.lr", "0.01",
        "--data.patch_size", "[48, 48]", "--data.samples_per_volume", "2", "--data.batch_size", "4",
        "--trainer.callbacks+", SPOIL,
    )


def _validation_rows(cli: MedSegCLI) -> list[dict[str, str]]:
    with (Path(cli.trainer.log_dir) / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/dice")]


def test_segmentation_fit_learns_and_keeps_the_best_checkpoint(trained_seg2d: MedSegCLI) -> None:
    callback = trained_seg2d.trainer.checkpoint_callback
    assert callback.monitor == "val/dice" and callback.mode == "max"
    rows = _validation_rows(trained_seg2d)
    assert [int(r["epoch"]) for r in rows] == [4, 9, 14, 19, 24]
    best_row = max(rows, key=lambda r: float(r["val/dice"]))
    best = float(best_row["val/dice"])
    assert float(rows[-1]["val/dice"]) < 0.1 < best  # the spoiled last validation is not the best
    # The best checkpoint is the one of the highest logged val/dice, saved at that validation ...
    assert float(callback.best_model_score) == pytest.approx(best, rel=1e-6)
    path = Path(callback.best_model_path)
    assert path.name == f"best-epoch{int(best_row['epoch']):03d}.ckpt"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "last.ckpt"])  # save_top_k 1
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == int(best_row["epoch"])
    # (metrics.csv logs the 0-based index of the last step, the checkpoint the number of steps taken)
    assert checkpoint["global_step"] == (int(best_row["epoch"]) + 1) * STEPS_PER_EPOCH == int(best_row["step"]) + 1
    # ... and its weights score that val/dice again on the validation cases.
    module = SegmentationModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    again = trainer.validate(module, datamodule=trained_seg2d.datamodule, verbose=False)[0]
    assert again["val/dice"] == pytest.approx(best, abs=1e-5)
    # Two foreground classes on held-out patients: chance level is far below these.
    assert best >= 0.8
    assert float(best_row["val/dice_class1"]) >= 0.7 and float(best_row["val/dice_class2"]) >= 0.7
    metrics = trained_seg2d.trainer.callback_metrics
    assert {"val/dice", "val/dice_class1", "val/dice_class2", "val/loss", "train/loss_epoch"} <= set(metrics)


def test_fit_writes_config_checkpoints_and_logs(trained_seg2d: MedSegCLI) -> None:
    callback = trained_seg2d.trainer.checkpoint_callback
    best, last = Path(callback.best_model_path), Path(saved_checkpoint(trained_seg2d.trainer))
    assert best.is_file() and last.is_file() and best != last
    log_dir = Path(trained_seg2d.trainer.log_dir)
    assert best.parent.parent == log_dir  # <run>/version_N/{config.yaml, checkpoints/, metrics.csv}
    assert (log_dir / "config.yaml").is_file()
    assert "seg2d_unet" in str(log_dir)
    assert "val/dice" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_checkpoint_reloads_with_weights_only(trained_seg2d: MedSegCLI) -> None:
    path = trained_seg2d.trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # nothing but plain data inside
    hp = ckpt["hyper_parameters"]
    assert hp["network"] == "unet" and hp["num_classes"] == 3 and hp["in_channels"] == 1
    assert hp["label_names"] == ["background", "structure1", "structure2"]
    assert hp["roi_size"] == [48, 48] and hp["preprocessing_spec"]["intensity"] == "mri"
    assert ckpt["medseg_task"] == "segmentation"

    # Reference: the network the CLI built, carrying the checkpoint's weights (the in-memory model holds the
    # spoiled last weights, not the best).
    x = torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    reference_model = copy.deepcopy(trained_seg2d.model).cpu().eval()
    reference_model.load_state_dict(ckpt["state_dict"])
    reference = reference_model(x)
    assert reference.std() > 0 and not torch.allclose(trained_seg2d.model.cpu().eval()(x), reference)
    rebuilt = load_model(path)  # no YAML: network, arguments, preprocessing come from the checkpoint
    assert torch.allclose(rebuilt.net(x), reference, atol=1e-5)
    module = SegmentationModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert torch.allclose(module.eval()(x), reference, atol=1e-5)


def test_native_prediction_keeps_the_input_grid(trained_seg2d: MedSegCLI, seg2d_root: Path) -> None:
    model = load_model(trained_seg2d.trainer.checkpoint_callback.best_model_path)
    case = load_dataset(seg2d_root).training[0]
    prediction = predict_segmentation(model, case["image"])
    shape, _ = read_header(case["image"][0])
    assert prediction.shape == shape
    assert set(np.unique(prediction)) <= {0, 1, 2}


def test_pretrained_and_frozen_encoder(trained_seg2d: MedSegCLI, seg2d_root: Path, tmp_path: Path) -> None:
    path = trained_seg2d.trainer.checkpoint_callback.best_model_path
    cli = _fit(
        "seg2d_unet.yaml", seg2d_root, tmp_path, "--trainer.fast_dev_run", "2",
        "--model.init_args.network_args", '{"channels": [8, 16, 32, 64]}',
        "--model.pretrained", path, "--model.freeze_encoder", "true", "--data.patch_size", "[48, 48]",
    )
    report = cli.model.pretrained_report
    assert report["loaded"] and not report["skipped"]
    start = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    after = cli.model.state_dict()
    frozen = [n for n, p in cli.model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert frozen and trainable
    assert all(torch.equal(after[n], start[n]) for n in frozen)
    assert any(not torch.equal(after[n], start[n]) for n in trainable)


def test_fit_refuses_bad_data_before_training(seg3d_root: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "bad"
    shutil.copytree(seg3d_root, root)
    broken = sorted((root / "labelsTr").glob("*.nii.gz"))[1]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated
    code = main([
        "fit", "--config", str(CONFIGS / "seg3d_unet.yaml"), "--data.root", str(root),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert broken.name in err and "truncated" in err.lower()
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "training must not start on bad data"
    assert not list((tmp_path / "runs").rglob("version_*")), "the failed attempt leaves no empty run folder"


def test_task_mismatch_is_refused(cls2d_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classification dataset"):
        _fit("seg2d_unet.yaml", cls2d_root, tmp_path, "--trainer.fast_dev_run", "1")


def test_classification_fit_learns(cls2d_root: Path, tmp_path: Path) -> None:
    cli = _fit(
        "cls2d_resnet18.yaml", cls2d_root, tmp_path,
        "--model.init_args.network", "cnn3d",
        "--model.init_args.network_args", '{"channels": [8, 16, 32], "norm": "batch"}',
        "--model.init_args.optimizer.init_args.lr", "0.003",
        "--data.patch_size", "[48, 48]", "--trainer.max_epochs", "12", "--data.augmentation", "null",
    )
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best")[0]
    # 6 held-out cases of 2 balanced classes: chance is 0.5, and 5 of 6 right is 0.83.
    assert metrics["val/acc"] >= 0.8
    assert metrics["val/auroc"] >= 0.8
