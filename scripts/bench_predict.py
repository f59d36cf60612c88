"""Benchmark: `medseg predict` against a bare MONAI sliding-window loop, same model, weights, roi, overlap, inputs.

Both paths read every NIfTI file, predict by sliding window, take the argmax and write a label NIfTI; medseg
also reorients, inverts its preprocessing and writes atomically. Runs are interleaved and repeated; the script
prints the median cases/s of each and their ratio (medseg / bare), plus the machine. One untimed
warm-up run of each comes first.

    python scripts/bench_predict.py [--cases 8] [--size 96 96 48] [--repeats 3] [--device cpu|cuda]

On CUDA medseg runs with fp16 autocast; the bare loop stays fp32 (the issue's comparison).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medseg.data.io import write_nifti
from medseg.data.synthetic import make_synthetic
from medseg.inference.batch import PredictOptions, predict_batch
from medseg.inference.native import load_model
from medseg.lightning_cli import MedSegCLI
from medseg.resume import saved_checkpoint

CONFIG = Path(__file__).parents[1] / "configs" / "seg3d_unet.yaml"


def make_checkpoint(root: Path, out: Path, patch: list[int]) -> Path:
    """One training step of the shipped 3D U-Net config: real weights, real checkpoint."""
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIG), "--data.root", str(root), "--trainer.default_root_dir", str(out),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.patch_size", str(patch),
    ])
    return Path(saved_checkpoint(cli.trainer))


def bare_loop(ckpt: Path, files: list[Path], out: Path, device: str) -> None:
    """What a user writes by hand: nibabel in, z-score, sliding window, argmax, nibabel out."""
    model = load_model(ckpt, device=device)
    hp = model.hparams
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for path in files:
            img = nib.load(str(path))
            x = np.ascontiguousarray(img.dataobj, dtype=np.float32)  # nibabel gives Fortran order
            nz = x[x != 0]
            x = (x - nz.mean()) / (nz.std() + 1e-8)
            logits = sliding_window_inference(
                torch.from_numpy(x)[None, None].to(device), hp["roi_size"], hp.get("sw_batch_size", 4), model.net,
                overlap=hp.get("overlap", 0.25), mode="gaussian",
            )
            labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
            write_nifti(labels, img.affine, out / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=3, default=[96, 96, 48])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic(tmp / "data", dims=3, cases=max(args.cases, 4), size=args.size, seed=0)
        ckpt = make_checkpoint(tmp / "data", tmp / "runs", args.patch)
        files = sorted((tmp / "data" / "imagesTr").glob("*.nii.gz"))[: args.cases]
        inputs = tmp / "inputs"
        inputs.mkdir()
        for f in files:
            (inputs / f.name).symlink_to(f)
        predict_batch([ckpt], inputs, PredictOptions(output=tmp / "warmup_medseg", device=args.device))
        bare_loop(ckpt, files, tmp / "warmup_bare", args.device)  # first runs pay one-off costs: not timed
        medseg_times, bare_times = [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            predict_batch([ckpt], inputs, PredictOptions(output=tmp / f"medseg{r}", device=args.device))
            medseg_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            bare_loop(ckpt, files, tmp / f"bare{r}", args.device)
            bare_times.append(time.perf_counter() - start)
    medseg_rate = len(files) / statistics.median(medseg_times)
    bare_rate = len(files) / statistics.median(bare_times)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"machine: {platform.node()} | {device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"cases {len(files)} of {args.size}, roi {args.patch}, repeats {args.repeats} (medians)")
    print(f"medseg predict : {medseg_rate:8.3f} cases/s  (runs: {', '.join(f'{t:.2f}s' for t in medseg_times)})")
    print(f"bare MONAI loop: {bare_rate:8.3f} cases/s  (runs: {', '.join(f'{t:.2f}s' for t in bare_times)})")
    print(f"ratio medseg/bare: {medseg_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
