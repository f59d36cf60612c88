"""`medseg benchmark` end to end on tiny data: shared splits, results.csv, statistics, report with pictures."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data.synthetic import make_synthetic
from medseg.evaluation import ranking
from medseg.evaluation.benchmark import dataset_names
from medseg.evaluation.ranking import MEAN_RANK
from medseg.evaluation.report import SEG_METRICS, bootstrap_ci, compare, holm, rank_biserial
from tests.test_report_render import check_benchmark_page, parse_report

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--data.patch_size", "[32, 32]"]


MODELS = ["seg2d_unet", "seg2d_attention_unet"]


@pytest.fixture(scope="module")
def two_datasets(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medseg benchmark --datasets`` of two 2D U-Nets (2 folds each) on alpha, a copy of ``seg2d_root`` (12 cases,
    3 classes), and beta (6 cases, 2 classes). Each dataset's folder is a normal single-dataset benchmark: the
    report test reads alpha's."""
    base = tmp_path_factory.mktemp("two_datasets")
    shutil.copytree(seg2d_root, base / "alpha")
    make_synthetic(base / "beta", dims=2, cases=6, classes=2, task="seg", size=(32, 32), seed=8)
    out = base / "bench"
    assert main(["benchmark", "--configs", *(str(CONFIGS / f"{m}.yaml") for m in MODELS), "--folds", "2",
                 "--output", str(out), "--datasets", str(base / "alpha"), str(base / "beta" / "dataset.json"),
                 "--model.init_args.network_args", '{"channels": [4, 8, 16]}', *FAST]) == 0
    return out


def test_segmentation_benchmark_report(two_datasets: Path) -> None:
    out = two_datasets / "alpha"  # the benchmark of seg2d_root's cases
    shared = json.loads((out / "splits.json").read_text())
    for model in ("seg2d_unet", "seg2d_attention_unet"):
        assert json.loads((out / model / "splits.json").read_text()) == shared  # the same folds for every model
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["model"] for r in rows} == {"seg2d_unet", "seg2d_attention_unet"}
    # Overlap, distance and calibration (from the out-of-fold probabilities cv saves).
    assert {r["metric"] for r in rows} == {"dice", "nsd", "hd95", "assd", "ece", "brier", "nll"}
    assert all(r["mean"] not in ("", "nan") for r in rows)
    dice = [r for r in rows if r["metric"] == "dice"]
    assert sum(r["wilcoxon_p"] == "" for r in dice) == 1  # the best model has no test against itself
    assert all(int(r["parameters"]) > 0 and float(r["train_seconds"]) > 0 for r in rows)
    other = next(r for r in dice if r["wilcoxon_p"] != "")
    assert float(other["p_holm"]) == pytest.approx(float(other["wilcoxon_p"]))  # one comparison: nothing to adjust
    assert -1 <= float(other["effect_rbc"]) <= 1 and other["median_diff"] != ""
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    dom = parse_report(html)
    # every model and metric, with the statistics' columns under human names, per-class tables named by the
    # dataset's labels, the parameters and times once, the four figures with captions (one file to open)
    check_benchmark_page(dom, ["seg2d_unet", "seg2d_attention_unet"], ["structure1 (label 1)", "structure2 (label 2)"],
                         figures=4)  # box plots, training curves, reliability, montage
    for column in ("Median difference vs best", "p (Wilcoxon)", "p (Holm)", "Effect size r"):
        assert any(c.startswith(column) for c in dom.table("table-dice")["head"]) and f"| {column}" in md
    assert "Statistics" in dom.h(2) and "Holm" in html and "rank-biserial" in html and "bootstrap" in html
    params = {r[0]: r[1] for r in dom.body(dom.table("resources"))}
    assert params == {r["model"]: f"{int(r['parameters']):,}" for r in dice}  # shown once, thousands separated
    assert "Metric conventions" in dom.h(2) and "image diagonal" in html
    counts = {r[0]: r[1] for r in dom.body(dom.table("convention-counts"))}
    for model in ("seg2d_unet", "seg2d_attention_unet"):
        summary = json.loads((out / model / "summary.json").read_text())
        assert counts[model] == str(summary["conventions"]["prediction_empty"])  # missed structures, as counted
    best = next(r["best"] for r in dice)
    montage = next(f for f in dom.figures if "Best and worst cases" in f["caption"])
    assert best in montage["caption"] and "Green" in montage["caption"] and "red" in montage["caption"]
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
    assert {r["metric"] for r in ensemble} == {"dice", "nsd", "hd95", "assd", "ece", "brier", "nll"}
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


