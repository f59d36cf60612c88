"""Benchmarks of `medseg predict`: speed against a bare MONAI loop, and peak memory against the ensemble size.

Speed (``--mode speed``, the default): `medseg predict` against what a user writes by hand with MONAI (LoadImaged,
Orientationd, NormalizeIntensityd, ``sliding_window_inference`` once per test-time flip, the flips averaged,
``Invertd`` back to the input grid, argmax, nibabel out), with the same checkpoint, roi, overlap, blending,
window batch, flips and inputs. Runs are interleaved and repeated after one untimed warm-up of each; the script
prints the median cases/s of each and their ratio (medseg / bare). On CUDA, ``--amp`` also times medseg with
``--precision 16`` against ``--precision 32`` and samples GPU utilisation with ``nvidia-smi``.

    python scripts/bench_predict.py [--cases 2] [--size 256 256 128] [--repeats 3] [--tta] [--device cpu|cuda] [--amp]

Memory (``--mode memory``): peak resident memory of `medseg predict` in a fresh process (``/usr/bin/time -v``) on
one volume, for 1, 8 and 16 members (1 checkpoint; 1 checkpoint x 8 flips; 2 checkpoints x 8 flips), printed
beside the ratio to 1 member, and beside one float32 probability map of the volume. The runtime and model alone
are measured on a tiny volume with the same command. ``--medseg-path DIR`` runs another checkout of medseg
(e.g. an older commit, for a before/after comparison).

    python scripts/bench_predict.py --mode memory [--size 256 256 128] [--classes 3] [--members 1 8 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from medseg.data.io import write_nifti
from medseg.data.synthetic import make_synthetic
from medseg.inference.batch import PredictOptions, predict_batch
from medseg.inference.native import flip_sets, load_model, preprocess_for
from medseg.lightning_cli import MedSegCLI
from medseg.resume import saved_checkpoint

CONFIG = Path(__file__).parents[1] / "configs" / "seg3d_unet.yaml"


def make_checkpoint(root: Path, out: Path, patch: list[int], channels: list[int] | None = None, seed: int = 0) -> Path:
    """One training step of the shipped 3D U-Net config: real weights, a real checkpoint."""
    extra = ["--model.init_args.network_args", str({"channels": channels})] if channels else []
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIG), "--data.root", str(root), "--trainer.default_root_dir", str(out),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.patch_size", str(patch),
        "--seed_everything", str(seed), *extra,
    ])
    return Path(saved_checkpoint(cli.trainer))


def bare_loop(ckpt: Path, files: list[Path], out: Path, device: str, flips: list[tuple[int, ...]]) -> None:
    """What a user writes by hand with MONAI: the checkpoint's preprocessing as MONAI transforms, one sliding
    window per flip, the softmaxes averaged, Invertd back to the input grid, argmax, nibabel out."""
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    model = load_model(ckpt, device=device)
    hp = model.hparams
    preprocess = preprocess_for(model)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for path in files:
            data = preprocess({"image": str(path)})
            x = data["image"].as_tensor()[None].to(device)
            mean = None
            for flip in flips:
                dims = [a + 2 for a in flip]
                logits = sliding_window_inference(torch.flip(x, dims) if dims else x, hp["roi_size"],
                                                  hp.get("sw_batch_size", 4), model.net,
                                                  overlap=hp.get("overlap", 0.25), mode="gaussian")
                p = torch.softmax(logits, dim=1)
                p = torch.flip(p, dims) if dims else p
                mean = p if mean is None else mean + p
            pred = MetaTensor(mean[0].cpu() / len(flips), meta=dict(data["image"].meta))
            pred.applied_operations = list(data["image"].applied_operations)
            data["pred"] = pred
            inverted = mt.Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=False)(data)
            labels = inverted["pred"].argmax(0).numpy().astype(np.uint8)
            write_nifti(labels, data["image"].meta["original_affine"], out / path.name)


def machine(device: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return f"{platform.node()} | {name} | {os.cpu_count()} CPUs | torch {torch.__version__} | threads {torch.get_num_threads()}"


class GpuSampler:
    """GPU utilisation (%) sampled every 200 ms with nvidia-smi while running (empty list without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def speed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_synthetic(tmp / "train", dims=3, cases=4, size=[64, 64, 32], seed=0)
        ckpt = make_checkpoint(tmp / "train", tmp / "runs", args.patch)
        make_synthetic(tmp / "data", dims=3, cases=args.cases, size=args.size, seed=1)
        files = sorted((tmp / "data" / "imagesTr").glob("*.nii.gz"))
        inputs = tmp / "inputs"
        inputs.mkdir()
        for f in files:
            (inputs / f.name).symlink_to(f)
        flips = flip_sets(3) if args.tta else [()]

        def medseg(out: Path, precision: str = "32") -> float:
            start = time.perf_counter()
            predict_batch([ckpt], inputs, PredictOptions(output=out, device=args.device, tta=args.tta,
                                                         precision=precision))
            return time.perf_counter() - start

        def bare(out: Path) -> float:
            start = time.perf_counter()
            bare_loop(ckpt, files, out, args.device, flips)
            return time.perf_counter() - start

        medseg(tmp / "warmup_medseg")  # first runs pay one-off costs: not timed
        bare(tmp / "warmup_bare")
        medseg_times, bare_times = [], []
        for r in range(args.repeats):
            medseg_times.append(medseg(tmp / f"medseg{r}"))
            bare_times.append(bare(tmp / f"bare{r}"))
        agree = _agreement(tmp / f"medseg{args.repeats - 1}", tmp / f"bare{args.repeats - 1}")
        amp = _amp(medseg, tmp, args.repeats) if args.amp else None
    medseg_rate = len(files) / statistics.median(medseg_times)
    bare_rate = len(files) / statistics.median(bare_times)
    print(f"machine: {machine(args.device)}")
    print(f"cases {len(files)} of {args.size}, roi {args.patch}, TTA {len(flips)} flip(s), repeats {args.repeats} (medians)")
    print(f"medseg predict : {medseg_rate:8.4f} cases/s  (runs: {', '.join(f'{t:.2f}s' for t in medseg_times)})")
    print(f"bare MONAI loop: {bare_rate:8.4f} cases/s  (runs: {', '.join(f'{t:.2f}s' for t in bare_times)})")
    print(f"ratio medseg/bare: {medseg_rate / bare_rate:.3f}   label agreement medseg vs bare: {agree:.5f}")
    if amp:
        print(amp)


def _agreement(a: Path, b: Path) -> float:
    import nibabel as nib

    same = total = 0
    for path in sorted(a.glob("*.nii.gz")):
        x, y = np.asarray(nib.load(path).dataobj), np.asarray(nib.load(b / path.name).dataobj)
        same += int((x == y).sum())
        total += x.size
    return same / max(total, 1)


def _amp(medseg: object, tmp: Path, repeats: int) -> str:
    fp32, fp16 = [], []
    with GpuSampler() as gpu:
        for r in range(repeats):
            fp32.append(medseg(tmp / f"fp32_{r}", "32"))  # type: ignore[operator]
            fp16.append(medseg(tmp / f"fp16_{r}", "16"))  # type: ignore[operator]
    busy = f"{statistics.mean(gpu.samples):.0f}% mean GPU utilisation" if gpu.samples else "no nvidia-smi samples"
    return (f"AMP: fp16 {statistics.median(fp16):.2f}s vs fp32 {statistics.median(fp32):.2f}s per run, speed-up "
            f"{statistics.median(fp32) / statistics.median(fp16):.2f}x ({busy})")


def peak_rss_mb(command: list[str], env: dict[str, str], cwd: Path, exit_codes: tuple[int, ...] = (0,)) -> float:
    """Peak resident memory (MB) of ``command`` in a fresh process, from ``/usr/bin/time -v``. ``cwd`` matters:
    ``python -m medseg`` imports the medseg of the working directory before ``PYTHONPATH``'s. An exit code
    outside ``exit_codes`` is an error."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode not in exit_codes:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    kilobytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if not kilobytes:
        raise RuntimeError("/usr/bin/time -v printed no maximum resident set size")
    return int(kilobytes.group(1)) / 1024


def memory(args: argparse.Namespace) -> None:
    if not Path("/usr/bin/time").exists():
        sys.exit("needs /usr/bin/time (Debian package 'time')")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.medseg_path:
        env["PYTHONPATH"] = str(Path(args.medseg_path).resolve())
    medseg = [sys.executable, "-m", "medseg"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_synthetic(tmp / "train", dims=3, cases=4, classes=args.classes, size=[48, 48, 24], seed=0)
        ckpts = [make_checkpoint(tmp / "train", tmp / f"runs{i}", args.patch, args.channels, seed=i) for i in (0, 1)]
        big, tiny = tmp / "big", tmp / "tiny"
        for folder, size in ((big, args.size), (tiny, [32, 32, 16])):
            folder.mkdir()
            rng = np.random.default_rng(0)
            image = (rng.normal(1000, 200, size=size)).astype(np.float32)
            write_nifti(image, np.diag([-0.8, 0.8, 2.5, 1.0]), folder / "case.nii.gz")
        runs = {1: ([ckpts[0]], False), 8: ([ckpts[0]], True), 16: (ckpts, True)}

        def run(folder: Path, members: int, out: str) -> float:
            chosen, tta = runs[members]
            command = [*medseg, "predict", "--device", args.device, "--input", str(folder), "--output",
                       str(tmp / out), *(a for c in chosen for a in ("--ckpt", str(c))), *(["--tta"] if tta else [])]
            return peak_rss_mb(command, env, cwd=tmp)

        baseline = run(tiny, 1, "out_tiny")
        peaks = {m: run(big, m, f"out_big{m}") for m in args.members}
    voxels = int(np.prod(args.size))
    one_map = voxels * args.classes * 4 / 2**20
    print(f"machine: {machine(args.device)}; medseg from {args.medseg_path or 'this checkout'}")
    print(f"volume {'x'.join(map(str, args.size))} ({voxels / 1e6:.1f} M voxels), {args.classes} classes: one float32 "
          f"probability map = {one_map:.0f} MB; runtime + model alone (a 32x32x16 volume) = {baseline:.0f} MB")
    print("| members | peak RSS (MB) | ratio to 1 member | (peak - runtime) / one map |")
    print("|---|---|---|---|")
    for m, peak in peaks.items():
        print(f"| {m} | {peak:.0f} | {peak / peaks[min(peaks)]:.3f} | {(peak - baseline) / one_map:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("speed", "memory"), default="speed")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="speed: all 8 flips on both sides")
    parser.add_argument("--amp", action="store_true", help="speed on CUDA: --precision 16 against 32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=3, help="memory: classes including background")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 16], choices=(1, 8, 16))
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8, 16],
                        help="memory: U-Net channels (small: the maps, not the network, are measured)")
    parser.add_argument("--threads", type=int, default=2, help="memory: OMP_NUM_THREADS of the predict processes")
    parser.add_argument("--medseg-path", default=None, help="memory: run medseg from this checkout instead")
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None and args.amp:
        print("note: no nvidia-smi, GPU utilisation will not be sampled")
    speed(args) if args.mode == "speed" else memory(args)


if __name__ == "__main__":
    main()
