"""The cases stage and the writers: shards over nodes, tables that lose no finished row, resume from them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.data.discovery import find_cases, parse_shard, shard_cases
from medseg.inference.writers import RowTable

SCRIPTS = Path(__file__).parents[1] / "scripts"


def _run(*args: str) -> int:
    return main(["predict", "--device", "cpu", *args])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_shard_parts_are_disjoint_and_cover_every_case(seg3d_root: Path) -> None:
    cases = find_cases(seg3d_root / "imagesTr", 1)
    parts = [shard_cases(list(reversed(cases)), k, 4) for k in range(4)]  # found in another order: same parts
    assert parts == [shard_cases(cases, k, 4) for k in range(4)]
    ids = [case["id"] for part in parts for case in part]
    assert sorted(ids) == sorted(case["id"] for case in cases) and len(set(ids)) == len(ids)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)


def test_three_shards_write_exactly_the_files_of_one_run(seg3d_checkpoint: Path, seg3d_root: Path,
                                                         tmp_path: Path, capsys) -> None:
    images = str(seg3d_root / "imagesTr")
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", images, "--output", str(tmp_path / "one")) == 0
    capsys.readouterr()
    done = []
    for k in range(3):
        assert _run("--ckpt", str(seg3d_checkpoint), "--input", images, "--output", str(tmp_path / "parts"),
                    "--shard", f"{k}/3") == 0
        done.append(int(capsys.readouterr().out.split("predicted ")[1].split(" ")[0]))
    assert done == [2, 2, 2]  # 6 cases: each predicted once
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.nii.gz")}
    parts = {p.name: p.read_bytes() for p in (tmp_path / "parts").glob("*.nii.gz")}
    assert sorted(parts) == sorted(one) and len(one) == 6
    runs = json.loads((tmp_path / "parts" / "run.json").read_text())["runs"]
    assert len(runs) == 1 and len(runs[0]["cases"]) == 6  # the three parts are one run of one model
    assert all(parts[name] == one[name] for name in one), "label maps differ byte for byte"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", images, "--output", str(tmp_path / "x"),
                "--shard", "3/3") == 2
    assert "0 <= K < N" in capsys.readouterr().err


def test_the_slurm_array_script_predicts_one_shard_per_task() -> None:
    script = (SCRIPTS / "slurm_predict.sbatch").read_text()
    assert "#SBATCH --array" in script and '--shard "${SLURM_ARRAY_TASK_ID}/' in script and "medseg predict" in script


KILLER = """
import os, signal, sys, time
import medseg.inference.batch as batch
real, seen = batch.classify, []
def dying(*args, **kwargs):
    seen.append(1)
    if len(seen) == int(os.environ["KILL_AT"]):
        time.sleep(0.5)  # on a GPU the previous case's row may still be in the writer thread
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a crash
    return real(*args, **kwargs)
batch.classify = dying
from medseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_classification_run_keeps_every_finished_row_and_resumes(
    cls2d_checkpoint: Path, cls2d_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    data = str(cls2d_root / "dataset.json")
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "predict", "--device", "cpu", "--ckpt", str(cls2d_checkpoint), "--input", data,
         "--output", str(out)], env={**os.environ, "KILL_AT": "4"}, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    ids = [case["id"] for case in load_dataset(cls2d_root).training]
    before = _rows(out / "predictions.csv")
    assert [row["case"] for row in before] == ids[:3]  # the three finished cases, in full
    assert _run("--ckpt", str(cls2d_checkpoint), "--input", data, "--output", str(out), "--resume") == 0
    after = _rows(out / "predictions.csv")
    assert [row["case"] for row in after] == ids
    assert after[:3] == before  # the rows of the killed run are kept as they were


