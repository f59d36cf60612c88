"""`medseg benchmark` end to end on tiny data: shared splits, results.csv, statistics, report with pictures."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.evaluation.report import bootstrap_ci, compare

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--data.patch_size", "[32, 32]"]


def test_segmentation_benchmark_report(seg2d_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["benchmark", "--configs", str(CONFIGS / "seg2d_unet.yaml"), str(CONFIGS / "seg2d_attention_unet.yaml"),
                 "--folds", "2", "--output", str(out), "--data.root", str(seg2d_root),
                 "--model.init_args.network_args", '{"channels": [4, 8, 16]}', *FAST])
    assert code == 0
    shared = json.loads((out / "splits.json").read_text())
    for model in ("seg2d_unet", "seg2d_attention_unet"):
        assert json.loads((out / model / "splits.json").read_text()) == shared  # the same folds for every model
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["model"] for r in rows} == {"seg2d_unet", "seg2d_attention_unet"}
    assert {r["metric"] for r in rows} == {"dice", "nsd", "hd95", "assd"}
    dice = [r for r in rows if r["metric"] == "dice"]
    assert sum(r["wilcoxon_p"] == "" for r in dice) == 1  # the best model has no test against itself
    assert all(int(r["parameters"]) > 0 and float(r["train_seconds"]) > 0 for r in rows)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # box plots, training curves, montage: one file to open
    assert re.search(r"montage\.png", (out / "report.md").read_text())


def test_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    values = np.random.default_rng(0).normal(0.8, 0.05, 40)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high and high - low < 0.05
    assert (low, high) == bootstrap_ci(values)


def test_compare_picks_the_best_and_tests_the_others_against_it() -> None:
    rng = np.random.default_rng(1)
    good = {f"c{i}": {"dice": 0.9 + 0.01 * rng.random()} for i in range(20)}
    bad = {c: {"dice": v["dice"] - 0.1 - 0.001 * i} for i, (c, v) in enumerate(good.items())}  # distinct |d|
    rows = compare({"good": good, "bad": bad}, {"dice": True})
    by_model = {r["model"]: r for r in rows}
    assert by_model["good"]["best"] == "good" and by_model["good"]["wilcoxon_p"] == ""
    # Every paired difference is negative: the exact two-sided p-value of 20 pairs is 2 / 2**20.
    assert by_model["bad"]["wilcoxon_p"] == pytest.approx(2 / 2**20)


def test_fold_ensemble_row_on_the_test_cases_and_classification_roc(seg3d_root: Path, cls2d_root: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "seg"
    assert main(["benchmark", "--configs", str(CONFIGS / "seg3d_unet.yaml"), "--folds", "2", "--output", str(out),
                 "--data.root", str(seg3d_root), "--model.init_args.network_args", '{"channels": [4, 8, 16]}',
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--data.patch_size", "[16, 16, 8]"]) == 0
    with (out / "results.csv").open() as handle:
        ensemble = [r for r in csv.DictReader(handle) if "fold ensemble" in r["model"]]
    assert {r["metric"] for r in ensemble} == {"dice", "nsd", "hd95", "assd"}
    assert "2 test cases" in ensemble[0]["model"]
    assert len(list((out / "seg3d_unet" / "fold_ensemble_test" / "predictions").glob("*.nii.gz"))) == 2

    out = tmp_path / "cls"
    assert main(["benchmark", "--configs", str(CONFIGS / "cls2d_resnet18.yaml"), "--folds", "2", "--output", str(out),
                 "--data.root", str(cls2d_root), "--model.init_args.network", "cnn3d",
                 "--model.init_args.network_args", '{"channels": [4, 8]}', *FAST]) == 0
    with (out / "results.csv").open() as handle:
        assert {r["metric"] for r in csv.DictReader(handle)} == {"correct", "brier", "nll"}
    assert (out / "roc.png").is_file() and "roc" in (out / "report.md").read_text()


def test_a_model_without_any_distance_gets_no_p_value() -> None:
    nan = float("nan")
    empty = {f"c{i}": {"hd95": nan} for i in range(5)}
    fine = {f"c{i}": {"hd95": 3.0 + i} for i in range(5)}
    rows = {r["model"]: r for r in compare({"empty": empty, "fine": fine}, {"hd95": False})}
    assert rows["fine"]["best"] == "fine"
    assert np.isnan(rows["empty"]["wilcoxon_p"]) and np.isnan(rows["empty"]["mean"])
