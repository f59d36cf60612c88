"""Joint segmentation + classification: predict's class rows, patient-level scores, and `medseg evaluate` of both
sides."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.io import read_image, write_nifti
from medseg.evaluation.classes import evaluate_classification
from medseg.evaluation.patients import aggregate


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_predictions(path: Path, names: list[str], probabilities: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "prediction", *(f"p_{n}" for n in names), "doubt", "members"])
        for case, p in probabilities.items():
            writer.writerow([case, names[int(np.argmax(p))], *p, 0.0, 1])


# --- predict -------------------------------------------------------------------------------------------------

CLASSES = ["benign", "malignant", "other"]
# Stored LAS-like (x flipped): the RAS preprocessing reorients, so the label maps must be inverted to this grid.
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 1.0, 0, -4.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def multitask_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A hand-built multitask checkpoint (3D, 2 segmentation classes, 3 image-level classes, 8^3 windows) and a
    folder of three 12x10x8 images."""
    from medseg.models import create_model

    root = tmp_path_factory.mktemp("mtl")
    torch.manual_seed(0)
    args = {"image_classes": 3, "channels": [4, 8]}
    net = create_model("multitask_unet", 3, 1, 2, **args)
    with torch.no_grad():  # a sharper head: flips and cases change the class probabilities visibly
        net.classifier[-1].weight.mul_(20.0)
    hparams = {"network": "multitask_unet", "spatial_dims": 3, "in_channels": 1, "num_classes": 2,
               "label_names": ["background", "lesion"], "class_names": CLASSES, "network_args": args,
               "roi_size": [8, 8, 8], "overlap": 0.25, "sw_batch_size": 2, "loss": "dice_ce",
               "preprocessing_spec": {"orientation": "RAS", "intensity": "none"}}
    checkpoint = root / "mtl.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams,
                "medseg_task": "multitask"}, checkpoint)
    rng = np.random.default_rng(0)
    for case in ("a", "b", "c"):
        write_nifti(rng.normal(size=(12, 10, 8)).astype(np.float32), AFFINE, root / "images" / f"{case}.nii.gz")
    return checkpoint, root / "images"


def _direct(checkpoint: Path, image: Path, flips: list[tuple[int, ...]]) -> np.ndarray:
    """The mean over ``flips`` of ``case_class_probabilities`` on the preprocessed image, computed here."""
    from medseg.inference.native import load_model, preprocess_for
    from medseg.models.multitask import case_class_probabilities

    model = load_model(checkpoint)
    x = preprocess_for(model)({"image": str(image)})["image"].as_tensor()[None]
    assert x.shape[2:] == (12, 10, 8)
    return np.mean([case_class_probabilities(model.net, torch.flip(x, [a + 2 for a in f]) if f else x, (8, 8, 8),
                                             0.25, 2).numpy() for f in flips], axis=0)


