"""What the `medseg` command shows: a fast start, no library noise (and every real warning), --verbose, the
summary at the end of fit, and where cv/benchmark are."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medseg import console
from medseg.cli import main, split_verbose

CONFIGS = Path(__file__).parents[1] / "configs"
ROOT = Path(__file__).parents[1]
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.check_val_every_n_epoch", "1", "--data.patch_size", "[32, 32]",
        "--model.init_args.network_args", '{"channels": [4, 8]}']
NOISE = {
    "LightningCLI args warning": "args parameter is intended to run from within Python",
    "litlogger tip": "litlogger",
    "torch _pytree LeafSpec deprecation": "LeafSpec",
    "MONAI 2D orientation warning": "length is smaller than number of input spatial dimensions",
}


FIT_AND_PREDICT_TEST = "test_fit_and_predict_2d_show_no_noise_but_real_warnings_and_end_with_a_summary"
DRIVER = """
import sys, warnings
from pathlib import Path
from medseg.data.datamodule import MedSegDataModule

setup = MedSegDataModule.setup

def warning_setup(self, *args, **kwargs):
    warnings.warn("a real warning the user must see", UserWarning)
    return setup(self, *args, **kwargs)

MedSegDataModule.setup = warning_setup
from medseg.cli import main

assert main() == 0  # sys.argv: the fit command line, as LightningCLI sees it from a console script
root, out = sys.argv[sys.argv.index("--data.root") + 1], sys.argv[sys.argv.index("--trainer.default_root_dir") + 1]
last = next(Path(out).rglob("last.ckpt"))
sys.exit(main(["predict", "--ckpt", str(last), "--input", root + "/imagesTr", "--output", out + "/pred"]))
"""


@pytest.fixture(scope="module", autouse=True)
def fit_and_predict_2d(request: pytest.FixtureRequest, seg2d_root: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``medseg fit`` then ``medseg predict`` in a fresh process, with a real warning raised in the data module's
    setup. It starts with this module's first test and runs beside the others (it waits for its own Python to
    import torch and Lightning most of its time); its test, the module's last, waits for it."""
    if not any(item.name == FIT_AND_PREDICT_TEST for item in request.session.items):
        yield {}
        return
    folder = tmp_path_factory.mktemp("fit_and_predict")
    (folder / "driver.py").write_text(DRIVER)
    stdout, stderr = (folder / "stdout.txt").open("w"), (folder / "stderr.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, str(folder / "driver.py"), "fit", "--config", str(CONFIGS / "seg2d_unet.yaml"),
         "--data.root", str(seg2d_root), "--trainer.default_root_dir", str(folder / "runs"), *TINY],
        stdout=stdout, stderr=stderr, text=True, cwd=folder,
    )
    yield {"process": process, "folder": folder}
    if process.poll() is None:
        process.kill()
        process.wait()
    stdout.close()
    stderr.close()


def _python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_help_and_argument_errors_import_neither_torch_nor_lightning() -> None:
    result = _python("""
        import sys
        from medseg.cli import main
        for argv in (["--help"], ["check-data", "--help"], ["evaluate", "--help"], ["predict", "--help"],
                     ["cv", "--help"], ["benchmark", "--help"], ["plan", "--help"], ["make-synthetic", "--help"],
                     ["demo", "--help"], ["export", "--help"], ["serve", "--help"], ["ab-report", "--help"],
                     ["models", "--help"], ["evaluate"], ["predict", "--ckpt"], ["check-data", "--bogus"]):
            try:
                main(argv)
            except SystemExit:
                pass
        print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules}
                                 & {"torch", "monai", "pytorch_lightning", "fastapi", "onnxruntime"}))
    """)
    assert "IMPORTED []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_check_data_make_synthetic_and_evaluate_do_not_import_lightning(tmp_path: Path) -> None:
    result = _python("""
        import sys
        from medseg.cli import main
        data, out = sys.argv[1], sys.argv[2]
        codes = [main(["make-synthetic", "--out", data, "--dims", "2", "--cases", "2", "--size", "24", "24"]),
                 main(["check-data", data]),
                 main(["evaluate", "--pred", data + "/labelsTr", "--truth", data + "/labelsTr", "--output", out])]
        print("CODES", codes, "LIGHTNING", "pytorch_lightning" in sys.modules or "lightning" in sys.modules)
    """, str(tmp_path / "data"), str(tmp_path / "eval"))
    assert "CODES [0, 0, 0] LIGHTNING False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_make_synthetic_writes_four_test_cases_by_default(tmp_path: Path, capsys) -> None:
    assert main(["make-synthetic", "--out", str(tmp_path), "--dims", "2", "--cases", "2", "--size", "24", "24"]) == 0
    assert len(json.loads((tmp_path / "dataset.json").read_text())["test"]) == 4
    assert len(list((tmp_path / "imagesTs").glob("*.nii.gz"))) == 4
    assert "wrote 2 cases + 4 test cases (imagesTs/)" in capsys.readouterr().out


