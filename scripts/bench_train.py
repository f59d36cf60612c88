"""Benchmark: `medseg fit` against a plain PyTorch + MONAI training loop, same model, batch, patch and data.

Both sides train the network of ``configs/seg3d_unet.yaml`` (MONAI UNet, its channels, norm and activation;
``dice_ce`` without background; AdamW with the config's lr and weight decay; its cosine schedule, stepped
once an epoch) on the same synthetic cases, cached in memory after the same preprocessing (load, RAS,
z-score of the non-zero voxels per channel), with the same random patches (pad, ``RandCropByPosNegLabeld``
with the config's ``pos_fraction`` and ``samples_per_volume``), the same augmentation (random flips on the
three axes, p = 0.5; ``medseg fit`` gets ``--data.augmentation {"flip": {"prob": 0.5}}``), batch size,
shuffling, loader (``monai.data.DataLoader``, no workers) and torch thread count. All cases train
(``--data.val_fraction 0``) and nothing validates (``--trainer.limit_val_batches 0``). ``medseg fit`` runs
in-process through ``MedSegCLI`` with everything else its config does: per-step logging to CSV and
TensorBoard, the learning-rate monitor, ``last.ckpt`` written (atomically) at every epoch end.

What is timed, on both sides: the wall time from the start of the first epoch after ``--warmup-epochs``
(``on_train_epoch_start`` of a callback in ``medseg fit``) to the end of training (``on_train_end``, after
the last epoch's checkpoint; in the plain loop, after the last scheduler step): data loading, random
patches and augmentation, forward, loss, backward, optimiser step and every per-step and per-epoch hook.
Not timed: imports, process start, writing the data, building the CLI/model, caching the dataset and the
warm-up epochs. samples/s = patches/s: a step trains ``batch_size * samples_per_volume`` patches.

Each repeat runs both sides, the order alternating (medseg first in odd repeats); the script prints every
repeat, the medians, ``ratio`` = medseg / plain samples/s (the target is >= 0.97 on CPU), and the machine.
With ``--device cuda`` it also prints the mean GPU utilisation over the timed part of each side
(``torch.cuda.utilization``, which needs pynvml; else n/a) and the achieved TFLOP/s of the 3D U-Net trained
on ``--tflops-size`` cubes (default 128^3) with bf16 autocast: forward + backward FLOPs of one step counted
by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions; elementwise work is not counted) times the
steps, over their wall time (CUDA-synchronised). Every run first checks that FLOP counter against the
analytic count of one Conv3d on the CPU.

    OMP_NUM_THREADS=1 python scripts/bench_train.py [--cases 16] [--size 96 96 48] [--patch 64 64 32]
        [--epochs 4] [--warmup-epochs 1] [--repeats 5] [--threads 1] [--device cpu|cuda]

Defaults take about a minute on a 2-core CPU. ``--medseg-arg`` (repeatable) adds a `medseg fit` argument, to see
what a part of medseg costs, e.g. ``"--medseg-arg=--trainer.callbacks=[]" --medseg-arg=--trainer.logger=false``
(no checkpoints, no logging; the timing callback is appended after them).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from monai import data as md
from monai import transforms as mt
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch.utils.flop_counter import FlopCounterMode

from medseg.data.synthetic import make_synthetic
from medseg.lightning_cli import MedSegCLI

CONFIG = Path(__file__).parents[1] / "configs" / "seg3d_unet.yaml"
AUGMENTATION = {"flip": {"prob": 0.5}}  # medseg's flip: RandFlipd on each of the three axes


@dataclass
class Timing:
    """One timed run: wall seconds, steps and patches of the timed epochs, seconds inside the steps."""

    seconds: float = 0.0
    steps: int = 0
    patches: int = 0
    step_seconds: float = 0.0
    gpu_util: float | None = None
    threads: int = 0

    @property
    def rate(self) -> float:
        return self.patches / self.seconds


@dataclass
class GpuUtilisation:
    """Samples ``torch.cuda.utilization()`` (percent, needs pynvml) every ``interval`` s in a thread."""

    interval: float = 0.05
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        if not torch.cuda.is_available():
            return
        try:
            torch.cuda.utilization()
        except Exception:  # no pynvml (or no NVML): n/a
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(torch.cuda.utilization())

    def stop(self) -> float | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return statistics.fmean(self.samples) if self.samples else None


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Times ``medseg fit`` from the start of epoch ``warmup_epochs`` to the end of training.

    Given to the CLI as ``--trainer.callbacks+={"class_path": "__main__.StepTimer", ...}``; the instance
    the CLI built is found again in ``trainer.callbacks``.
    """

    def __init__(self, warmup_epochs: int = 1) -> None:
        self.warmup_epochs = warmup_epochs
        self.timing = Timing()
        self._start = self._step_start = 0.0
        self._util = GpuUtilisation()

    def _timed(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self.warmup_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.warmup_epochs:
            self.timing.threads = torch.get_num_threads()
            sync(pl_module.device)
            self._util.start()
            self._start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._timed(trainer):
            self.timing.step_seconds += time.perf_counter() - self._step_start  # CPU only: no sync here
            self.timing.steps += 1
            self.timing.patches += int(batch["image"].shape[0])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        if self.timing.steps:
            self.timing.seconds = time.perf_counter() - self._start
        self.timing.gpu_util = self._util.stop()


def load_config() -> dict[str, Any]:
    """The shipped config, checked to use what the plain loop implements (so a changed config is noticed)."""
    cfg = yaml.safe_load(CONFIG.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]
    prep = data["preprocessing"]
    expected = {
        "network": (model["network"], "unet"),
        "loss": (model["loss"], "dice_ce"),
        "loss_args": (model["loss_args"], {"include_background": False}),
        "optimizer": (model["optimizer"]["class_path"], "torch.optim.AdamW"),
        "scheduler": (model["scheduler"]["class_path"], "torch.optim.lr_scheduler.CosineAnnealingLR"),
        "preprocessing": (prep, {"orientation": "RAS", "spacing": None, "intensity": "mri", "crop_foreground": False}),
        "precision": (cfg["trainer"]["precision"], "32-true"),
    }
    wrong = {k: got for k, (got, want) in expected.items() if got != want}
    if wrong:
        raise SystemExit(f"{CONFIG} changed ({wrong}): update the plain loop of {__file__} to match")
    return cfg


def medseg_fit(root: Path, out: Path, args: argparse.Namespace) -> Timing:
    """``medseg fit`` of the shipped config, in-process, with the benchmark's overrides."""
    timer = {"class_path": f"{StepTimer.__module__}.StepTimer", "init_args": {"warmup_epochs": args.warmup_epochs}}
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIG), "--data.root", str(root), "--trainer.default_root_dir", str(out),
        "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.devices", "1",
        "--trainer.max_epochs", str(args.epochs), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.patch_size", json.dumps(args.patch),
        "--data.cache", "memory", "--data.num_workers", "0", "--data.val_fraction", "0",
        "--data.augmentation", json.dumps(AUGMENTATION), *args.medseg_arg,
        "--trainer.callbacks+=" + json.dumps(timer),  # last: survives a --trainer.callbacks=[...] in medseg_arg
    ])
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, StepTimer)).timing


