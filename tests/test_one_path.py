"""One inference path: the Dice that validation reports is the Dice of `medseg predict` + `medseg evaluate`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.evaluation.evaluate import evaluate_segmentation
from medseg.lightning_cli import MedSegCLI
from medseg.resume import saved_checkpoint

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("dims", [2, 3])
def test_validation_dice_equals_predict_then_evaluate(dims: int, seg2d_root: Path, seg3d_root: Path,
                                                      tmp_path: Path) -> None:
    """Grid-keeping preprocessing (RAS + z-score), validation cases holding every class: the per-class Dice of
    `medseg validate` equals the per-class mean of `medseg evaluate` on `medseg predict`'s files, to 1e-4."""
    root = seg2d_root if dims == 2 else seg3d_root
    spec = load_dataset(root)
    val = [case for case in spec.training if case["patient"] == spec.training[0]["patient"]]
    common = [
        "--config", str(CONFIGS / f"seg{dims}d_unet.yaml"), "--data.root", str(root),
        "--data.val_cases", json.dumps([case["id"] for case in val]), "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--model.init_args.network_args",
        '{"channels": [8, 16, 32]}', "--data.patch_size", "[32, 32]" if dims == 2 else "[16, 16, 8]",
    ]
    # A constant learning rate: this test is about the inference path, and 8 epochs of annealing learn less.
    fit = MedSegCLI(args=["fit", *common, "--trainer.max_epochs", "8", "--trainer.check_val_every_n_epoch", "8",
                          "--model.init_args.optimizer.init_args.lr", "0.01", "--model.init_args.scheduler", "null"])
    checkpoint = saved_checkpoint(fit.trainer)
    validated = MedSegCLI(args=["validate", *common, "--ckpt_path", checkpoint]).trainer.callback_metrics
    assert float(validated["val/dice"]) > 0.3, "the model must predict something for the comparison to mean much"

    images = tmp_path / "images"
    images.mkdir()
    for case in val:
        os.symlink(case["image"][0], images / Path(case["image"][0]).name)
    assert main(["predict", "--ckpt", checkpoint, "--input", str(images), "--output", str(tmp_path / "pred"),
                 "--device", "cpu", "--save-probabilities"]) == 0
    # The same probabilities, not only the same Dice: validation's function on validation's input (RAS grid)
    # against predict's saved maps (input grid, float16) turned to RAS.
    model, data = fit.model.eval(), fit.datamodule
    data.setup("validate")
    for index, case in enumerate(val):
        item = data._datasets["val"][index]
        with torch.no_grad():
            ours = model.predict_probabilities(torch.as_tensor(item["image"])[None])[0].numpy()
        saved = np.load(tmp_path / "pred" / "probabilities" / f"{case['id']}.npz")
        turn = nib.orientations.io_orientation(saved["affine"])
        ras = nib.orientations.apply_orientation(np.moveaxis(saved["probabilities"], 0, -1).astype(np.float32), turn)
        assert np.abs(np.moveaxis(ras, -1, 0) - ours).max() < 2e-3
    classes = [k for k in spec.labels if k > 0]
    summary = evaluate_segmentation(tmp_path / "pred", {c["id"]: c["label"] for c in val}, tmp_path / "eval",
                                    classes=classes)
    assert summary["conventions"] == {"both_empty": 0, "prediction_empty": 0, "reference_empty": 0}
    for k in classes:
        assert summary["per_class"][str(k)]["dice"]["n"] == len(val)
        assert summary["per_class"][str(k)]["dice"]["mean"] == pytest.approx(float(validated[f"val/dice_class{k}"]),
                                                                             abs=1e-4)
    assert summary["foreground_mean"]["dice"] == pytest.approx(float(validated["val/dice"]), abs=1e-4)
