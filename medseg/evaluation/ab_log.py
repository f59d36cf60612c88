"""The request log of ``medseg serve`` as ``medseg ab-report`` reads it: its rows, the two arms, what is measured.

The log has one row per ``POST /predict`` request, whatever its outcome: ``time``, ``request``, ``case``,
``patient``, ``model`` (the arm's model name), ``status`` (``ok`` or the error kind), ``latency_s``, ``input``,
``doubt``, one column per structure (``volume_ml_<name>`` for 3D models, ``area_mm2_<name>`` for 2D ones,
``probability_<class>`` for classifiers) and ``prediction`` (the kept label map, or empty).

The arms are the log's two models. ``medseg serve`` sends a request to arm B when the hash of its key (patient,
else the case id the client gave, else request id; :mod:`medseg.serve.routing`) falls below the split, so in a
log the router wrote every key of arm B lies below every key of arm A: that is how the arms are told apart here.
A row without a patient was routed by its case id or, when that came from the file name, by its request id; the
log does not say which, so either may have been its key. When the keys do not separate (a patient routed to both
arms, a split changed during the test), the arms are taken in alphabetical order; ``--arms`` gives the order.

The text cells ``case``, ``patient`` and ``model`` are read back as ``medseg serve`` meant them (without the quote
that keeps a spreadsheet from running them as formulas, :func:`medseg.serve.requests_log.text_from_cell`).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import InputError, did_you_mean
from medseg.evaluation.report_format import MetricInfo
from medseg.serve.requests_log import TEXT_COLUMNS, text_from_cell

REQUIRED = ("time", "request", "case", "patient", "model", "status", "latency_s", "input", "doubt", "prediction")
OK = "ok"
# column prefix -> (family, shown name, unit, decimals, what a value is)
PER_STRUCTURE = {
    "volume_ml_": ("volume", "Volume", "ml", 2, "predicted volume of the structure"),
    "area_mm2_": ("area", "Area", "mm²", 2, "predicted area of the structure"),
    "probability_": ("probability", "Probability", "", 3, "predicted probability of the class"),
}
LATENCY = MetricInfo("latency_s", "Latency", "s", "lower", 3, "seconds from the request's arrival to its response")
DOUBT = MetricInfo("doubt", "Doubt", "nats", "", 3, "mean voxel entropy where any member calls foreground")


@dataclass(frozen=True)
class Measure:
    """A per-request number the arms are compared on.

    Args:
        family: the group whose tests are Holm-corrected together (``"latency"``, ``"volume"``, ``"dice"``, ...).
        structure: the structure (or class) it belongs to; empty for a per-request number (latency, doubt).
        info: how it is shown (name, unit, decimals); ``info.better`` is ``"higher"``, ``"lower"``, or empty when
            neither arm is better for a larger value (a volume).
    """

    family: str
    structure: str
    info: MetricInfo

    @property
    def title(self) -> str:
        """``"Latency"``, ``"Volume of liver"``, ``"Dice of liver"``."""
        return f"{self.info.name} of {self.structure}" if self.structure else self.info.name


@dataclass
class ABLog:
    """The rows of a request log that belong to the two compared arms, numbers parsed (empty cells are NaN).

    Attributes:
        path: the log file.
        rows: the rows of the two arms, in the log's order.
        arms: the two model names, arm A first.
        routed: whether the order is the router's (the keys of arm B all below those of arm A).
        order: how the order was found: ``"routed"``, ``"given"`` (``--arms``) or ``"alphabetical"``.
        measures: ``column -> Measure`` of the log's numbers (latency, doubt, one per structure column).
        left_out: rows of other models (``--arms``) or without a model, by model name (``""`` for none).
    """

    path: Path
    rows: list[dict[str, Any]]
    arms: list[str]
    routed: bool
    measures: dict[str, Measure]
    left_out: dict[str, int] = field(default_factory=dict)
    order: str = "routed"

    def of(self, arm: str, ok: bool = True) -> list[dict[str, Any]]:
        """The rows of ``arm``: only its answered requests (``status`` ok) unless ``ok`` is false."""
        return [r for r in self.rows if r["model"] == arm and (r["status"] == OK or not ok)]

    def values(self, arm: str, column: str) -> list[float]:
        """``column`` of the answered requests of ``arm`` that have a value."""
        return [r[column] for r in self.of(arm) if not math.isnan(r[column])]

    def shared_patients(self) -> list[str]:
        """Patients with requests in both arms (the split must keep a patient on one arm), sorted."""
        seen = [{r["patient"] for r in self.of(arm, ok=False) if r["patient"]} for arm in self.arms]
        return sorted(seen[0] & seen[1])

    def errors(self, arm: str) -> dict[str, int]:
        """``status -> count`` of the failed requests of ``arm``."""
        return dict(sorted(Counter(r["status"] for r in self.of(arm, ok=False) if r["status"] != OK).items()))


def read_log(path: str | Path, arms: list[str] | None = None) -> ABLog:
    """Read and check a ``medseg serve`` request log.

    Args:
        path: the CSV log.
        arms: the two models to compare, arm A first (``--arms``); default: the log's two models.

    Raises:
        InputError: one line naming the file: missing or unreadable, without the required columns, a cell that is
            not a number, no answered request, one model only, more than two without ``arms``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such request log (medseg serve --log writes it)")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 text file ({err.reason})") from err
    except csv.Error as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from err
    if not header:
        raise InputError(f"{path}: empty: no header line (a medseg serve request log starts with {','.join(REQUIRED[:3])},…)")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"{path}: not a medseg serve request log: missing column(s) {', '.join(missing)} "
                         f"(it needs {', '.join(REQUIRED)})")
    measures = {"latency_s": Measure("latency", "", LATENCY), "doubt": Measure("doubt", "", DOUBT)}
    measures |= _structure_measures(header)
    for line, row in enumerate(rows, start=2):
        for column in measures:
            row[column] = _number(row.get(column), path, line, column)
        for column in ("model", "status", "patient", "case", "request", "prediction"):
            row[column] = (row.get(column) or "").strip()
        for column in TEXT_COLUMNS:
            row[column] = text_from_cell(row[column])
    if not any(r["status"] == OK for r in rows):
        kinds = Counter(r["status"] or "empty" for r in rows)
        told = f": {', '.join(f'{n} {k}' for k, n in kinds.most_common())}" if rows else ""
        raise InputError(f"{path}: no answered request (status ok) among its {len(rows)} row(s){told}")
    chosen, order = _arms(path, rows, arms)
    kept = [r for r in rows if r["model"] in chosen]
    left_out = dict(Counter(r["model"] for r in rows if r["model"] not in chosen))
    return ABLog(path, kept, chosen, order == "routed", measures, left_out, order)