def plain_loop(root: Path, cfg: dict[str, Any], args: argparse.Namespace) -> Timing:
    """What a user writes by hand with MONAI: CacheDataset, DataLoader, UNet, DiceCELoss, AdamW."""
    model, data = cfg["model"]["init_args"], cfg["data"]
    opt_args = model["optimizer"]["init_args"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    meta = json.loads((root / "dataset.json").read_text())
    items = [{"image": str(root / c["image"]), "label": str(root / c["label"])} for c in meta["training"]]
    keys = ("image", "label")
    transform = mt.Compose([
        # deterministic: cached once by CacheDataset
        mt.LoadImaged(keys, image_only=True, ensure_channel_first=True),
        mt.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        mt.EnsureTyped("image", dtype=torch.float32),
        mt.SpatialPadd(keys, spatial_size=args.patch),
        # random: every step
        mt.RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=args.patch, pos=data["pos_fraction"],
            neg=1.0 - data["pos_fraction"], num_samples=data["samples_per_volume"],
        ),
        *[mt.RandFlipd(keys, prob=AUGMENTATION["flip"]["prob"], spatial_axis=axis) for axis in range(3)],
        mt.EnsureTyped(keys, track_meta=False),  # plain tensors into the network, as medseg's batches are
    ]).set_random_state(seed=0)
    dataset = md.CacheDataset(items, transform, cache_rate=1.0, progress=False)
    loader = md.DataLoader(dataset, batch_size=data["batch_size"], shuffle=True, num_workers=0)
    net = unet(cfg, classes=len(meta["labels"])).to(device)
    loss_fn = dice_ce()
    optimizer = torch.optim.AdamW(net.parameters(), lr=opt_args["lr"], weight_decay=opt_args["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **model["scheduler"]["init_args"])
    timing, util = Timing(), GpuUtilisation()
    start = 0.0
    net.train()
    for epoch in range(args.epochs):
        if epoch == args.warmup_epochs:
            timing.threads = torch.get_num_threads()
            sync(device)
            util.start()
            start = time.perf_counter()
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            step_start = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(net(image), label)
            loss.backward()
            optimizer.step()
            if epoch >= args.warmup_epochs:
                timing.step_seconds += time.perf_counter() - step_start
                timing.steps += 1
                timing.patches += image.shape[0]
        scheduler.step()
    sync(device)
    timing.seconds = time.perf_counter() - start
    timing.gpu_util = util.stop()
    return timing


def step_flops(
    net: torch.nn.Module, x: torch.Tensor, loss_fn: Any, target: Any, amp_dtype: torch.dtype | None = None
) -> tuple[int, int]:
    """FLOPs ``(forward, backward)`` of one training step, counted by ``FlopCounterMode`` (convolutions and
    matmuls; elementwise ops are not counted), the forward under autocast to ``amp_dtype`` when given. Works on
    any device; leaves no gradients behind."""
    with FlopCounterMode(display=False) as forward:
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(net(x), target)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    net.zero_grad(set_to_none=True)
    return forward.get_total_flops(), backward.get_total_flops()


def check_flop_counter() -> None:
    """``step_flops`` of one Conv3d against the analytic count ``2 * Cin * Cout * k^3 * output voxels`` for
    the forward, and the same for the backward (weight gradient only: the input needs no gradient)."""
    cin, cout, k, size = 3, 5, 3, (6, 7, 8)
    conv = torch.nn.Conv3d(cin, cout, k, padding=1, bias=False)
    x = torch.randn(2, cin, *size)
    analytic = 2 * cin * cout * k**3 * 2 * size[0] * size[1] * size[2]
    counted = step_flops(conv, x, lambda y, _: y.square().mean(), None)
    if counted != (analytic, analytic):
        raise SystemExit(f"FlopCounterMode check failed: counted {counted}, analytic {analytic} each")
    print(f"flop counter check: Conv3d {cin}->{cout}, k={k}, input 2x{cin}x{size}: forward = backward = "
          f"{analytic} FLOPs, as analytic: ok")


def unet(cfg: dict[str, Any], classes: int = 2) -> UNet:
    """The config's network as medseg's registry builds it (``build_unet``: stride 2 at every level)."""
    net_args = cfg["model"]["init_args"]["network_args"]
    widths = tuple(net_args["channels"])
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=classes, channels=widths, strides=(2,) * (len(widths) - 1),
        norm=net_args["norm"], act=net_args["act"], dropout=net_args["dropout"],
    )


def dice_ce() -> DiceCELoss:
    """MONAI's equivalent of medseg's ``dice_ce`` with ``include_background: false``."""
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)


