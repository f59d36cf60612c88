"""The ten most common mistakes of a user's first hour, each run as the user runs it (the ``medseg`` command):
one line ``medseg <command>: <file or option>: <reason>`` naming what to fix (and the closest valid name when
there is one), exit code 2, no traceback and no usage dump. Every refusal comes before anything trains."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import pytest

from medseg.errors import ConfigError
from medseg.training import resolved_data
from tests.reliability.conftest import Result

CONFIGS = Path(__file__).parents[2] / "configs"
SEG2D = CONFIGS / "seg2d_unet.yaml"


def _one_line(result: Result, command: str) -> str:
    """The whole of stderr, which must be exactly one ``medseg <command>: `` line (and nothing on stdout)."""
    output = result.out + result.err
    assert "Traceback" not in output and "usage:" not in output, output[-3000:]
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2 and len(lines) == 1 and not result.out.strip(), output[-3000:]
    assert lines[0].startswith(f"medseg {command}: "), lines[0]
    return lines[0]


def _fit(medseg: Callable[..., Result], root: Path, tmp_path: Path, *args: object) -> Result:
    """``medseg fit ARGS`` on the dataset ``root``, logging under ``tmp_path/runs`` (which a refusal must not
    create: it comes before the run folder is claimed)."""
    result = medseg("fit", *args, "--data.root", root, "--trainer.default_root_dir", tmp_path / "runs",
                    "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1")
    assert not (tmp_path / "runs").exists()
    return result


def _yaml(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("checkpoint", "root", "found", "trained"),
                         [("cls2d_checkpoint", "seg3d_root", 3, 2), ("seg3d_checkpoint", "seg2d_root", 2, 3)])
def test_1_a_checkpoint_of_other_dimensionality_fails_each_case_once(
        checkpoint: str, root: str, found: int, trained: int, tmp_path: Path, medseg: Callable[..., Result],
        request: pytest.FixtureRequest) -> None:
    """Each case fails with its file and the fix, checked from the header before any transform (no MONAI
    ``applying transform <Orientationd ...>``); the summary lists the ids only. The batch goes on past a failed
    case, so the exit code is the batch's 1 (some cases failed), not a refusal's 2."""
    folder = tmp_path / "in"
    folder.mkdir()
    images = sorted((request.getfixturevalue(root) / "imagesTr").glob("*.nii.gz"))[:2]
    for image in images:
        shutil.copy(image, folder / image.name)
    result = medseg("predict", "--ckpt", request.getfixturevalue(checkpoint), "--input", folder,
                    "--output", tmp_path / "out")
    assert result.code == 1 and "Traceback" not in result.err and "usage:" not in result.err
    assert "applying transform" not in result.err and "RuntimeError" not in result.err
    for image in images:
        case, shape = image.name.removesuffix(".nii.gz"), tuple(nib.load(image).shape)
        lines = [line.strip() for line in re.split(r"[\r\n]", result.err) if f"{folder / image.name}:" in line]
        assert lines == [
            f"{case} FAILED: {folder / image.name}: a {found}D image, but the model is {trained}D (shape {shape}); "
            f"it was trained on {trained}D images: predict {trained}D images, or use a {found}D model"
        ], result.err
    ids = ", ".join(image.name.removesuffix(".nii.gz") for image in images)
    assert result.refusal("predict") == f"medseg predict: 2 case(s) failed (reasons above): {ids}"


@pytest.mark.parametrize(("text", "line", "typo", "section", "meant"), [
    ("data:\n  patch_sise: [32, 32]\n", 2, "patch_sise", "data", "patch_size"),
    ("model:\n  init_args:\n    netwrok: unet\n", 3, "netwrok", "model.init_args", "network"),
    ("trainer:\n  max_epoch: 3\n", 2, "max_epoch", "trainer", "max_epochs"),
])
def test_2_a_key_typo_in_a_yaml_config_names_the_file_line_and_the_key_meant(
        text: str, line: int, typo: str, section: str, meant: str, seg2d_root: Path, tmp_path: Path,
        medseg: Callable[..., Result]) -> None:
    mine = _yaml(tmp_path, text)
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--config", mine)
    expected = f"{mine}: line {line}: unknown key '{typo}' under '{section}'; did you mean '{meant}'?"
    assert _one_line(result, "fit") == f"medseg fit: {expected}"
    with pytest.raises(ConfigError) as refused:  # what medseg cv and medseg benchmark read the config with
        resolved_data(["--config", str(SEG2D), "--config", str(mine), "--data.root", str(seg2d_root)])
    assert str(refused.value) == expected


@pytest.mark.parametrize(("option", "meant"), [
    ("--data.patch_sise", "--data.patch_size"),
    ("--model.init_args.netwrok", "--model.init_args.network"),
    ("--trainr.max_epochs", "--trainer.max_epochs"),
    ("--conifg", "--config"),
])
def test_3_a_key_typo_on_the_command_line_names_the_option_meant(option: str, meant: str, seg2d_root: Path,
                                                                  tmp_path: Path, medseg: Callable[..., Result]) -> None:
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, option, "32")
    assert _one_line(result, "fit") == f"medseg fit: {option}: unknown option; did you mean '{meant}'?"
    result = medseg("cv", "--config", SEG2D, "--data.root", seg2d_root, option, "32", "--output", tmp_path / "cv")
    assert _one_line(result, "cv") == f"medseg cv: {option}: unknown option; did you mean '{meant}'?"


def test_4_a_network_args_typo_names_the_network_its_arguments_and_the_one_meant(
        seg2d_root: Path, tmp_path: Path, medseg: Callable[..., Result]) -> None:
    reason = ("network 'unet' has no argument 'channel'; did you mean 'channels'? (its arguments: act, base_channels, "
              "channels, depth, dropout, kernel_size, norm, num_res_units, up_kernel_size)")
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--model.init_args.network_args",
                  '{"channel": [4, 8]}')
    assert _one_line(result, "fit") == f"medseg fit: --model.init_args.network_args: {reason}"
    mine = _yaml(tmp_path, "model:\n  init_args:\n    network_args:\n      channel: [4, 8]\n")
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--config", mine)
    assert _one_line(result, "fit") == f"medseg fit: {mine}: line 4: {reason}"
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--model.init_args.network", "unte")
    assert _one_line(result, "fit").startswith(
        "medseg fit: --model.init_args.network: no network named 'unte'; did you mean 'unet'? (networks: ")


def test_5_a_value_of_the_wrong_type_names_the_key_and_the_type(seg2d_root: Path, tmp_path: Path,
                                                               medseg: Callable[..., Result]) -> None:
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--trainer.max_epochs", "ten")
    assert _one_line(result, "fit") == "medseg fit: --trainer.max_epochs: expected int or null, got 'ten'"
    mine = _yaml(tmp_path, "model:\n  init_args:\n    overlap: lots\n")
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--config", mine)
    assert _one_line(result, "fit") == (
        f"medseg fit: {mine}: line 3: model.init_args.overlap: expected float, got 'lots'")


def test_6_a_config_file_that_does_not_exist_names_the_closest_one(seg2d_root: Path, tmp_path: Path,
                                                                   medseg: Callable[..., Result]) -> None:
    result = _fit(medseg, seg2d_root, tmp_path, "--config", CONFIGS / "seg2d_unte.yaml")
    assert _one_line(result, "fit") == (
        f"medseg fit: {CONFIGS / 'seg2d_unte.yaml'}: no such config file; did you mean '{SEG2D}'?")


def test_7_a_yaml_syntax_error_names_the_file_and_the_line(seg2d_root: Path, tmp_path: Path,
                                                          medseg: Callable[..., Result]) -> None:
    mine = _yaml(tmp_path, "data:\n  patch_size: [32, 32]\n  batch_size: 2\n    samples_per_volume: 2\n")
    result = _fit(medseg, seg2d_root, tmp_path, "--config", SEG2D, "--config", mine)
    assert _one_line(result, "fit") == (
        f"medseg fit: {mine}: line 4, column 23: YAML syntax error: mapping values are not allowed here (check the "
        "indentation and the ':' there)")


def test_8_a_data_root_without_dataset_json_is_named(tmp_path: Path, medseg: Callable[..., Result]) -> None:
    (tmp_path / "images").mkdir()
    result = _fit(medseg, tmp_path / "images", tmp_path, "--config", SEG2D)
    assert _one_line(result, "fit") == (
        f"medseg fit: {tmp_path / 'images'}: no dataset.json or dataset.csv found (is this the dataset root?)")


def test_9_a_checkpoint_that_does_not_exist_is_named(seg2d_root: Path, tmp_path: Path,
                                                     medseg: Callable[..., Result]) -> None:
    missing = tmp_path / "runs" / "last.ckpt"
    result = medseg("predict", "--ckpt", missing, "--input", seg2d_root / "imagesTr", "--output", tmp_path / "out")
    assert _one_line(result, "predict") == f"medseg predict: {missing}: checkpoint not found"
    assert not (tmp_path / "out").exists()


def test_10_a_classification_config_on_a_segmentation_dataset_names_both_and_a_config_to_use(
        seg2d_root: Path, tmp_path: Path, medseg: Callable[..., Result]) -> None:
    config = CONFIGS / "cls2d_resnet18.yaml"
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if "class_path: medseg.tasks" in text)
    result = _fit(medseg, seg2d_root, tmp_path, "--config", config)
    assert _one_line(result, "fit") == (
        f"medseg fit: {(seg2d_root / 'dataset.json').resolve()}: a segmentation dataset, but the model is ClassificationModule "
        f"({config}: line {line}); use a segmentation config, e.g. --config {SEG2D}")
