"""``medseg benchmark``: cross-validate several configs on the same splits and compare them in one report."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from medseg.data.datalist import SEGMENTATION
from medseg.data.io import write_csv
from medseg.evaluation import report
from medseg.evaluation.crossval import dataset_of, run_cv
from medseg.evaluation.splits import load_or_make_splits


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
    columns = ["model", "metric", "mean", "std", "ci_low", "ci_high", "best", "wilcoxon_p", "parameters",
               "train_seconds", "predict_seconds_per_case"]
    write_csv(output / "results.csv", rows, columns)
    images = [report.box_plots(tables, metrics, output / "boxplots.png"),
              report.training_curves({n: list(r["log_dirs"].values()) for n, r in runs.items()},
                                     output / "training_curves.png")]
    if spec.task == SEGMENTATION:
        best = next(r["best"] for r in rows if r["metric"] == "dice")
        images.append(report.overlay_montage(spec, output / best, tables[best], output / "montage.png",
                                             max_voxels=runs[best]["max_voxels"]))
    else:
        images.append(_roc_of_models(spec, output, names))
    tables_md = [
        "## Results (pooled out-of-fold, mean over cases; 95% bootstrap CI; Wilcoxon signed-rank vs the best)",
        report.markdown_table(rows, columns),
        f"{len(configs)} models, {strategy} {folds} folds on `{spec.source}`; overrides: `{' '.join(overrides)}`",
    ]
    report.write_reports(output, "medseg benchmark", tables_md, images)
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
                                 max_voxels=run["max_voxels"])
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
