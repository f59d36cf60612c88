"""``medseg benchmark``: cross-validate several configs on the same splits and compare them in one report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medseg.data.datalist import SEGMENTATION, load_dataset
from medseg.data.io import write_csv
from medseg.evaluation import ranking, report
from medseg.evaluation.benchmark_report import Settings, write_benchmark_report
from medseg.evaluation.crossval import dataset_of, run_cv
from medseg.evaluation.splits import load_or_make_splits

RESULT_COLUMNS = ["model", "metric", "mean", "std", "ci_low", "ci_high", "best", "wilcoxon_p", "p_holm",
                  "effect_rbc", "median_diff"]


def run_benchmark(
    configs: list[str | Path],
    output: str | Path,
    folds: int = 5,
    strategy: str = "kfold",
    seed: int = 0,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``medseg cv`` for each config on one shared ``splits.json``, then write ``results.csv``,
    ``report.md``/``report.html`` and the plots into ``output``. Returns the rows of ``results.csv``."""
    output, overrides = Path(output), list(overrides or [])
    names = [Path(c).stem for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs must have distinct file names (they name the models): {names}")
    spec = dataset_of(configs[0], overrides)
    shared = output / "splits.json"
    load_or_make_splits(shared, spec.training, strategy=strategy, folds=folds, seed=seed)
    from medseg.progress import CvProgress

    runs, progress = {}, CvProgress(names, title="medseg benchmark")  # model i/N, fold k/F, epoch e/E; time left
    for name, config in zip(names, configs, strict=True):
        (output / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared, output / name / "splits.json")  # every model sees the same folds
        runs[name] = run_cv(config, output / name, folds, strategy, seed=seed, overrides=overrides,
                            progress=progress)
    metrics = report.SEG_METRICS if spec.task == SEGMENTATION else report.CLS_METRICS
    tables = {name: report.per_case_table(spec, output / name) for name in names}
    rows = report.compare(tables, metrics)
    for row in rows:
        run = runs[row["model"]]
        row.update(parameters=run["parameters"], train_seconds=round(run["train_seconds"], 2),
                   predict_seconds_per_case=round(run["predict_seconds_per_case"], 4))
    rows += _fold_ensemble_rows(spec, runs, output)
    columns = [*RESULT_COLUMNS, "parameters", "train_seconds", "predict_seconds_per_case"]
    write_csv(output / "results.csv", rows, columns)
    write_benchmark_report(spec, output, runs, tables, rows, Settings(strategy, folds, seed, overrides))
    return rows


def dataset_names(datasets: list[str | Path]) -> list[str]:
    """The name of each dataset: its folder's name (for a ``dataset.json``/``dataset.csv`` file, the name of the
    folder holding it).

    Raises:
        ValueError: two datasets share a name (naming them), or a name is a column of ``results_by_dataset.csv``.
    """
    paths = [Path(d).resolve() for d in datasets]
    names = [p.parent.name if p.is_file() or p.suffix.lower() in (".json", ".csv") else p.name for p in paths]
    duplicates = {n: [str(d) for d, m in zip(datasets, names, strict=True) if m == n]
                  for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError("datasets must have distinct folder names (they name the output folders): "
                         + "; ".join(f"{n!r} from {', '.join(ds)}" for n, ds in duplicates.items()))
    reserved = [n for n in names if n in ranking.RESERVED_COLUMNS or not n]
    if reserved:
        raise ValueError(f"dataset folder names {reserved} cannot name a column of results_by_dataset.csv")
    return names


def run_dataset_benchmark(
    configs: list[str | Path],
    datasets: list[str | Path],
    output: str | Path,
    folds: int = 5,
    strategy: str = "kfold",
    seed: int = 0,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_benchmark` of the same configs on each dataset, then the models compared across datasets.

    Each dataset is benchmarked into ``output/<dataset name>/`` (see :func:`dataset_names`) with
    ``--data.root <dataset>`` added to the overrides. ``output/results_by_dataset.csv`` then holds the models ×
    datasets table of the primary metric (dice, or ``correct`` i.e. accuracy for classification; cells
    ``mean ± half-width of the 95% bootstrap CI``) and a rank table of every metric, each with the models' mean
    rank over the datasets; ``output/report.md``/``report.html`` show the first and the mean ranks.

    Args:
        configs: the models' configs (named by their file names).
        datasets: dataset folders or description files (``dataset.json``/``dataset.csv``).
        output: folder for everything.
        folds: cross-validation folds.
        strategy: split strategy (``medseg.evaluation.splits.STRATEGIES``).
        seed: seed of the splits and of training.
        overrides: ``medseg fit`` arguments for every config, dataset and fold (not ``--data.root``).

    Returns:
        The rows of ``results_by_dataset.csv``.

    Raises:
        ValueError: duplicate dataset names, a ``--data.root`` override, or datasets of different tasks.
    """
    output, overrides = Path(output), list(overrides or [])
    if any(a == "--data.root" or a.startswith("--data.root=") for a in overrides):
        raise ValueError("--datasets gives each run its --data.root: leave --data.root out")
    names = dataset_names(datasets)
    tasks = {name: load_dataset(d).task for name, d in zip(names, datasets, strict=True)}  # fail before training
    if len(set(tasks.values())) > 1:
        raise ValueError(f"the datasets must share one task: {tasks}")
    task = next(iter(tasks.values()))
    results = {name: run_benchmark(configs, output / name, folds, strategy, seed,
                                   [*overrides, "--data.root", str(dataset)])
               for name, dataset in zip(names, datasets, strict=True)}
    models = [Path(c).stem for c in configs]
    metrics = report.SEG_METRICS if task == SEGMENTATION else report.CLS_METRICS
    primary = ranking.primary_metric(task)
    rows = ranking.by_dataset_rows(results, models, metrics, primary)
    write_csv(output / "results_by_dataset.csv", rows, ["metric", "table", "model", *names, ranking.MEAN_RANK])
    facts = [("Datasets", " ".join(str(d) for d in datasets)), ("Models", ", ".join(models)),
             ("Cross-validation", f"{strategy}, {folds} folds, seed {seed}; the same splits for every model"),
             ("Overrides", " ".join(overrides) or "none")]
    sources = {n: str(d) for n, d in zip(names, datasets, strict=True)}
    report.write_reports(output, "datasets", ranking.datasets_context(results, models, metrics, primary, sources,
                                                                      facts))
    return rows


def _fold_ensemble_rows(spec: Any, runs: dict[str, dict[str, Any]], output: Path) -> list[dict[str, Any]]:
    """Each model's folds as one ensemble on the labelled ``test`` cases (none: no such rows)."""
    from medseg.evaluation.classes import evaluate_classification
    from medseg.evaluation.evaluate import evaluate_segmentation
    from medseg.inference.batch import PredictOptions, predict_batch

    test = [c for c in spec.test if c["label"] is not None]
    if not test:
        return []
    rows = []
    for name, run in runs.items():
        folder = output / name / "fold_ensemble_test"
        options = PredictOptions(output=folder / "predictions", overwrite=True, device=run.get("device", "auto"),
                                 max_voxels=run["max_voxels"], save_probabilities=spec.task == SEGMENTATION)
        predict_batch(list(run["checkpoints"].values()), None, options,
                      cases=[{"id": c["id"], "image": c["image"]} for c in test])
        if spec.task == SEGMENTATION:
            regions = {name: list(values) for name, values in spec.regions} if spec.regions else None
            summary = evaluate_segmentation(folder / "predictions", {c["id"]: c["label"] for c in test}, folder,
                                            classes=[k for k in spec.labels if k > 0], regions=regions,
                                            max_voxels=run["max_voxels"], names=dict(spec.labels))
            values = {m: summary["foreground_mean"][m] for m in report.SEG_METRICS}
        else:
            summary = evaluate_classification(folder / "predictions", spec.source, folder)
            values = {m: summary[m] for m in ("accuracy", "auc", "brier", "nll")}
        rows += [{"model": f"{name} (fold ensemble, {len(test)} test cases)", "metric": m, "mean": v,
                  "parameters": run["parameters"]} for m, v in values.items()]
    return rows
