"""Untrusted files: pickles, YAML tags and class paths execute nothing; a forged header allocates nothing;
truncated checkpoints are named before Lightning touches them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medseg.data.synthetic import write_forged_header

CONFIGS = Path(__file__).parents[2] / "configs"
ROOT = Path(__file__).parents[2]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(seg3d_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling would run ``touch MARKER``, and the marker."""
    checkpoint = torch.load(seg3d_checkpoint, map_location="cpu", weights_only=True)
    marker = tmp_path / "PWNED"
    checkpoint["optimizer_states"] = [_Payload(marker)]
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def _fit(*extra: object, root: Path, runs: Path, command: str = "fit") -> list[str]:
    return [command, "--config", str(CONFIGS / "seg3d_unet.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(runs), "--trainer.accelerator", "cpu", *map(str, extra)]


def test_a_pickle_payload_in_a_checkpoint_runs_nowhere(evil_checkpoint: tuple[Path, Path], seg3d_root: Path,
                                                       tmp_path: Path, medseg: Callable) -> None:
    path, marker = evil_checkpoint
    result = medseg("predict", "--ckpt", path, "--input", seg3d_root / "imagesTs", "--output", tmp_path / "out")
    assert result.code == 2 and f"{path}: not a loadable checkpoint" in result.refusal("predict")
    for command in ("fit", "validate"):
        result = medseg(*_fit("--ckpt_path", path, root=seg3d_root, runs=tmp_path / "runs", command=command))
        assert result.code == 2 and f"{path}: not a loadable checkpoint" in result.refusal(command)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_truncated_checkpoint_is_named_before_lightning_loads_it(command: str, seg3d_checkpoint: Path,
                                                                   seg3d_root: Path, tmp_path: Path,
                                                                   medseg: Callable) -> None:
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(seg3d_checkpoint.read_bytes()[:5000])
    result = medseg(*_fit("--ckpt_path", cut, root=seg3d_root, runs=tmp_path / "runs", command=command))
    assert result.code == 2 and f"{cut}: not a loadable checkpoint" in result.refusal(command)
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_a_yaml_python_tag_in_a_config_runs_nothing(seg3d_root: Path, tmp_path: Path, medseg: Callable) -> None:
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text((CONFIGS / "seg3d_unet.yaml").read_text()
                      + f'\nseed_everything: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = medseg("fit", "--config", config, "--data.root", seg3d_root, "--trainer.default_root_dir",
                    tmp_path / "runs", "--trainer.max_epochs", 1)
    assert result.code == 2 and not marker.exists()
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'" \
        in result.err


def test_a_class_path_outside_medseg_is_refused_before_it_runs(seg3d_root: Path, tmp_path: Path,
                                                               medseg: Callable) -> None:
    marker = tmp_path / "PWNED"
    result = medseg(*_fit("--model.class_path", "subprocess.Popen", "--model.init_args.args",
                          f'["touch", "{marker}"]', root=seg3d_root, runs=tmp_path / "runs"))
    assert result.code == 2 and not marker.exists()
    assert "subprocess.Popen does not correspond to a subclass of MedSegModule" in result.err


def test_a_forged_header_costs_no_memory_in_a_fresh_process(seg3d_root: Path, tmp_path: Path) -> None:
    """8 KB of file claiming 20000 x 20000 float32 voxels: check-data used to allocate 1.6 GB (1.9 GB peak)."""
    import shutil

    root = Path(shutil.copytree(seg3d_root, tmp_path / "ds"))
    write_forged_header(root / "imagesTr" / "case_001.nii.gz", (20000, 20000, 1))
    probe = ("import resource, subprocess, sys; "
             "done = subprocess.run([sys.executable, '-m', 'medseg', 'check-data', sys.argv[1]], capture_output=True, "
             "text=True); print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "print(done.stdout)")
    out = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT).stdout
    code, peak_kb = map(int, out.split("\n")[0].split())
    assert code == 1 and "case_001.nii.gz: the header claims 20000x20000x1" in out
    assert peak_kb < 1024 * 1024, f"peak {peak_kb / 1024:.0f} MB for an 8 KB file"
