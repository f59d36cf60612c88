"""Calibration from cross-validation to prediction: cv fits a temperature on its out-of-fold probabilities,
predict --calibration applies it (labels unchanged, held-out NLL lower), evaluate scores calibration per case."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError

from medseg.cli import main
from medseg.data.synthetic import make_synthetic
from medseg.evaluation.calibrate import mean_nll
from medseg.metrics.temperature import apply_temperature

CONFIGS = Path(__file__).parents[1] / "configs"
TRAIN = ["--trainer.max_epochs", "6", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--data.patch_size", "[32, 32]", "--model.init_args.network_args", '{"channels": [4, 8, 16]}']


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-fold cv of a small 2D U-Net (12 training cases) and 4 labelled held-out test cases."""
    base = tmp_path_factory.mktemp("calibration")
    make_synthetic(base / "data", dims=2, cases=12, classes=3, task="seg", size=(48, 48), seed=7, test_cases=4)
    assert main(["cv", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--folds", "2", "--data.root",
                 str(base / "data"), *TRAIN, "--output", str(base / "cv")]) == 0
    return {"base": base, "data": base / "data", "cv": base / "cv"}


def _predict(cv_run: dict[str, Path], name: str, *extra: str) -> Path:
    checkpoint = json.loads((cv_run["cv"] / "cv.json").read_text())["checkpoints"]["0"]
    out = cv_run["base"] / name
    assert main(["predict", "--ckpt", checkpoint, "--input", str(cv_run["data"] / "imagesTs"), "--output", str(out),
                 "--save-probabilities", *extra]) == 0
    return out


def _held_out(folder: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every voxel's probabilities ``(N, K)`` and class ``(N,)`` over the held-out test cases."""
    probabilities, classes = [], []
    for path in sorted(labels.glob("*.nii.gz")):
        saved = np.load(folder / "probabilities" / path.name.replace(".nii.gz", ".npz"))["probabilities"]
        probabilities.append(saved.reshape(saved.shape[0], -1).T.astype(np.float32))
        classes.append(np.asarray(nib.load(path).dataobj).round().astype(np.int64).reshape(-1))
    return np.concatenate(probabilities), np.concatenate(classes)


def test_cv_fits_a_temperature_that_lowers_held_out_nll(cv_run: dict[str, Path]) -> None:
    fitted = json.loads((cv_run["cv"] / "calibration.json").read_text())
    assert fitted["activation"] == "softmax" and fitted["cases"] == 12
    assert fitted["nll_after"] < fitted["nll_before"]  # on the out-of-fold sample it was fitted on
    plain = _predict(cv_run, "plain")
    calibrated = _predict(cv_run, "calibrated", "--calibration", str(cv_run["cv"] / "calibration.json"))
    labels = cv_run["data"] / "labelsTs"
    p_plain, y = _held_out(plain, labels)
    p_calibrated, _ = _held_out(calibrated, labels)
    # Cases the temperature never saw: their NLL drops.
    assert mean_nll(p_calibrated, y, "softmax") < mean_nll(p_plain, y, "softmax")
    # It is exactly the temperature applied to the plain probabilities (float16 files), and the labels are the same.
    expected = apply_temperature(p_plain, fitted["temperature"], "softmax", channel_axis=1)
    assert np.abs(p_calibrated - expected).max() < 2e-3
    for path in sorted(plain.glob("*.nii.gz")):
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(calibrated / path.name).dataobj))
    run = json.loads((calibrated / "run.json").read_text())
    assert run["runs"][0]["options"]["calibration"] == pytest.approx(fitted["temperature"])


def test_a_folder_predicted_without_calibration_refuses_a_calibrated_run(cv_run: dict[str, Path], capsys) -> None:
    plain = cv_run["base"] / "plain"
    if not plain.is_dir():
        _predict(cv_run, "plain")
    checkpoint = json.loads((cv_run["cv"] / "cv.json").read_text())["checkpoints"]["0"]
    code = main(["predict", "--ckpt", checkpoint, "--input", str(cv_run["data"] / "imagesTs"), "--output", str(plain),
                 "--resume", "--calibration", str(cv_run["cv"] / "calibration.json")])
    assert code == 2 and "calibration" in capsys.readouterr().err


