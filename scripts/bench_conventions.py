"""Side by side: what the metric conventions of issue 12 changed in a benchmark's reported numbers.

Compares two ``medseg benchmark`` output folders of the same configs, seed and overrides, one run with the code
before the change (4689ce6: ``val/dice`` with MONAI's ``ignore_empty``, HD95/ASSD of a missed or spurious
structure NaN and dropped from the means, ``evaluate`` on a folder of labels scoring only the classes present
per case) and one with the code after it (ce9f06c: spurious structures score Dice 0 at checkpoint selection, the
image diagonal in mm as HD95/ASSD of a missed or spurious structure, every case scored on the same classes,
plus calibration, Holm-adjusted p and rank-biserial effect sizes). Optionally also pairs of ``medseg evaluate``
outputs (before, after) of one prediction folder. Prints:

1. per model x metric: the pooled out-of-fold mean (``results.csv``) before, after and the difference, with the
   Wilcoxon p before/after and the after-only ``p_holm`` and ``effect_rbc``;
2. per model x class: Dice/HD95/ASSD means with the number of pairs averaged (``summary.json``), and how many
   pairs met each empty-mask rule (both empty, missed, spurious);
3. per model x fold: the epoch of the selected checkpoint and its ``val/dice`` before and after, the after-rule
   ``val/dice`` at the epoch *before* selected (when the after run reached it), the Dice of the fold's held-out
   (= validation) cases in the pooled ``per_case.csv`` (evaluate's rule, the same in both versions), the last
   epoch trained (early stopping), and whether the two runs trained identically (largest difference of
   ``train/loss_epoch`` over the epochs both ran);
4. per ``evaluate`` pair: foreground mean Dice/HD95/ASSD/NSD before, after, difference, the classes scored and
   the empty-mask counts.

How the inputs were made (2-core CPU VM; two worktrees sharing one venv, ``python -m medseg`` run from each
worktree's root imports that worktree's package)::

    git -C /work/main worktree add /tmp/before 4689ce6
    git -C /work/main worktree add /tmp/after ce9f06c
    cd /tmp/after && python -m medseg make-synthetic --out /tmp/bc_data --dims 2 --cases 24 --classes 3 \\
        --size 64 64 --structure-scale 0.35 --seed 11
    # then class 2 removed (voxels 2 -> 0, affine/header/dtype kept) from labelsTr of case_000, 003, ..., 021
    # (every case index % 3 == 0: 8 of 24); images left as they are
    for W in before after; do (cd /tmp/$W && python -m medseg benchmark \\
        --configs configs/seg2d_unet.yaml configs/seg2d_attention_unet.yaml --folds 3 --seed 0 \\
        --output /tmp/bc_out60_$W --data.root /tmp/bc_data --trainer.max_epochs 60 \\
        --trainer.check_val_every_n_epoch 1 --trainer.accelerator cpu --trainer.enable_progress_bar false \\
        --data.patch_size "[32, 32]" --model.init_args.network_args '{"channels": [8, 16, 32]}'); done
    # The shipped configs then lost their EarlyStopping (the new val/dice stopped lesion folds too early): the
    # same benchmark from the final tree, to /tmp/bc_out60_now, is the "after" of docs/benchmarks.md.
    P=/tmp/bc_out60_after/seg2d_unet/predictions
    for W in before after; do (cd /tmp/$W &&
        python -m medseg evaluate --pred $P --truth /tmp/bc_data/labelsTr --output /tmp/bc_eval_${W}_folder &&
        python -m medseg evaluate --pred $P --truth /tmp/bc_data/dataset.json --output /tmp/bc_eval_${W}_json); done
    python scripts/bench_conventions.py /tmp/bc_out60_before /tmp/bc_out60_after \\
        --evaluate labelsTr /tmp/bc_eval_before_folder /tmp/bc_eval_after_folder \\
        --evaluate dataset.json /tmp/bc_eval_before_json /tmp/bc_eval_after_json

Variants run the same way: ``--trainer.max_epochs 15`` (class 2 never learned by either version), and the after
code with ``--model.init_args.dice_both_empty .nan`` (YAML's NaN; a plain ``nan`` is refused by the parser).

Standard library and numpy only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

import numpy as np

METRICS = ("dice", "nsd", "hd95", "assd", "ece", "brier", "nll")
FOREGROUND = ("dice", "hd95", "assd", "nsd")
RULES = ("both_empty", "prediction_empty", "reference_empty")  # summary.json "conventions"


def number(value: object) -> float:
    """A float from a CSV/JSON cell; NaN for empty, None or text."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def read_results(folder: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (folder / "results.csv").open(newline="") as handle:
        return {(r["model"], r["metric"]): r for r in csv.DictReader(handle)}