def test_holm_matches_a_worked_example() -> None:
    # Sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> max(0.06, 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN is left out of m (still 4 tests) and stays NaN; adjusted values are capped at 1.
    adjusted = holm([0.01, float("nan"), 0.04, 0.03, 0.005])
    assert np.isnan(adjusted[1]) and adjusted[:1] + adjusted[2:] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_holm_matches_statsmodels() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).uniform(0, 0.1, 12)
    assert holm(list(p)) == pytest.approx(list(multitest.multipletests(p, method="holm")[1]))


def test_rank_biserial_hand_example_and_wilcoxon_statistic() -> None:
    from scipy import stats

    # Nonzero |d| = 1, 2, 3, 3, 0.5 -> ranks 2, 3, 4.5, 4.5, 1; W+ = 2 + 4.5 + 4.5 = 11, W- = 3 + 1 = 4.
    d = np.array([1.0, -2.0, 3.0, 3.0, 0.0, -0.5, np.nan])
    assert rank_biserial(d) == pytest.approx((11 - 4) / 15)
    d = np.random.default_rng(5).normal(0.2, 1.0, 25)
    w_plus = stats.wilcoxon(d, alternative="greater").statistic
    assert rank_biserial(d) == pytest.approx(2 * w_plus / (25 * 26 / 2) - 1)
    assert rank_biserial(np.array([0.5, 1.0])) == 1.0 and rank_biserial(np.array([-0.1])) == -1.0


def test_all_differences_zero_and_no_pairs() -> None:
    assert rank_biserial(np.zeros(6)) == 0.0 and np.isnan(rank_biserial(np.array([np.nan])))
    same = {f"c{i}": {"dice": 0.5 + 0.01 * i} for i in range(6)}
    rows = {r["model"]: r for r in compare({"a": same, "b": dict(same)}, {"dice": True})}
    other = rows["b"] if rows["a"]["best"] == "a" else rows["a"]
    assert (other["wilcoxon_p"], other["p_holm"], other["effect_rbc"], other["median_diff"]) == (1.0, 1.0, 0.0, 0.0)
    best = rows[rows["a"]["best"]]
    assert (best["wilcoxon_p"], best["p_holm"], best["effect_rbc"], best["median_diff"]) == ("", "", "", "")


def test_compare_holm_adjusts_within_each_metric_and_signs_the_effect() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(2, 3, 15)
    tables = {"best": {f"c{i}": {"hd95": v} for i, v in enumerate(base)},
              "near": {f"c{i}": {"hd95": v + rng.normal(0.05, 0.2)} for i, v in enumerate(base)},
              "far": {f"c{i}": {"hd95": v + 1 + 0.01 * i} for i, v in enumerate(base)}}
    rows = {r["model"]: r for r in compare(tables, {"hd95": False})}
    assert rows["best"]["best"] == "best"
    raw = [rows["near"]["wilcoxon_p"], rows["far"]["wilcoxon_p"]]
    assert [rows["near"]["p_holm"], rows["far"]["p_holm"]] == pytest.approx(holm(raw))
    # Larger distances than the best in every case: d = model - best > 0, so r = +1 (worse for hd95).
    assert rows["far"]["effect_rbc"] == 1.0 and rows["far"]["median_diff"] == pytest.approx(1.07)


def test_rank_models_ties_direction_and_missing_values() -> None:
    assert ranking.rank_models({"a": 0.9, "b": 0.8, "c": 0.9}, higher_is_better=True) == {"a": 1.5, "b": 3.0, "c": 1.5}
    assert ranking.rank_models({"a": 4.0, "b": 2.0, "c": 3.0}, higher_is_better=False) == {"a": 3.0, "b": 1.0, "c": 2.0}
    assert ranking.rank_models({"a": float("nan"), "b": 2.0}, higher_is_better=False) == {"a": 2.0, "b": 1.0}


def _rows(metric: str, means: dict[str, float]) -> list[dict[str, str]]:
    """``results.csv`` rows as read back from the file (strings), with a 0.02-wide interval around each mean."""
    return [{"model": m, "metric": metric, "mean": str(v), "ci_low": str(v - 0.01), "ci_high": str(v + 0.01)}
            for m, v in means.items()]


