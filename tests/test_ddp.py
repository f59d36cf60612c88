"""Real 2-process DDP on CPU (gloo): validation numbers equal the single-process ones on the same checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medseg.data.datalist import load_dataset
from medseg.data.synthetic import make_synthetic
from medseg.lightning_cli import MedSegCLI

CONFIGS = Path(__file__).parents[1] / "configs"


def odd_validation(root: Path, at_least: int = 3) -> list[str]:
    """Ids of whole patients, taken until there are an odd number (>= ``at_least``) of cases."""
    chosen: list[str] = []
    by_patient: dict[str, list[str]] = {}
    for case in load_dataset(root).training:
        by_patient.setdefault(case["patient"] or case["id"], []).append(case["id"])
    for ids in reversed(list(by_patient.values())):
        chosen += ids
        if len(chosen) >= at_least and len(chosen) % 2:
            return chosen
    raise AssertionError(f"{root}: no odd set of whole patients")


class DdpFit:
    """``medseg fit`` on 2 CPU processes (gloo), started in ``folder`` with the dataset ``args``; its output goes to
    a file (a pipe nobody reads while the other fit is awaited could fill and stop it)."""

    def __init__(self, folder: Path, args: list[str], *fit_only: str) -> None:
        self.folder, self.args = folder, args
        command = [
            sys.executable, "-m", "medseg", "fit", *args, *fit_only, "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", "runs",
            "--trainer.enable_progress_bar", "false", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.num_sanity_val_steps", "0",
        ]
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> None:
        try:
            code = self.process.wait(timeout=300)
        finally:
            self.stop()
        self.log.seek(0)
        assert code == 0, self.log.read()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def ddp_fits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DdpFit]]:
    """Both tests' DDP fits, started together: each spends most of its time waiting for its second process to
    start (a Python importing torch and Lightning), so the two take little longer than one."""
    seg = tmp_path_factory.mktemp("ddp_seg")
    make_synthetic(seg / "data", dims=3, cases=9, classes=2, task="seg", size=(24, 24, 12), seed=5)
    seg_args = [
        "--config", str(CONFIGS / "seg3d_unet.yaml"), "--data.root", str(seg / "data"),
        "--data.val_cases", json.dumps(odd_validation(seg / "data")), "--data.patch_size", "[16, 16, 8]",
        "--model.init_args.network_args.channels", "[8, 16, 32]", "--data.cache", "memory",
    ]
    cls = tmp_path_factory.mktemp("ddp_cls")
    make_synthetic(cls / "data", dims=2, cases=11, classes=2, task="cls", size=(32, 32), seed=6)
    cls_args = [
        "--config", str(CONFIGS / "cls2d_resnet18.yaml"), "--data.root", str(cls / "data"),
        "--data.val_cases", json.dumps(odd_validation(cls / "data", at_least=5)), "--data.patch_size", "[32, 32]",
        "--data.batch_size", "2",
    ]
    fits = {"seg": DdpFit(seg, seg_args, "--trainer.max_epochs", "2"),
            "cls": DdpFit(cls, cls_args, "--trainer.max_epochs", "1")}
    yield fits
    for fit in fits.values():
        fit.stop()


def last_logged(metrics_csv: Path, keys: list[str]) -> dict[str, float]:
    rows = [row for row in csv.DictReader(metrics_csv.open()) if row.get(keys[0])]
    return {key: float(rows[-1][key]) for key in keys}


def validate_single(config: Path, args: list[str], checkpoint: Path, out: Path) -> dict[str, float]:
    cli = MedSegCLI(args=[
        "validate", "--config", str(config), *args, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--ckpt_path", str(checkpoint),
    ])
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def only_run_folder(tmp_path: Path, name: str) -> Path:
    """The one run folder; a second rank that wrote its own logs would leave ``version_1`` too."""
    folders = sorted((tmp_path / "runs" / name).iterdir())
    assert [f.name for f in folders] == ["version_0"]
    return folders[0]


def test_ddp_segmentation_validation_equals_single_process(ddp_fits: dict[str, DdpFit]) -> None:
    fit = ddp_fits["seg"]
    fit.wait()
    run = only_run_folder(fit.folder, "seg3d_unet")
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    keys = ["val/dice", "val/dice_class1", "val/loss"]
    ddp = last_logged(run / "metrics.csv", keys)
    single = validate_single(CONFIGS / "seg3d_unet.yaml", fit.args[2:], run / "checkpoints" / "last.ckpt",
                             fit.folder / "v")
    val = json.loads(fit.args[fit.args.index("--data.val_cases") + 1])
    assert len(val) % 2 == 1
    for key in keys:
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


def test_ddp_classification_with_batch_norm_validation_equals_single_process(ddp_fits: dict[str, DdpFit]) -> None:
    # BatchNorm buffers are broadcast at the first forward of validation, so every process must have a
    # batch; the AUROC needs every case exactly once.
    fit = ddp_fits["cls"]
    fit.wait()
    run = only_run_folder(fit.folder, "cls2d_resnet18")
    keys = ["val/loss", "val/acc", "val/f1", "val/auroc"]
    ddp = last_logged(run / "metrics.csv", keys)
    single = validate_single(CONFIGS / "cls2d_resnet18.yaml", fit.args[2:], run / "checkpoints" / "last.ckpt",
                             fit.folder / "v")
    for key in keys:
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
