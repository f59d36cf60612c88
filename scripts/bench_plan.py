"""Benchmark: the config `medseg plan` derives for a dataset against the shipped 3D U-Net config, same wall time.

For each synthetic 3D dataset (``--datasets``; all by default)

* ``default``: medseg's own phantom, MRI-like, 64x64x32 voxels of 1x1x2 mm (what the shipped config is tuned for);
* ``anisotropic``: the same phantom at 0.7x0.7x5 mm, 96x96x20 voxels (thick slices);
* ``ct``: CT-like Hounsfield units, air around a soft-tissue body holding the structure, 64x64x32 at 1x1x2 mm;
* ``small``: the default phantom with structures of 0.4 x the radius (about 6% of the foreground volume),

the script writes ``--cases`` training and ``--test-cases`` labelled test cases (``make_synthetic``), runs
``medseg plan DATA --max-time T --out planned.yaml`` and then trains, each in a fresh process with
``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = ``--threads`` (default: the core count):

* planned: ``medseg fit --config planned.yaml --trainer.max_time T``, the plan as written;
* shipped: ``medseg fit --config configs/seg3d_unet.yaml --data.root DATA --trainer.max_time T
  --trainer.max_epochs 1000000`` (so the time limit, not the config's 50 epochs, ends it; everything else, early
  stopping included, as shipped: that is the comparison).

The two fits of a dataset alternate in order (planned first on the 1st, 3rd... dataset). Each best checkpoint
(``best-*.ckpt``, the highest ``val/dice``; ``last.ckpt`` when no validation ran, marked ``*``) predicts the
held-out test cases (``medseg predict --input DATA/dataset.json``: its ``test`` list), which ``medseg evaluate``
scores against their labels; the table shows ``foreground_mean`` Dice of each, their difference, the epochs
begun and optimizer steps done (from ``last.ckpt``), the best validation Dice (``metrics.csv``), the planned
patch x batch x samples per volume, the seconds each fit trained (Lightning's ``Timer``, what ``max_time``
limits: it stops at the first step end past it) and why it stopped (time, early stopping, epochs). The progress
lines also give the wall time of each fit process (start-up, caching, the last validation and checkpoint
included) and the load average before it. Then the machine.

    python scripts/bench_plan.py [--time 00:00:02:00] [--datasets default anisotropic ct small] [--cases 20]
        [--test-cases 6] [--threads N] [--keep] [--work DIR]

On a 2-core CPU ``--time 00:00:01:30`` takes about 5 minutes a dataset. Any failing step stops the script with
exit status 1, the command, its exit status and the tail of its output; the work folder (a temporary one unless
``--work``) is then kept. Timings on a machine shared with other work are noisy: a fit gets the wall time, not
the CPU time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.data.synthetic import make_synthetic

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "seg3d_unet.yaml"
DATASETS: dict[str, dict[str, Any]] = {
    "default": {"size": (64, 64, 32)},
    "anisotropic": {"size": (96, 96, 20), "spacing": (0.7, 0.7, 5.0)},
    "ct": {"size": (64, 64, 32), "modality": "ct"},
    "small": {"size": (64, 64, 32), "structure_scale": 0.4},
}
TAIL_LINES = 40


class StepFailed(RuntimeError):
    """A step of the benchmark failed (the message says which and why)."""


@dataclass
class Run:
    """One fit and its scores."""

    dice: float = float("nan")
    val_dice: float = float("nan")
    epochs: int = 0
    steps: int = 0
    fit_seconds: float = 0.0  # the whole process
    train_seconds: float = float("nan")  # Lightning's Timer: what max_time limits
    stopped: str = "?"
    fallback: bool = False  # predicted with last.ckpt: no validation ran


def run(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> float:
    """Run ``cmd`` with its output (stdout and stderr) in ``log``; raise :class:`StepFailed` on a non-zero exit.

    Returns:
        The wall time in seconds.
    """
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        raise StepFailed(
            f"\nFAILED (exit status {rc}, {seconds:.0f} s): {' '.join(cmd)}\n"
            f"last {len(tail)} lines of its output ({log}):\n" + "\n".join(tail)
        )
    return seconds


def medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", *args]


def fit_result(root: Path, log: Path) -> tuple[Path, Run]:
    """The checkpoint to predict with and what the fit under ``root`` did."""
    import torch

    result = Run()
    best = sorted(root.rglob("checkpoints/best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = sorted(root.rglob("checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not last:
        raise StepFailed(f"\nFAILED: no last.ckpt under {root} (log {log})")
    state = torch.load(last[-1], map_location="cpu", weights_only=False)
    result.epochs, result.steps = int(state["epoch"]) + 1, int(state["global_step"])
    metrics = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if metrics:
        with metrics[-1].open() as f:
            values = [float(r["val/dice"]) for r in csv.DictReader(f) if r.get("val/dice")]
        result.val_dice = max(values, default=float("nan"))
    callbacks = state.get("callbacks", {})
    timer = next((v for k, v in callbacks.items() if k.startswith("Timer")), {})
    result.train_seconds = float(timer.get("time_elapsed", {}).get("train", float("nan")))
    early = [v for k, v in callbacks.items() if k.startswith("EarlyStopping") and v.get("stopped_epoch")]
    if early:  # EarlyStopping says nothing unless verbose: its saved state does
        result.stopped = f"early stop (epoch {early[0]['stopped_epoch']})"
    elif "Time limit reached" in log.read_text(errors="replace"):
        result.stopped = "time"
    else:
        result.stopped = "epochs/steps"
    result.fallback = not best
    return (best[-1] if best else last[-1]), result


def score(ckpt: Path, data: Path, out: Path, env: dict[str, str]) -> float:
    """Predict the test cases of ``data`` with ``ckpt`` and return their foreground mean Dice."""
    run(medseg("predict", "--ckpt", str(ckpt), "--input", str(data / "dataset.json"), "--output",
               str(out / "predictions")), out / "predict.log", env, REPO)
    run(medseg("evaluate", "--pred", str(out / "predictions"), "--truth", str(data / "dataset.json"), "--output",
               str(out / "evaluation")), out / "evaluate.log", env, REPO)
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    if summary.get("missing_predictions"):
        raise StepFailed(f"\nFAILED: missing predictions {summary['missing_predictions']} in {out}")
    return float(summary["foreground_mean"]["dice"])


def patch_shape(config: Path) -> str:
    """``patch x batch x samples per volume`` of a config."""
    data = yaml.safe_load(config.read_text())["data"]
    return f"{'x'.join(map(str, data['patch_size']))} x {data['batch_size']} x {data['samples_per_volume']}"


def bench_dataset(name: str, index: int, work: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    folder = work / name
    data = folder / "data"
    make_synthetic(data, dims=3, cases=args.cases, test_cases=args.test_cases, seed=0, **DATASETS[name])
    planned = folder / "planned.yaml"
    run(medseg("plan", str(data), "--max-time", args.time, "--out", str(planned)), folder / "plan.log", env, REPO)
    print(f"\n[{name}] plan ({planned}):")
    print("\n".join(line for line in (folder / "plan.log").read_text().splitlines()
                    if line.strip() and "fingerprinting" not in line and "\r" not in line))
    common = ["--trainer.max_time", args.time, "--trainer.enable_progress_bar", "false"]
    fits = {
        "planned": medseg("fit", "--config", str(planned), "--trainer.default_root_dir", str(folder / "planned"),
                          *common),
        "shipped": medseg("fit", "--config", str(SHIPPED), "--data.root", str(data), "--trainer.default_root_dir",
                          str(folder / "shipped"), "--trainer.max_epochs", "1000000", *common),
    }
    order = ["planned", "shipped"] if index % 2 == 0 else ["shipped", "planned"]
    runs: dict[str, Run] = {}
    for side in order:
        (folder / side).mkdir(parents=True, exist_ok=True)
        log = folder / side / "fit.log"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"[{name}] fit {side} for {args.time} (load average {load:.2f}) ...", end=" ", flush=True)
        seconds = run(fits[side], log, env, REPO)
        ckpt, result = fit_result(folder / side, log)
        result.fit_seconds = seconds
        result.dice = score(ckpt, data, folder / side, env)
        runs[side] = result
        print(f"{result.epochs} epochs, {result.steps} steps, {result.train_seconds:.0f} s of training in a "
              f"{seconds:.0f} s process (stopped: {result.stopped}); "
              f"test Dice {result.dice:.4f} with {ckpt.name}", flush=True)
    return {"name": name, "planned": runs["planned"], "shipped": runs["shipped"], "shape": patch_shape(planned)}


def machine(threads: int) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} | {platform.platform()} | {cpu_name()} | {os.cpu_count()} CPUs | {device} | "
            f"torch {torch.__version__} | OMP_NUM_THREADS {threads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="00:00:02:00", help="wall time of each training run, DD:HH:MM:SS")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--cases", type=int, default=20, help="training cases per dataset")
    parser.add_argument("--test-cases", type=int, default=6, help="labelled held-out test cases per dataset")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore"}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_plan_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(args.datasets)} dataset(s), {args.cases} training + {args.test_cases} test cases each; every fit "
          f"{args.time} of wall time; work folder {work}", flush=True)
    start = time.perf_counter()
    try:
        rows = [bench_dataset(name, i, work, args, env) for i, name in enumerate(args.datasets)]
    except (Exception, KeyboardInterrupt) as error:
        print(f"{error}\nwork folder kept: {work}", file=sys.stderr)
        raise SystemExit(1) from error
    total = time.perf_counter() - start

    def cell(r: Run) -> str:
        return f"{r.dice:.4f}{'*' if r.fallback else ''}"

    print()
    print(f"machine: {machine(args.threads)}")
    print(f"each fit: --trainer.max_time {args.time}; {args.cases} training cases (20% validate), "
          f"{args.test_cases} test cases scored; total {total / 60:.1f} min")
    print()
    print("| dataset | planned Dice | shipped Dice | planned - shipped | planned epochs / steps | shipped epochs / "
          "steps | best val Dice planned / shipped | planned patch x batch x samples | trained s planned / shipped "
          "| stopped planned / shipped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p, s = row["planned"], row["shipped"]
        print(f"| {row['name']} | {cell(p)} | {cell(s)} | {p.dice - s.dice:+.4f} | {p.epochs} / {p.steps} | "
              f"{s.epochs} / {s.steps} | {p.val_dice:.3f} / {s.val_dice:.3f} | {row['shape']} | "
              f"{p.train_seconds:.0f} / {s.train_seconds:.0f} | {p.stopped} / {s.stopped} |")
    print(f"shipped: {SHIPPED.relative_to(REPO)}, patch x batch x samples {patch_shape(SHIPPED)}"
          + ("; * = no validation ran, last.ckpt predicted" if any(r[k].fallback for r in rows
                                                                  for k in ("planned", "shipped")) else ""))
    if args.keep or args.work:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
