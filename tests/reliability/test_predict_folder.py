"""One output folder, one model, nothing lost: ``run.json``, the folder lock, resume after a kill, and the
refusals of folders and files that cannot be used."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.conftest import Result


def _predict(medseg: Callable, checkpoint: Path, source: Path, out: Path, *extra: object) -> Result:
    return medseg("predict", "--ckpt", checkpoint, "--input", source, "--output", out, *extra)


def _label_maps(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def test_run_json_records_the_checkpoints_and_the_options(seg3d_checkpoint: Path, seg3d_root: Path,
                                                          tmp_path: Path, medseg: Callable) -> None:
    import hashlib

    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out, "--tta").code == 0
    (run,) = json.loads((out / "run.json").read_text())["runs"]
    assert run["checkpoints"][0]["sha256"] == hashlib.sha256(seg3d_checkpoint.read_bytes()).hexdigest()
    assert run["options"]["tta"] is True and run["options"]["ensemble"] == "mean"
    assert len(run["cases"]) == 6


def test_a_second_model_into_the_same_folder_is_refused(seg3d_checkpoint: Path, other_checkpoint: Path,
                                                        seg3d_root: Path, tmp_path: Path, medseg: Callable) -> None:
    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out).code == 0
    before = _label_maps(out)
    result = _predict(medseg, other_checkpoint, seg3d_root / "imagesTs", out)  # other cases: no file collides
    line = result.refusal("predict")
    assert result.code == 2 and seg3d_checkpoint.name in line and other_checkpoint.name in line
    assert "another --output" in line
    assert _label_maps(out) == before  # nothing added, nothing changed


def test_resume_with_other_options_is_refused_naming_both(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                          medseg: Callable) -> None:
    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out).code == 0
    (out / "case_003.nii.gz").unlink()
    line = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out, "--resume", "--tta").refusal("predict")
    assert "tta: False before, True now" in line
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out, "--resume").code == 0  # same: fine


def test_overwrite_replaces_another_model_only_when_it_redoes_all_its_cases(
    seg3d_checkpoint: Path, other_checkpoint: Path, seg3d: Path, tmp_path: Path, medseg: Callable
) -> None:
    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, seg3d / "imagesTr", out).code == 0
    (seg3d / "imagesTr" / "case_005.nii.gz").rename(tmp_path / "aside.nii.gz")
    line = _predict(medseg, other_checkpoint, seg3d / "imagesTr", out, "--overwrite").refusal("predict")
    assert "1 of its cases (e.g. case_005) are not in this run" in line
    (tmp_path / "aside.nii.gz").rename(seg3d / "imagesTr" / "case_005.nii.gz")
    assert _predict(medseg, other_checkpoint, seg3d / "imagesTr", out, "--overwrite").code == 0
    (run,) = json.loads((out / "run.json").read_text())["runs"]
    assert run["checkpoints"][0]["path"] == str(other_checkpoint)


def _hold_lock(out: Path, identity: str, pid: int | None = None) -> subprocess.Popen:
    """Another process that holds a predict lock on ``out`` (as a running ``medseg predict`` does); ``pid``
    is the pid its lock file states (default its own; another one stands for a process in another container
    with the same host name)."""
    code = f"""
