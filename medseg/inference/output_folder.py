"""One output folder, one model: ``run.json`` says which checkpoints and options made the predictions in it,
and a lock says which processes are writing there now.

* ``run.json`` lists the runs that wrote into the folder: the checkpoints (path and SHA-256), the options that
  change a prediction (TTA, ensemble mode, precision, post-processing; a few others are recorded too) and the
  case ids. A run with other checkpoints or such options is refused while the folder holds predictions of the
  earlier one (a run whose cases all failed left nothing, and blocks nothing): the folder would become a
  silent mix of two models.
  ``--overwrite`` may replace an earlier run only when it redoes all of that run's cases. Runs of one model
  (``--resume``, ``--shard K/N`` parts, several at once) share an entry. Cross-validation writes each fold's
  model on its own cases into one folder on purpose (``mix=True``); each fold then keeps its own entry.
* Each process writing into the folder holds a hidden lock file ``.medseg-predict.<host>.<pid>.lock`` (pid,
  host, start time) with an exclusive ``flock`` for as long as it runs. A lock file whose ``flock`` is free
  belongs to a run that was killed: it is reported and removed. On network file systems without ``flock``
  support, two hosts cannot see each other's locks.
* When no other process is writing, the hidden temporary files a killed run left (``.<file>.<random><suffix>``)
  are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.data.io import atomic_path, flocked, sha256_of
from medseg.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, run.json still guards against mixing
    fcntl = None  # type: ignore[assignment]

RUN_FILE = "run.json"
LOCK_PREFIX = ".medseg-predict"
IDENTITY_OPTIONS = ("tta", "tta_axes", "ensemble", "precision", "postprocess", "calibration", "runtime")
"""Options that change a case's prediction: runs that differ in them do not share a folder."""
RECORDED_OPTIONS = (*IDENTITY_OPTIONS, "precision_option", "nonfinite", "save_probabilities", "save_uncertainty")
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.[a-z0-9_]{8}(?P<suffix>\.nii\.gz|\.[A-Za-z0-9]+)$")
logger = logging.getLogger("medseg")


