"""`medseg evaluate`: tables from prediction and reference folders, missing cases reported."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.data.io import read_image, write_nifti


def test_perfect_predictions_and_a_missing_case(seg3d_root: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    cases = load_dataset(seg3d_root).test
    shutil.copy(cases[0]["label"], pred / f"{cases[0]['id']}.nii.gz")  # perfect; the second case is missing
    label, affine = read_image(cases[0]["label"])
    write_nifti(np.zeros_like(label, dtype=np.uint8), affine, pred / "stray.nii.gz")  # no reference
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(pred), "--truth", str(seg3d_root / "dataset.json"), "--output", str(out)])
    assert code == 1  # a prediction is missing
    err = capsys.readouterr().err
    assert cases[1]["id"] in err and "stray" in err
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "class", "dice", "iou", "hd95", "assd", "nsd", "volume_diff_ml",
                             "sensitivity", "precision"]
    assert len(rows) == 1 and float(rows[0]["dice"]) == 1.0 and float(rows[0]["hd95"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_predictions"] == [cases[1]["id"]] and summary["unmatched_predictions"] == ["stray"]
    assert summary["foreground_mean"]["dice"] == 1.0 and summary["per_class"]["1"]["dice"]["n"] == 1
    assert (out / "summary.csv").read_text().startswith("class,metric,mean,std,median,n")


def test_scores_match_the_metric_functions(seg3d_root: Path, tmp_path: Path) -> None:
    from medseg.metrics.segmentation import binary_metrics

    pred = tmp_path / "pred"
    truth = tmp_path / "truth"
    expected = []
    for case in load_dataset(seg3d_root).test:
        label, affine = read_image(case["label"])
        eroded = label.copy()
        eroded[:, :, ::3] = 0  # a damaged prediction
        write_nifti(eroded.astype(np.uint8), affine, pred / f"{case['id']}.nii.gz")
        write_nifti(label.astype(np.uint8), affine, truth / f"{case['id']}.nii.gz")
        expected.append(binary_metrics(eroded == 1, label == 1, np.linalg.norm(affine[:3, :3], axis=0))["dice"])
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--output", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["per_class"]["1"]["dice"]["mean"] == pytest.approx(np.mean(expected))
    assert summary["per_class"]["1"]["dice"]["median"] == pytest.approx(np.median(expected))
    assert 0.3 < summary["foreground_mean"]["dice"] < 0.95


def test_a_prediction_on_another_grid_is_refused(seg3d_root: Path, tmp_path: Path, capsys) -> None:
    case = load_dataset(seg3d_root).test[0]
    label, affine = read_image(case["label"])
    write_nifti(label[:-1].astype(np.uint8), affine, tmp_path / "pred" / f"{case['id']}.nii.gz")
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(seg3d_root), "--output",
                 str(tmp_path / "e")])
    assert code == 2 and "does not match the reference" in capsys.readouterr().err


def test_classification_evaluation_writes_metrics_and_pictures(cls2d_checkpoint: Path, cls2d_root: Path,
                                                               tmp_path: Path) -> None:
    import sklearn.metrics as skm
    from PIL import Image

    assert main(["predict", "--ckpt", str(cls2d_checkpoint), "--input", str(cls2d_root / "dataset.json"),
                 "--output", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--truth", str(cls2d_root),
                 "--output", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    with (tmp_path / "p" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    truth = {c["id"]: c["label"] for c in load_dataset(cls2d_root).training}
    y = [truth[r["case"]] for r in rows]
    assert summary["auc"] == pytest.approx(skm.roc_auc_score(y, [float(r["p_class1"]) for r in rows]), abs=1e-6)
    assert summary["cases"] == len(rows) and summary["missing_predictions"] == []
    for name in ("roc.png", "reliability.png", "confusion.png"):
        with Image.open(tmp_path / "e" / name) as img:
            assert img.format == "PNG" and min(img.size) > 200


def test_roc_points_match_sklearn() -> None:
    import sklearn.metrics as skm

    from medseg.evaluation.plots import roc_points

    rng = np.random.default_rng(0)
    y = rng.random(60) > 0.5
    scores = np.round(rng.random(60), 1)  # many ties
    fpr, tpr = roc_points(y, scores)
    ref_fpr, ref_tpr, _ = skm.roc_curve(y, scores, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
