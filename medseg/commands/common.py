"""What the sub-commands share: the refusal they raise, option types, and each command's one-line description."""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """A refusal that ``medseg`` reports as one line ``medseg <command>: <message>`` and exit code 2 (the whole
    traceback, with the error it was raised from, under ``--verbose``)."""


def doc(command: str) -> str:
    """The one-line description of ``command`` in :data:`medseg.cli.USAGE`."""
    from medseg.cli import USAGE

    for line in USAGE.splitlines():
        if line.strip().startswith(command + " "):
            return line.strip()[len(command) :].strip()
    return ""


def count(text: str) -> int:
    """A positive whole number, also written as ``2e9``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number (e.g. 2000000000 or 2e9)")
    return int(value)


def max_voxels_option(parser: argparse.ArgumentParser) -> None:
    """``--max-voxels``: the most voxels an image header may claim."""
    from medseg.data.io import DEFAULT_MAX_VOXELS

    parser.add_argument("--max-voxels", type=count, default=DEFAULT_MAX_VOXELS,
                        help="the most voxels an image header may claim; larger claims (and claims the file is too "
                             f"small to hold) are refused before any voxel is read (default {DEFAULT_MAX_VOXELS:,})")


def prediction_options(parser: argparse.ArgumentParser, ensemble_default: str | None = "mean") -> None:
    """``--tta``, ``--tta-axes``, ``--ensemble``, ``--postprocess`` and ``--calibration``: how members and flips
    combine and what follows (``medseg predict`` takes them, ``medseg export`` bakes them into the model)."""
    parser.add_argument("--tta", action="store_true", help="average over flips along every combination of axes")
    parser.add_argument("--tta-axes", type=int, nargs="+", default=None, help="flip only these spatial axes")
    parser.add_argument("--ensemble", choices=("mean", "vote"), default=ensemble_default,
                        help="how members combine (default mean)")
    parser.add_argument("--postprocess", default=None, help="post-processing spec: JSON/YAML file or JSON text")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="calibration.json of medseg cv: its temperature rescales the probabilities (the labels "
                             "do not change)")


def number(value: object, digits: int = 4) -> str:
    """A metric value for the terminal: ``digits`` decimals below 10 (``0.9123``), two fewer from 10 on
    (``25.82``); text as it is."""
    if isinstance(value, (int, float)):
        value = float(value)
        return f"{value:.{digits if abs(value) < 10 else max(digits - 2, 1)}f}"
    return "" if value is None else str(value)


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """Rows of text in columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return indent + "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])
