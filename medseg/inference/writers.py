"""Writers: a case's files, each written under a temporary name and renamed (the label map last, so its presence
means the case is complete), and tables that grow by one row per finished case.

Output folder of ``medseg predict``::

    <case>.nii.gz                    label map on the input's grid (uint8, or int16 above 255 labels)
    <case>.seg.dcm                   --output-format dicom-seg: a DICOM SEG referencing the input series
    probabilities/<case>.npz         --save-probabilities: float16 (P, *S), the affine and the channel names
    uncertainty/<case>_entropy.nii.gz, <case>_variance.nii.gz      --save-uncertainty
    uncertainty.csv                  --save-uncertainty: case, doubt, members (sorted by doubt at the end)
    predictions.csv                  classification: case, prediction, p_<class>...
    run.json                         which checkpoints (SHA-256) and options made the predictions, and their cases
    .medseg-predict.<host>.<pid>.lock   one per running writer (see medseg.inference.output_folder)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.io import atomic_path, flocked, write_csv, write_nifti


@dataclass(frozen=True)
class CaseFiles:
    """Where the files of one segmentation case go."""

    probabilities: Path
    entropy: Path
    variance: Path
    labels: Path
    dicom_seg: Path

    @classmethod
    def of(cls, case: str, output: Path) -> CaseFiles:
        return cls(output / "probabilities" / f"{case}.npz", output / "uncertainty" / f"{case}_entropy.nii.gz",
                   output / "uncertainty" / f"{case}_variance.nii.gz", output / f"{case}.nii.gz",
                   output / f"{case}.seg.dcm")

    def all(self) -> list[Path]:
        """Every file, the label map last."""
        return [self.probabilities, self.entropy, self.variance, self.dicom_seg, self.labels]

    def remove(self) -> None:
        for path in self.all():
            path.unlink(missing_ok=True)


def write_probabilities(path: Path, probabilities: np.ndarray, affine: np.ndarray, names: Sequence[str],
                        regions: Sequence[Sequence[int]] | None = None) -> None:
    """Write ``probabilities`` ``(P, *S)`` as float16 into a compressed ``.npz`` (keys ``probabilities``,
    ``affine``, ``label_names``, and for a region model ``regions``: the label values of each channel as JSON
    text), one channel at a time: no float16 copy of the whole stack is made."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("probabilities.npy", "w", force_zip64=True) as handle:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")), "fortran_order": False,
                      "shape": tuple(probabilities.shape)}
            np.lib.format.write_array_header_1_0(handle, header)
            for channel in probabilities:
                handle.write(np.ascontiguousarray(channel, dtype="<f2").data)
        extra = [("regions", np.array(json.dumps([list(map(int, r)) for r in regions])))] if regions else []
        for name, array in (("affine", np.asarray(affine, dtype=np.float64)), ("label_names", np.array(list(names))),
                            *extra):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{name}.npy", buffer.getvalue())


def write_case_maps(files: CaseFiles, maps: Any, affine: np.ndarray, names: Sequence[str],
                    regions: Sequence[Sequence[int]] | None = None) -> None:
    """Write what :class:`~medseg.inference.accumulate.CaseMaps` holds; the label map last."""
    if maps.probabilities is not None:
        write_probabilities(files.probabilities, maps.probabilities, affine, names, regions)
    if maps.entropy is not None:
        write_nifti(maps.entropy, affine, files.entropy)
    if maps.variance is not None:
        write_nifti(maps.variance, affine, files.variance)
    write_nifti(maps.labels, affine, files.labels)  # last: its presence means the case is complete


class RowTable:
    """A CSV table of one row per case that grows as cases finish.

    Each row is appended, flushed and fsynced as its case completes, so a crash keeps every finished row. Other
    processes (``--devices``, ``--shard`` runs into one folder) append to the same table: writers take an
    exclusive ``flock`` on a hidden lock file beside it. Reading drops a torn last line and keeps the last row
    of each case.
    """

    def __init__(self, path: Path, key: str = "case") -> None:
        self.path, self.key = Path(path), key
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the table's lock (exclusive across processes on this host and on lock-aware file systems)."""
        return flocked(self._lock_path)

    def rows(self) -> list[dict[str, str]]:
        """The complete rows, the last one of each case (no lock taken: call inside :meth:`locked` to be safe
        against concurrent rewrites)."""
        rows = [row for row in csv.DictReader(io.StringIO(self._complete_text(), newline=""))
                if None not in row.values() and None not in row]
        last = {row[self.key]: row for row in rows}
        return list(last.values())

    def _complete_text(self) -> str:
        """The file up to its last newline: a line torn by a kill while it was written is not part of it."""
        if not self.path.exists():
            return ""
        text = self.path.read_text()
        return text[: text.rfind("\n") + 1]

    def append(self, row: dict[str, Any]) -> None:
        """Add one row now (durably). A row with columns the file lacks rewrites the file with both sets."""
        with self.locked():
            columns = self._columns()
            if self.path.exists() and self._complete_text() != self.path.read_text():
                if columns is None:  # only a torn header: start afresh
                    self.path.unlink()
                else:  # drop the torn last row before appending after it
                    self._write(self.rows(), columns)
            if columns is not None and list(row) != columns:
                rows = self.rows()
                merged = columns + [c for c in row if c not in columns]
                self._write(rows + [row], merged)
                return
            new = columns is None
            with self.path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
                handle.flush()
                os.fsync(handle.fileno())

    def rewrite(self, keep: Callable[[dict[str, str]], bool] = lambda row: True,
                order: Callable[[dict[str, str]], Any] | None = None) -> None:
        """Rewrite the table atomically with the rows ``keep`` accepts, sorted by ``order`` (stable)."""
        with self.locked():
            columns = self._columns()
            if columns is None:
                return
            rows = [row for row in self.rows() if keep(row)]
            self._write(sorted(rows, key=order) if order else rows, columns)

    def _columns(self) -> list[str] | None:
        """The header of the complete part of the file (``None`` without one: a torn header is no header)."""
        text = self._complete_text()
        return next(csv.reader(io.StringIO(text, newline="")), None) if text else None

    def _write(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        write_csv(self.path, rows, columns)
