"""``medseg benchmark``: cross-validate several configs on the same splits and compare them in one report."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from medseg.data.datalist import SEGMENTATION, load_dataset
from medseg.data.io import write_csv
from medseg.evaluation import ranking, report
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
    runs = {}
    for name, config in zip(names, configs, strict=True):
        (output / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared, output / name / "splits.json")  # every model sees the same folds
        runs[name] = run_cv(config, output / name, folds, strategy, seed=seed, overrides=overrides)
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
    images = [report.box_plots(tables, metrics, output / "boxplots.png"),
              report.training_curves({n: list(r["log_dirs"].values()) for n, r in runs.items()},
                                     output / "training_curves.png")]
    images.append(_reliability_of_models(spec, output, names))
    if spec.task == SEGMENTATION:
        best = next(r["best"] for r in rows if r["metric"] == "dice")
        images.append(report.overlay_montage(spec, output / best, tables[best], output / "montage.png",
                                             max_voxels=runs[best]["max_voxels"]))
    else:
        images.append(_roc_of_models(spec, output, names))
    tables_md = [
        "## Results (pooled out-of-fold, mean over cases; 95% bootstrap CI; Wilcoxon signed-rank vs the best, "
        "Holm-adjusted; rank-biserial effect size)",
        report.markdown_table(rows, columns),
        f"{len(configs)} models, {strategy} {folds} folds on `{spec.source}`; overrides: `{' '.join(overrides)}`",
        "## Statistics",
        report.statistics_note(metrics),
        *(_conventions_md(output, names) if spec.task == SEGMENTATION else []),
    ]
    report.write_reports(output, "medseg benchmark", tables_md, images)
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
    label = "accuracy" if primary == "correct" else primary
    tables_md = [
        f"## {label} per dataset (mean over cases ± half-width of the 95% bootstrap CI; mean rank over datasets)",
        report.markdown_table([r for r in rows if r["table"] == ranking.VALUE_TABLE],
                              ["model", *names, ranking.MEAN_RANK]),
        "## Mean rank per metric",
        report.markdown_table(ranking.mean_rank_by_metric(results, models, metrics), ["model", *metrics]),
        f"Rank 1 = best on a dataset (highest mean; lowest for "
        f"{', '.join(m for m, h in metrics.items() if not h)}); tied models share the average rank; a model "
        f"without a value ranks last. Mean rank: the average over the {len(names)} datasets. "
        f"{len(configs)} models, {strategy} {folds} folds; overrides: `{' '.join(overrides)}`. "
        "Per-dataset ranks: `results_by_dataset.csv`.",
        "## Datasets",
        report.markdown_table([{"dataset": f"[{n}]({n}/report.html)", "source": f"`{d}`"}
                               for n, d in zip(names, datasets, strict=True)], ["dataset", "source"]),
    ]
    report.write_reports(output, "medseg benchmark across datasets", tables_md, [])
    return rows


def _fold_ensemble_rows(spec: Any, runs: dict[str, dict[str, Any]], output: Path) -> list[dict[str, Any]]:
    """Each model's folds as one ensemble on the labelled ``test`` cases (none: no such rows)."""
    from medseg.evaluation.evaluate import evaluate_classification, evaluate_segmentation
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
                                            max_voxels=run["max_voxels"])
            values = {m: summary["foreground_mean"][m] for m in report.SEG_METRICS}
        else:
            summary = evaluate_classification(folder / "predictions", spec.source, folder)
            values = {m: summary[m] for m in ("accuracy", "auc", "brier", "nll")}
        rows += [{"model": f"{name} (fold ensemble, {len(test)} test cases)", "metric": m, "mean": v,
                  "parameters": run["parameters"]} for m, v in values.items()]
    return rows


def _conventions_md(output: Path, names: list[str]) -> list[str]:
    """The report's "Metric conventions" section: the rules, and how many structures each model missed."""
    import json

    from medseg.metrics.conventions import conventions_markdown

    counts = []
    for name in names:
        summary = json.loads((output / name / "summary.json").read_text())
        hits = summary["conventions"]
        counts.append({"model": name, "missed structures": hits["prediction_empty"],
                       "spurious structures": hits["reference_empty"], "absent from both": hits["both_empty"]})
    columns = ["model", "missed structures", "spurious structures", "absent from both"]
    return ["## Metric conventions", conventions_markdown(),
            "Case/structure pairs that met each rule (pooled out-of-fold):", report.markdown_table(counts, columns)]


def _reliability_of_models(spec: Any, output: Path, names: list[str]) -> Path:
    """Each model's pooled out-of-fold reliability: per class (segmentation, all voxels), or top-label
    (classification, all cases)."""
    import json

    from medseg.evaluation.plots import reliability_lines

    curves = {}
    for name in names:
        if spec.task == SEGMENTATION:
            calibration = json.loads((output / name / "summary.json").read_text()).get("calibration", {})
            for structure, curve in calibration.get("curves", {}).items():
                ece = calibration["pooled"][structure]["ece"]
                curves[f"{name} {structure} (ECE {ece:.3f})"] = curve
        else:
            import numpy as np

            from medseg.metrics.calibration import MulticlassCalibration

            truth = {c["id"]: c["label"] for c in spec.training}
            with (output / name / "predictions" / "predictions.csv").open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            p = np.array([[float(r[f"p_{n}"]) for n in spec.label_names] for r in rows])
            accumulator = MulticlassCalibration(len(spec.label_names))
            accumulator.update(p, np.array([truth[r["case"]] for r in rows]), channel_axis=1)
            curves[f"{name} (ECE {accumulator.result()['ece']:.3f})"] = accumulator.curve()
    title = "reliability, per class (all voxels)" if spec.task == SEGMENTATION else "reliability (top label)"
    return reliability_lines(curves, output / "reliability.png", title)


def _roc_of_models(spec: Any, output: Path, names: list[str]) -> Path:
    import numpy as np

    from medseg.evaluation.plots import pyplot, roc_points, save_figure

    truth = {c["id"]: c["label"] for c in spec.training}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in names:
        with (output / name / "predictions" / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        positive = np.array([truth[r["case"]] == len(spec.label_names) - 1 for r in rows])
        scores = np.array([float(r[f"p_{spec.label_names[-1]}"]) for r in rows])
        fpr, tpr = roc_points(positive, scores)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({spec.label_names[-1]} vs rest)")
    ax.legend(loc="lower right")
    return save_figure(fig, output / "roc.png")
