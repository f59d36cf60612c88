"""The cases stage of ``medseg predict``: what runs now, what an earlier run finished, which table grows.

Discovery (a folder, a ``dataset.json``, a shard of either) is :mod:`medseg.data.discovery`. Here: a segmentation
case is finished when its label map and every side file asked for exist (and its ``uncertainty.csv`` row, with
``--save-uncertainty``); a classification case when ``predictions.csv`` holds its row; a multitask case when it
has both, its label map and its ``predictions.csv`` row. Finished cases are refused without ``--overwrite`` (redo
them) or ``--resume`` (skip them); rows of cases that are not in this run's input are kept and never block it.
"""

from __future__ import annotations

from typing import Any

from medseg.inference.writers import CaseFiles, RowTable


def case_table(task: str, options: Any) -> RowTable | None:
    """The table this run grows: ``predictions.csv`` (classification, and the image-level classes of a
    multitask model), ``uncertainty.csv`` (segmentation with ``--save-uncertainty``), or none."""
    if task in ("classification", "multitask"):
        return RowTable(options.output / "predictions.csv")
    return RowTable(options.output / "uncertainty.csv") if options.save_uncertainty else None


def pending_cases(
    task: str, cases: list[dict[str, Any]], options: Any, table: RowTable | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Split ``cases`` into those to predict now and the ids of finished ones to skip.

    Nothing is removed here: with ``overwrite`` each case's old files go just before it is predicted again
    (so no new file sits beside an old label map), and a table row is superseded by the case's next row.

    Raises:
        FileExistsError: finished cases exist and neither ``overwrite`` nor ``resume`` was asked for.
    """
    ids = {case["id"] for case in cases}
    rows = {row["case"] for row in table.rows()} if table is not None else None
    if task == "classification":
        done = ids & (rows or set())
    else:  # a case with its files but without its row (written first) is not finished
        done = {case["id"] for case in cases if _complete(case["id"], options) and (rows is None or case["id"] in rows)}
    if options.overwrite:
        done = set()
    elif done and not options.resume:
        raise FileExistsError(
            f"{options.output}: {len(done)} case(s) already predicted (e.g. {sorted(done)[0]}); "
            "use --overwrite to redo them or --resume to skip them"
        )
    todo = [case for case in cases if case["id"] not in done]
    return todo, [case["id"] for case in cases if case["id"] in done]


def finish_table(table: RowTable | None, task: str, cases: list[dict[str, Any]], failed: set[str]) -> None:
    """Rewrite the table once the run ends: one row per case, none for the cases that failed in this run;
    classification rows in case order (rows of other inputs after them), uncertainty rows by doubt, highest
    first."""
    if table is None:
        return
    if task in ("classification", "multitask"):
        order = {case["id"]: i for i, case in enumerate(cases)}
        table.rewrite(keep=lambda row: row["case"] not in failed, order=lambda row: order.get(row["case"], len(order)))
    else:
        table.rewrite(keep=lambda row: row["case"] not in failed, order=lambda row: -float(row["doubt"] or 0))


def _complete(case: str, options: Any) -> bool:
    files = CaseFiles.of(case, options.output)
    wanted = [files.labels] + [files.probabilities] * options.save_probabilities + [files.entropy] * options.save_uncertainty
    wanted += [files.dicom_seg] * (getattr(options, "output_format", "nifti") == "dicom-seg")
    return all(path.exists() for path in wanted)
