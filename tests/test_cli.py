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
from medseg.data.synthetic import make_synthetic

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


def test_print_config_resolves_defaults(seg3d_root: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "seg3d_unet.yaml"), "--data.root", str(seg3d_root),
              "--trainer.max_epochs", "3", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_epochs"] == 3
    assert config["data"]["root"] == str(seg3d_root)
    assert config["model"]["init_args"]["network"] == "unet"
    assert config["model"]["init_args"]["network_args"]["channels"] == [16, 32, 64, 128]  # from the YAML


@pytest.mark.parametrize("regions", [False, True])
def test_data_values_reach_the_model(regions: bool, seg3d_regions_root: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value of DATA_TO_MODEL is stated once (dataset.json and the data config) and linked into the
    model's hyperparameters and network, replacing the model's own defaults."""
    import inspect

    import torch

    from medseg.lightning_cli import DATA_TO_MODEL, MedSegCLI
    from medseg.resume import RUN_FOLDER_ENV
    from medseg.tasks.segmentation import SegmentationModule

    monkeypatch.setenv(RUN_FOLDER_ENV, "{}")  # the run folder the CLI claims is not left to later tests

    if regions:  # three overlapping regions of label values 1, 2, 3; one channel
        root, config = seg3d_regions_root, "seg3d_unet_regions.yaml"
        expected = {"in_channels": 1, "num_classes": 3, "label_names": ["whole", "core", "inner"],
                    "regions": [[1, 2, 3], [2, 3], [3]], "class_names": None}
    else:  # two channels, three classes
        root, config = tmp_path / "two_channels", "seg3d_unet.yaml"
        make_synthetic(root, dims=3, cases=4, classes=3, size=(16, 16, 8), channels=2, seed=3)
        expected = {"in_channels": 2, "num_classes": 3, "label_names": ["background", "structure1", "structure2"],
                    "regions": None, "class_names": None}
    cli = MedSegCLI(args=[
        "--config", str(CONFIGS / config), "--data.root", str(root), "--trainer.default_root_dir",
        str(tmp_path / "runs"), "--trainer.accelerator", "cpu", "--data.patch_size", "[16, 16, 8]",
        "--data.preprocessing", '{"intensity": "ct", "spacing": [1.5, 1.5, 2.0]}',
        "--model.init_args.network_args", '{"channels": [4, 8, 16]}',
    ], run=False)
    hp, dm = cli.model.hparams, cli.datamodule
    expected |= {"spatial_dims": 3, "roi_size": [16, 16, 8], "preprocessing_spec": dm.preprocessing_spec}
    assert set(expected) | {"region_order"} == set(DATA_TO_MODEL.values())
    for name, value in expected.items():
        assert hp[name] == value, name
        assert getattr(dm, name) == value, name  # what the data module states, not something of the CLI's own
    assert hp["region_order"] == dm.region_order
    assert hp["preprocessing_spec"]["intensity"] == "ct" and hp["preprocessing_spec"]["spacing"] == [1.5, 1.5, 2.0]
    # The link replaced the model's default, it did not meet it by chance.
    defaults = {k: v.default for k, v in inspect.signature(SegmentationModule.__init__).parameters.items()}
    for name in ["num_classes", "label_names", "roi_size", "preprocessing_spec"] + ([] if regions else ["in_channels"]):
        assert expected[name] != defaults[name], name
    # The network itself is built from the linked values: 2 (or 1) input channels, 3 output channels.
    out = cli.model.eval()(torch.zeros(1, expected["in_channels"], 16, 16, 8))
    assert out.shape == (1, 3, 16, 16, 8)


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
