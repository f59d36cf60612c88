"""``report.html``/``report.md`` of ``medseg benchmark``: gathers what the runs wrote (per-class summaries, the
empty-mask counts, calibration curves, predictions), draws the figures, and renders the report templates."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.data.datalist import SEGMENTATION, DatasetSpec
from medseg.evaluation import plots, report, report_sections
from medseg.evaluation import report_format as fmt
from medseg.evaluation.report_sections import Figure, Table

CLASS_METRICS = ("dice", "nsd", "hd95", "assd", "area_diff_mm2", "volume_diff_ml")
CLASSIFICATION_CLASS_NOTE = ("Accuracy among the cases of each true class, i.e. its sensitivity (recall); mean ± "
                             "std over those cases, n counts them.")
SEGMENTATION_CLASS_NOTE = ("Each structure of the dataset (label names from its dataset.json), scored on every "
                           "case, pooled out-of-fold; mean ± std over the cases with a value, n counts them; the "
                           "best value of each column in bold.")


@dataclass
class Settings:
    """How the benchmark ran (shown in the report's facts)."""

    strategy: str = "kfold"
    folds: int = 5
    seed: int = 0
    overrides: list[str] = field(default_factory=list)


def structure_names(spec: DatasetSpec, keys: list[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """``key -> shown name`` of the structures a summary scores: ``"tumour (label 1)"`` for a label value, and
    ``"core (labels 2, 3)"`` for a region. The dataset's label names come first; ``given`` names
    (``summary.json``'s ``name``) stand in for the labels the dataset does not name."""
    regions = {name: values for name, values in spec.regions or []}
    out = {}
    for key in keys:
        if key in regions:
            values = regions[key]
            out[key] = f"{key} (label{'s' if len(values) > 1 else ''} {', '.join(str(v) for v in values)})"
        elif str(key).lstrip("-").isdigit():
            name = spec.labels.get(int(key)) or (given or {}).get(key) or str(key)
            out[key] = f"{name} (label {key})"
        else:
            out[key] = (given or {}).get(key, str(key))
    return out


def write_benchmark_report(spec: DatasetSpec, output: Path, runs: dict[str, dict[str, Any]],
                           tables: dict[str, dict[str, dict[str, float]]], rows: list[dict[str, Any]],
                           settings: Settings) -> None:
    """Draw the figures and write ``report.html``/``report.md`` of one benchmark into ``output``.

    Args:
        spec: the dataset.
        output: the benchmark's folder (one sub-folder per model).
        runs: ``model -> run_cv result``.
        tables: ``model -> case -> metric -> value`` (:func:`medseg.evaluation.report.per_case_table`).
        rows: the rows of ``results.csv`` (fold-ensemble rows included).
        settings: how the benchmark ran.
    """
    names = list(runs)
    best_dice = next((r["best"] for r in rows if r["metric"] == "dice" and r.get("best") in runs), names[0])
    figures = _figures(spec, output, runs, tables, best_dice)
    if spec.task == SEGMENTATION:
        summaries = {n: json.loads((output / n / "summary.json").read_text()) for n in names}
        sections, note = _segmentation_classes(spec, summaries), SEGMENTATION_CLASS_NOTE
        given = next((s["rules"] for s in summaries.values() if s.get("rules")), None)
        conventions = conventions_section(given, {n: s.get("conventions", {}) for n, s in summaries.items()})
    else:
        sections, note, conventions = _classification_classes(spec, tables), CLASSIFICATION_CLASS_NOTE, None
    context = benchmark_context(spec.task, str(spec.source), runs, tables, rows, settings, figures,
                                sections, note, conventions)
    report.write_reports(output, "benchmark", context)


def benchmark_context(task: str, source: str, runs: dict[str, dict[str, Any]],
                      tables: dict[str, dict[str, dict[str, float]]], rows: list[dict[str, Any]],
                      settings: Settings, figures: list[Figure], class_sections: list[Any] | None = None,
                      class_note: str = "", conventions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The variables of the ``benchmark`` templates, from numbers only (no file is read).

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        source: the dataset's description file.
        runs: ``model -> {"parameters", "train_seconds", "predict_seconds_per_case"}`` (``run_cv`` results).
        tables: ``model -> case -> metric -> value``.
        rows: ``results.csv`` rows (:func:`medseg.evaluation.report.compare`; fold-ensemble rows too).
        settings: how the benchmark ran.
        figures: the figures, in order.
        class_sections: per-class tables (:func:`medseg.evaluation.report_sections.class_sections`).
        class_note: what the per-class tables show.
        conventions: :func:`conventions_section` (segmentation), or ``None``.
    """
    names = list(runs)
    metrics = report.SEG_METRICS if task == SEGMENTATION else report.CLS_METRICS
    compared = [r for r in rows if r["model"] in runs]
    cases = sorted(set.intersection(*(set(t) for t in tables.values())))
    counts = {m: {x: sum(not math.isnan(t[c][m]) for c in cases) for x, t in tables.items()} for m in metrics}
    found = report_sections.findings(compared, list(metrics), names)
    wins = {x: [f.metric.name for f in found if f.best == x] for x in names}
    dataset = Path(source).parent.name or source
    return {
        "title": "medseg benchmark",
        "subtitle": f"{len(names)} model{'s' if len(names) != 1 else ''}, {settings.folds}-fold cross-validation ({settings.strategy}) on "
                    f"{len(cases):,} cases of the dataset {dataset}",
        "toc": [("summary", "Summary"), ("results", "Results by metric"), ("per-class", "Per-class results"),
                ("resources", "Model size and run time"), ("statistics", "Statistics"),
                *([("conventions", "Metric conventions")] if conventions else []), ("figures", "Figures")],
        "facts": [("Dataset", source), ("Task", task), ("Cases (n)", f"{len(cases):,} (pooled out-of-fold)"),
                  ("Models", ", ".join(names)),
                  ("Cross-validation", f"{settings.strategy}, {settings.folds} folds, seed {settings.seed}; the "
                                       "same splits for every model"),
                  ("Overrides", " ".join(settings.overrides) or "none")],
        "n_cases": f"{len(cases):,}", "n_metrics": len(metrics),
        "lead": found[0] if found else None,
        "wins": [(x, w) for x, w in wins.items() if w] if len(names) > 1 else [],
        "findings": report_sections.findings_table(found),
        "metric_sections": report_sections.metric_sections(compared, list(metrics), names, counts),
        "class_sections": list(class_sections or []), "class_note": class_note,
        "resources": report_sections.resources_table(runs, settings.folds),
        "ensemble": report_sections.ensemble_table([r for r in rows if r["model"] not in runs]),
        "statistics": report.statistics_paragraphs(metrics, len(cases), settings.folds, len(names), task),
        "conventions": None, "convention_counts": None, "conventions_note": "",
        **(conventions or {}),
        "figures": figures,
    }


def _segmentation_classes(spec: DatasetSpec, summaries: dict[str, dict[str, Any]]) -> list[Any]:
    """Per-class tables from each model's ``summary.json`` ``per_class``, named by the dataset's labels."""
    per_class = {name: summary.get("per_class", {}) for name, summary in summaries.items()}
    given = {k: v["name"] for classes in per_class.values() for k, v in classes.items()
             if isinstance(v.get("name"), str)}
    keys = list(dict.fromkeys(k for classes in per_class.values() for k in classes))
    return report_sections.class_sections(per_class, structure_names(spec, keys, given), list(CLASS_METRICS))


def _classification_classes(spec: DatasetSpec, tables: dict[str, dict[str, dict[str, float]]]) -> list[Any]:
    """Per-class tables of a classification benchmark: the accuracy among the cases of each true class."""
    truth = {c["id"]: c["label"] for c in spec.training}
    per_class: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        per_class[name] = {}
        for k, label in enumerate(spec.label_names):
            values = [row["correct"] for case, row in table.items() if truth.get(case) == k]
            if values:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                per_class[name][label] = {"correct": {"mean": mean, "std": std, "n": len(values)}}
    shown = {label: f"{label} (class {k})" for k, label in enumerate(spec.label_names)}
    return report_sections.class_sections(per_class, shown, ["correct"])


def conventions_section(rules: dict[str, Any] | None, hits: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The metric conventions table (the rules the runs used) and how often each model met them.

    Args:
        rules: ``summary.json``'s ``rules`` (``both_empty``, ``distance_penalty``); ``None``: the defaults.
        hits: ``model -> summary.json's conventions`` (``prediction_empty``, ``reference_empty``, ``both_empty``).
    """
    from medseg.metrics.conventions import EmptyMaskRules, conventions_markdown

    used = None
    if rules:
        both = float("nan") if rules.get("both_empty") is None else float(rules["both_empty"])
        used = EmptyMaskRules(both, rules.get("distance_penalty", "diagonal"))
    table = report_sections.markdown_table(
        conventions_markdown(used), "What each metric gives when a structure is absent from one or both masks "
        "(Metrics Reloaded).")
    counts = [[name, *(fmt.integer(h.get(k, 0)) for k in ("prediction_empty", "reference_empty", "both_empty"))]
              for name, h in hits.items()]
    missed = Table(["Model", "Missed structures", "Spurious structures", "Absent from both"], counts,
                   "Case/structure pairs (pooled out-of-fold) that met each rule: missed = in the reference only; "
                   "spurious = in the prediction only.")
    note = ("Following Metrics Reloaded (Maier-Hein et al., Nature Methods 2024), every metric states what it "
            "gives when the reference or the prediction holds no voxel of a structure; the same rules pick "
            "the checkpoints during training and score the cases here.")
    return {"conventions": table, "convention_counts": missed, "conventions_note": note}


def _figures(spec: DatasetSpec, output: Path, runs: dict[str, dict[str, Any]],
             tables: dict[str, dict[str, dict[str, float]]], best: str) -> list[Figure]:
    """Draw the report's figures into ``output``, each with its title and caption."""
    names = list(runs)
    metrics = report.SEG_METRICS if spec.task == SEGMENTATION else report.CLS_METRICS
    log_dirs = {n: list(r["log_dirs"].values()) for n, r in runs.items()}
    folds = max((len(d) for d in log_dirs.values()), default=0)
    figures = [
        Figure(plots.box_plots(tables, metrics, output / "boxplots.png"), "Per-case values by model",
               "One panel per metric, with its unit on the y axis and its better direction (↑ higher, ↓ lower) "
               "in the title. Box: quartiles and median (orange line), whiskers to 1.5 × the interquartile "
               "range; dots: the individual cases, pooled out-of-fold."),
        Figure(plots.training_curves(log_dirs, output / "training_curves.png"), "Training curves",
               f"Loss per epoch, the mean over the {folds} folds of each model: training (solid line, circles) "
               "and validation (dashed line, squares, at the epochs validation ran); validation Dice on the "
               "right when logged."),
        Figure(_reliability_of_models(spec, output, names), "Calibration (reliability diagram)",
               ("Observed frequency of each structure against the mean predicted probability per bin, per model "
                "and structure, all voxels of the pooled out-of-fold predictions"
                if spec.task == SEGMENTATION else
                "Accuracy against the confidence of the predicted class per bin, per model, all cases pooled "
                "out-of-fold") + "; dashed diagonal: perfect calibration; below: the count per bin (log scale); "
                "ECE in the legend."),
    ]
    if spec.task == SEGMENTATION:
        figures.append(Figure(
            plots.overlay_montage(spec, output / best, tables[best], output / "montage.png",
                                  max_voxels=runs[best]["max_voxels"], model=best),
            f"Best and worst cases of {best}",
            f"Model {best} (the best by mean Dice): its two best and two worst cases by Dice"
            + (", each on the slice with the most reference foreground" if _is_3d(spec) else "")
            + ". Green: outline of the reference; red: outline of the model's pooled out-of-fold prediction; "
            "yellow: where the two outlines coincide."))
    else:
        figures.append(Figure(_roc_of_models(spec, output, names), "ROC curves",
                              f"{spec.label_names[-1]} against the other classes, per model, all cases pooled "
                              "out-of-fold; dashed diagonal: chance."))
    return figures


def _is_3d(spec: DatasetSpec) -> bool:
    from medseg.data.io import read_image

    return bool(spec.training) and read_image(spec.training[0]["label"])[0].ndim == 3


def _reliability_of_models(spec: DatasetSpec, output: Path, names: list[str]) -> Path:
    """Each model's pooled out-of-fold reliability: per class (segmentation, all voxels), or top-label
    (classification, all cases)."""
    curves = {}
    for name in names:
        if spec.task == SEGMENTATION:
            calibration = json.loads((output / name / "summary.json").read_text()).get("calibration", {})
            shown = structure_names(spec, list(calibration.get("curves", {})))
            for structure, curve in calibration.get("curves", {}).items():
                ece = calibration["pooled"][structure]["ece"]
                curves[f"{name}, {shown[structure]} (ECE {ece:.3f})"] = curve
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
    title = ("Reliability per structure (all voxels)" if spec.task == SEGMENTATION
             else "Reliability (top label)")
    return plots.reliability_lines(curves, output / "reliability.png", title)


def _roc_of_models(spec: DatasetSpec, output: Path, names: list[str]) -> Path:
    """One ROC curve per model: the last class against the others, from the pooled out-of-fold predictions."""
    import numpy as np

    truth = {c["id"]: c["label"] for c in spec.training}
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in names:
        with (output / name / "predictions" / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        positive = np.array([truth[r["case"]] == len(spec.label_names) - 1 for r in rows])
        scores = np.array([float(r[f"p_{spec.label_names[-1]}"]) for r in rows])
        fpr, tpr = plots.roc_points(positive, scores)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({spec.label_names[-1]} vs rest)")
    ax.legend(loc="lower right")
    return plots.save_figure(fig, output / "roc.png")