def test_predict_writes_label_maps_and_class_rows(multitask_model: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, images = multitask_model
    out, tta = tmp_path / "p", tmp_path / "tta"
    assert main(["predict", "--ckpt", str(checkpoint), "--input", str(images), "--output", str(out),
                 "--device", "cpu"]) == 0
    assert main(["predict", "--ckpt", str(checkpoint), "--input", str(images), "--output", str(tta),
                 "--device", "cpu", "--tta", "--tta-axes", "0"]) == 0
    rows, tta_rows = _rows(out / "predictions.csv"), _rows(tta / "predictions.csv")
    assert [r["case"] for r in rows] == ["a", "b", "c"] and [r["case"] for r in tta_rows] == ["a", "b", "c"]
    assert list(rows[0])[:5] == ["case", "prediction", "p_benign", "p_malignant", "p_other"]
    for row, tta_row in zip(rows, tta_rows, strict=True):
        image = images / f"{row['case']}.nii.gz"
        labels, affine = read_image(out / f"{row['case']}.nii.gz")
        assert labels.shape == (12, 10, 8) and np.allclose(affine, AFFINE)
        assert set(np.unique(labels)) <= {0, 1}
        p = np.array([float(row[f"p_{n}"]) for n in CLASSES])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert p == pytest.approx(_direct(checkpoint, image, [()]), abs=1e-5)
        assert row["prediction"] == CLASSES[int(p.argmax())]
        # --tta --tta-axes 0: the mean of the plain and the x-flipped image's probabilities
        p_tta = np.array([float(tta_row[f"p_{n}"]) for n in CLASSES])
        assert p_tta == pytest.approx(_direct(checkpoint, image, [(), (0,)]), abs=1e-5)
        assert np.abs(p_tta - p).max() > 1e-4  # the flip changed something, so the line above tests the mean
    assert int(rows[0]["members"]) == 1 and int(tta_rows[0]["members"]) == 2


def test_resume_redoes_a_case_without_its_row_or_its_label_map(multitask_model: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    from medseg.inference.batch import PredictOptions, predict_batch
    from medseg.inference.writers import RowTable

    checkpoint, images = multitask_model
    out = tmp_path / "p"
    first = predict_batch([checkpoint], images, PredictOptions(out, device="cpu"))
    assert first.done == ["a", "b", "c"]
    before = {r["case"]: r for r in _rows(out / "predictions.csv")}
    RowTable(out / "predictions.csv").rewrite(keep=lambda row: row["case"] != "a")  # a: label map, no row
    (out / "c.nii.gz").unlink()  # c: a row, no label map
    with pytest.raises(FileExistsError, match="--resume"):
        predict_batch([checkpoint], images, PredictOptions(out, device="cpu"))
    again = predict_batch([checkpoint], images, PredictOptions(out, device="cpu", resume=True))
    assert again.done == ["a", "c"] and again.skipped == ["b"]
    rows = _rows(out / "predictions.csv")
    assert [r["case"] for r in rows] == ["a", "b", "c"]  # one row per case, in case order
    assert all(rows[i]["p_other"] == before[c]["p_other"] for i, c in enumerate("abc"))
    assert (out / "c.nii.gz").is_file()


def test_members_with_other_image_classes_are_refused(multitask_model: tuple[Path, Path], tmp_path: Path) -> None:
    from medseg.inference.batch import PredictOptions, predict_batch

    checkpoint, images = multitask_model
    state = torch.load(checkpoint, weights_only=True)
    state["hyper_parameters"]["class_names"] = ["x", "y", "z"]
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    with pytest.raises(ValueError, match=r"other\.ckpt: image-level classes \['x', 'y', 'z'\] differ"):
        predict_batch([checkpoint, other], images, PredictOptions(tmp_path / "p", device="cpu"))


def test_export_and_load_refuse_a_multitask_model_in_one_line(multitask_model: tuple[Path, Path], tmp_path: Path,
                                                               capsys) -> None:
    import medseg

    checkpoint, _ = multitask_model
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and str(checkpoint) in err
    assert "multitask models cannot be exported yet (its network has two outputs, a label map and a class)" in err
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match=r"mtl\.ckpt: multitask models predict with `medseg predict --ckpt`"):
        medseg.load(checkpoint)


# --- patient-level aggregation --------------------------------------------------------------------------------

# (case, class, patient, p_positive); c5 has no patient id (a patient of its own); c9 is never predicted.
BINARY = [("c1", 0, "p1", 0.2), ("c2", 1, "p1", 0.6), ("c3", 0, "p2", 0.3), ("c4", 0, "p2", 0.1),
          ("c5", 1, None, 0.9), ("c6", 1, "p3", 0.45), ("c7", 1, "p3", 0.35), ("c8", 0, "p4", 0.5),
          ("c9", 0, "p4", None)]


@pytest.fixture
def binary_dataset(tmp_path: Path) -> Path:
    training = [{"image": f"imagesTr/{c}.png", "label": y, **({"patient": p} if p else {})}
                for c, y, p, _ in BINARY]
    (tmp_path / "dataset.json").write_text(json.dumps({
        "task": "classification", "labels": {"0": "negative", "1": "positive"}, "training": training}))
    _write_predictions(tmp_path / "pred" / "predictions.csv", ["negative", "positive"],
                       {c: [1 - p, p] for c, _, _, p in BINARY if p is not None})
    return tmp_path


@pytest.mark.parametrize(("rule", "expected"), [
    # patient: p1 (its cases disagree: positive, as one case is), p2, c5 (own patient), p3, p4 (c9 unpredicted)
    ("mean", {"p1": 0.4, "p2": 0.2, "c5": 0.9, "p3": 0.4, "p4": 0.5}),
    ("max", {"p1": 0.6, "p2": 0.3, "c5": 0.9, "p3": 0.45, "p4": 0.5}),
])
def test_patient_scores_by_hand_and_by_scikit_learn(binary_dataset: Path, rule: str, expected: dict) -> None:
    import sklearn.metrics as skm

    truth = {"p1": 1, "p2": 0, "c5": 1, "p3": 1, "p4": 0}
    out = binary_dataset / f"eval_{rule}"
    summary = evaluate_classification(binary_dataset / "pred", binary_dataset, out, patient_aggregate=rule)
    assert summary["missing_predictions"] == ["c9"] and summary["cases"] == 8
    rows = {r["patient"]: r for r in _rows(out / "patients.csv")}
    assert list(rows) == list(expected)  # in order of each patient's first case
    for patient, p in expected.items():
        assert float(rows[patient]["p_positive"]) == pytest.approx(p)
        assert float(rows[patient]["p_negative"]) == pytest.approx(1 - p)
        assert rows[patient]["truth"] == ["negative", "positive"][truth[patient]]
    assert rows["p1"]["cases"] == "c1 c2" and rows["p4"]["cases"] == "c8"
    y = [truth[p] for p in expected]
    scores = [expected[p] for p in expected]
    patients = summary["patients"]
    assert patients["patients"] == 5 and patients["aggregate"] == rule
    assert patients["auc"] == pytest.approx(skm.roc_auc_score(y, scores))
    assert patients["accuracy"] == pytest.approx(skm.accuracy_score(y, [int(s > 0.5) for s in scores]))
    assert patients["accuracy"] == {"mean": 0.6, "max": 0.8}[rule]  # the tie at 0.5 goes to the first class
    assert json.loads((out / "summary.json").read_text())["patients"]["auc"] == pytest.approx(patients["auc"])


def test_patient_line_on_the_console(binary_dataset: Path, capsys) -> None:
    assert main(["evaluate", "--pred", str(binary_dataset / "pred"), "--truth", str(binary_dataset),
                 "--output", str(binary_dataset / "e"), "--patient-aggregate", "max"]) == 1  # c9 is missing
    assert "5 patient(s) (max of their cases): accuracy 0.8000" in capsys.readouterr().out


def test_max_over_more_classes_is_renormalised() -> None:
    rows = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert aggregate(rows, "max") == pytest.approx(np.array([0.7, 0.3, 0.6]) / 1.6)
    assert aggregate(rows, "mean") == pytest.approx([0.4, 0.25, 0.35])
    assert aggregate(np.array([[0.9, 0.1], [0.3, 0.7]]), "max") == pytest.approx([0.3, 0.7])  # not [0.9, 0.7]/1.6


def test_patient_whose_cases_disagree_on_one_of_three_classes_is_refused(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    training = [{"image": "x.png", "label": 0, "patient": "pA"}, {"image": "y.png", "label": 2, "patient": "pA"},
                {"image": "z.png", "label": 1, "patient": "pB"}]
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"task": "classification", "labels": dict(enumerate(names)), "training": training}))
    _write_predictions(tmp_path / "pred" / "predictions.csv", names,
                       {"x": [0.5, 0.3, 0.2], "y": [0.2, 0.2, 0.6], "z": [0.1, 0.8, 0.1]})
    with pytest.raises(ValueError, match=r"patient 'pA': its cases disagree on the class \(x=a, y=c\)"):
        evaluate_classification(tmp_path / "pred", tmp_path, tmp_path / "e", patient_aggregate="mean")
    # without patient scores the same predictions are scored per case
    assert evaluate_classification(tmp_path / "pred", tmp_path, tmp_path / "e")["accuracy"] == 1.0


