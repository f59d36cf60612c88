"""Run folders, resuming and safe checkpoint writes for ``medseg fit``.

* A run writes to ``<default_root_dir>/<config name>/version_N/``; global rank 0 claims ``N`` by creating
  the folder (so runs started together never share one) and hands it to the DDP processes it launches.
* ``--ckpt_path last`` resumes from the newest ``version_*/checkpoints/last.ckpt`` of the config and keeps
  writing in that run's folder; asking to resume when there is nothing to resume from is an error.
* Checkpoints are written to a temporary file beside the target and renamed over it, so a process killed
  while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from medseg.data.io import atomic_path, write_csv
from medseg.errors import ResumeError

# How a launching process (global rank 0) tells the DDP processes it starts which run folder it claimed.
RUN_FOLDER_ENV = "MEDSEG_RUN_FOLDER"
LAST = "last.ckpt"
_VERSION = re.compile(r"version_(\d+)$")


def launched_rank() -> int:
    """Whether this process is the run's first: 0 for global rank 0, else a positive number. Known before
    torch.distributed starts.

    torchrun and srun give the exact global rank (``RANK``, ``SLURM_PROCID``). Lightning's own launcher does
    not say how many devices a node has, so there the value is ``LOCAL_RANK + NODE_RANK``: 0 exactly on the
    first process of the first node, which is all the callers ask. A node's main process started by hand with
    ``NODE_RANK=1`` (a multi-node run Lightning launches) is not rank 0 either, before and after Lightning sets
    its ``LOCAL_RANK``.
    """
    if os.environ.get("RANK", "").isdigit():  # torchrun
        return int(os.environ["RANK"])
    node_text = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or "0"
    node = int(node_text) if node_text.isdigit() else 0
    if "LOCAL_RANK" in os.environ:  # Lightning's launcher sets it (and NODE_RANK) for the processes it starts
        return int(os.environ["LOCAL_RANK"] or 0) + node
    if node:
        return node
    if SLURMEnvironment.detect():  # srun tasks; not an interactive SLURM shell, where Lightning launches
        return int(os.environ["SLURM_PROCID"])
    return 0


def versions(run_root: Path) -> list[int]:
    """The ``N`` of the ``version_N`` folders under ``run_root``, ascending."""
    found = (_VERSION.match(p.name) for p in run_root.glob("version_*") if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def claim_run_folder(run_root: Path) -> int:
    """The version ``N`` of this run's ``run_root/version_N`` folder.

    Rank 0 creates the next free folder (``mkdir`` fails if another run took it first, and the next number is
    tried) and records it for the processes it launches; those take the recorded one.
    """
    inherited = json.loads(os.environ.get(RUN_FOLDER_ENV, "{}"))
    if launched_rank() != 0 and inherited.get("root") == str(run_root.resolve()):
        return int(inherited["version"])
    version = 1 + max(versions(run_root), default=-1)
    if launched_rank() != 0:
        return version  # a process rank 0 did not launch (torchrun, srun): it writes nothing itself
    while True:
        try:
            (run_root / f"version_{version}").mkdir(parents=True)
            break
        except FileExistsError:
            version += 1
    share_run_folder(run_root, version)
    return version


def share_run_folder(run_root: Path, version: int) -> None:
    os.environ[RUN_FOLDER_ENV] = json.dumps({"root": str(run_root.resolve()), "version": version})


def release_empty_run_folder() -> None:
    """Remove the run folder this process claimed when the run stopped before writing anything of its own
    into it (a data check or a configuration error), so failed attempts do not leave ``version_N`` folders
    holding nothing but a TensorBoard file header."""
    claimed = json.loads(os.environ.get(RUN_FOLDER_ENV, "{}"))
    if not claimed or launched_rank() != 0:
        return
    folder = Path(claimed["root"]) / f"version_{claimed['version']}"
    if not folder.is_dir():
        return
    contents = list(folder.iterdir())
    if all(p.name.startswith("events.out.tfevents.") and p.stat().st_size < 65536 for p in contents):
        shutil.rmtree(folder)


def resolve_resume(ckpt_path: str, run_root: Path) -> Path:
    """The checkpoint ``--ckpt_path`` names: ``last`` is the newest ``run_root/version_*/checkpoints/last.ckpt``.

    Raises:
        FileNotFoundError: nothing to resume from (never silently a fresh start).
    """
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        return path
    found = versions(run_root)
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no run under {run_root} to resume from; leave out --ckpt_path to start a new run"
        )
    path = run_root / f"version_{found[-1]}" / "checkpoints" / LAST
    if not path.is_file():  # never an older run instead: it may be another experiment, or finished
        raise FileNotFoundError(
            f"--ckpt_path last: the newest run {path.parent.parent} has no checkpoints/{LAST} (it stopped before "
            "its first epoch ended); start it again, or name a checkpoint with --ckpt_path FILE"
        )
    return path


def drop_rows_after(metrics_csv: Path, global_step: int) -> None:
    """Remove the rows a killed run logged after its last checkpoint (``step >= global_step``): the resumed
    run logs those steps again."""
    if not metrics_csv.is_file():
        return
    with metrics_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = list(reader.fieldnames or []), list(reader)
    kept = [row for row in rows if not row.get("step", "").isdigit() or int(row["step"]) < global_step]
    if len(kept) < len(rows) and columns:
        write_csv(metrics_csv, kept, columns)


def run_folder_of(checkpoint: Path) -> tuple[Path, int] | None:
    """``(run_root, N)`` when ``checkpoint`` lies in ``run_root/version_N/checkpoints/``."""
    match = _VERSION.match(checkpoint.parent.parent.name)
    if checkpoint.parent.name != "checkpoints" or not match:
        return None
    return checkpoint.parent.parent.parent, int(match.group(1))


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """Epoch, step and medseg task of a checkpoint, read with ``weights_only=True`` (memory-mapped).

    Raises:
        ResumeError: naming the file, when it is truncated, not a torch file, or holds pickled objects that
            ``weights_only`` refuses to run.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:300]
        raise ResumeError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {reason})") from err
    if not isinstance(checkpoint, dict):
        raise ResumeError(f"{path}: not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    return {k: checkpoint.get(k) for k in ("epoch", "global_step", "medseg_task", "hyper_parameters")}


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, flushed to disk, then renamed over it.

    Lightning's default writes through an fsspec transaction whose temporary file lives in the system temp
    folder; when that is another file system (a local ``/tmp`` and a shared run folder), the final move is a
    copy, and a kill during it leaves a truncated checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())


class _AppendingWriter(ExperimentWriter):
    """Continues an existing ``metrics.csv``: its columns are known from the start, so rows append to it."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes an existing metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its ``metrics.csv`` instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def saved_checkpoint(trainer: Any, kind: str = "last") -> str:
    """The path of the ``last`` (or ``best``, else ``last``) checkpoint a fitted trainer's ModelCheckpoint
    callbacks wrote; ``""`` when none did.

    The shipped configs keep them in two callbacks: one monitors a metric (the best), the other has no
    monitor and rewrites ``last.ckpt`` at every epoch end (its "best" is the newest).
    """
    callbacks = trainer.checkpoint_callbacks
    monitored = [c.best_model_path for c in callbacks if c.monitor is not None and c.best_model_path]
    latest = [c.last_model_path or c.best_model_path for c in callbacks if c.monitor is None or c.last_model_path]
    found = (monitored if kind == "best" else []) + [p for p in latest if p]
    return found[0] if found else ""