def test_rows_of_other_inputs_never_block_a_run(cls2d_checkpoint: Path, cls2d_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("case,prediction,p_class0,p_class1\nsomeone_else,class1,0.2,0.8\n")
    assert _run("--ckpt", str(cls2d_checkpoint), "--input", str(cls2d_root / "dataset.json"), "--output", str(out)) == 0
    rows = _rows(out / "predictions.csv")
    assert len(rows) == len(load_dataset(cls2d_root).training) + 1
    assert rows[-1]["case"] == "someone_else"  # kept, after this input's cases


def test_uncertainty_rows_only_when_asked_and_kept_on_resume(seg3d_checkpoint: Path, seg3d_root: Path,
                                                             tmp_path: Path) -> None:
    data, out = str(seg3d_root / "dataset.json"), tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(out)) == 0
    assert not (out / "uncertainty.csv").exists()  # not asked for: no table of zeros
    out2 = tmp_path / "out2"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(out2), "--save-uncertainty") == 0
    first = _rows(out2 / "uncertainty.csv")
    assert len(first) == 2 and all(float(r["doubt"]) > 0 for r in first)
    (out2 / f"{first[0]['case']}.nii.gz").unlink()  # one case lost: --resume redoes it alone
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(out2), "--save-uncertainty",
                "--resume") == 0
    again = _rows(out2 / "uncertainty.csv")
    assert sorted(r["case"] for r in again) == sorted(r["case"] for r in first)
    assert {r["case"]: r["doubt"] for r in again} == {r["case"]: r["doubt"] for r in first}


def test_a_table_drops_a_torn_last_line_and_keeps_the_last_row_of_a_case(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("case,doubt,members\na,0.1,2\nb,0.2,2\na,0.3,2\nc,0.4,")  # killed while writing c's row
    table = RowTable(path)
    assert [(r["case"], r["doubt"]) for r in table.rows()] == [("a", "0.3"), ("b", "0.2")]
    table.append({"case": "d", "doubt": 0.5, "members": 2, "extra": "x"})  # a new column: both sets kept
    rows = table.rows()
    assert rows[-1] == {"case": "d", "doubt": "0.5", "members": "2", "extra": "x"} and rows[0]["extra"] == ""
    assert [r["case"] for r in rows] == ["a", "b", "d"]


def test_background_reading_and_writing_give_the_same_files(seg3d_checkpoint: Path, seg3d_root: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's three-thread path, run on the CPU: the next case is read in its own thread, the files match."""
    import threading

    from medseg.inference import batch

    images = str(seg3d_root / "imagesTr")
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", images, "--output", str(tmp_path / "in_turn")) == 0
    readers = []
    real = batch.prepare_case
    monkeypatch.setattr(batch, "prepare_case", lambda *a: readers.append(threading.current_thread().name) or real(*a))
    monkeypatch.setattr(batch, "background_stages", lambda device: True)
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", images, "--output", str(tmp_path / "background")) == 0
    assert len(readers) == 6 and all(name.startswith("medseg-read") for name in readers)
    for path in (tmp_path / "in_turn").glob("*.nii.gz"):
        assert path.read_bytes() == (tmp_path / "background" / path.name).read_bytes()


def test_a_torn_header_is_no_header(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("case,do")  # killed while the header itself was written
    table = RowTable(path)
    assert table.rows() == []
    table.append({"case": "a", "doubt": 0.1, "members": 2})
    assert path.read_text() == "case,doubt,members\na,0.1,2\n"


def test_an_overwrite_run_killed_midway_leaves_no_case_mixed_and_resume_finishes(
    seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.inference import batch

    data, out = str(seg3d_root / "dataset.json"), tmp_path / "out"
    args = ("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(out), "--save-uncertainty",
            "--save-probabilities")
    assert _run(*args) == 0
    first, second = sorted(p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz"))
    calls = []
    real = batch.segment

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a kill, while the second case is predicted
        return real(*a, **k)

    monkeypatch.setattr(batch, "segment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(*args, "--overwrite")
    assert (out / f"{first}.nii.gz").is_file()  # redone
    leftovers = [p.name for p in out.rglob(f"{second}*") if p.is_file()]
    assert leftovers == [], "the interrupted case kept old files beside new ones"
    monkeypatch.setattr(batch, "segment", real)
    assert _run(*args, "--resume") == 0
    rows = _rows(out / "uncertainty.csv")
    assert sorted(r["case"] for r in rows) == [first, second]
    assert (out / f"{second}.nii.gz").is_file() and (out / "probabilities" / f"{second}.npz").is_file()
