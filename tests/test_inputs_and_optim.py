"""Other ways in: PNG and CSV datasets, and every optimiser / scheduler family from the config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.io import read_image
from medseg.lightning_cli import MedSegCLI

CONFIGS = Path(__file__).parents[1] / "configs"


def _fit(config: str, root: Path, out: Path, *extra: str) -> MedSegCLI:
    return MedSegCLI(args=["fit", "--config", str(CONFIGS / config), "--data.root", str(root),
                           "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", *extra])


def _to_png(array: np.ndarray, path: Path, scale: float) -> str:
    """Write an (X, Y) array as an 8-bit PNG (PIL wants (rows, cols) = (Y, X))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array.T * scale, 0, 255).astype(np.uint8)).save(path)
    return str(path.relative_to(path.parents[1]))


def test_png_segmentation_dataset_trains(seg2d_root: Path, tmp_path: Path) -> None:
    meta = json.loads((seg2d_root / "dataset.json").read_text())
    root = tmp_path / "png"
    training = []
    for case in meta["training"]:
        image, _ = read_image(seg2d_root / case["image"])
        label, _ = read_image(seg2d_root / case["label"])
        name = Path(case["label"]).name.replace(".nii.gz", ".png")
        training.append({"image": _to_png(image, root / "imagesTr" / name, 255.0 / image.max()),
                         "label": _to_png(label, root / "labelsTr" / name, 1.0)})
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    cli = _fit("seg2d_unet.yaml", root, tmp_path / "runs", "--trainer.fast_dev_run", "1",
               "--data.preprocessing", '{"orientation": null, "intensity": "us"}')
    assert cli.trainer.global_step == 1
    assert cli.datamodule.num_classes == 3


def test_csv_classification_dataset_trains(cls2d_root: Path, tmp_path: Path) -> None:
    meta = json.loads((cls2d_root / "dataset.json").read_text())
    table = tmp_path / "cases.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "patient"])
        for case in meta["training"]:
            writer.writerow([str(cls2d_root / case["image"]), case["label"], case.get("patient", "")])
    cli = _fit("cls2d_resnet18.yaml", table, tmp_path / "runs", "--trainer.fast_dev_run", "1",
               "--data.patch_size", "[32, 32]")
    assert cli.datamodule.task == "classification" and cli.model.hparams.num_classes == 2
    assert cli.trainer.global_step == 1


OPTIMISERS = {
    "sgd_nesterov": '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9, "nesterov": true}}',
    "adam": '{"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}',
    "rmsprop": '{"class_path": "torch.optim.RMSprop", "init_args": {"lr": 0.001}}',
    "adagrad": '{"class_path": "torch.optim.Adagrad", "init_args": {"lr": 0.01}}',
}
SCHEDULERS = {
    "poly": ('{"class_path": "torch.optim.lr_scheduler.PolynomialLR", "init_args": {"total_iters": 4, "power": 0.9}}',
             "PolynomialLR"),
    "step": ('{"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}', "StepLR"),
    "plateau": ('{"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "init_args": {"patience": 1}}',
                "ReduceLROnPlateau"),
    "cosine": ('{"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 4}}',
               "CosineAnnealingLR"),
}


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_optimisers_from_config(name: str, seg2d_root: Path, tmp_path: Path) -> None:
    cli = _fit("seg2d_unet.yaml", seg2d_root, tmp_path, "--trainer.fast_dev_run", "1", "--data.patch_size", "[32, 32]",
               "--model.init_args.optimizer", OPTIMISERS[name])
    optimiser = cli.trainer.optimizers[0]
    assert type(optimiser).__name__.lower() == json.loads(OPTIMISERS[name])["class_path"].split(".")[-1].lower()
    if name == "sgd_nesterov":
        assert optimiser.param_groups[0]["nesterov"] and optimiser.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_from_config(name: str, seg2d_root: Path, tmp_path: Path) -> None:
    spec, cls_name = SCHEDULERS[name]
    cli = _fit("seg2d_unet.yaml", seg2d_root, tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1",
               "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
               "--data.patch_size", "[32, 32]", "--model.init_args.scheduler", spec)
    config = cli.trainer.lr_scheduler_configs[0]
    assert type(config.scheduler).__name__ == cls_name
    if name == "plateau":
        assert config.monitor == "val/loss"
    else:  # the scheduler stepped once per epoch: the learning rate moved away from the initial one
        assert config.scheduler.last_epoch == 2
        assert cli.trainer.optimizers[0].param_groups[0]["lr"] != config.scheduler.base_lrs[0]