def test_calibration_files_of_another_output_or_broken_are_refused(cv_run: dict[str, Path], tmp_path: Path,
                                                                   capsys) -> None:
    checkpoint = json.loads((cv_run["cv"] / "cv.json").read_text())["checkpoints"]["0"]
    sigmoid = tmp_path / "sigmoid.json"
    sigmoid.write_text(json.dumps({"temperature": 1.5, "activation": "sigmoid"}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, reason in ((sigmoid, "fitted on sigmoid outputs, but this model's are softmax"), (broken, "not a JSON")):
        code = main(["predict", "--ckpt", checkpoint, "--input", str(cv_run["data"] / "imagesTs"),
                     "--output", str(tmp_path / path.stem), "--calibration", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and f"medseg predict: {path}: {reason}" in err and "Traceback" not in err
        assert not list((tmp_path / path.stem).glob("*.nii.gz"))


def test_evaluate_scores_calibration_per_case_like_torchmetrics(cv_run: dict[str, Path]) -> None:
    cv = cv_run["cv"]
    header = (cv / "per_case.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["ece", "brier", "nll"]
    assert (cv / "reliability.png").stat().st_size > 10_000
    summary = json.loads((cv / "summary.json").read_text())
    assert set(summary["calibration"]["pooled"]) == {"1", "2"} and not summary["calibration"]["missing_probabilities"]
    import csv

    with (cv / "per_case.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["class"] == "2")
    saved = np.load(cv / "predictions" / "probabilities" / f"{row['case']}.npz")["probabilities"]
    label_file = next(cv_run["data"].glob(f"labelsTr/{row['case']}.nii.gz"))
    truth = np.asarray(nib.load(label_file).dataobj).round() == 2
    p = torch.from_numpy(saved[2].astype(np.float32)).reshape(-1)
    t = torch.from_numpy(truth).reshape(-1).long()
    assert float(row["ece"]) == pytest.approx(BinaryCalibrationError(n_bins=15, norm="l1")(p, t).item(), abs=1e-6)
    assert float(row["brier"]) == pytest.approx(((p - t) ** 2).mean().item(), abs=1e-6)
    bce = torch.nn.functional.binary_cross_entropy(p.double().clamp(1e-7, 1 - 1e-7), t.double())
    assert float(row["nll"]) == pytest.approx(bce.item(), abs=1e-6)


def test_a_temperature_never_changes_the_label_map() -> None:
    from medseg.inference.accumulate import NativeAccumulator
    from medseg.inference.members import Layout
    from medseg.inference.outputs import OutputSpec

    # Sigmoid classes: the label is the argmax over channels. Scaled by T < 1, 0.9999 and 0.99995 both round to
    # 1.0 in float32 and tie; the label must still be class 2, decoded before the scaling.
    probabilities = np.array([[0.01, 0.2], [0.9999, 0.1], [0.99995, 0.3]], np.float32)[..., None]  # (P, X, Y)
    for outputs in (OutputSpec("sigmoid", ("bg", "a", "b")), OutputSpec("softmax", ("bg", "a", "b"))):
        p = probabilities if outputs.activation == "sigmoid" else probabilities / probabilities.sum(0)
        plain, scaled = (NativeAccumulator(Layout(3), outputs) for _ in range(2))
        for accumulator in (plain, scaled):
            accumulator.add_group(lambda c, p=p: p[c].copy(), 1, None, None)
        before = plain.finish(probabilities=True)
        after = scaled.finish(probabilities=True, uncertainty=True, temperature=0.5)
        assert np.array_equal(before.labels, after.labels), outputs.activation
        assert np.allclose(after.probabilities, apply_temperature(p, 0.5, outputs.activation), atol=1e-6)
