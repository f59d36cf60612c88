"""Peak memory of `medseg check-data` and `medseg predict` when one image's header lies about its size.

A ``.nii.gz`` of about 100 bytes (8 KB of zero voxels, compressed) whose header claims 20000 x 20000 float32
voxels (1.6 GB) replaces one image of a small
synthetic 3D dataset. Each command runs in a fresh process under ``/usr/bin/time -v``, on the clean dataset and
on the forged one; the script prints both peaks and their ratio (1.0: the forged file cost nothing).
``--medseg-path DIR`` measures another checkout (e.g. an older commit) for a before/after comparison.

    python scripts/bench_forged_header.py [--claim 20000 20000 1] [--medseg-path DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_predict import make_checkpoint, peak_rss_mb  # noqa: E402

from medseg.data.synthetic import make_synthetic, write_forged_header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim", type=int, nargs="+", default=[20000, 20000, 1])
    parser.add_argument("--medseg-path", type=Path, default=Path(__file__).parents[1])
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("needs /usr/bin/time (Debian package 'time')")
    work = Path(tempfile.mkdtemp(prefix="medseg_forged_"))
    try:
        clean = make_synthetic(work / "clean", dims=3, cases=4, classes=2, task="seg", size=(24, 24, 12), seed=0).parent
        forged = Path(shutil.copytree(clean, work / "forged"))
        write_forged_header(forged / "imagesTr" / "case_001.nii.gz", args.claim)
        checkpoint = make_checkpoint(clean, work / "runs", [16, 16, 8], channels=[4, 8, 16])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        python = [sys.executable, "-m", "medseg"]
        claimed_gb = np.prod(args.claim, dtype=np.int64) * 4 / 1e9
        print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), medseg from {args.medseg_path}")
        print(f"forged file: {(forged / 'imagesTr' / 'case_001.nii.gz').stat().st_size} bytes claiming "
              f"{'x'.join(map(str, args.claim))} float32 ({claimed_gb:.1f} GB)")
        print(f"{'command':<12} {'clean MB':>9} {'forged MB':>10} {'ratio':>6}")
        for name, command in (
            ("check-data", lambda root: [*python, "check-data", str(root)]),
            ("predict", lambda root: [*python, "predict", "--device", "cpu", "--ckpt", str(checkpoint), "--input",
                                      str(root / "imagesTr"), "--output", str(work / f"out_{root.name}"),
                                      "--overwrite"]),
        ):
            peaks = [peak_rss_mb(command(root), env, args.medseg_path, exit_codes=(0, 1)) for root in (clean, forged)]
            print(f"{name:<12} {peaks[0]:>9.0f} {peaks[1]:>10.0f} {peaks[1] / peaks[0]:>6.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