def _structure_measures(header: list[str]) -> dict[str, Measure]:
    """One :class:`Measure` per structure column, in the log's order."""
    found = {}
    for column in header:
        for prefix, (family, name, unit, decimals, description) in PER_STRUCTURE.items():
            if column.startswith(prefix) and len(column) > len(prefix):
                info = MetricInfo(column, name, unit, "", decimals, description)
                found[column] = Measure(family, column[len(prefix):], info)
    return found


def _number(text: str | None, path: Path, line: int, column: str) -> float:
    """A cell as a number; NaN when empty."""
    text = (text or "").strip()
    if not text:
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{path}: line {line}: {column} {text!r} is not a number") from None


def _arms(path: Path, rows: list[dict[str, Any]], asked: list[str] | None) -> tuple[list[str], str]:
    """The two compared models, arm A first, and how that order was found (``routed``, ``given``,
    ``alphabetical``)."""
    models = sorted({r["model"] for r in rows if r["model"]})
    shown = ", ".join(models) or "none"
    if asked:
        if len(asked) != 2 or asked[0] == asked[1]:
            raise InputError(f"--arms {','.join(asked)}: name two different models of the log ({shown})")
        for name in asked:
            if name not in models:
                raise InputError(f"{path}: no model {name!r} in the log (models: {shown})"
                                 f"{did_you_mean(name, models)}")
        return list(asked), "given"
    if len(models) < 2:
        raise InputError(f"{path}: every request names one model ({shown}): an A/B comparison needs two arms "
                         "(medseg serve --model A --model B)")
    if len(models) > 2:
        raise InputError(f"{path}: {len(models)} models ({shown}): choose the two arms to compare with --arms A,B")
    return _routed_order(rows, models)


def _routed_order(rows: list[dict[str, Any]], models: list[str]) -> tuple[list[str], str]:
    """``[A, B]`` and ``"routed"`` when the routing keys of one model can all lie below those of the other
    (that one is B), else the models as given (alphabetical) and ``"alphabetical"``.

    A row's possible keys: its patient; without one, its case id (when the client gave it) or its request id
    (when the case came from the file name). Model B can be arm B when the highest of its rows' lowest possible
    places lies below the lowest of model A's rows' highest possible places.
    """
    from medseg.serve.routing import key_fraction

    def places(row: dict[str, Any]) -> list[float]:
        keys = [row["patient"]] if row["patient"] else [k for k in (row["case"], row["request"]) if k]
        return [key_fraction(k) for k in keys] or [0.0]

    by_model = {m: [places(r) for r in rows if r["model"] == m] for m in models}
    first, second = models
    for a, b in ((first, second), (second, first)):
        if max(min(p) for p in by_model[b]) < min(max(p) for p in by_model[a]):
            return [a, b], "routed"
    return list(models), "alphabetical"
