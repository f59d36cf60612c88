"""What medseg shows on the terminal: its own log lines, the library noise it hides, the end-of-fit summary and
the progress of ``cv`` and ``benchmark``.

:func:`install` (called by ``medseg``'s ``main``; call it yourself from Python for the same console) hides five
messages that every run printed and that say nothing about the run, each matched by its exact text and origin
so that every other warning still shows:

* Lightning's ``LightningCLI's args parameter is intended to run from within Python ...`` (a ``UserWarning``
  from ``pytorch_lightning.cli``, printed with the whole command line): medseg passes the command line as
  ``args`` on purpose.
* Lightning's ``💡 Tip: ... litlogger ...`` advertisement, an INFO record of its rank-zero logger.
* torch's ``isinstance(treespec, LeafSpec) is deprecated`` ``FutureWarning``, raised where Lightning's own
  ``pytorch_lightning/utilities/_pytree.py`` builds a ``LeafSpec``; nothing medseg can change.
* MONAI's ``axcodes (...) length is smaller than number of input spatial dimensions D=2`` from
  ``monai.transforms.spatial.array`` (``Orientation``): undoing the orientation of a 2D image builds the
  axis codes from its 4x4 affine (three codes) and cuts them to the two spatial axes; the "channel-first"
  advice it gives does not apply. The same message for any other D still shows.
* MONAI's ``NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register`` (``monai.data.image_reader``)
  and its log record ``nvImageCodec is not available``: with pydicom installed (medseg reads DICOM), every
  ``LoadImage`` builds MONAI's GPU DICOM reader, which says so each time; medseg reads DICOM with its own reader.

Importing this module imports neither torch nor Lightning: the ``medseg`` command starts fast. The progress of
``cv`` and ``benchmark`` is :mod:`medseg.progress`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

# (message regex, category, module regex) of each warning hidden; see the module docstring.
HIDDEN_WARNINGS = (
    ("LightningCLI's args parameter is intended to run from within Python", UserWarning,
     r"(pytorch_lightning|lightning\.pytorch)\.cli$"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     r"(pytorch_lightning|lightning\.pytorch)\.utilities\._pytree$"),
    (r"axcodes \(.*\) length is smaller than number of input spatial dimensions D=2\.", UserWarning,
     r"monai\.transforms\.spatial\.array$"),
    ("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", UserWarning,
     r"monai\.data\.image_reader$"),
)
# (logger, message start) of each log record hidden: MONAI builds its GPU DICOM reader for every LoadImage
# (whenever pydicom is installed) and says, each time, that the GPU decoder is missing.
HIDDEN_RECORDS = (("monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available"),)
# Lightning's rank-zero helpers log through whichever of these its packages set last (`rank_zero_module.log`).
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                     "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning_utilities.core.rank_zero")


class StartsWith(logging.Filter):
    """Drops the records whose message starts with ``text`` (and nothing else)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.text)


class LitLoggerTip(logging.Filter):
    """Drops Lightning's "install litlogger" tip (and nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and "litlogger" in message)


def install() -> None:
    """Hide the messages listed in the module docstring and show medseg's own log lines on stderr. Idempotent."""
    hide_library_noise()
    show_medseg_logs()


def hide_library_noise() -> None:
    """Hide only the library messages listed in the module docstring (``medseg.load`` calls this). Idempotent."""
    for message, category, module in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, LitLoggerTip) for f in logger.filters):
            logger.addFilter(LitLoggerTip())
    for name, text in HIDDEN_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, StartsWith) and f.text == text for f in logger.filters):
            logger.addFilter(StartsWith(text))


def show_medseg_logs() -> None:
    """medseg's own log records (e.g. where the sliding window stitches) go to stderr, one line each."""
    logger = logging.getLogger("medseg")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("medseg: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the one at start-up), so output
    redirected or captured later still gets medseg's messages."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def duration(seconds: float, decimals: int = 0) -> str:
    """``"45 s"`` (``"45.3 s"`` with ``decimals=1``), ``"3 min 20 s"``, ``"2 h 05 min"``."""
    seconds = max(float(seconds), 0.0)
    if round(seconds, decimals) < 60:
        return f"{seconds:.{decimals}f} s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600:,} h {whole % 3600 // 60:02d} min"


def fit_summary(result: Any) -> str:
    """What ``medseg fit`` prints when it ends: the run folder, the best checkpoint with its monitored value and
    epoch, the last checkpoint and the time taken.

    Args:
        result: a :class:`medseg.training.FitResult`.
    """
    trainer = result.cli.trainer if result.cli is not None else None
    state = "interrupted" if trainer is not None and trainer.interrupted else "done"
    folder = result.log_dir if result.log_dir not in ("", "None") else "none (no logger)"
    lines = [f"medseg fit: {state} in {duration(result.seconds)}; run folder {folder}"]
    monitored = [c for c in (trainer.checkpoint_callbacks if trainer is not None else [])
                 if c.monitor is not None and c.best_model_path and c.best_model_score is not None]
    if monitored:
        callback = monitored[0]
        lines.append(f"  best {callback.monitor} {float(callback.best_model_score):.4g}"
                     f"{_epoch_of(callback.best_model_path)}: {callback.best_model_path}")
    else:
        watched = sorted({c.monitor for c in (trainer.checkpoint_callbacks if trainer else []) if c.monitor})
        reason = f"no {', '.join(watched)} logged yet" if watched else "no checkpoint monitors a metric"
        lines.append(f"  best: none ({reason})")
    lines.append(f"  last checkpoint: {result.last or 'none written'}")
    return "\n".join(lines)


def _epoch_of(checkpoint: str) -> str:
    """`` at epoch N`` (Lightning's 0-based epoch, as in checkpoint file names and metrics.csv) of a checkpoint."""
    from pathlib import Path

    from medseg.resume import checkpoint_summary

    try:
        epoch = checkpoint_summary(Path(checkpoint))["epoch"]
    except (ValueError, OSError):
        return ""
    return f" at epoch {epoch}" if epoch is not None else ""

