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
    assert list(rows[0]) == ["case", "class", "name", "dice", "iou", "hd95", "assd", "nsd", "volume_diff_ml",
                             "sensitivity", "precision"]  # 3D: the size difference is a volume
    assert len(rows) == 1 and float(rows[0]["dice"]) == 1.0 and float(rows[0]["hd95"]) == 0.0
    assert rows[0]["class"] == "1" and rows[0]["name"] == "structure1"  # the dataset.json's label name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_predictions"] == [cases[1]["id"]] and summary["unmatched_predictions"] == ["stray"]
    assert summary["foreground_mean"]["dice"] == 1.0 and summary["per_class"]["1"]["dice"]["n"] == 1
    assert summary["per_class"]["1"]["name"] == "structure1" and "volume_diff_ml" in summary["foreground_mean"]
    assert (out / "summary.csv").read_text().startswith("class,name,metric,mean,std,median,n")


# Anisotropic voxels (mm) along the array axes, the smallest along z; the affine flips x, so the spacing must come
# from the norms of the affine's columns.
SPACING = (1.5, 2.0, 0.8)
BOX = (8, 6, 7)  # a x b x c voxels


def _boxes_and_blobs() -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label maps (28x22x18); both hold both classes.

    Class 1: a box and the same box shifted by one voxel along z (known in closed form, see the test).
    Class 2: an ellipsoid and a smaller, diagonally shifted ellipsoid (irregular surfaces: scored by MONAI).
    """
    shape = (28, 22, 18)
    a, b, c = BOX
    reference = np.zeros(shape, np.uint8)
    prediction = np.zeros(shape, np.uint8)
    reference[3:3 + a, 4:4 + b, 3:3 + c] = 1
    prediction[3:3 + a, 4:4 + b, 4:4 + c] = 1  # z 4..10 instead of 3..9
    x, y, z = np.indices(shape)
    reference[((x - 19) / 5.5) ** 2 + ((y - 13) / 5.0) ** 2 + ((z - 9) / 6.5) ** 2 < 1] = 2
    prediction[((x - 20) / 4.5) ** 2 + ((y - 14) / 5.0) ** 2 + ((z - 11) / 5.5) ** 2 < 1] = 2
    return reference, prediction


def _evaluate_one_case(tmp_path: Path, *options: str) -> dict[int, dict[str, float]]:
    reference, prediction = _boxes_and_blobs()
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [30.0, -12.0, 5.0]
    write_nifti(prediction, affine, tmp_path / "pred" / "case.nii.gz")
    write_nifti(reference, affine, tmp_path / "truth" / "case.nii.gz")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--output", str(tmp_path / "e"), *options]) == 0
    with (tmp_path / "e" / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["name"] == r["class"] for r in rows)  # a folder of labels names no class: the value as text
    return {int(r["class"]): {k: float(v) for k, v in r.items() if k not in ("case", "class", "name")} for r in rows}


def test_shifted_box_scores_match_closed_form(tmp_path: Path) -> None:
    """Class 1: an a x b x c box against itself shifted by one voxel along z (dz = 0.8 mm, the smallest spacing).

    Overlap a*b*(c-1): Dice = sensitivity = precision = (c-1)/c, IoU = (c-1)/(c+1), equal volumes.
    Surface distances are 0 where the two surfaces coincide (the side faces) and dz elsewhere (every other distance
    is at least the smallest spacing, and the next face lies one z step away): on each side the a*b leading face
    plus the (a-2)(b-2) inner voxels of the face that now lies inside the other box, out of the
    a*b*c - (a-2)(b-2)(c-2) surface voxels (the same count on both sides). So HD95 = dz (over 5% are at dz),
    ASSD = dz * far / surface, and NSD at a 0.5 mm tolerance (< dz) = 1 - far / surface; at 1 mm, NSD = 1.
    """
    a, b, c = BOX
    dz = SPACING[2]
    far, surface = a * b + (a - 2) * (b - 2), a * b * c - (a - 2) * (b - 2) * (c - 2)
    tight = _evaluate_one_case(tmp_path / "tight", "--nsd-tolerance", "0.5")[1]
    assert tight["dice"] == pytest.approx((c - 1) / c)
    assert tight["iou"] == pytest.approx((c - 1) / (c + 1))
    assert tight["sensitivity"] == pytest.approx((c - 1) / c) and tight["precision"] == pytest.approx((c - 1) / c)
    assert tight["volume_diff_ml"] == pytest.approx(0.0, abs=1e-12)
    assert tight["hd95"] == pytest.approx(dz)
    assert tight["assd"] == pytest.approx(dz * far / surface)
    assert tight["nsd"] == pytest.approx(1 - far / surface)
    assert _evaluate_one_case(tmp_path / "loose", "--nsd-tolerance", "1.0")[1]["nsd"] == pytest.approx(1.0)


def test_irregular_scores_match_monai(tmp_path: Path) -> None:
    """Both classes against MONAI's own metric functions, with the same anisotropic spacing."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    reference, prediction = _boxes_and_blobs()
    rows = _evaluate_one_case(tmp_path, "--nsd-tolerance", "1.0")
    assert sorted(rows) == [1, 2]

    def one_hot(labels: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.stack([labels == k for k in (0, 1, 2)])[None].astype(np.float32))

    pred, ref, spacing = one_hot(prediction), one_hot(reference), list(SPACING)
    expected = {
        "dice": compute_dice(pred, ref, include_background=False)[0],
        "hd95": compute_hausdorff_distance(pred, ref, percentile=95, spacing=spacing)[0],
        "assd": compute_average_surface_distance(pred, ref, symmetric=True, spacing=spacing)[0],
        "nsd": compute_surface_dice(pred, ref, class_thresholds=[1.0, 1.0], spacing=spacing)[0],
    }
    for cls in (1, 2):
        for metric, values in expected.items():
            assert rows[cls][metric] == pytest.approx(float(values[cls - 1]), rel=1e-5), (cls, metric)
        voxel_ml = float(np.prod(SPACING)) / 1000
        n_pred, n_ref = (prediction == cls).sum(), (reference == cls).sum()
        assert rows[cls]["volume_diff_ml"] == pytest.approx((n_pred - n_ref) * voxel_ml)
    # The ellipsoids overlap only in part: the values are far from both a perfect and a missed prediction.
    assert 0.3 < rows[2]["dice"] < 0.9 and rows[2]["hd95"] > 1.0


