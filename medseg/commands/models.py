"""``medseg models``: every network name a config can use, where it comes from, its task, and its size."""

from __future__ import annotations

import argparse
from typing import Any

from medseg.commands.common import doc

TASKS = ("segmentation", "classification", "multitask")  # medseg.models.registry.TASKS, written out: help without torch


def parser() -> argparse.ArgumentParser:
    """The options of ``medseg models``."""
    parser = argparse.ArgumentParser(
        prog="medseg models", description=doc("models"),
        epilog="Any nn.Module factory also works as `network: package.module:callable` (README, Models).")
    parser.add_argument("--task", choices=TASKS, default=None, help="only the networks of this task")
    parser.add_argument("--no-count", action="store_true",
                        help="skip the parameter counts (each network is built at its default options, on the "
                             "meta device: no memory, but each package is imported)")
    return parser


def parameter_count(name: str, spatial_dims: int, in_channels: int = 1, out_channels: int = 2) -> int | None:
    """Parameters of network ``name`` at its default options, or None when it does not build so (a network
    that needs options, or not in this dimension). Built on the meta device (shapes only), on the CPU when a
    network cannot be built there."""
    import torch

    from medseg.models import create_model

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                net = create_model(name, spatial_dims, in_channels, out_channels)
        except Exception:  # any failure of a network's own code means "not at these options"
            continue
        return sum(p.numel() for p in net.parameters())
    return None


def rows(task: str | None = None, count: bool = True) -> list[dict[str, Any]]:
    """One row per registered network: ``name``, ``source`` (``medseg`` or the entry point's distribution and
    version), ``task``, ``dims`` (the dimensions it builds in at default options), ``params`` (``{2: n, 3: n}``,
    None where it does not build) and ``description``."""
    from medseg.models import get_model_spec, list_models
    from medseg.models.external import network_source

    found = []
    for name in list_models(task):
        spec, source = get_model_spec(name), network_source(name)
        params = {dims: parameter_count(name, dims) for dims in (2, 3)} if count else {2: None, 3: None}
        origin = "medseg" if source is None else " ".join(
            str(part) for part in (source["distribution"] or source["module"], source["version"]) if part)
        found.append({"name": name, "source": origin, "task": spec.task, "params": params,
                      "dims": [d for d, n in params.items() if n is not None] if count else [],
                      "description": spec.description})
    return found


def _table(found: list[dict[str, Any]], count: bool) -> list[str]:
    header = ["name", "source", "task"] + (["dims", "params 2D", "params 3D"] if count else []) + ["description"]
    lines = []
    for row in found:
        cells = [row["name"], row["source"], row["task"]]
        if count:
            cells += ["/".join(f"{d}D" for d in row["dims"]) or "-",
                      *(f"{n:,}" if n is not None else "-" for n in row["params"].values())]
        lines.append([*cells, row["description"]])
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header) - 1)]
    align = [">" if h.startswith("params") else "<" for h in header]
    return ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line[:-1], align, widths, strict=False)) + "  " +
            str(line[-1]) for line in [header, *lines]]


def run(argv: list[str]) -> int:
    """``medseg models [--task T] [--no-count]``: the table on stdout, entry points that failed to load after it
    (exit code 0: a broken plugin is reported, it does not stop medseg)."""
    args = parser().parse_args(argv)
    from medseg.models.external import load_entry_points

    count = not args.no_count
    for line in _table(rows(args.task, count), count):
        print(line.rstrip())
    failures = load_entry_points().failures
    if failures:
        print(f"\nleft out ({len(failures)}):")
        for name, reason in sorted(failures.items()):
            print(f"  {name}: {reason}")
    if count:
        print("\nparams: at default options, in_channels=1, out_channels=2; '-' = needs options or not in this "
              "dimension")
    return 0
