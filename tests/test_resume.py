"""Exact resume after a kill, refusals, and checkpoint writes that survive a kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from medseg.data.synthetic import make_synthetic
from medseg.resume import AtomicCheckpointIO, launched_rank

REPO = Path(__file__).parents[1]
CONFIG = REPO / "configs" / "seg2d_unet.yaml"


class Fit:
    """``medseg fit`` started in a fresh process (one thread, as a user would run it), from the repository root;
    its output goes to a file (a pipe nobody reads while another run is awaited could fill and stop it)."""

    def __init__(self, out: Path, root: Path, *extra: str) -> None:
        command = [
            sys.executable, "-m", "medseg", "fit", "--config", str(CONFIG), "--data.root", str(root),
            "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.max_epochs", "3",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
            "--data.patch_size", "[48, 48]", "--data.batch_size", "4",
            "--model.init_args.network_args.channels", "[8, 16, 32]", *extra,
        ]
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait(self, check: bool = True) -> tuple[int, str]:
        """The exit code and the output, once the run has ended."""
        try:
            code = self.process.wait(timeout=300)
        finally:
            self.stop()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        if check:
            assert code == 0, output[-3000:]
        return code, output

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def fits() -> Iterator[list[Fit]]:
    """Started runs, each stopped at the end of the test if it still runs."""
    started: list[Fit] = []
    yield started
    for run in started:
        run.stop()


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights of the newest run's last.ckpt and its last validation row of metrics.csv."""
    run = sorted((out / "seg2d_unet").glob("version_*"))[-1]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    rows = [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("val/dice")]
    return checkpoint["state_dict"], rows[-1]


