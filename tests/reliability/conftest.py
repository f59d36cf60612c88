"""The reliability battery: bad inputs, faults and attacks, each run the way a user meets it (the ``medseg``
command) and checked for what the user sees: the exit code, one line naming the file and the reason, no
traceback, and nothing silently wrong or lost."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    def refusal(self, command: str) -> str:
        """The one ``medseg <command>: ...`` line of a refusal (and no traceback)."""
        assert "Traceback" not in self.err, self.err[-3000:]
        lines = [line for line in self.err.splitlines() if line.startswith(f"medseg {command}: ")]
        assert len(lines) == 1, self.err[-3000:]
        return lines[0]


@pytest.fixture
def medseg(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run ``medseg ARGS...`` in this process; returns the exit code and what it printed."""

    def run(*args: object) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argument parsers exit
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def seg3d(seg3d_root: Path, tmp_path: Path) -> Path:
    """A private copy of the 3D segmentation dataset (6 training cases, 2 test cases) that a test may damage."""
    return Path(shutil.copytree(seg3d_root, tmp_path / "seg3d"))


@pytest.fixture(scope="session")
def other_checkpoint(seg3d_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model of the same architecture: the checkpoint with one weight changed."""
    checkpoint = torch.load(seg3d_checkpoint, map_location="cpu", weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("net.") and v.is_floating_point())
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 0.5
    path = tmp_path_factory.mktemp("other") / "other.ckpt"
    torch.save(checkpoint, path)
    return path


def set_voxels(path: Path, value: float, count: int = 5) -> np.ndarray:
    """Set ``count`` voxels of the image ``path`` to ``value`` (NaN, Inf); returns the indices changed."""
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    flat = np.linspace(0, data.size - 1, count).astype(int)
    data.flat[flat] = value
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return flat
