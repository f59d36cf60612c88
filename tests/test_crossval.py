"""`medseg cv` end to end on tiny data: folds trained, out-of-fold predictions, pooled evaluation, reproducible."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.metrics.temperature import apply_temperature
from tests.conftest import seg2d_cv_args

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false"]


def test_segmentation_cv_end_to_end_and_reproducible(seg2d_cv: Path, seg2d_root: Path, tmp_path: Path) -> None:
    out = seg2d_cv  # `medseg cv` of seg2d_cv_args, run once for the session
    splits = json.loads((out / "splits.json").read_text())
    ids = sorted(c["id"] for c in load_dataset(seg2d_root).training)
    assert sorted(splits[0]["val"] + splits[1]["val"]) == ids  # every case held out once
    assert sorted(p.name[: -len(".nii.gz")] for p in (out / "predictions").glob("*.nii.gz")) == ids
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(ids) * 2  # two foreground classes per case
    from medseg.inference.postprocess import load_postprocessing

    assert isinstance(load_postprocessing(out / "postprocessing.json"), list)  # what predict --postprocess reads
    cv = json.loads((out / "cv.json").read_text())
    assert set(cv["checkpoints"]) == {"0", "1"} and "dice" in cv["metrics"]
    # Same seed, a fresh folder: identical splits and identical metrics on the CPU.
    assert main(seg2d_cv_args(seg2d_root, tmp_path / "b")) == 0
    assert json.loads((tmp_path / "b" / "splits.json").read_text()) == splits
    again = json.loads((tmp_path / "b" / "cv.json").read_text())["metrics"]
    assert again == cv["metrics"]


def test_classification_cv_and_fold_out_of_range(cls2d_root: Path, tmp_path: Path, capsys) -> None:
    args = ["cv", "--config", str(CONFIGS / "cls2d_resnet18.yaml"), "--folds", "2", "--strategy", "stratified",
            "--data.root", str(cls2d_root), "--data.patch_size", "[32, 32]",
            "--model.init_args.network", "cnn3d", "--model.init_args.network_args", '{"channels": [4, 8]}', *FAST]
    assert main([*args, "--output", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert {"accuracy", "auc", "f1_macro", "nll", "brier", "ece"} <= set(metrics)
    with (tmp_path / "c" / "predictions" / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(load_dataset(cls2d_root).training)
    # The temperature fitted on the pooled out-of-fold probabilities; predict --calibration applies it.
    fitted = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert fitted["activation"] == "softmax" and fitted["nll_after"] <= fitted["nll_before"]
    checkpoint = json.loads((tmp_path / "c" / "cv.json").read_text())["checkpoints"]["0"]
    tables = {}
    for name, extra in (("plain", []), ("calibrated", ["--calibration", str(tmp_path / "c" / "calibration.json")])):
        assert main(["predict", "--ckpt", checkpoint, "--input", str(cls2d_root / "dataset.json"), "--output",
                     str(tmp_path / name), *extra]) == 0
        with (tmp_path / name / "predictions.csv").open() as handle:
            tables[name] = {r["case"]: r for r in csv.DictReader(handle)}
    names = load_dataset(cls2d_root).label_names
    for case, row in tables["plain"].items():
        plain = np.array([float(row[f"p_{n}"]) for n in names])
        calibrated = np.array([float(tables["calibrated"][case][f"p_{n}"]) for n in names])
        assert np.allclose(calibrated, apply_temperature(plain, fitted["temperature"], "softmax"), atol=1e-6)
        assert tables["calibrated"][case]["prediction"] == row["prediction"]
    # A fold folder of other splits left in predictions/ is not pooled (it would count cases twice).
    import shutil

    shutil.copytree(tmp_path / "c" / "predictions" / "fold_0", tmp_path / "c" / "predictions" / "fold_7")
    assert main([*args, "--output", str(tmp_path / "c")]) == 0
    with (tmp_path / "c" / "predictions" / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(load_dataset(cls2d_root).training)
    assert main([*args, "--output", str(tmp_path / "c"), "--fold", "2"]) == 2  # folds 0 and 1
    assert "out of range" in capsys.readouterr().err


def test_holdout_cv_evaluates_only_the_held_out_cases(seg2d_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "h"
    assert main(["cv", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--strategy", "holdout", "--holdout-fraction",
                 "0.34", "--output", str(out), "--data.root", str(seg2d_root), "--data.patch_size", "[32, 32]",
                 "--model.init_args.network_args", '{"channels": [4, 8, 16]}', *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    held_out = json.loads((out / "splits.json").read_text())[0]["val"]
    assert summary["cases"] == len(held_out) and summary["missing_predictions"] == []
    assert (out / "postprocessing.json").is_file()


def test_cv_refuses_a_multi_process_trainer_before_training(seg2d_root: Path, tmp_path: Path, capsys) -> None:
    code = main([
        "cv", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--output", str(tmp_path / "cv"), "--folds", "2",
        "--data.root", str(seg2d_root), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
    ])
    assert code == 2
    assert "trains in one process" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


# The held-out cases are predicted on the device the fold trained on: checked in test_cv_files.py
# (test_folds_run_apart_are_collected_without_training_or_predicting_again), on its folds run one by one.