# --- medseg evaluate on a multitask dataset -------------------------------------------------------------------

def _block(shape: tuple[int, ...], stop: int) -> np.ndarray:
    """A label map with label 1 in ``[2:6, 2:stop, 1:3]``."""
    label = np.zeros(shape, dtype=np.uint8)
    label[2:6, 2:stop, 1:3] = 1
    return label


def test_multitask_evaluation_scores_both_sides(tmp_path: Path, capsys) -> None:
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    shape = (8, 8, 4)
    # case: (class, p_malignant, truth block end, predicted block end)
    cases = {"a": (0, 0.2, 6, 6), "b": (1, 0.7, 6, 4), "c": (0, 0.6, 6, 6), "d": (1, 0.4, 6, 6)}
    training = []
    for case, (klass, _, truth_stop, pred_stop) in cases.items():
        write_nifti(_block(shape, truth_stop), affine, tmp_path / "labelsTr" / f"{case}.nii.gz")
        write_nifti(_block(shape, pred_stop), affine, tmp_path / "pred" / f"{case}.nii.gz")
        training.append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "class": klass,
                         "patient": f"p{case}"})
    (tmp_path / "dataset.json").write_text(json.dumps({
        "task": "multitask", "labels": {"0": "background", "1": "lesion"},
        "classes": {"0": "benign", "1": "malignant"}, "training": training}))
    _write_predictions(tmp_path / "pred" / "predictions.csv", ["benign", "malignant"],
                       {case: [1 - p, p] for case, (_, p, _, _) in cases.items()})
    out = tmp_path / "e"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "dataset.json"),
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # b: 16 of its 32 truth voxels predicted, nothing else: Dice 2*16/(32+16) = 2/3; the others are exact
    assert summary["segmentation"]["foreground_mean"]["dice"] == pytest.approx((3 + 2 / 3) / 4)
    assert summary["segmentation"]["per_class"]["1"]["name"] == "lesion"
    # predicted classes 0, 1, 1, 0 against 0, 1, 0, 1; AUC: 3 of the 4 (positive, negative) pairs are ordered
    assert summary["classification"]["accuracy"] == 0.5 and summary["classification"]["auc"] == 0.75
    assert summary["missing_predictions"] == [] and summary["cases"] == 4
    assert json.loads((out / "segmentation" / "summary.json").read_text())["cases"] == 4
    assert json.loads((out / "classification" / "summary.json").read_text())["accuracy"] == 0.5
    printed = capsys.readouterr().out
    assert "segmentation: 4 case(s): foreground mean Dice 0.9167" in printed
    assert "classification: 4 case(s): accuracy 0.5000, AUC 0.7500" in printed

    (tmp_path / "pred" / "d.nii.gz").unlink()  # one side misses a case: exit code 1, named
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "dataset.json"),
                 "--output", str(out)]) == 1
    assert json.loads((out / "summary.json").read_text())["missing_predictions"] == ["d"]
    assert "segmentation: missing predictions: d" in capsys.readouterr().err