def checkpoint_facts(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Path, size and SHA-256 of each checkpoint (what identifies a model, whatever its file is called); an
    exported model folder is identified by its spec file, which holds the checksum of every file it has."""
    facts = []
    for path in paths:
        identity = Path(path) / "medseg_model.json" if Path(path).is_dir() else Path(path)
        facts.append({"path": str(path), "bytes": os.path.getsize(identity), "sha256": sha256_of(identity)})
    return facts


class OutputFolder:
    """The output folder of one ``medseg predict`` run (see the module docstring); a context manager.

    Args:
        path: the folder (created when missing).
        checkpoints: :func:`checkpoint_facts` of the run's checkpoints.
        options: the run's options; :data:`IDENTITY_OPTIONS` must agree with every earlier run (``precision``
            is what each model's windows run at, e.g. ``["torch.float32"]``, not the ``auto`` asked for).
        cases: the ids of the cases this run predicts or skips.
        overwrite: this run redoes its cases (an earlier run of another model may be replaced, when every
            case of it is among them).
        mix: several models on disjoint cases on purpose (cross-validation's out-of-fold predictions).

    Raises (on entering):
        ConfigError: the folder cannot be created, another model's predictions are there, or a run of another
            model is writing there now; the message names the folder, both runs and the way out.
    """

    def __init__(self, path: Path, checkpoints: list[dict[str, Any]], options: dict[str, Any],
                 cases: Sequence[str], overwrite: bool = False, mix: bool = False) -> None:
        self.path = Path(path)
        self.run = {"checkpoints": checkpoints, "options": {k: options.get(k) for k in RECORDED_OPTIONS},
                    "cases": sorted(cases)}
        self.overwrite, self.mix = overwrite, mix
        self.replaced: set[str] = set()
        """Cases of an earlier run of another model that this ``--overwrite`` run replaces: their old outputs
        go before any case starts, so a kill midway cannot leave them to a later ``--resume``."""
        self._lock: Any = None

    def __enter__(self) -> OutputFolder:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
            raise ConfigError(f"{self.path}: cannot create the output folder ({reason}: {err.filename})") from err
        with self._startup():
            others = self._live_locks()
            runs = self._checked_runs(others)
            if not others:
                self._remove_temporary_files()
            self._hold_lock()
            self._write_runs(runs)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            handle, lock_path = self._lock
            with self._startup():  # never while another process reads the lock files
                Path(lock_path).unlink(missing_ok=True)
            handle.close()
            self._lock = None

    # ------------------------------------------------------------------ run.json

    def _checked_runs(self, others: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The runs ``run.json`` will hold with this one, or a refusal."""
        runs = self._read_runs()
        mine = _identity(self.run)
        for other in others:
            if other.get("identity") != _fingerprint(mine) and not self.mix:
                raise ConfigError(
                    f"{self.path}: another medseg predict with other checkpoints or options is writing here now "
                    f"(pid {other.get('pid')} on {other.get('host')}, since {other.get('started')}); "
                    f"wait for it to end, or give another --output (if that run is gone and this file system "
                    f"cannot tell, delete {other['file']})")
        kept, merged = [], False
        finished = self._finished_cases()
        claimed = self._claimed(runs, finished, mine)
        for run in runs:
            if _identity(run) != mine and not set(run.get("cases", [])) & finished:
                continue  # it left no prediction here
            if _identity(run) == mine:
                run["cases"] = sorted(set(run.get("cases", [])) | claimed)
                merged = True
            elif self.mix:
                run["cases"] = sorted(set(run.get("cases", [])) - set(self.run["cases"]))
            elif self.overwrite and set(run.get("cases", [])) & finished <= set(self.run["cases"]):
                self.replaced |= set(run.get("cases", [])) & finished  # every case of it is redone now
                continue
            else:
                raise ConfigError(self._mismatch(run, finished))
            if run["cases"] or _identity(run) == mine:
                kept.append(run)
        if not merged:
            kept.append(dict(self.run, cases=sorted(claimed), started=_now()))
        return kept

    def _claimed(self, runs: list[dict[str, Any]], finished: set[str], mine: tuple[Any, ...]) -> set[str]:
        """The cases this run's entry takes: its own, less finished ones no entry of this model lists (which
        ``--resume`` skips: medseg cannot tell who made them, so they are reported and not claimed)."""
        listed = {case for run in runs for case in run.get("cases", [])}
        unlisted = sorted(finished - listed)
        if unlisted and not self.mix:
            logger.warning("%s: %d finished case(s) (e.g. %s) are in no %s entry (made before medseg recorded "
                           "runs, or copied in): medseg cannot tell which model made them", self.path,
                           len(unlisted), unlisted[0], RUN_FILE)
        if self.overwrite or self.mix:
            return set(self.run["cases"])
        by_me = {case for run in runs if _identity(run) == mine for case in run.get("cases", [])}
        return set(self.run["cases"]) - (finished - by_me)

    def _finished_cases(self) -> set[str]:
        """Ids of the cases with a prediction in the folder (a label map, or a ``predictions.csv`` row)."""
        from medseg.data.datalist import case_id
        from medseg.inference.writers import RowTable

        found = {case_id(p) for p in self.path.glob("*.nii.gz") if not p.name.startswith(".")}
        return found | {row["case"] for row in RowTable(self.path / "predictions.csv").rows()}

    def _mismatch(self, run: dict[str, Any], finished: set[str]) -> str:
        earlier, now = _describe(run), _describe(self.run)
        differences = "; ".join(f"{what}: {earlier[what]} before, {now[what]} now"
                                for what in earlier if earlier[what] != now[what])
        others = sorted(set(run.get("cases", [])) & finished - set(self.run["cases"]))
        way_out = (f"--overwrite cannot replace it: {len(others)} of its cases (e.g. {others[0]}) are not in this "
                   "run and would stay beside the new ones; give another --output" if self.overwrite and others
                   else "give another --output, or --overwrite to redo its cases with this model")
        return (f"{self.path}: holds predictions of another model or other options ({RUN_FILE}): {differences}. "
                f"Mixing them would give a folder of two models; {way_out}")

    def _read_runs(self) -> list[dict[str, Any]]:
        path = self.path / RUN_FILE
        if not path.exists():
            return []
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); it says which model made these predictions: "
                              "give another --output, or remove the folder's predictions and this file") from err
        return [run for run in runs if isinstance(run, dict)]

    def _write_runs(self, runs: list[dict[str, Any]]) -> None:
        import medseg

        with atomic_path(self.path / RUN_FILE) as tmp, open(tmp, "w") as handle:
            json.dump({"medseg_version": medseg.__version__, "runs": runs}, handle, indent=1)

    # ------------------------------------------------------------------ locks

    def _startup(self) -> contextlib.AbstractContextManager[None]:
        """One process at a time checks the folder and claims it (held for milliseconds)."""
        return flocked(self.path / f"{LOCK_PREFIX}.lock")

    def _live_locks(self) -> list[dict[str, Any]]:
        """What the lock files of running processes say (with ``"file"``, the lock's path); a lock of a killed
        run is reported and removed."""
        live = []
        for path in sorted(self.path.glob(f"{LOCK_PREFIX}.*.*.lock")):
            try:
                holder = _holder(path)
                held = _held(path, holder)
            except FileNotFoundError:  # its run ended a moment ago
                continue
            if held:
                live.append({**holder, "file": str(path)})
                continue
            logger.warning("%s: removed the stale lock of a medseg predict that did not end (pid %s on %s, "
                           "started %s)", self.path, holder.get("pid", "?"), holder.get("host", "?"),
                           holder.get("started", "?"))
            path.unlink(missing_ok=True)
        return live

    def _hold_lock(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        lock_path = self.path / f"{LOCK_PREFIX}.{host}.{pid}.lock"
        handle = open(lock_path, "w")  # noqa: SIM115 - held open (and flocked) until the run ends
        if fcntl is not None:
            with contextlib.suppress(OSError):  # no lock support on this file system: pid and host still tell
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        json.dump({"pid": pid, "host": host, "started": _now(), "identity": _fingerprint(_identity(self.run))},
                  handle)
        handle.flush()
        self._lock = (handle, lock_path)

    def _remove_temporary_files(self) -> None:
        """Hidden temporary files of killed writers (``atomic_path`` names) in the folder and its sub-folders."""
        removed = []
        for folder in (self.path, self.path / "probabilities", self.path / "uncertainty"):
            for path in folder.glob(".*") if folder.is_dir() else []:
                match = _TEMPORARY.match(path.name)
                if match and match.group("final").endswith(match.group("suffix")) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        if removed:
            logger.warning("%s: removed %d temporary file(s) a killed run left (e.g. %s)", self.path, len(removed),
                           removed[0])


def _holder(path: Path) -> dict[str, Any]:
    """What a lock file says (pid, host, started, identity); ``{}`` for one a run was killed while writing."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _held(path: Path, holder: dict[str, Any]) -> bool:
    """Whether the process that wrote lock file ``path`` still runs: it holds the file's ``flock``.

    Where ``flock`` does not work (no ``fcntl``; an NFS mount without lock support), a process on this host is
    looked up by pid, and one on another host is taken to be running.
    """
    if fcntl is not None:
        try:
            # Opened for writing (NFS emulates flock with fcntl locks, which need it), never created.
            with open(os.open(path, os.O_WRONLY | os.O_APPEND), "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(handle, fcntl.LOCK_UN)
                return False
        except FileNotFoundError:
            raise
        except OSError:  # ENOLCK and the like: this file system cannot tell
            pass
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
    return True


def _identity(run: dict[str, Any]) -> tuple[Any, ...]:
    shas = sorted(c["sha256"] for c in run.get("checkpoints", []))
    options = run.get("options", {})
    return tuple(shas), json.dumps({k: options.get(k) for k in IDENTITY_OPTIONS}, sort_keys=True)


def _fingerprint(identity: tuple[Any, ...]) -> str:
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _describe(run: dict[str, Any]) -> dict[str, str]:
    checkpoints = ", ".join(f"{c['path']} (sha256 {c['sha256'][:12]})" for c in run["checkpoints"])
    options = run.get("options", {})
    return {"checkpoints": f"[{checkpoints}]", **{k: repr(options.get(k)) for k in IDENTITY_OPTIONS}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
