"""The cases stage of ``medseg predict``: what runs now, what an earlier run finished, which table grows.

Discovery (a folder, a ``dataset.json``, a shard of either) is :mod:`medseg.data.discovery`. Here: a segmentation
case is finished when its label map and every side file asked for exist; a classification case when
``predictions.csv`` holds its row. Finished cases are refused without ``--overwrite`` (redo them) or ``--resume``
(skip them); rows of cases that are not in this run's input are kept and never block it.
"""

from __future__ import annotations

from typing import Any

from medseg.inference.writers import CaseFiles, RowTable


def case_table(task: str, options: Any) -> RowTable | None:
    """The table this run grows: ``predictions.csv`` (classification), ``uncertainty.csv`` (segmentation with
    ``--save-uncertainty``), or none."""
    if task == "classification":
        return RowTable(options.output / "predictions.csv")
    return RowTable(options.output / "uncertainty.csv") if options.save_uncertainty else None


def pending_cases(
    task: str, cases: list[dict[str, Any]], options: Any, table: RowTable | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Split ``cases`` into those to predict now and the ids of finished ones to skip.

    Raises:
        FileExistsError: finished cases exist and neither ``overwrite`` nor ``resume`` was asked for.
    """
    ids = {case["id"] for case in cases}
    if task == "classification":
        done = {row["case"] for row in (table.rows() if table else []) if row["case"] in ids}
    else:
        done = {case["id"] for case in cases if _complete(case["id"], options)}
    if options.overwrite:
        done = set()
    elif done and not options.resume:
        raise FileExistsError(
            f"{options.output}: {len(done)} case(s) already predicted (e.g. {sorted(done)[0]}); "
            "use --overwrite to redo them or --resume to skip them"
        )
    if table is not None:  # rows of the cases redone now go; the others stay
        table.rewrite(keep=lambda row: row["case"] not in ids or row["case"] in done)
    todo = [case for case in cases if case["id"] not in done]
    return todo, [case["id"] for case in cases if case["id"] in done]


def finish_table(table: RowTable | None, task: str, cases: list[dict[str, Any]]) -> None:
    """Sort the table once the run ends: classification rows in case order (rows of other inputs after them),
    uncertainty rows by doubt, highest first."""
    if table is None:
        return
    if task == "classification":
        order = {case["id"]: i for i, case in enumerate(cases)}
        table.rewrite(order=lambda row: order.get(row["case"], len(order)))
    else:
        table.rewrite(order=lambda row: -float(row["doubt"]))


def _complete(case: str, options: Any) -> bool:
    files = CaseFiles.of(case, options.output)
    wanted = [files.labels] + [files.probabilities] * options.save_probabilities + [files.entropy] * options.save_uncertainty
    return all(path.exists() for path in wanted)
