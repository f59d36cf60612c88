"""Benchmark of `medseg export`: what exporting costs, and how the exported runtimes predict against the checkpoint.

One checkpoint of the shipped 3D U-Net config (one training step: real weights) is exported with
``--format both``. The script prints, side by side in one run:

* export time and the size of each network file, beside the checkpoint's size;
* the largest absolute logit difference of TorchScript and ONNX against the eager network (on random windows);
* `medseg predict` on the same cases with ``--ckpt`` (eager torch), ``--model --runtime torchscript`` and
  ``--model --runtime onnx``: median seconds per case over interleaved repeats (after an untimed warm-up each),
  in this process (``predict_batch``, what the command runs), the ratio to ``--ckpt``, and the share of voxels
  whose label agrees with ``--ckpt``;
* peak resident memory of each `medseg predict` in a fresh process (``/usr/bin/time -v``).

    python scripts/bench_export.py [--cases 3] [--size 160 160 96] [--repeats 3] [--tta]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_predict import _agreement, machine, make_checkpoint, peak_rss_mb  # noqa: E402

from medseg.data.synthetic import make_synthetic  # noqa: E402
from medseg.inference.batch import PredictOptions, predict_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=3, default=[160, 160, 96])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    medseg = [sys.executable, "-m", "medseg"]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_synthetic(tmp / "train", dims=3, cases=4, size=[64, 64, 32], seed=0)
        ckpt = make_checkpoint(tmp / "train", tmp / "runs", args.patch)
        make_synthetic(tmp / "data", dims=3, cases=args.cases, size=args.size, seed=1, test_cases=0)
        images = tmp / "data" / "imagesTr"
        start = time.perf_counter()
        export = [*medseg, "export", "--ckpt", str(ckpt), "--out", str(tmp / "model"), "--format", "both",
                  *(["--tta"] if args.tta else [])]
        subprocess.run(export, check=True, capture_output=True, cwd=tmp, env=env)
        export_seconds = time.perf_counter() - start
        spec = json.loads((tmp / "model" / "medseg_model.json").read_text())
        runs = {"--ckpt (torch)": ["--ckpt", str(ckpt), *(["--tta"] if args.tta else [])],
                "--model torchscript": ["--model", str(tmp / "model"), "--runtime", "torchscript"],
                "--model onnx": ["--model", str(tmp / "model"), "--runtime", "onnx"]}

        sources = {"--ckpt (torch)": ([ckpt], "auto", args.tta), "--model torchscript": ([tmp / "model"], "torchscript",
                   args.tta), "--model onnx": ([tmp / "model"], "onnx", args.tta)}

        def predict(name: str, out: Path) -> float:  # in this process: the time of predicting, not of importing
            paths, runtime, tta = sources[name]
            begin = time.perf_counter()
            predict_batch(paths, images, PredictOptions(output=out, device="cpu", tta=tta, runtime=runtime))
            return time.perf_counter() - begin

        for name in runs:  # warm-up: file caches, first imports
            predict(name, tmp / f"warm_{len(name)}")
        times: dict[str, list[float]] = {name: [] for name in runs}
        outs = {name: tmp / f"out_{k}" for k, name in enumerate(runs)}
        for r in range(args.repeats):
            for name in runs:
                times[name].append(predict(name, outs[name].with_name(f"{outs[name].name}_{r}")))
        peaks = {name: peak_rss_mb([*medseg, "predict", "--device", "cpu", "--input", str(images), "--output",
                                    str(tmp / f"rss_{k}"), *runs[name]], env, cwd=tmp)
                 for k, name in enumerate(runs)}
        reference = outs["--ckpt (torch)"].with_name(f"{outs['--ckpt (torch)'].name}_0")
        agreement = {name: _agreement(reference, outs[name].with_name(f"{outs[name].name}_0")) for name in runs}
        sizes = {p.name: p.stat().st_size for p in (tmp / "model" / "networks").iterdir()}
        ckpt_size = ckpt.stat().st_size
    member = spec["members"][0]
    print(f"machine: {machine('cpu')}")
    print(f"3D U-Net (seg3d_unet.yaml), roi {args.patch}; {args.cases} cases of {'x'.join(map(str, args.size))}; "
          f"TTA {'8 flips' if args.tta else 'off'}; {args.repeats} repeats (medians)")
    print(f"export --format both: {export_seconds:.1f} s (a fresh process, imports included); checkpoint "
          f"{ckpt_size / 1e6:.2f} MB; " + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sorted(sizes.items())))
    print(f"max |logit diff| vs eager: TorchScript {member['torchscript_max_abs_diff']:.1e} "
          f"({member['torchscript_by']}), ONNX {member['onnx_max_abs_diff']:.1e}")
    base = statistics.median(times["--ckpt (torch)"]) / args.cases
    print("| predict with | s/case (median) | ratio to --ckpt | label agreement with --ckpt | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name in runs:
        per_case = statistics.median(times[name]) / args.cases
        print(f"| {name} | {per_case:.3f} | {per_case / base:.3f} | {agreement[name]:.6f} | {peaks[name]:.0f} |")


if __name__ == "__main__":
    main()
