"""Every shipped model config for the same wall-clock training time: size, speed and held-out score side by side.

For each config under ``configs/`` (all but the region configs) the script trains on a synthetic dataset of the
config's task and dimensionality for ``--seconds`` of wall time (``--trainer.max_time``), then predicts the
dataset's held-out test cases with the best checkpoint and scores them: foreground Dice (``medseg evaluate``'s
metric and empty-mask rules) for segmentation, accuracy for classification. It prints one row per config:

* parameters of the network;
* training samples/s: patches (segmentation) or images (classification) trained, over the time spent in
  training epochs (validation and checkpoint writing left out), counted by a callback;
* inference s/case: ``medseg predict`` (in this process, ``predict_batch``) over the test cases, divided by
  their number, in a second run (the first pays for loading and first calls);
* the held-out score.

The same data, seed, budget and thread count for every config, so the rows compare; the absolute numbers are
what a few seconds of training on a 2-core CPU give, not what each family reaches.

    python scripts/bench_models.py [--seconds 60] [--configs seg2d_unet seg2d_unet3plus ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from medseg.console import install
from medseg.data.datalist import load_dataset
from medseg.data.synthetic import make_synthetic
from medseg.evaluation.evaluate import evaluate_segmentation
from medseg.inference.batch import PredictOptions, predict_batch
from medseg.inference.native import load_model
from medseg.training import fit

CONFIGS = Path(__file__).parents[1] / "configs"
DATA = {  # (task, dims): make_synthetic arguments, with held-out test cases
    ("seg", 2): {"dims": 2, "cases": 16, "classes": 3, "task": "seg", "size": (64, 64), "test_cases": 6},
    ("seg", 3): {"dims": 3, "cases": 8, "classes": 2, "task": "seg", "size": (48, 48, 32), "test_cases": 4},
    ("cls", 2): {"dims": 2, "cases": 32, "classes": 2, "task": "cls", "size": (64, 64), "test_cases": 12},
    ("cls", 3): {"dims": 3, "cases": 16, "classes": 2, "task": "cls", "size": (32, 32, 32), "test_cases": 8},
    ("mtl", 2): {"dims": 2, "cases": 24, "size": (64, 64), "test_cases": 8},
    ("enh", 2): {"dims": 2, "cases": 16, "size": (64, 64), "test_cases": 6},
}


def make_data(kind: tuple[str, int], root: Path) -> None:
    """The synthetic dataset of a config kind (``DATA``), seed 7."""
    if kind[0] == "mtl":
        from medseg.data.synthetic_multitask import make_multitask as make
    elif kind[0] == "enh":
        from medseg.data.synthetic_enhance import make_enhancement as make
    else:
        make = make_synthetic
    make(root, seed=7, **DATA[kind])


class SampleCounter(pl.Callback):
    """Samples trained over the time spent in training epochs (validation and checkpoint writing left out)."""

    def __init__(self) -> None:
        self.samples, self.seconds, self.start = 0, 0.0, None

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, index: int) -> None:
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        self.samples += int(image.shape[0])

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._stop()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.start is not None:
            self.seconds += time.perf_counter() - self.start
            self.start = None

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


def max_time(seconds: int) -> str:
    """Lightning's ``DD:HH:MM:SS`` for ``seconds``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"00:{hours:02d}:{minutes:02d}:{secs:02d}"


def kind_of(config: str) -> tuple[str, int]:
    """``("seg" | "cls" | "mtl" | "enh", dims)`` from a config's name (``seg2d_unet`` -> ``("seg", 2)``)."""
    return config[:3], int(config[3])


def run_one(config: str, root: Path, work: Path, seconds: int) -> dict:
    counter = SampleCounter()
    result = fit(["--config", str(CONFIGS / f"{config}.yaml"), "--data.root", str(root),
                  "--trainer.default_root_dir", str(work / "runs"), "--trainer.accelerator", "cpu",
                  "--trainer.max_epochs", "10000", "--trainer.max_time", max_time(seconds),
                  "--trainer.enable_progress_bar", "false"], seed=0, callbacks=[counter])
    out = work / "predictions"
    predict_batch([result.best], root / "dataset.json", PredictOptions(output=work / "warm-up", device="cpu"))
    start = time.perf_counter()  # a second run: the first paid for loading and first calls
    report = predict_batch([result.best], root / "dataset.json", PredictOptions(output=out, device="cpu"))
    per_case = (time.perf_counter() - start) / max(len(report.done), 1)
    task, _ = kind_of(config)
    if task == "seg":
        summary = evaluate_segmentation(out, root / "dataset.json", work / "evaluation")
        score = ("Dice", summary["foreground_mean"]["dice"])
    elif task == "mtl":  # the label maps' Dice, and the classes' accuracy beside it
        from medseg.evaluation.multitask import evaluate_multitask
        from medseg.metrics.conventions import EmptyMaskRules

        summary = evaluate_multitask(out, root / "dataset.json", work / "evaluation", 1.0, EmptyMaskRules())
        score = (f"accuracy {summary['classification']['accuracy']:.3f}, Dice",
                 summary["segmentation"]["foreground_mean"]["dice"])
    elif task == "enh":  # PSNR of the enhanced images (the degraded inputs' beside it)
        from medseg.evaluation.enhancement import evaluate_enhancement

        summary = evaluate_enhancement(out, root / "dataset.json", work / "evaluation")
        score = (f"PSNR (input {summary['psnr_input']['mean']:.1f} dB)", summary["psnr"]["mean"])
    else:
        truth = {case["id"]: int(case["label"]) for case in load_dataset(root / "dataset.json").test}
        names = load_model(result.best).label_names
        with open(out / "predictions.csv") as handle:
            rows = list(csv.DictReader(handle))
        correct = sum(names.index(row["prediction"]) == truth[row["case"]] for row in rows)
        score = ("accuracy", correct / len(rows))
    return {"config": config, "parameters": result.parameters, "samples_per_s": counter.rate,
            "s_per_case": per_case, "metric": score[0], "score": score[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="training wall time per config")
    parser.add_argument("--configs", nargs="+", default=None, help="config names (default: all but regions)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    install()  # medseg's console: the library noise hidden, as under the medseg command
    torch.set_num_threads(args.threads)
    seconds = args.seconds
    # (a region config and a lesion generator, which draws images from label maps, have no predict to time)
    configs = args.configs or sorted(p.stem for p in CONFIGS.glob("*.yaml")
                                     if "regions" not in p.stem and "lesion_synthesis" not in p.stem)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        roots = {}
        for config in configs:
            kind = kind_of(config)
            if kind not in roots:
                roots[kind] = tmp / f"data_{kind[0]}{kind[1]}"
                make_data(kind, roots[kind])
            try:
                rows.append(run_one(config, roots[kind], tmp / config, seconds))
            except Exception as err:  # one config failing is a row, not the end of the table
                rows.append({"config": config, "error": f"{type(err).__name__}: {err}"})
            print(rows[-1], flush=True)
    print(f"\nmachine: {platform.node()} | {platform.processor() or 'cpu'} | torch {torch.__version__} | "
          f"threads {args.threads}; {seconds} s of training per config; held-out test cases of one synthetic "
          "dataset per task and dimensionality")
    print("| config | parameters | training samples/s | inference s/case | held-out score |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['config']} | failed: {row['error'][:80]} | | | |")
            continue
        print(f"| {row['config']} | {row['parameters']:,} | {row['samples_per_s']:.1f} | {row['s_per_case']:.3f} | "
              f"{row['metric']} {row['score']:.3f} |")


if __name__ == "__main__":
    main()
