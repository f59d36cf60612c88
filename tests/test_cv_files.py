"""`medseg cv` through files: folds run apart and collected, an interrupted cv continues, the dataset and the seed
come from the resolved configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medseg import training
from medseg.cli import main
from medseg.evaluation.crossval import dataset_of
from tests.conftest import seg2d_cv_args

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture
def count_fits(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The argument lists of every training run started."""
    calls: list[list[str]] = []
    real = training.fit

    def counted(args: list[str], **kwargs: object) -> training.FitResult:
        calls.append(list(args))
        return real(args, **kwargs)

    monkeypatch.setattr(training, "fit", counted)
    return calls


def _cv(root: Path, out: Path, *extra: str) -> int:
    return main(seg2d_cv_args(root, out, *extra))


def test_folds_run_apart_are_collected_without_training_or_predicting_again(
    seg2d_root: Path, tmp_path: Path, count_fits: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.evaluation import crossval

    devices = []
    real = crossval.predict_batch
    monkeypatch.setattr(crossval, "predict_batch", lambda *a, **k: devices.append(a[2].device) or real(*a, **k))
    out = tmp_path / "cv"
    assert _cv(seg2d_root, out, "--fold", "0") == 0
    assert _cv(seg2d_root, out, "--fold", "1") == 0
    assert len(count_fits) == 2 and not (out / "cv.json").exists()  # one fold at a time: no pooled result
    records = [json.loads((out / f"fold_{k}" / "fold.json").read_text()) for k in (0, 1)]
    assert all(r["predicted"] for r in records)
    # Each fold's held-out cases are predicted on the device it trained on (`--trainer.accelerator cpu`), not a
    # default.
    assert devices == ["cpu", "cpu"] and [r["device"] for r in records] == ["cpu", "cpu"]

    monkeypatch.setattr(crossval, "predict_batch", lambda *a, **k: pytest.fail("predicted again"))
    assert _cv(seg2d_root, out) == 0  # collects: the pooled evaluation, post-processing, calibration
    assert len(count_fits) == 2  # nothing trained again
    cv = json.loads((out / "cv.json").read_text())
    assert cv["checkpoints"] == {"0": records[0]["checkpoint"], "1": records[1]["checkpoint"]}
    assert (out / "summary.json").is_file() and (out / "postprocessing.json").is_file()
    assert (out / "calibration.json").is_file()


def test_a_cv_predicted_without_probabilities_is_collected_without_a_temperature(
    seg2d_cv: Path, seg2d_root: Path, tmp_path: Path, count_fits: list[list[str]], capsys
) -> None:
    import shutil

    out = Path(shutil.copytree(seg2d_cv, tmp_path / "cv"))  # a finished cv, with calibration.json
    assert (out / "calibration.json").is_file()
    shutil.rmtree(out / "predictions" / "probabilities")  # as a cv made before probabilities were saved
    assert _cv(seg2d_root, out) == 0
    assert "no calibration.json fitted" in capsys.readouterr().err
    assert not (out / "calibration.json").exists() and (out / "cv.json").is_file()
    assert count_fits == []  # collected, not trained again


def test_an_interrupted_cv_continues_where_it_stopped(seg2d_root: Path, tmp_path: Path,
                                                      count_fits: list[list[str]], capsys) -> None:
    out = tmp_path / "cv"
    assert _cv(seg2d_root, out, "--fold", "0") == 0
    fold = out / "fold_0"
    record = json.loads((fold / "fold.json").read_text())
    assert Path(record["checkpoint"]).is_absolute()  # collected from any working directory
    # Killed while training fold 0 (after its last checkpoint): fold.json says started, last.ckpt is there.
    started = {key: record[key] for key in ("fold", "cases", "run")}
    (fold / "fold.json").write_text(json.dumps({**started, "trained": False}))
    assert _cv(seg2d_root, out, "--fold", "0") == 0
    assert count_fits[-1][count_fits[-1].index("--ckpt_path") + 1] == record["last"]
    assert "fold 0: resuming from" in capsys.readouterr().out
    # Killed while predicting: fold.json says trained, one held-out prediction is missing.
    record = json.loads((fold / "fold.json").read_text())
    missing = out / "predictions" / f"{record['cases'][0]}.nii.gz"
    kept = out / "predictions" / f"{record['cases'][1]}.nii.gz"
    kept_time = kept.stat().st_mtime_ns
    missing.unlink()
    (fold / "fold.json").write_text(json.dumps({**record, "predicted": False}))
    fits = len(count_fits)
    assert _cv(seg2d_root, out, "--fold", "0") == 0
    assert len(count_fits) == fits  # not trained again
    assert missing.is_file() and kept.stat().st_mtime_ns == kept_time  # only the missing case predicted


def test_a_fold_trained_on_other_cases_or_settings_is_refused(seg2d_cv: Path, seg2d_root: Path, tmp_path: Path,
                                                             count_fits: list[list[str]], capsys) -> None:
    import shutil

    out = Path(shutil.copytree(seg2d_cv, tmp_path / "cv"))  # its fold 0 is trained
    # Reusing the fold under another seed or other overrides would report it as theirs.
    assert _cv(seg2d_root, out, "--fold", "0", "--seed", "5") == 2
    assert "started with other seed" in capsys.readouterr().err
    assert _cv(seg2d_root, out, "--fold", "0", "--trainer.max_epochs", "3") == 2
    assert "started with other overrides" in capsys.readouterr().err
    splits = json.loads((out / "splits.json").read_text())
    splits[0]["val"], splits[1]["val"] = splits[1]["val"], splits[0]["val"]
    (out / "splits.json").write_text(json.dumps(splits))
    assert _cv(seg2d_root, out, "--fold", "0") == 2
    assert "trained on other held-out cases" in capsys.readouterr().err
    assert count_fits == []  # refused before training


def test_the_dataset_comes_from_every_config_and_override(seg2d_root: Path, cls2d_root: Path, tmp_path: Path) -> None:
    # A second --config that changes data.root: the resolved configuration decides, as in `medseg fit`.
    second = tmp_path / "other_data.yaml"
    second.write_text(yaml.safe_dump({"data": {"root": str(seg2d_root)}}))
    configs = [CONFIGS / "seg2d_unet.yaml", second]
    assert dataset_of(configs, []).root == seg2d_root
    assert dataset_of(configs, ["--data.root", str(cls2d_root)]).root == cls2d_root


def test_cv_seed_reaches_sampling_and_augmentation(seg2d_cv: Path, seg2d_root: Path, tmp_path: Path) -> None:
    # seg2d_cv ran with the default seed 0; this fold with seed 3.
    for seed, out in ((0, seg2d_cv), (3, tmp_path / "s3")):
        if seed:
            assert _cv(seg2d_root, out, "--fold", "0", "--seed", str(seed)) == 0
        text = next((out / "fold_0").rglob("config.yaml")).read_text()
        config = yaml.safe_load(text)
        assert config["seed_everything"] == seed and config["data"]["seed"] == seed
        assert "EpochProgress" not in text  # cv's progress callback is not part of the fold's config