def results_section(before: Path, after: Path) -> str:
    old, new = read_results(before), read_results(after)
    models = list(dict.fromkeys(m for m, _ in [*old, *new]))
    rows = []
    for model in models:
        for metric in METRICS:
            b, a = old.get((model, metric), {}), new.get((model, metric), {})
            if not b and not a:
                continue
            vb, va = number(b.get("mean")), number(a.get("mean"))
            rows.append([model, metric, fmt(vb), fmt(va), fmt(va - vb), fmt(number(b.get("wilcoxon_p")), 3),
                         fmt(number(a.get("wilcoxon_p")), 3), fmt(number(a.get("p_holm")), 3),
                         fmt(number(a.get("effect_rbc")), 3), a.get("best", "-")])
    header = ["model", "metric", "before", "after", "after-before", "p before", "p after", "p_holm", "effect_rbc",
              "best (after)"]
    return "## 1. results.csv (pooled out-of-fold mean over cases)\n" + table(header, rows)


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def per_class_section(before: Path, after: Path, models: list[str]) -> str:
    rows, counts = [], []
    for model in models:
        old, new = summary_of(before / model), summary_of(after / model)
        for cls in sorted(set(old["per_class"]) | set(new["per_class"])):
            for metric in ("dice", "hd95", "assd"):
                b = old["per_class"].get(cls, {}).get(metric, {})
                a = new["per_class"].get(cls, {}).get(metric, {})
                rows.append([model, cls, metric, f"{fmt(number(b.get('mean')))} (n={b.get('n', '-')})",
                             f"{fmt(number(a.get('mean')))} (n={a.get('n', '-')})"])
        cb, ca = old.get("conventions", {}), new.get("conventions", {})
        counts.append([model, *(f"{cb.get(k, '-')} -> {ca.get(k, '-')}" for k in RULES),
                       json.dumps(new.get("left_out", {}))])
    return ("## 2. per class (summary.json: mean over cases, n = pairs averaged)\n"
            + table(["model", "class", "metric", "before", "after"], rows)
            + "\n\nempty-mask rules met, before -> after (case/class pairs, pooled out-of-fold)\n"
            + table(["model", "both empty", "missed", "spurious", "left out (after)"], counts))


def epoch_of(checkpoint: str) -> int | None:
    found = re.search(r"epoch[=_-]?(\d+)", Path(checkpoint).name)
    return int(found.group(1)) if found else None


def fold_runs(folder: Path) -> dict[str, tuple[str, str]]:
    """``fold -> (best checkpoint, log dir)`` from cv.json (both versions write them), else fold_K/fold.json."""
    cv = json.loads((folder / "cv.json").read_text())
    checkpoints, logs = dict(cv.get("checkpoints", {})), dict(cv.get("log_dirs", {}))
    for fold_json in sorted(folder.glob("fold_*/fold.json")):
        fold = json.loads(fold_json.read_text())
        key = str(fold.get("fold"))
        checkpoints.setdefault(key, fold.get("checkpoint", ""))
        logs.setdefault(key, fold.get("log_dir", ""))
    return {k: (checkpoints[k], logs.get(k, "")) for k in sorted(checkpoints, key=int)}


def epoch_log(log_dir: str) -> dict[int, dict[str, float]]:
    """``epoch -> {column: value}`` of metrics.csv (a column's last non-empty value in that epoch)."""
    out: dict[int, dict[str, float]] = {}
    path = Path(log_dir) / "metrics.csv"
    if not path.is_file():
        return out
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch", "") == "":
                continue
            cells = out.setdefault(int(row["epoch"]), {})
            cells.update({k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)})
    return out