def test_rank_and_value_tables_across_datasets() -> None:
    results = {
        "A": _rows("dice", {"x": 0.9, "y": 0.8, "z": 0.7}) + _rows("hd95", {"x": 3.0, "y": 2.0, "z": 1.0}),
        "B": _rows("dice", {"x": 0.6, "y": 0.6, "z": 0.9}) + _rows("hd95", {"x": 5.0, "y": 5.0, "z": 9.0}),
        "C": _rows("dice", {"x": 0.5, "y": 0.7, "z": 0.6}) + _rows("hd95", {"x": 1.0, "y": 3.0, "z": 2.0})
        + [{"model": "x (fold ensemble, 2 test cases)", "metric": "dice", "mean": "0.99"}],  # not a ranked model
    }
    dice = {r["model"]: r for r in ranking.rank_table(results, ["x", "y", "z"], "dice", True)}
    assert [dice["x"][d] for d in "ABC"] == [1.0, 2.5, 3.0] and dice["x"][MEAN_RANK] == pytest.approx(6.5 / 3)
    assert [dice["y"][d] for d in "ABC"] == [2.0, 2.5, 1.0] and dice["z"][MEAN_RANK] == pytest.approx(6 / 3)
    hd95 = {r["model"]: r for r in ranking.rank_table(results, ["x", "y", "z"], "hd95", False)}
    assert [hd95["x"][d] for d in "ABC"] == [3.0, 1.5, 1.0] and hd95["z"][MEAN_RANK] == pytest.approx(6 / 3)
    table = ranking.value_table(results, ["x", "y", "z"], "dice", True)
    assert [r["model"] for r in table] == ["x", "y", "z"] and table[0]["A"] == "0.9 ± 0.01"
    assert table[1][MEAN_RANK] == pytest.approx(5.5 / 3)
    assert ranking.estimate_cell("0.5", "nan", "nan") == "0.5" and ranking.estimate_cell(float("nan"), 0, 1) == "n/a"
    rows = ranking.by_dataset_rows(results, ["x", "y", "z"], {"dice": True, "hd95": False}, "dice")
    assert [(r["metric"], r["table"]) for r in rows][::3] == [("dice", "mean ± 95% CI half-width"),
                                                              ("dice", "rank"), ("hd95", "rank")]
    with pytest.raises(ValueError, match="no dice result for w"):
        ranking.rank_table(results, ["x", "w"], "dice", True)


def test_dataset_names_from_folders_and_files(tmp_path: Path) -> None:
    (tmp_path / "liver").mkdir()
    (tmp_path / "liver" / "dataset.json").write_text("{}")
    assert dataset_names([tmp_path / "liver" / "dataset.json", str(tmp_path / "heart") + "/"]) == ["liver", "heart"]
    with pytest.raises(ValueError, match="'liver' from .*liver, .*liver/dataset.json"):
        dataset_names([tmp_path / "liver", tmp_path / "liver" / "dataset.json"])


def test_benchmark_across_datasets(two_datasets: Path) -> None:
    out, models = two_datasets, MODELS
    for dataset in ("alpha", "beta"):  # each a normal single-dataset benchmark folder
        assert all((out / dataset / f).is_file() for f in ("splits.json", "results.csv", "report.html"))
    with (out / "results_by_dataset.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["metric", "table", "model", "alpha", "beta", MEAN_RANK]
        rows = list(reader)
    table = [r for r in rows if r["table"] != "rank"]
    assert sorted(r["model"] for r in table) == sorted(models) and {r["metric"] for r in table} == {"dice"}
    assert all(re.fullmatch(r"\S+( ± \S+)?", r[d]) for r in table for d in ("alpha", "beta"))
    assert {r["metric"] for r in rows if r["table"] == "rank"} == set(SEG_METRICS)
    for metric, higher in SEG_METRICS.items():
        ranks = {}
        for dataset in ("alpha", "beta"):
            with (out / dataset / "results.csv").open() as handle:
                means = {r["model"]: float(r["mean"]) for r in csv.DictReader(handle)
                         if r["metric"] == metric and r["model"] in models}
            ranks[dataset] = ranking.rank_models(means, higher)
        written = {r["model"]: r for r in rows if r["table"] == "rank" and r["metric"] == metric}
        for m in models:
            assert [float(written[m][d]) for d in ("alpha", "beta")] == [ranks[d][m] for d in ("alpha", "beta")]
            assert float(written[m][MEAN_RANK]) == pytest.approx((ranks["alpha"][m] + ranks["beta"][m]) / 2)
            if metric == "dice":  # the value table's mean rank is the dice one
                shown = next(r for r in table if r["model"] == m)
                assert float(shown[MEAN_RANK]) == float(written[m][MEAN_RANK])
    md = (out / "report.md").read_text()
    assert "| Model | alpha | beta | Mean rank |" in md and "(alpha/report.html)" in md
    dom = parse_report((out / "report.html").read_text())
    assert dom.h(2) == ["Summary", "Dice ↑ per dataset", "Mean rank per metric", "Statistics", "Datasets"]
    assert sorted(r[0] for r in dom.body(dom.table("by-dataset"))) == sorted(models)
    assert ("beta/report.html", "beta") in dom.links


def test_benchmark_across_datasets_refuses_duplicate_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["benchmark", "--configs", str(CONFIGS / "seg2d_unet.yaml"), "--output", str(tmp_path / "out"),
                 "--datasets", str(tmp_path / "a" / "data"), str(tmp_path / "b" / "data")])
    assert code == 2 and "distinct folder names" in capsys.readouterr().err
