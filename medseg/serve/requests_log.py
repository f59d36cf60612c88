"""The request log: one CSV row per ``POST /predict`` request, appended, flushed and fsynced as it is answered.

The columns (kept stable: ``medseg ab-report`` reads them) are
:data:`FIXED_COLUMNS`, one column per structure (``volume_ml_<name>`` for 3D models, ``area_mm2_<name>`` for
2D, ``probability_<class>`` for classification), then ``prediction``. A log that exists with the same header is
appended to; one with another header is refused at start rather than mixed.

The text columns a client or an operator chooses (:data:`TEXT_COLUMNS`: ``case``, ``patient``, ``model``) are
written so that a spreadsheet does not run them as formulas: a cell starting with ``=``, ``+``, ``-``, ``@``, a
tab, a carriage return or a single quote gets a single quote in front (:func:`text_cell`);
:func:`text_from_cell` takes it off again (``medseg ab-report`` reads the ids through it).
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import InputError

FIXED_COLUMNS = ("time", "request", "case", "patient", "model", "status", "latency_s", "input", "doubt")
LAST_COLUMN = "prediction"
TEXT_COLUMNS = ("case", "patient", "model")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
"""First characters a spreadsheet reads as the start of a formula, and the quote that escapes them."""


def text_cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text: ``'`` in front of a formula's first character (or of a
    leading quote, so that :func:`text_from_cell` is its exact inverse)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def text_from_cell(cell: str) -> str:
    """The text :func:`text_cell` wrote."""
    return cell[1:] if cell.startswith("'") else cell


def structure_columns(model: Any) -> list[str]:
    """The log columns of one model's structures (``model.structures``: its foreground classes or regions):
    ``volume_ml_<name>`` (3D), ``area_mm2_<name>`` (2D), or ``probability_<class>`` (classification)."""
    if model.task == "classification":
        return [f"probability_{name}" for name in model.label_names]
    unit = "volume_ml" if model.spatial_dims == 3 else "area_mm2"
    names = getattr(model, "structures", None) or model.label_names[1:]  # regions, or the foreground classes
    return [f"{unit}_{name}" for name in names]


def log_columns(models: Sequence[Any]) -> list[str]:
    """Every column of a log of ``models``: the structure columns of arm A, then arm B's new ones."""
    structures: list[str] = []
    for model in models:
        structures += [column for column in structure_columns(model) if column not in structures]
    return [*FIXED_COLUMNS, *structures, LAST_COLUMN]


def structure_values(summary: dict[str, Any], spatial_dims: int) -> dict[str, Any]:
    """The structure columns of one prediction's summary."""
    if "probabilities" in summary and not summary.get("structures"):
        return {f"probability_{name}": value for name, value in dict(summary["probabilities"]).items()}
    unit = "volume_ml" if spatial_dims == 3 else "area_mm2"
    return {f"{unit}_{name}": values.get(unit) for name, values in summary.get("structures", {}).items()}


class RequestLog:
    """Appends rows to the CSV log at ``path`` (created with its header when missing)."""

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.path, self.columns = Path(path), list(columns)
        self._lock = threading.Lock()
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as handle:
                header = next(csv.reader(handle), [])
            if header != self.columns:
                raise InputError(f"{self.path}: a request log with other columns ({', '.join(header[:12])}...); "
                                 "give another --log for these models")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write(self.columns)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row (missing columns empty, unknown ones ignored), flushed and fsynced."""
        cells = [_cell(row.get(column)) for column in self.columns]
        self._write([text_cell(cell) if column in TEXT_COLUMNS else cell
                     for column, cell in zip(self.columns, cells, strict=True)])

    def _write(self, cells: list[str]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(cells)
        with self._lock, open(self.path, "a", newline="") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