def test_killed_run_resumed_with_ckpt_path_last_ends_like_an_uninterrupted_one(
    seg2d_root: Path, tmp_path: Path, fits: list[Fit]
) -> None:
    dropout = ["--model.init_args.network_args.dropout", "0.2"]  # draws from torch's global generator
    # The uninterrupted run goes on beside the killed and the resumed one (each process uses one core).
    fits.append(whole := Fit(tmp_path / "whole", seg2d_root, *dropout))
    # Killed mid-epoch 1 (3 steps an epoch) and resumed from the end of epoch 0, both with loader workers.
    killer = json.dumps({"class_path": "tests.kill_callback.KillAtStep", "init_args": {"step": 5}})
    workers = ["--data.num_workers", "2", *dropout]
    fits.append(killed := Fit(tmp_path / "split", seg2d_root, "--trainer.callbacks+", killer, *workers))
    assert killed.wait(check=False)[0] == -signal.SIGKILL
    epoch = torch.load(tmp_path / "split/seg2d_unet/version_0/checkpoints/last.ckpt", weights_only=True)["epoch"]
    assert epoch == 0  # so the resumed run really redoes epochs 1 and 2
    fits.append(resumed := Fit(tmp_path / "split", seg2d_root, "--ckpt_path", "last", *workers))
    assert "resuming from" in resumed.wait()[1]
    whole.wait()

    whole_weights, whole_row = final_state(tmp_path / "whole")
    split_weights, split_row = final_state(tmp_path / "split")
    assert [p.name for p in (tmp_path / "split/seg2d_unet").iterdir()] == ["version_0"]  # kept its folder
    assert whole_weights.keys() == split_weights.keys()
    for name, tensor in whole_weights.items():
        assert torch.equal(tensor, split_weights[name]), name
    for key in ("epoch", "step", "val/dice", "val/loss"):
        assert whole_row[key] == split_row[key], key
    # metrics.csv continues: the rows before the checkpoint kept, those the killed run logged after it
    # replaced by the resumed run's, so it reads exactly as the uninterrupted run's.
    def rows(out: Path) -> list[dict[str, str]]:
        return list(csv.DictReader((out / "seg2d_unet/version_0/metrics.csv").open()))

    assert rows(tmp_path / "split") == rows(tmp_path / "whole")


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(
    seg2d_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "fit", "--config", str(CONFIG), "--data.root", str(seg2d_root), "--trainer.default_root_dir", str(tmp_path),
        "--ckpt_path", "last",
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no run under" in err
    assert not list(tmp_path.rglob("*.ckpt"))
    # The newest run has no last.ckpt: an error, never an older (maybe finished, maybe other) run instead.
    older = tmp_path / "seg2d_unet/version_0/checkpoints/last.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"an older run")
    (tmp_path / "seg2d_unet/version_1").mkdir()
    code = main([
        "fit", "--config", str(CONFIG), "--data.root", str(seg2d_root), "--trainer.default_root_dir", str(tmp_path),
        "--ckpt_path", "last",
    ])
    assert code == 2 and "version_1 has no checkpoints/last.ckpt" in capsys.readouterr().err


def _launcher_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Exactly ``env`` of the variables launchers set (none inherited from the shell running the tests)."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in (
            "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),  # started by hand
        # torchrun, 2 nodes x 4 processes: RANK is the global rank (LOCAL_RANK + GROUP_RANK would give 2, not 5)
        ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 0),
        ({"RANK": "3", "LOCAL_RANK": "3", "GROUP_RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 3),
        ({"RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 5),
        ({"RANK": "4", "LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 4),
        # srun, 2 nodes x 4 tasks: SLURM_PROCID is the global rank
        ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "8",
          "SLURM_JOB_NAME": "train"}, 0),
        ({"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
          "SLURM_JOB_NAME": "train"}, 6),
        # Lightning's own launcher, one node of 4 devices: the processes it starts get LOCAL_RANK (= global rank)
        ({"LOCAL_RANK": "3", "NODE_RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}, 3),
        # ... inside an interactive SLURM allocation (salloc shell: job name bash), where Lightning launches, not
        # srun: SLURM_PROCID 0 is the shell's, not this process's rank
        ({"LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}, 1),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"}, 0),
        # ... 2 nodes x 1 device: the process on node 1 has global rank 1 (with several devices per node the global
        # rank, NODE_RANK * devices + LOCAL_RANK, is not in the environment: launched_rank() then gives
        # LOCAL_RANK + NODE_RANK, right only in being 0 or not)
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node0"}, 1),
        # GROUP_RANK when NODE_RANK is not set
        ({"LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node0"}, 1),
    ],
)
def test_launched_rank_reads_the_launcher_that_started_the_process(
    env: dict[str, str], rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _launcher_env(monkeypatch, env)
    assert launched_rank() == rank


def test_launched_rank_of_the_main_process_on_node_1(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's "general purpose cluster": the user sets these on node 1 and runs medseg fit there; its global
    # rank is NODE_RANK * devices (1 with one device per node), never 0.
    _launcher_env(monkeypatch, {"NODE_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert launched_rank() == 1  # --trainer.devices 1


def test_resume_of_another_model_or_other_classes_is_refused(
    seg2d_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    common = [
        "fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--data.patch_size", "[48, 48]",
    ]
    assert main([*common, "--data.root", str(seg2d_root)]) == 0
    last = out / "seg2d_unet/version_0/checkpoints/last.ckpt"
    before = last.stat().st_mtime_ns
    capsys.readouterr()

    assert main([*common, "--data.root", str(seg2d_root), "--model.init_args.network_args.channels", "[8, 16, 32, 64]",
                 "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "network_args: checkpoint {'channels': [16, 32, 64, 128]" in err

    two_classes = make_synthetic(tmp_path / "two", dims=2, cases=6, classes=2, task="seg", size=(48, 48))
    assert main([*common, "--data.root", str(two_classes), "--ckpt_path", str(last)]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "num_classes: checkpoint 3, this run 2" in err
    assert last.stat().st_mtime_ns == before  # nothing trained, nothing overwritten


KILL_DURING_SAVE = """
import os, signal, sys, torch
from medseg.resume import AtomicCheckpointIO, launched_rank

def dies_half_way(obj, handle, *args, **kwargs):
    handle.write(b"PK" + bytes(1000))  # the start of a zip archive, then the process is gone
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dies_half_way
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((4,), 2.0)}}, sys.argv[1])
"""


def test_a_kill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(4)}}, path)
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(4))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any other file, not mkstemp's 0600
    # Only a hidden temporary file is left beside it, never a half-written last.ckpt.
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]
