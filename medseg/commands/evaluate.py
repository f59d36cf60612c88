"""``medseg evaluate``: score a folder of predictions (or a predictions.csv) against references."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.commands.common import CommandError, doc, max_voxels_option


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg evaluate``."""
    parser = argparse.ArgumentParser(prog="medseg evaluate", description=doc("evaluate"))
    parser.add_argument("--pred", required=True, help="folder of <case>.nii.gz predictions, or predictions.csv")
    parser.add_argument("--truth", required=True, help="folder of reference label files, or a dataset.json")
    parser.add_argument("--output", required=True, help="folder for per_case.csv, summary.csv, summary.json")
    parser.add_argument("--labels", type=labels, default=None, metavar="1,2",
                        help="foreground label values to score in every case (default: a dataset.json's labels, "
                             "else every value the reference files hold)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="normalised surface Dice tolerance (mm)")
    parser.add_argument("--empty-distance", default="diagonal", metavar="diagonal|MM|nan",
                        help="hd95/assd of a missed or spurious structure: the image diagonal in mm (default), a "
                             "number of mm, or nan to leave such pairs out of the means (counted and warned)")
    parser.add_argument("--probabilities", default=None, metavar="DIR",
                        help="saved probabilities (medseg predict --save-probabilities; default PRED/probabilities "
                             "when it exists): adds ECE, Brier and NLL per case and class, and reliability.png")
    parser.add_argument("--both-empty", default="1", choices=("1", "nan"),
                        help="dice/iou/nsd of a structure absent from both masks: 1 (default), or nan to leave "
                             "such pairs out")
    parser.add_argument("--data-range", type=float, default=None, metavar="R",
                        help="enhancement: the intensity range of PSNR and SSIM (default 1 when every target lies in "
                             "[0, 1], else the targets' max - min; give the training config's data_range to match "
                             "val/psnr)")
    parser.add_argument("--patient-aggregate", choices=("mean", "max"), default=None,
                        help="classification and multitask: also score per patient (the dataset's 'patient' ids), "
                             "combining each patient's case probabilities by their mean or their maximum")
    max_voxels_option(parser)
    return parser


def run(argv: list[str]) -> int:
    """``medseg evaluate ARGS``; exit code 1 when a reference case has no prediction."""
    args = parser().parse_args(argv)
    from medseg.evaluation.classes import evaluate_classification
    from medseg.evaluation.evaluate import evaluate_segmentation
    from medseg.metrics.conventions import EmptyMaskRules

    pred = Path(args.pred)
    try:
        rules = EmptyMaskRules.parse(args.both_empty, args.empty_distance)
        task = truth_task(args.truth)
        if task == "enhancement":
            from medseg.evaluation.enhancement import evaluate_enhancement, report_enhancement

            return report_enhancement(evaluate_enhancement(pred, args.truth, args.output, data_range=args.data_range,
                                                           max_voxels=args.max_voxels), args.output)
        if task == "multitask":
            from medseg.evaluation.multitask import evaluate_multitask, report_multitask

            return report_multitask(evaluate_multitask(
                pred, args.truth, args.output, args.nsd_tolerance, rules, classes=args.labels,
                max_voxels=args.max_voxels, probabilities=args.probabilities,
                patient_aggregate=args.patient_aggregate), args.output)
        # A folder with predictions.csv and label maps (a multitask model's) is scored as the truth asks.
        if pred.suffix == ".csv" or (task == "classification" and (pred / "predictions.csv").is_file()):
            summary = evaluate_classification(pred, args.truth, args.output, patient_aggregate=args.patient_aggregate)
            return _report_classification(summary, args.output)
        if args.patient_aggregate:
            raise ValueError("--patient-aggregate scores image-level classes (classification or multitask "
                             "predictions); segmentation is scored per case")
        summary = evaluate_segmentation(args.pred, args.truth, args.output, args.nsd_tolerance, rules,
                                        classes=args.labels, max_voxels=args.max_voxels,
                                        probabilities=args.probabilities)
    except ValueError as err:
        raise CommandError(str(err)) from err
    fg, hits = summary["foreground_mean"], summary["conventions"]
    print(f"{summary['cases']} case(s): foreground mean Dice {fg['dice']:.4f}, HD95 {fg['hd95']:.2f} mm, "
          f"NSD {fg['nsd']:.4f}; tables in {args.output}")
    missed = hits["prediction_empty"] + hits["reference_empty"]
    if missed:
        print(f"  {hits['prediction_empty']} missed and {hits['reference_empty']} spurious structure(s): Dice 0, "
              f"HD95/ASSD {args.empty_distance}{'' if args.empty_distance == 'nan' else ' (penalty)'}")
    for metric, count in summary["left_out"].items():
        print(f"warning: {metric}: {count} case/class pair(s) are undefined (nan by request) and left out of its "
              "means", file=sys.stderr)
    for key in ("missing_predictions", "unmatched_predictions"):
        if summary[key]:
            print(f"  {key.replace('_', ' ')}: {', '.join(summary[key])}", file=sys.stderr)
    undeclared = summary["undeclared_labels"]
    if undeclared["cases"]:
        print(f"  undeclared label values: {undeclared['voxels']} voxel(s) in {undeclared['cases']} case(s) "
              "(summary.json: undeclared_labels)", file=sys.stderr)
    return 1 if summary["missing_predictions"] else 0


def truth_task(truth: str) -> str:
    """The task of the references: a dataset description's, else ``segmentation`` (a folder of label files)."""
    from medseg.data.datalist import find_description, load_dataset

    path = Path(truth)
    if path.is_dir() and not any((path / name).is_file() for name in ("dataset.json", "dataset.csv")):
        return "segmentation"
    return load_dataset(find_description(path)).task


def labels(text: str) -> list[int]:
    """Foreground label values written ``1,2,3``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give foreground label values > 0, e.g. 1,2")
    return sorted(set(values))


def _report_classification(summary: dict, output: str) -> int:
    print(f"{summary['cases']} case(s): accuracy {summary['accuracy']:.4f}, AUC {summary['auc']:.4f}, "
          f"macro F1 {summary['f1_macro']:.4f}, ECE {summary['ece']:.4f}; tables and plots in {output}")
    if summary.get("patients"):
        from medseg.evaluation.patients import patient_line

        print(patient_line(summary["patients"], "patients.csv"))
    for key in ("missing_predictions", "unmatched_predictions"):
        if summary[key]:
            print(f"  {key.replace('_', ' ')}: {', '.join(summary[key])}", file=sys.stderr)
    return 1 if summary["missing_predictions"] else 0