import fcntl, json, os, socket, sys, time
pid = {pid} or os.getpid()
path = {str(out)!r} + f"/.medseg-predict.{{socket.gethostname()}}.{{pid}}.lock"
handle = open(path, "w")
fcntl.flock(handle, fcntl.LOCK_EX)
json.dump({{"pid": pid, "host": socket.gethostname(), "started": "2026-12-01T10:00:00", "identity": {identity!r}}}, handle)
handle.flush()
print("holding", flush=True)
time.sleep(120)
"""
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_run_of_another_model_in_progress_is_named_and_a_dead_one_is_reported(
    seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path, medseg: Callable
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out, identity="another-model")
    try:
        line = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out).refusal("predict")
        assert f"pid {holder.pid} on {socket.gethostname()}" in line and "is writing here now" in line
    finally:
        holder.kill()
        holder.wait()
    result = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTr", out)  # its holder is gone: stale
    assert result.code == 0 and f"removed the stale lock of a medseg predict that did not end (pid {holder.pid}" \
        in result.err
    assert not list(out.glob(".medseg-predict.*.*.lock"))


def test_the_lock_decides_not_the_pid(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                      medseg: Callable) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # A run in another PID namespace (a container with this host name): its pid means nothing here, its lock does.
    holder = _hold_lock(out, identity="another-model", pid=4_000_000)
    try:
        assert "pid 4000000" in _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", out).refusal("predict")
    finally:
        holder.kill()
        holder.wait()
    # A killed run on another node (its flock released, its pid unknowable here) is stale.
    (out / ".medseg-predict.node-7.1.lock").write_text('{"pid": 1, "host": "node-7", "started": "x", "identity": "y"}')
    result = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", out)
    assert result.code == 0 and "(pid 1 on node-7" in result.err


def test_a_lock_file_that_vanishes_while_it_is_read_is_skipped(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.inference import output_folder

    lock = tmp_path / ".medseg-predict.node-7.12.lock"
    lock.write_text("{}")
    real = output_folder._holder

    def ends_now(path: Path) -> dict:
        path.unlink()  # the run it belongs to ended between the folder listing and this read
        return real(path)

    monkeypatch.setattr(output_folder, "_holder", ends_now)
    folder = output_folder.OutputFolder(tmp_path, [], {}, [])
    assert folder._live_locks() == []


def test_precision_auto_is_recorded_as_what_the_windows_ran_at(seg3d_checkpoint: Path, seg3d_root: Path,
                                                               tmp_path: Path, medseg: Callable) -> None:
    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", out, "--device", "cpu").code == 0
    (run,) = json.loads((out / "run.json").read_text())["runs"]
    assert run["options"]["precision"] == ["torch.float32"] and run["options"]["precision_option"] == "auto"
    # float32 on the CPU either way: the same predictions, so --precision 32 may resume an auto run ...
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", out, "--device", "cpu", "--precision", "32",
                    "--resume").code == 0
    # ... but bf16 windows would not give them
    line = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", out, "--device", "cpu", "--precision",
                    "bf16", "--resume").refusal("predict")
    assert "precision: ['torch.float32'] before, ['torch.bfloat16'] now" in line


def test_predictions_no_run_recorded_are_reported_and_not_claimed(seg3d_checkpoint: Path, other_checkpoint: Path,
                                                                  seg3d_root: Path, tmp_path: Path,
                                                                  medseg: Callable) -> None:
    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", out).code == 0
    (out / "run.json").unlink()  # as a folder written before medseg recorded runs
    result = _predict(medseg, other_checkpoint, seg3d_root / "imagesTs", out, "--resume")
    assert result.code == 0 and "2 finished case(s) (e.g. case_006) are in no run.json entry" in result.err
    (run,) = json.loads((out / "run.json").read_text())["runs"]
    assert run["cases"] == []  # it predicted nothing: the two label maps are not attributed to it


KILLER = """
import os, signal, sys
import medseg.data.io as io
real, calls = os.replace, []
def dying(*args):
    calls.append(1)
    if len(calls) == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash between writing a file and renaming it
    return real(*args)