def patch_flops(cfg: dict[str, Any], patch: list[int], device: str) -> int:
    """Forward + backward FLOPs of the config's U-Net per training patch (fp32)."""
    net = unet(cfg).to(device)
    x = torch.randn(1, 1, *patch, device=device)
    y = torch.randint(0, 2, (1, 1, *patch), device=device)
    return sum(step_flops(net, x, dice_ce(), y))


def bf16_tflops(cfg: dict[str, Any], size: int, batch: int, steps: int, device: str) -> tuple[float, float, int]:
    """Train the config's U-Net on ``(batch, 1, size, size, size)`` random inputs with bf16 autocast.

    Returns:
        ``(TFLOP/s, patches/s, FLOPs per step)``: the counted forward + backward FLOPs of a step times
        ``steps``, over the wall time of those steps (after 3 untimed ones; synchronised on CUDA).
    """
    net = unet(cfg).to(device)
    loss_fn = dice_ce()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, size, device=device)
    y = torch.randint(0, 2, (batch, 1, size, size, size), device=device)
    flops = sum(step_flops(net, x, loss_fn, y, amp_dtype=torch.bfloat16))

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return flops * steps / seconds / 1e12, batch * steps / seconds, flops


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def quiet_lightning() -> None:
    """Lightning's start-up banners and the warnings this setup triggers on purpose (no validation, no workers,
    fewer steps than the logging interval) would bury the progress lines."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*could not find the monitored key.*", ".*Checkpoint directory.*exists.*",
                    ".*You defined a `validation_step` but have no `val_dataloader`.*",
                    ".*LightningCLI's args parameter is intended.*", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"):
        warnings.filterwarnings("ignore", pattern)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16, help="synthetic training cases (all train)")
    parser.add_argument("--size", type=int, nargs=3, default=[96, 96, 48], help="synthetic volume size")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32], help="training patch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, warm-up included")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="first epochs left out of the timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tflops-size", type=int, default=128, help="cuda: cube side of the bf16 TFLOP/s run")
    parser.add_argument("--tflops-batch", type=int, default=2)
    parser.add_argument("--tflops-steps", type=int, default=20, help="cuda: timed steps of that run (0: skip it)")
    parser.add_argument("--medseg-arg", action="append", default=[],
                        help="extra `medseg fit` argument (repeatable), e.g. '--medseg-arg=--trainer.callbacks=[]'")
    args = parser.parse_args()
    if args.epochs <= args.warmup_epochs:
        parser.error("--epochs must exceed --warmup-epochs")
    torch.set_num_threads(args.threads)
    quiet_lightning()
    cfg = load_config()
    check_flop_counter()
    data = cfg["data"]
    per_step = data["batch_size"] * data["samples_per_volume"]
    print(f"{args.cases} cases of {args.size}, patch {args.patch}, {per_step} samples (patches) a step, "
          f"{args.epochs - args.warmup_epochs} timed epoch(s) after {args.warmup_epochs} warm-up, "
          f"{args.repeats} repeats, {args.device}, {args.threads} thread(s)", flush=True)
    medseg_runs: list[Timing] = []
    plain_runs: list[Timing] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_synthetic(root, dims=3, cases=args.cases, size=args.size, seed=0)
        for r in range(args.repeats):
            order = ("medseg", "plain") if r % 2 == 0 else ("plain", "medseg")
            for side in order:
                print(f"repeat {r + 1}/{args.repeats}: {side} ...", end=" ", flush=True)
                gc.collect()  # the previous run's objects (Lightning's hold reference cycles) go before this one
                if side == "medseg":
                    t = medseg_fit(root, Path(tmp) / f"runs{r}", args)
                    medseg_runs.append(t)
                else:
                    t = plain_loop(root, cfg, args)
                    plain_runs.append(t)
                print(f"{t.rate:.2f} samples/s ({t.patches} in {t.seconds:.2f} s, {t.steps} steps)", flush=True)
    threads = {t.threads for t in medseg_runs + plain_runs}
    if threads != {args.threads}:
        print(f"WARNING: torch threads during the timed epochs were {sorted(threads)}, not {args.threads}")
    flops = patch_flops(cfg, args.patch, args.device)

    medseg_rate = statistics.median(t.rate for t in medseg_runs)
    plain_rate = statistics.median(t.rate for t in plain_runs)
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else cpu_name()
    print()
    print(f"machine: {platform.node()} | {platform.platform()} | {device} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__} | threads {args.threads} | device {args.device}")
    print(f"{CONFIG.name}: batch {data['batch_size']} volumes x {data['samples_per_volume']} patches of {args.patch} "
          f"= {per_step} samples a step; {args.cases} cases of {args.size}; augmentation {AUGMENTATION}")
    print(f"timed: epochs {args.warmup_epochs + 1}..{args.epochs} of {args.epochs} ({medseg_runs[0].steps} steps, "
          f"{medseg_runs[0].patches} samples a run); forward + backward {flops / 1e9:.2f} GFLOP a sample")
    print()
    print("| repeat | order | medseg samples/s | plain samples/s | ratio |")
    print("|---|---|---|---|---|")
    for r, (m, p) in enumerate(zip(medseg_runs, plain_runs, strict=True)):
        order = "medseg, plain" if r % 2 == 0 else "plain, medseg"
        print(f"| {r + 1} | {order} | {m.rate:.2f} | {p.rate:.2f} | {m.rate / p.rate:.3f} |")
    print(f"| median | | {medseg_rate:.2f} | {plain_rate:.2f} | {medseg_rate / plain_rate:.3f} (of the medians) |")
    print()
    for name, runs, rate in (("medseg fit", medseg_runs, medseg_rate), ("plain loop", plain_runs, plain_rate)):
        line = f"{name}: {rate:.2f} samples/s, {rate * flops / 1e12:.3f} TFLOP/s (fp32)"
        wall = statistics.median(1e3 * t.seconds / t.steps for t in runs)
        if cuda:
            utils = [t.gpu_util for t in runs if t.gpu_util is not None]
            line += f"; GPU utilisation {statistics.median(utils):.0f}%" if utils else "; GPU utilisation n/a (no pynvml)"
        else:  # without a synchronisation per step the split means nothing on CUDA
            inside = statistics.median(1e3 * t.step_seconds / t.steps for t in runs)
            line += (f"; a step: {wall:.1f} ms, of which {inside:.1f} ms training step (forward, loss, backward, "
                     f"optimiser, logging) and {wall - inside:.1f} ms around it (data, hooks, epoch ends)")
        print(line)
    ratios = [m.rate / p.rate for m, p in zip(medseg_runs, plain_runs, strict=True)]
    print(f"ratio medseg/plain samples/s (medians): {medseg_rate / plain_rate:.3f} (target >= 0.97); per repeat "
          f"{min(ratios):.3f} to {max(ratios):.3f}, median {statistics.median(ratios):.3f}")
    if cuda and args.tflops_steps > 0:
        print(f"bf16 autocast TFLOP/s: U-Net on {args.tflops_batch} x {args.tflops_size}^3 ...", flush=True)
        tflops, rate, step = bf16_tflops(cfg, args.tflops_size, args.tflops_batch, args.tflops_steps, "cuda")
        print(f"bf16 autocast, U-Net on {args.tflops_batch} x {args.tflops_size}^3 random inputs: {tflops:.1f} TFLOP/s "
              f"achieved, {rate:.2f} patches/s ({step / 1e12:.3f} TFLOP a step, {args.tflops_steps} steps)")


if __name__ == "__main__":
    main()
