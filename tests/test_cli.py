"""The `medseg` command: sub-commands, exit codes, messages, and the demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.cli import main
from medseg.data.io import read_header, read_image

CONFIGS = Path(__file__).parents[1] / "configs"


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "demo", "make-synthetic", "check-data"):
        assert f"  {command} " in out


def test_unknown_command_fails(capsys) -> None:
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    exe = shutil.which("medseg")
    assert exe, "the medseg console script is not on PATH (pip install -e .)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "make-synthetic" in result.stdout


def test_make_synthetic_writes_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    code = main(["make-synthetic", "--out", str(out), "--dims", "3", "--cases", "3", "--classes", "3",
                 "--size", "16", "16", "8"])
    assert code == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["training"]) == 3 and len(meta["labels"]) == 3
    shape, affine = read_header(out / meta["training"][0]["image"])
    assert shape == (16, 16, 8) and not np.allclose(affine, np.eye(4))
    label, _ = read_image(out / meta["training"][0]["label"])
    assert set(np.unique(label)) == {0, 1, 2}


def test_check_data_exit_codes(seg3d_root: Path, tmp_path: Path, capsys) -> None:
    assert main(["check-data", str(seg3d_root)]) == 0
    assert "no problems" in capsys.readouterr().out.lower()
    bad = tmp_path / "bad"
    shutil.copytree(seg3d_root, bad)
    missing = sorted((bad / "imagesTr").glob("*.nii.gz"))[0]
    missing.unlink()
    assert main(["check-data", str(bad)]) == 1
    out = capsys.readouterr().out
    assert str(missing) in out or missing.name in out


def test_check_data_on_a_folder_without_description(tmp_path: Path, capsys) -> None:
    assert main(["check-data", str(tmp_path)]) == 1
    assert "dataset.json" in capsys.readouterr().out


def test_print_config_resolves_links_and_defaults(seg3d_root: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "seg3d_unet.yaml"), "--data.root", str(seg3d_root),
              "--trainer.max_epochs", "3", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_epochs"] == 3
    assert config["data"]["root"] == str(seg3d_root)
    assert config["model"]["init_args"]["network"] == "unet"


@pytest.mark.slow
def test_demo_reaches_dice_090(tmp_path: Path) -> None:
    """The README's main job, as a user runs it (about 1-3 minutes on a 2-core CPU)."""
    result = subprocess.run(
        [sys.executable, "-m", "medseg", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("mean held-out foreground Dice")][0]
    assert float(line.split(":")[1].split()[0]) >= 0.90
