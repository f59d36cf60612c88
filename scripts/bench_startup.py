"""Start-up time of the ``medseg`` command: ``--help``, a command's ``--help`` and an argument error, each run
``--repeat`` times in a fresh process; the median wall seconds, before and after, side by side.

"before" is another checkout of medseg, e.g. the commit before lazy imports, made without touching this tree::

    git worktree add /tmp/st_before 0666d88
    python scripts/bench_startup.py --before /tmp/st_before [--repeat 5]
    git worktree remove /tmp/st_before

Each checkout runs as ``python -m medseg ...`` from its own folder (so its own ``medseg`` package is the one
imported), with this interpreter and its installed libraries. ``check-data``, ``make-synthetic`` and
``evaluate`` also run on a tiny dataset, and the script says whether each imported Lightning.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AFTER = Path(__file__).parents[1]
STARTS = {
    "medseg --help": ["--help"],
    "medseg check-data --help": ["check-data", "--help"],
    "medseg evaluate --help": ["evaluate", "--help"],
    "medseg predict --help": ["predict", "--help"],
    "medseg cv --help": ["cv", "--help"],
    "medseg evaluate (argument error)": ["evaluate"],
    "medseg check-data (argument error)": ["check-data"],
}
# Run on a dataset: does the command import Lightning? (printed by the child at exit)
PROBE = ("import atexit, sys, runpy; atexit.register(lambda: print('LIGHTNING', 'pytorch_lightning' in sys.modules, "
         "file=sys.stderr)); sys.argv = ['medseg', *sys.argv[1:]]; runpy.run_module('medseg', run_name='__main__')")


def wall_seconds(checkout: Path, args: list[str], repeat: int) -> float:
    """The median wall time of ``python -m medseg ARGS`` in ``checkout`` over ``repeat`` fresh processes."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medseg", *args], cwd=checkout, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def imports_lightning(checkout: Path, args: list[str]) -> str:
    """``yes``/``no``: whether ``medseg ARGS`` run from ``checkout`` imported pytorch_lightning."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=checkout, capture_output=True, text=True,
                            check=False)
    return "yes" if "LIGHTNING True" in result.stderr else "no" if "LIGHTNING False" in result.stderr else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (git worktree add DIR REV)")
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per command and checkout")
    args = parser.parse_args()
    if not (args.before / "medseg" / "__main__.py").is_file():
        sys.exit(f"{args.before}: no medseg checkout there; make one: git worktree add {args.before} 0666d88")
    env_threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}, "
          f"OMP_NUM_THREADS {env_threads}; median of {args.repeat} fresh processes, wall seconds")
    print(f"{'command':<38} {'before':>8} {'after':>8} {'ratio':>7}")
    for name, command in STARTS.items():
        before, after = (wall_seconds(c, command, args.repeat) for c in (args.before, AFTER))
        print(f"{name:<38} {before:8.2f} {after:8.2f} {before / after:6.1f}x", flush=True)
    with tempfile.TemporaryDirectory(prefix="medseg_startup_") as work:
        data, out = Path(work) / "data", Path(work) / "eval"
        runs = {
            "make-synthetic": ["make-synthetic", "--out", str(data), "--dims", "2", "--cases", "2", "--size", "24",
                               "24"],
            "check-data": ["check-data", str(data)],
            "evaluate": ["evaluate", "--pred", str(data / "labelsTr"), "--truth", str(data / "labelsTr"),
                         "--output", str(out)],
        }
        print(f"\n{'imports pytorch_lightning':<38} {'before':>8} {'after':>8}")
        for name, command in runs.items():
            found = [imports_lightning(c, command) for c in (args.before, AFTER)]
            print(f"{'medseg ' + name:<38} {found[0]:>8} {found[1]:>8}", flush=True)


if __name__ == "__main__":
    main()