# --- user mistakes at evaluation ------------------------------------------------------------------------------

@pytest.fixture
def multitask_folder(tmp_path: Path) -> Path:
    """A multitask dataset (two training and two test cases, patients pA and pB) and a prediction folder with
    the test cases' label maps and predictions.csv rows."""
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    entries = {"training": [], "test": []}
    for split, case, klass, patient in (("training", "t1", 0, "pA"), ("training", "t2", 1, "pB"),
                                        ("test", "s1", 0, "pC"), ("test", "s2", 1, "pD")):
        write_nifti(_block((8, 8, 4), 6), affine, tmp_path / "labels" / f"{case}.nii.gz")
        entries[split].append({"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz", "class": klass,
                               "patient": patient})
        if split == "test":
            write_nifti(_block((8, 8, 4), 6), affine, tmp_path / "pred" / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "task": "multitask", "labels": {"0": "background", "1": "lesion"},
        "classes": {"0": "benign", "1": "malignant"}, **entries}))
    _write_predictions(tmp_path / "pred" / "predictions.csv", ["benign", "malignant"],
                       {"s1": [0.8, 0.2], "s2": [0.3, 0.7]})
    return tmp_path


def _evaluate(root: Path, capsys: pytest.CaptureFixture, pred: Path | None = None, truth: Path | None = None,
              *extra: str) -> tuple[int, str]:
    code = main(["evaluate", "--pred", str(pred or root / "pred"), "--truth", str(truth or root / "dataset.json"),
                 "--output", str(root / "e"), *extra])
    return code, capsys.readouterr().err.strip()


def _edit(root: Path, change: Any) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_a_class_index_out_of_range_is_named(multitask_folder: Path, capsys: pytest.CaptureFixture) -> None:
    _edit(multitask_folder, lambda meta: meta["test"][1].update({"class": 2}))
    code, err = _evaluate(multitask_folder, capsys)
    assert code == 2 and "\n" not in err, err
    assert f"{multitask_folder / 'dataset.json'}: case 's2' has class 2, not one of the 2 declared classes" in err
    assert not (multitask_folder / "e").exists()  # refused before anything is scored
    # a classification dataset's label out of range: the same refusal, naming its 'label'
    (multitask_folder / "cls").mkdir()
    (multitask_folder / "cls" / "dataset.json").write_text(json.dumps({
        "task": "classification", "labels": {"0": "benign", "1": "malignant"},
        "training": [{"image": "s1.png", "label": 0}, {"image": "s2.png", "label": -1}]}))
    code, err = _evaluate(multitask_folder, capsys, None, multitask_folder / "cls" / "dataset.json")
    assert code == 2 and "case 's2' has label -1, not one of the 2 declared classes" in err and "\n" not in err


