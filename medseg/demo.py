"""``medseg demo``: synthetic 3D data -> a small 3D U-Net trained through ``medseg fit`` -> held-out Dice.

It runs the real path a user runs (config file, LightningCLI, data checks, checkpoints) on an embedded config,
then predicts the held-out cases on their own grid from the best checkpoint and compares them with their labels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.data.datalist import load_dataset
from medseg.data.io import read_image
from medseg.data.synthetic import make_synthetic
from medseg.inference.native import load_model, predict_segmentation
from medseg.visualize import best_slice, overlay, save_montage

TRAIN_CASES = 16
TEST_CASES = 4
EPOCHS = 12


def demo_config(root: Path, out: Path, epochs: int, seed: int) -> dict[str, Any]:
    """The demo's training config (what ``configs/seg3d_unet.yaml`` says, made small for a laptop CPU)."""
    return {
        "seed_everything": seed,
        "trainer": {
            "max_epochs": epochs,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(out / "runs"),
            "log_every_n_steps": 4,
            "check_val_every_n_epoch": 4,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/dice", "mode": "max", "save_last": True, "filename": "best"},
                }
            ],
        },
        "model": {
            "class_path": "medseg.tasks.segmentation.SegmentationModule",
            "init_args": {
                "network": "unet",
                "network_args": {"channels": [8, 16, 32, 64]},
                "loss": "dice_ce",
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 1e-5}},
                "sw_batch_size": 2,
            },
        },
        "data": {
            "root": str(root),
            "spatial_dims": 3,
            "patch_size": [32, 32, 16],
            "batch_size": 2,
            "samples_per_volume": 2,
            "cache": "memory",
            "preprocessing": {"orientation": "RAS", "intensity": "mri"},
            "augmentation": {"flip": {"prob": 0.5}},
            "seed": seed,
        },
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of two label maps (all non-zero labels together); 1.0 when both are empty."""
    p, t = pred > 0, truth > 0
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(p, t).sum() / denominator)


def run_demo(out: Path, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Make data, train, predict the held-out cases, print and return their Dice.

    Returns:
        ``{"mean_dice": float, "dice": {case_id: float}, "checkpoint": str, "seconds": float, "picture": str}``.
    """
    from medseg.console import fit_summary
    from medseg.training import fit

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    root = out / "data"
    print(f"[1/3] writing a synthetic 3D dataset ({TRAIN_CASES} training + {TEST_CASES} held-out cases) to {root}")
    make_synthetic(root, dims=3, cases=TRAIN_CASES, classes=2, task="seg", seed=seed, test_cases=TEST_CASES)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(root, out, epochs or EPOCHS, seed), sort_keys=False))
    print(f"[2/3] training a 3D U-Net: medseg fit --config {config_path}")
    trained = fit(["--config", str(config_path)])
    print(fit_summary(trained))
    checkpoint = trained.best
    print(f"[3/3] predicting the held-out cases with {checkpoint}")
    model = load_model(checkpoint)
    scores: dict[str, float] = {}
    tiles: list[np.ndarray] = []
    for case in load_dataset(root).test:
        prediction = predict_segmentation(model, case["image"])
        truth, _ = read_image(case["label"])
        image, _ = read_image(case["image"][0])
        scores[case["id"]] = dice(prediction, truth)
        print(f"  {case['id']}: Dice {scores[case['id']]:.3f}")
        z = best_slice(truth)
        tiles.append(overlay(image[..., z], truth[..., z], prediction[..., z]))
    picture = save_montage(tiles, [f"{k} Dice {v:.3f}" for k, v in scores.items()], out / "predictions.png")
    mean = float(np.mean(list(scores.values())))
    seconds = time.perf_counter() - start
    print(f"slices with reference (green) and prediction (red) outlines: {picture}")
    print(f"mean held-out foreground Dice: {mean:.3f} ({len(scores)} cases, {seconds:.0f} s in all)")
    return {"mean_dice": mean, "dice": scores, "checkpoint": checkpoint, "seconds": seconds, "picture": str(picture)}