def held_out_dice(folder: Path) -> dict[str, float]:
    """``fold -> Dice of its held-out cases`` from the pooled per_case.csv (mean over cases per class, then over
    classes; evaluate's rule, the same in both versions: absent from both 1, missed or spurious 0)."""
    splits_path = folder / "splits.json" if (folder / "splits.json").is_file() else folder.parent / "splits.json"
    splits = json.loads(splits_path.read_text())
    with (folder / "per_case.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for k, split in enumerate(splits):
        cases = set(split["val"])
        by_class: dict[str, list[float]] = {}
        for row in rows:
            if row["case"] in cases:
                by_class.setdefault(row["class"], []).append(number(row["dice"]))
        out[str(k)] = float(np.mean([np.nanmean(v) for v in by_class.values()])) if by_class else math.nan
    return out


def selection_section(before: Path, after: Path, models: list[str]) -> str:
    rows = []
    for model in models:
        old, new = fold_runs(before / model), fold_runs(after / model)
        held_b, held_a = held_out_dice(before / model), held_out_dice(after / model)
        for fold in sorted(set(old) | set(new), key=int):
            (cb, lb), (ca, la) = old.get(fold, ("", "")), new.get(fold, ("", ""))
            eb, ea = epoch_of(cb), epoch_of(ca)
            logb, loga = epoch_log(lb), epoch_log(la)
            vb = logb.get(eb, {}).get("val/dice", math.nan) if eb is not None else math.nan
            va = loga.get(ea, {}).get("val/dice", math.nan) if ea is not None else math.nan
            at_b = loga.get(eb, {}).get("val/dice", math.nan) if eb is not None else math.nan
            common = sorted(set(logb) & set(loga))
            losses = [abs(logb[e]["train/loss_epoch"] - loga[e]["train/loss_epoch"]) for e in common
                      if "train/loss_epoch" in logb[e] and "train/loss_epoch" in loga[e]]
            rows.append([model, fold, fmt(eb), fmt(ea), fmt(vb), fmt(va), fmt(at_b),
                         fmt(held_b.get(fold, math.nan)), fmt(held_a.get(fold, math.nan)),
                         f"{max(logb, default='-')}/{max(loga, default='-')}",
                         fmt(float(np.max(losses)), 2) if losses else "-"])
    header = ["model", "fold", "epoch before", "epoch after", "val/dice before", "val/dice after",
              "after-rule val/dice @epoch before", "held-out Dice before", "held-out Dice after", "last epoch b/a",
              "max |dloss|"]
    return ("## 3. checkpoint selection per fold (best-epochNNN.ckpt; val/dice at the selected epoch, each under "
            "its own rule)\n" + table(header, rows))


def evaluate_section(pairs: list[tuple[str, str, str]]) -> str:
    rows, info = [], []
    for name, before, after in pairs:
        old, new = summary_of(Path(before)), summary_of(Path(after))
        for metric in FOREGROUND:
            vb, va = number(old["foreground_mean"].get(metric)), number(new["foreground_mean"].get(metric))
            rows.append([name, metric, fmt(vb), fmt(va), fmt(va - vb)])
        cb, ca = old.get("conventions", {}), new.get("conventions", {})
        n_b = " ".join(f"{c}:{s['dice']['n']}/{s['hd95']['n']}" for c, s in old["per_class"].items())
        n_a = " ".join(f"{c}:{s['dice']['n']}/{s['hd95']['n']}" for c, s in new["per_class"].items())
        info.append([name, f"{sorted(old['per_class'])} -> {new.get('classes', sorted(new['per_class']))}",
                     *(f"{cb.get(k, '-')} -> {ca.get(k, '-')}" for k in RULES), f"{n_b} -> {n_a}"])
    return ("## 4. medseg evaluate, foreground mean (mean over classes of the per-class means)\n"
            + table(["truth", "metric", "before", "after", "after-before"], rows)
            + "\n\n" + table(["truth", "classes scored", "both empty", "missed", "spurious", "class:dice n/hd95 n, before -> after"],
                             info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="benchmark output folder made with the code before")
    parser.add_argument("after", type=Path, help="benchmark output folder made with the code after")
    parser.add_argument("--evaluate", nargs=3, action="append", default=[], metavar=("NAME", "BEFORE", "AFTER"),
                        help="a pair of medseg evaluate output folders (repeatable)")
    args = parser.parse_args()
    models = [m for m in dict.fromkeys(m for m, _ in read_results(args.after))
              if (args.before / m / "summary.json").is_file() and (args.after / m / "summary.json").is_file()]
    sections = [results_section(args.before, args.after), per_class_section(args.before, args.after, models),
                selection_section(args.before, args.after, models)]
    if args.evaluate:
        sections.append(evaluate_section(args.evaluate))
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