def test_a_classifier_table_or_other_cases_are_refused(multitask_folder: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    classifier = multitask_folder / "classifier"  # a plain classifier's folder: predictions.csv only
    classifier.mkdir()
    (multitask_folder / "pred" / "predictions.csv").rename(classifier / "predictions.csv")
    code, err = _evaluate(multitask_folder, capsys, classifier)
    assert code == 2 and "\n" not in err
    assert f"{classifier}: no label map of the dataset's 2 test case(s) (e.g. s1.nii.gz)" in err
    # an unlabelled test list: the training cases are scored, and the test predictions are not theirs
    (classifier / "predictions.csv").rename(multitask_folder / "pred" / "predictions.csv")
    _edit(multitask_folder, lambda meta: [(c.pop("label"), c.pop("class")) for c in meta["test"]])
    code, err = _evaluate(multitask_folder, capsys)
    assert code == 2 and "\n" not in err
    assert "no label map of the dataset's 2 training case(s) (e.g. t1.nii.gz) (its 'test' cases carry" in err


def test_a_refused_patient_comes_before_the_label_maps(multitask_folder: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    _edit(multitask_folder, lambda meta: [c.update(patient="pX") for c in meta["test"]])
    _edit(multitask_folder, lambda meta: meta.update(classes={"0": "a", "1": "b", "2": "c"}))
    _write_predictions(multitask_folder / "pred" / "predictions.csv", ["a", "b", "c"],
                       {"s1": [0.8, 0.1, 0.1], "s2": [0.1, 0.7, 0.2]})
    code, err = _evaluate(multitask_folder, capsys, None, None, "--patient-aggregate", "mean")
    assert code == 2 and "patient 'pX': its cases disagree on the class (s1=a, s2=b)" in err
    assert not (multitask_folder / "e" / "segmentation").exists()
    # without patient ids every case is a patient of its own: the patient scores are the case scores
    _edit(multitask_folder, lambda meta: [c.pop("patient") for c in meta["test"]])
    code, _ = _evaluate(multitask_folder, capsys, None, None, "--patient-aggregate", "max")
    summary = json.loads((multitask_folder / "e" / "summary.json").read_text())["classification"]
    assert code == 0 and summary["patients"]["patients"] == 2 and summary["patients"]["accuracy"] == 1.0
    assert [r["patient"] for r in _rows(multitask_folder / "e" / "classification" / "patients.csv")] == ["s1", "s2"]


def test_label_maps_of_a_multitask_folder_score_against_a_folder_of_labels(
        multitask_folder: Path, capsys: pytest.CaptureFixture) -> None:
    """predictions.csv beside the label maps does not make a segmentation evaluation a classification one."""
    code, err = _evaluate(multitask_folder, capsys, None, multitask_folder / "labels")
    summary = json.loads((multitask_folder / "e" / "summary.json").read_text())
    assert code == 1 and summary["cases"] == 2 and summary["foreground_mean"]["dice"] == 1.0  # t1, t2 missing
    assert "missing predictions: t1, t2" in err


def test_predict_runs_the_encoder_once_per_window(multitask_model: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The class head is read from the segmentation's own window pass (forward_with_class), not from a second
    pass over the windows: predict never calls classify or the segmentation-only forward, and its rows still equal
    the direct computation."""
    from medseg.cli import main
    from medseg.models.multitask import MultiTaskUNet

    checkpoint, images = multitask_model
    calls = {"both": 0}
    both, classify = MultiTaskUNet.forward_with_class, MultiTaskUNet.classify

    def counted(self: MultiTaskUNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["both"] += 1
        return both(self, x)

    def refused(self: MultiTaskUNet, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a second pass over the windows")

    monkeypatch.setattr(MultiTaskUNet, "forward_with_class", counted)
    monkeypatch.setattr(MultiTaskUNet, "classify", refused)
    monkeypatch.setattr(MultiTaskUNet, "forward", refused)
    assert main(["predict", "--ckpt", str(checkpoint), "--input", str(images), "--output", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    # 12x10x8 images in 8^3 windows at overlap 0.25: 2 x 2 x 1 windows, 2 per batch -> 2 calls per case
    assert calls["both"] == 3 * 2
    monkeypatch.setattr(MultiTaskUNet, "classify", classify)  # for the direct computation
    rows = _rows(tmp_path / "p" / "predictions.csv")
    for row in rows:
        p = np.array([float(row[f"p_{n}"]) for n in CLASSES])
        assert p == pytest.approx(_direct(checkpoint, images / f"{row['case']}.nii.gz", [()]), abs=1e-5)