def _write_dataset(root: Path, labels: dict[str, str], maps: dict[str, np.ndarray], affine: np.ndarray) -> Path:
    """A dataset.json whose labelled test cases are ``maps`` (written as their own images too)."""
    for case, values in maps.items():
        write_nifti(values, affine, root / "labelsTs" / f"{case}.nii.gz")
        write_nifti(values.astype(np.float32), affine, root / "imagesTs" / f"{case}.nii.gz")
    test = [{"image": f"imagesTs/{case}.nii.gz", "label": f"labelsTs/{case}.nii.gz"} for case in maps]
    (root / "dataset.json").write_text(json.dumps({"name": "named", "task": "segmentation", "labels": labels,
                                                   "channel_names": {"0": "MRI"}, "training": test, "test": test}))
    return root / "dataset.json"


def _table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_label_names_from_a_dataset_json_fill_the_name_column(tmp_path: Path) -> None:
    from medseg.evaluation.evaluate import evaluate_segmentation

    reference, prediction = _boxes_and_blobs()
    affine = np.diag([*SPACING, 1.0])
    description = _write_dataset(tmp_path / "data", {"0": "background", "1": "liver", "2": "tumour"},
                                 {"case": reference}, affine)
    write_nifti(prediction, affine, tmp_path / "pred" / "case.nii.gz")
    summary = evaluate_segmentation(tmp_path / "pred", description, tmp_path / "e")
    rows = _table(tmp_path / "e" / "per_case.csv")
    assert [(r["class"], r["name"]) for r in rows] == [("1", "liver"), ("2", "tumour")]  # the class column keeps values
    table = _table(tmp_path / "e" / "summary.csv")
    assert list(table[0])[:3] == ["class", "name", "metric"]
    assert {(r["class"], r["name"]) for r in table} == {("1", "liver"), ("2", "tumour"), ("foreground", "foreground")}
    dice_2 = next(r for r in table if r["class"] == "2" and r["metric"] == "dice")
    assert float(dice_2["mean"]) == pytest.approx(float(rows[1]["dice"]))
    assert list(summary["per_class"]) == ["1", "2"]  # still keyed by the label value
    assert summary["per_class"]["1"]["name"] == "liver" and summary["per_class"]["2"]["name"] == "tumour"
    saved = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert saved["per_class"]["2"]["name"] == "tumour" and saved["per_class"]["2"]["dice"]["n"] == 1

    # A mapping of reference files (as cv passes them) names nothing: the names come from `names`, else the value.
    references = {"case": str(tmp_path / "data" / "labelsTs" / "case.nii.gz")}
    named = evaluate_segmentation(tmp_path / "pred", references, tmp_path / "n", classes=[1, 2],
                                  names={0: "background", 1: "liver", 2: "tumour"})
    assert [r["name"] for r in _table(tmp_path / "n" / "per_case.csv")] == ["liver", "tumour"]
    assert named["per_class"]["2"]["name"] == "tumour"
    unnamed = evaluate_segmentation(tmp_path / "pred", references, tmp_path / "u", classes=[1, 2])
    assert [r["name"] for r in _table(tmp_path / "u" / "per_case.csv")] == ["1", "2"]
    assert unnamed["per_class"]["1"]["name"] == "1"


