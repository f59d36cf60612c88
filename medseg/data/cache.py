"""A JSON cache beside a dataset (``DATASET/fingerprint.json``): values keyed by name, valid while every file
they were computed from keeps its path, size and modification time.

The fingerprint and the integrity checks share it, so `medseg fit`, `cv` and `benchmark` read a file's voxels
again only after it changed. Several processes (DDP ranks) may save at once: saving merges under a file lock
and writes atomically. A dataset folder that cannot be written is used without a cache (logged at each save).
Callers put in a key whatever else the value depends on (the description's entries, settings, a version).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.data.io import atomic_path, flocked

CACHE_VERSION = 1
CACHE_FILE = "fingerprint.json"
logger = logging.getLogger("medseg")


class DatasetCache:
    """Values that stay valid while their files are unchanged (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries = self._read()
        self._new: dict[str, Any] = {}

    def lookup(self, key: str, files: Sequence[str]) -> tuple[Any | None, Any]:
        """``(value, stamp)``: the value stored under ``key`` if ``files`` are those it was computed from,
        unchanged (else ``None``), and their stamp now, taken before they are read, for :meth:`put`."""
        stamp = _stamps(files)
        entry = self._new.get(key) or self._entries.get(key)
        if stamp is None or entry is None or entry.get("files") != stamp:
            return None, stamp
        return entry.get("value"), stamp

    def put(self, key: str, stamp: Any, value: Any) -> None:
        """Store ``value`` under ``key`` for the files of ``stamp`` (from :meth:`lookup`, taken before they were
        read: a file changed while it was read no longer matches). Saved by :meth:`save`."""
        if stamp is not None:
            self._new[key] = {"files": stamp, "value": value}

    def save(self) -> None:
        """Merge what was put into the file (atomically, under a lock)."""
        if not self._new:
            return
        try:
            with flocked(self.path.with_name(f".{self.path.name}.lock")):
                entries = {**self._read(), **self._new}
                with atomic_path(self.path) as tmp, open(tmp, "w") as handle:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, handle)
        except OSError as err:  # a read-only dataset folder: no cache, the same results
            logger.warning("%s: cannot write the cache (%s); files will be read again next time", self.path,
                           err.strerror or err)
            return
        self._entries, self._new = entries, {}

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}


def _stamps(files: Sequence[str]) -> list[list[Any]] | None:
    """``[[path, size, mtime_ns], ...]`` of ``files`` in order; ``None`` when one is missing (nothing to cache)."""
    stamps = []
    for file in files:
        try:
            stat = os.stat(file)
        except OSError:
            return None
        stamps.append([str(file), stat.st_size, stat.st_mtime_ns])
    return stamps