io.os.replace = dying
from medseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed(*args: object, kill_at: int) -> None:
    done = subprocess.run([sys.executable, "-c", KILLER, *map(str, args)], env={**os.environ, "KILL_AT": str(kill_at)},
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == -9, done.stderr[-3000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _temporary(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.is_file() and not p.name.endswith(".lock")]


@pytest.fixture(scope="module")
def killed_output(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder a ``predict --save-uncertainty`` left when killed at its 8th rename (run once, then copied)."""
    out = tmp_path_factory.mktemp("killed") / "out"
    # Renames: run.json, then per case entropy map + label map; the 8th is case 4's label map.
    _killed("predict", "--device", "cpu", "--ckpt", seg3d_checkpoint, "--input", seg3d_root / "imagesTr",
            "--output", out, "--save-uncertainty", kill_at=8)
    return out


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_killed_run_leaves_its_rows_and_resume_or_overwrite_clear_its_temporary_files(
    flag: str, killed_output: Path, seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path, medseg: Callable
) -> None:
    out, images = Path(shutil.copytree(killed_output, tmp_path / "out")), seg3d_root / "imagesTr"
    (orphan,) = _temporary(out)  # killed between writing case_003's entropy map and renaming it
    assert orphan.parent.name == "uncertainty" and orphan.name.startswith(".case_003_entropy.nii.gz.")
    before = {row["case"]: row for row in _rows(out / "uncertainty.csv")}
    assert sorted(before) == ["case_000", "case_001", "case_002", "case_003"]  # case_003's row is written first
    assert list(out.glob(".medseg-predict.*.*.lock"))  # the killed run's lock is still there
    result = _predict(medseg, seg3d_checkpoint, images, out, "--save-uncertainty", flag)
    assert result.code == 0 and "stale lock" in result.err and "temporary file(s) a killed run left" in result.err
    assert not _temporary(out)
    after = {row["case"]: row for row in _rows(out / "uncertainty.csv")}
    assert sorted(after) == [f"case_{i:03d}" for i in range(6)]
    if flag == "--resume":
        assert all(after[case] == before[case] for case in ("case_000", "case_001", "case_002"))
    fresh = tmp_path / "fresh"
    assert _predict(medseg, seg3d_checkpoint, images, fresh, "--save-uncertainty").code == 0
    assert _label_maps(out) == _label_maps(fresh)  # a killed and resumed run ends like an uninterrupted one


def test_no_uncertainty_table_unless_asked(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                           medseg: Callable) -> None:
    assert _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", tmp_path / "out").code == 0
    assert not (tmp_path / "out" / "uncertainty.csv").exists()


def test_an_output_folder_under_a_file_is_one_line(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                   medseg: Callable) -> None:
    (tmp_path / "a_file").write_text("x")
    result = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", tmp_path / "a_file" / "out")
    assert result.code == 2 and "cannot create the output folder" in result.refusal("predict")


def test_an_output_folder_without_permission_is_one_line(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                         medseg: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = Path.mkdir

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "denied":  # tests run as root, where chmod cannot deny anything
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    result = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", tmp_path / "denied")
    line = result.refusal("predict")
    assert result.code == 2 and f"{tmp_path / 'denied'}: cannot create the output folder (Permission denied" in line


def test_malformed_postprocess_files_are_one_line(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                  medseg: Callable) -> None:
    for name, text in (("bad.yaml", "- op: [keep_largest_component\n  classes: {1\n"), ("bad.json", '[{"op": ')):
        spec = tmp_path / name
        spec.write_text(text)
        result = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", tmp_path / "out", "--postprocess", spec)
        assert result.code == 2 and f"{spec}: not valid" in result.refusal("predict")
    missing = tmp_path / "missing.yaml"
    result = _predict(medseg, seg3d_checkpoint, seg3d_root / "imagesTs", tmp_path / "out", "--postprocess", missing)
    assert result.code == 2 and f"{missing}: post-processing spec file not found" in result.refusal("predict")


def test_two_shard_runs_of_one_model_share_the_folder_at_once(seg3d_checkpoint: Path, seg3d_root: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medseg", "predict", "--device", "cpu", "--ckpt", str(seg3d_checkpoint),
               "--input", str(seg3d_root / "imagesTr"), "--output", str(out)]
    runs = [subprocess.Popen([*command, "--shard", f"{k}/2"], stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[2]) for k in range(2)]
    start = time.time()
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert len(list(out.glob("*.nii.gz"))) == 6 and time.time() - start < 300
    (run,) = json.loads((out / "run.json").read_text())["runs"]
    assert len(run["cases"]) == 6


def test_a_run_that_left_no_prediction_blocks_no_other(seg3d_checkpoint: Path, other_checkpoint: Path,
                                                       seg3d_root: Path, tmp_path: Path, medseg: Callable) -> None:
    import numpy as np

    from tests.reliability.conftest import set_voxels

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(seg3d_root / "imagesTs" / "case_006.nii.gz", folder)
    set_voxels(folder / "case_006.nii.gz", np.nan, 3)
    out = tmp_path / "out"
    assert _predict(medseg, seg3d_checkpoint, folder, out).code == 1  # its only case failed: nothing written
    result = _predict(medseg, other_checkpoint, folder, out, "--nonfinite", "zero", "--tta")
    assert result.code == 0, result.err[-2000:]
    (run,) = json.loads((out / "run.json").read_text())["runs"]
    assert run["checkpoints"][0]["path"] == str(other_checkpoint) and run["options"]["nonfinite"] == "zero"