def test_predict_choices_are_the_library_s() -> None:
    from medseg.commands import predict
    from medseg.inference.native import NONFINITE_MODES
    from medseg.inference.pipeline import PRECISIONS

    assert predict.NONFINITE_MODES == NONFINITE_MODES and predict.PRECISIONS == PRECISIONS


def test_verbose_before_or_after_the_command_shows_the_traceback(tmp_path: Path, capsys) -> None:
    bad = ["make-synthetic", "--out", str(tmp_path), "--cases", "0"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("medseg make-synthetic: make_synthetic: need cases >= 1") and "Traceback" not in err
    for argv in (["--verbose", *bad], [*bad, "--verbose"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and 'synthetic.py", line' in err
        assert "ValueError: make_synthetic: need cases >= 1" in err


def test_verbose_of_validate_and_test_is_lightning_s_when_it_has_a_value() -> None:
    assert split_verbose(["--verbose", "fit", "--config", "c.yaml"]) == (["fit", "--config", "c.yaml"], True)
    assert split_verbose(["predict", "--verbose", "--ckpt", "x"]) == (["predict", "--ckpt", "x"], True)
    assert split_verbose(["validate", "--verbose", "false"]) == (["validate", "--verbose", "false"], False)
    assert split_verbose(["test", "--verbose"]) == (["test"], True)
    assert split_verbose(["--verbose", "validate", "--verbose", "true"]) == (["validate", "--verbose", "true"], True)


@pytest.mark.parametrize(("message", "category", "module", "hidden"), [
    ("LightningCLI's args parameter is intended to run from within Python like if it were from the command line. "
     "To prevent mistakes ...", UserWarning, "pytorch_lightning.cli", True),
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
     "instead.", FutureWarning, "pytorch_lightning.utilities._pytree", True),
    ("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "medseg.tasks.base", False),  # another origin
    ("axcodes ('('L', 'A', 'S')') length is smaller than number of input spatial dimensions D=2.\nOrientation: "
     "spatial shape = (48, 48), channels = 1,please make sure", UserWarning, "monai.transforms.spatial.array", True),
    ("axcodes ('RAS') length is smaller than number of input spatial dimensions D=1.\nOrientation: spatial shape = "
     "(48,), channels = 48,please make sure", UserWarning, "monai.transforms.spatial.array", False),  # not 2D
    ("The number of training batches (2) is smaller than the logging interval", UserWarning,
     "pytorch_lightning.loops.fit_loop", False),
])
def test_each_filter_hides_its_noise_only(message: str, category: type[Warning], module: str, hidden: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.install()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    assert (not caught) == hidden


def test_the_litlogger_tip_is_dropped_and_other_rank_zero_logs_kept() -> None:
    console.install()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
                           "(https://pypi.org/project/litlogger/) to enable LitLogger")
            logger.warning("GPU available: False, used: False")
        finally:
            logger.removeHandler(handler)
    assert records == ["GPU available: False, used: False"] * 2


def test_cv_shows_model_fold_epoch_and_time_left_then_the_pooled_table(seg2d_root: Path, tmp_path: Path,
                                                                      capsys, monkeypatch) -> None:
    from medseg import progress

    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # every epoch's line (a pipe gets plain lines)
    out = tmp_path / "cv"
    assert main(["cv", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--folds", "2", "--data.root", str(seg2d_root),
                 *TINY, "--trainer.max_epochs", "2", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    for line in ("medseg cv: seg2d_unet fold 1/2: training", "medseg cv: seg2d_unet fold 1/2, epoch 1/2, val/dice 0.",
                 "medseg cv: seg2d_unet fold 2/2, epoch 2/2, val/dice 0."):
        assert line in err, err[-3000:]
    assert "medseg cv: seg2d_unet fold 1/2 done in " in err and "; 1 fold(s) left, about " in err
    assert "medseg cv: seg2d_unet fold 2/2 done in " in err
    assert "| Name" not in captured.out + err  # no model summary per fold
    assert f"cross-validation (2 folds) in {out}: pooled out-of-fold results" in captured.out
    assert "  metric" in captured.out and "  dice " in captured.out
    assert f"report: {out / 'summary.csv'}" in captured.out


def test_progress_counts_models_and_folds_and_estimates_from_the_folds_done(monkeypatch) -> None:
    from medseg import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    tracker = progress.CvProgress(["unet", "unetpp", "attention"], "medseg benchmark", stream=stream, interval=0)
    assert tracker.time_left() is None
    with tracker.fold("unetpp", 5, "fold 4/5"):
        assert tracker.time_left() is None  # nothing tells yet
        tracker.train_start(0, 50)
        clock[0] = 12.0
        tracker.epoch(12, 50, "val/dice 0.8300")
        assert tracker.where() == "model 2/3 unetpp, fold 4/5, epoch 12/50, val/dice 0.8300"
        assert tracker.time_left() == pytest.approx(38.0 + 50.0 * 14)  # this fold's epochs, then 14 folds
        clock[0] = 60.0
    assert tracker.fold_seconds == [60.0] and tracker.total() == 15
    assert tracker.time_left() == pytest.approx(60.0 * 14)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "medseg benchmark: model 2/3 unetpp, fold 4/5: training"
    assert lines[1] == ("medseg benchmark: model 2/3 unetpp, fold 4/5, epoch 12/50, val/dice 0.8300 "
                        "(about 12 min 18 s left)")
    assert lines[2] == "medseg benchmark: model 2/3 unetpp, fold 4/5 done in 1 min 00 s; 14 fold(s) left, about 14 min 00 s left"


def test_benchmark_table_is_models_by_metrics_with_the_best_marked() -> None:
    from medseg.commands.benchmark import results_table

    rows = [{"model": "a", "metric": "dice", "mean": 0.91234, "std": 0.0312, "best": "a"},
            {"model": "a", "metric": "hd95", "mean": 25.98, "std": 2.47, "best": "b"},
            {"model": "b", "metric": "dice", "mean": 0.8, "std": 0.1, "best": "a"},
            {"model": "b", "metric": "hd95", "mean": 20.0, "std": 1.0, "best": "b"}]
    assert results_table(rows).splitlines()[1:] == ["  model            dice         hd95",
                                                    "  a      0.912 ± 0.031*  26.0 ± 2.5",
                                                    "  b      0.800 ± 0.100   20.0 ± 1.0*"]


def test_fit_and_predict_2d_show_no_noise_but_real_warnings_and_end_with_a_summary(
    fit_and_predict_2d: dict[str, Any]
) -> None:
    process, folder = fit_and_predict_2d["process"], fit_and_predict_2d["folder"]
    returncode = process.wait(timeout=600)
    stdout, stderr = ((folder / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    output = stdout + stderr
    assert returncode == 0, output[-3000:]
    for noise, text in NOISE.items():
        assert text not in output, f"{noise} is shown:\n{output[-3000:]}"
    assert "UserWarning: a real warning the user must see" in stderr
    assert "predicted 12 case(s)" in stdout
    run = folder / "runs" / "seg2d_unet" / "version_0"
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("medseg fit: done in "))
    assert lines[start].endswith(f"; run folder {run}")
    best = run / "checkpoints" / "best-epoch000.ckpt"
    assert lines[start + 1].startswith("  best val/dice 0.") and lines[start + 1].endswith(f" at epoch 0: {best}")
    assert lines[start + 2] == f"  last checkpoint: {run / 'checkpoints' / 'last.ckpt'}"