def test_a_folder_of_labels_names_each_class_by_its_value(tmp_path: Path) -> None:
    _evaluate_one_case(tmp_path)  # checks name == class in per_case.csv
    table = _table(tmp_path / "e" / "summary.csv")
    assert {(r["class"], r["name"]) for r in table} == {("1", "1"), ("2", "2"), ("foreground", "foreground")}
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["per_class"]["1"]["name"] == "1" and summary["per_class"]["2"]["name"] == "2"


SPACING_2D = (0.5, 2.0)  # mm along x and y: a pixel is 1.0 mm^2


def test_2d_images_report_the_area_difference_in_mm2(tmp_path: Path) -> None:
    """A 2D case has an area difference in mm^2 (no volume): 5 extra pixels of 0.5 x 2.0 mm are 5.0 mm^2."""
    from medseg.evaluation.evaluate import evaluate_segmentation

    affine = np.diag([*SPACING_2D, 1.0, 1.0])
    reference = np.zeros((20, 16), np.uint8)
    reference[4:10, 3:9] = 1  # 36 pixels
    reference[12:16, 10:14] = 2  # 16 pixels
    prediction = reference.copy()
    prediction[10, 3:8] = 1  # 5 extra pixels of class 1, one row below the square
    prediction[12:14, 10:14] = 0  # 8 pixels of class 2 missed
    only_1 = np.zeros_like(reference)
    only_1[2:6, 2:6] = 1  # a second case without class 2 on either side
    for case, ref, pred in (("a", reference, prediction), ("b", only_1, only_1)):
        write_nifti(ref, affine, tmp_path / "truth" / f"{case}.nii.gz")
        write_nifti(pred, affine, tmp_path / "pred" / f"{case}.nii.gz")
    summary = evaluate_segmentation(tmp_path / "pred", tmp_path / "truth", tmp_path / "e")
    rows = _table(tmp_path / "e" / "per_case.csv")
    assert list(rows[0]) == ["case", "class", "name", "dice", "iou", "hd95", "assd", "nsd", "area_diff_mm2",
                             "sensitivity", "precision"]
    area = {(r["case"], r["class"]): float(r["area_diff_mm2"]) for r in rows}
    assert area[("a", "1")] == pytest.approx(5.0)  # 5 pixels x 0.5 mm x 2.0 mm
    assert area[("a", "2")] == pytest.approx(-8.0)
    assert area[("b", "1")] == 0.0 and area[("b", "2")] == 0.0  # class 2 absent from both: 0 mm^2
    assert summary["per_class"]["1"]["area_diff_mm2"]["mean"] == pytest.approx(2.5)
    assert summary["foreground_mean"]["area_diff_mm2"] == pytest.approx((2.5 + -4.0) / 2)
    assert "volume_diff_ml" not in summary["foreground_mean"] and "volume_diff_ml" not in summary["per_class"]["2"]
    metrics = {r["metric"] for r in _table(tmp_path / "e" / "summary.csv")}
    assert "area_diff_mm2" in metrics and "volume_diff_ml" not in metrics


def test_2d_and_3d_cases_in_one_evaluation_are_refused(tmp_path: Path) -> None:
    from medseg.evaluation.evaluate import evaluate_segmentation

    flat, deep = np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8)
    flat[2:5, 2:5] = deep[2:5, 2:5, 1:3] = 1
    for case, values in (("a", flat), ("b", deep)):
        write_nifti(values, np.eye(4), tmp_path / "truth" / f"{case}.nii.gz")
        write_nifti(values, np.eye(4), tmp_path / "pred" / f"{case}.nii.gz")
    with pytest.raises(ValueError, match=r"b\.nii\.gz: a 3D image, but .*a\.nii\.gz is 2D"):
        evaluate_segmentation(tmp_path / "pred", tmp_path / "truth", tmp_path / "e")


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
