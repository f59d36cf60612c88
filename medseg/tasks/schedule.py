"""A learning-rate schedule whose length is the fit in force: ``max_epochs``/``max_steps`` and ``max_time``.

:class:`Annealing` maps training *progress* in ``[0, 1]`` to a factor of the initial learning rate. The
LightningModule sets the progress before every step of the scheduler (once per optimizer step) from what the
trainer will stop at, so a command-line ``--trainer.max_epochs 300`` or ``--trainer.max_time 00:00:02:30``
stretches or shortens the schedule and the run always ends annealed::

    scheduler:
      class_path: medseg.tasks.schedule.Annealing
      init_args: {kind: cosine, warmup: 0.0, min_lr_ratio: 0.0}

Progress is ``max(global_step / total_steps, elapsed_seconds / max_seconds)`` over the limits the trainer
has (:class:`FitLimits`). Both survive a resume: ``global_step`` is in the checkpoint, and the elapsed time is
the one Lightning's ``Timer`` (the callback that enforces ``max_time``) saves and restores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer

from medseg.errors import ConfigError

logger = logging.getLogger("medseg")

KINDS = ("cosine", "poly")


def lr_factor(progress: float, kind: str = "cosine", min_lr_ratio: float = 0.0, warmup: float = 0.0,
              power: float = 0.9) -> float:
    """The learning rate, as a fraction of the initial one, at ``progress`` through the fit.

    Args:
        progress: fraction of the fit done, clipped to ``[0, 1]``.
        kind: ``"cosine"`` (half a cosine) or ``"poly"`` (nnU-Net's ``(1 - p) ** power``).
        min_lr_ratio: the factor at the end of the fit.
        warmup: fraction of the fit over which the factor rises linearly from 0 to 1 first.
        power: exponent of ``"poly"``.

    Returns:
        The factor, 1 at the start (after any warmup), ``min_lr_ratio`` at the end.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    decay = (progress - warmup) / (1.0 - warmup)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * decay))
    else:
        shape = (1.0 - decay) ** power
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class Annealing(torch.optim.lr_scheduler.LRScheduler):
    """Cosine or polynomial decay over the whole fit, whatever limits its length; stepped every optimizer step.

    Holds no length of its own: :class:`~medseg.tasks.base.MedSegModule` sets :attr:`progress` (from
    :class:`FitLimits`) before each :meth:`step`.

    Args:
        optimizer: the optimizer whose learning rates it sets (``initial lr x factor``).
        kind: ``"cosine"`` or ``"poly"`` (see :func:`lr_factor`).
        min_lr_ratio: the learning rate at the end, as a fraction of the initial one, in ``[0, 1)``.
        warmup: fraction of the fit spent rising linearly from 0 to the initial rate, in ``[0, 1)``.
        power: exponent of ``"poly"`` (nnU-Net: 0.9).
        last_epoch: steps already taken; ``-1`` for a new schedule (torch's convention).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: Literal["cosine", "poly"] = "cosine",
                 min_lr_ratio: float = 0.0, warmup: float = 0.0, power: float = 0.9, last_epoch: int = -1) -> None:
        _check_arguments(kind, min_lr_ratio, warmup, power)
        self.kind = kind
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup = float(warmup)
        self.power = float(power)
        self.progress = 0.0
        super().__init__(optimizer, last_epoch)

    def factor(self) -> float:
        """The factor of the initial learning rate at the current :attr:`progress`."""
        return lr_factor(self.progress, self.kind, self.min_lr_ratio, self.warmup, self.power)

    def get_lr(self) -> list[float]:
        """The learning rate of each parameter group at the current :attr:`progress`."""
        return [float(base) * self.factor() for base in self.base_lrs]

    def describe(self) -> str:
        """``"cosine to 0 x the initial rate"``, with the warmup if any: for the log line at fit start."""
        text = f"{self.kind} to {self.min_lr_ratio:g} x the initial rate"
        return text + (f" after a {self.warmup:.0%} linear warmup" if self.warmup else "")


def _check_arguments(kind: str, min_lr_ratio: float, warmup: float, power: float) -> None:
    """Refuse arguments with no schedule behind them, naming the one to change."""
    if kind not in KINDS:
        raise ConfigError(f"Annealing kind {kind!r}: use one of {', '.join(KINDS)}")
    if not 0.0 <= min_lr_ratio < 1.0:
        raise ConfigError(f"Annealing min_lr_ratio {min_lr_ratio}: use a value in [0, 1)")
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"Annealing warmup {warmup}: use a fraction of the fit in [0, 1)")
    if power <= 0.0:
        raise ConfigError(f"Annealing power {power}: use a positive exponent")


@dataclass(frozen=True)
class FitLimits:
    """Where the fit in force stops: after ``total_steps`` optimizer steps, after ``max_seconds``, or either.

    Attributes:
        total_steps: optimizer steps the trainer stops at (``max_steps``, or ``max_epochs`` x steps an epoch,
            whichever is fewer); ``None`` when neither is finite.
        max_seconds: the training time limit (``max_time``); ``None`` without one.
    """

    total_steps: int | None
    max_seconds: float | None

    def progress(self, global_step: int, elapsed_seconds: float) -> float:
        """Fraction of the fit done: the larger of the step and the time fractions, clipped to ``[0, 1]``."""
        fractions = [0.0]
        if self.total_steps:
            fractions.append(global_step / self.total_steps)
        if self.max_seconds:
            fractions.append(elapsed_seconds / self.max_seconds)
        return min(max(fractions), 1.0)

    def describe(self) -> str:
        """``"150 optimizer steps or 150 s of training, whichever comes first"``."""
        parts = []
        if self.total_steps:
            parts.append(f"{self.total_steps} optimizer steps")
        if self.max_seconds:
            parts.append(f"{self.max_seconds:g} s of training")
        return " or ".join(parts) + (", whichever comes first" if len(parts) > 1 else "")


NO_LIMIT = ("the learning-rate schedule follows the length of the fit, but this fit has no limit: "
            "set --trainer.max_epochs N or --trainer.max_time DD:HH:MM:SS")


def require_a_limit(trainer: pl.Trainer) -> None:
    """Refuse a fit without ``max_epochs``, ``max_steps`` or ``max_time`` before any data is loaded.

    Raises:
        ConfigError: no limit is set.
    """
    epochs_unlimited = trainer.max_epochs is None or trainer.max_epochs < 0
    if epochs_unlimited and trainer.max_steps < 0 and limiting_timer(trainer) is None:
        raise ConfigError(NO_LIMIT)


def fit_limits(trainer: pl.Trainer) -> FitLimits:
    """The limits ``trainer`` will stop the fit at (command-line overrides included).

    Read once training starts: counting the steps of an epoch loads the training data, which must not happen
    before a resume has restored the loops (the sampler starts at the resumed epoch).

    Raises:
        ConfigError: the trainer has no finite ``max_epochs``, ``max_steps`` or ``max_time``.
    """
    limits = FitLimits(total_steps=_total_steps(trainer), max_seconds=_max_seconds(trainer))
    if limits.total_steps is None and limits.max_seconds is None:
        raise ConfigError(NO_LIMIT)
    return limits


def _total_steps(trainer: pl.Trainer) -> int | None:
    """Optimizer steps the fit stops at, or ``None`` when no step or epoch limit is finite."""
    total = trainer.estimated_stepping_batches  # inf without limits; max_steps (maybe -1) for iterable data
    if not math.isfinite(total) or total <= 0:
        return None
    return int(total)


def limiting_timer(trainer: pl.Trainer) -> Timer | None:
    """The ``Timer`` callback that will stop the fit first (``max_time`` adds one), or ``None``."""
    timers = [cb for cb in trainer.callbacks if isinstance(cb, Timer) and _duration(cb) is not None]
    return min(timers, key=_duration, default=None)


def _duration(timer: Timer) -> float | None:
    """The time limit of ``timer`` in seconds (elapsed + remaining, to the millisecond), ``None`` without one."""
    remaining = timer.time_remaining()
    return None if remaining is None else round(timer.time_elapsed() + remaining, 3)


def _max_seconds(trainer: pl.Trainer) -> float | None:
    """The training time limit in seconds (``max_time`` or a ``Timer`` callback's), ``None`` without one."""
    timer = limiting_timer(trainer)
    return None if timer is None else _duration(timer)


class FitProgress:
    """How far through the fit training is, read before each step of an :class:`Annealing` schedule.

    Steps count from the trainer's ``global_step`` and time from the ``Timer`` that enforces the limit, both
    restored by a resume (the ``Timer`` saves its elapsed time in the checkpoint), so a resumed fit continues
    its schedule where it stopped.

    Args:
        trainer: the trainer whose training starts (its limits are read once, here; see :func:`fit_limits`).

    Raises:
        ConfigError: the trainer has no finite ``max_epochs``, ``max_steps`` or ``max_time``.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.limits = fit_limits(trainer)
        self.timer = limiting_timer(trainer)

    def __call__(self, global_step: int) -> float:
        """Fraction of the fit done once ``global_step`` optimizer steps have been taken, now."""
        elapsed = self.timer.time_elapsed() if self.timer is not None else 0.0
        return self.limits.progress(global_step, elapsed)


# Torch schedulers stepped per epoch whose length is one argument: set to the fit's max_epochs at train start.
EPOCH_LENGTH_ARGUMENT = {
    torch.optim.lr_scheduler.CosineAnnealingLR: "T_max",
    torch.optim.lr_scheduler.PolynomialLR: "total_iters",
}


def follow_max_epochs(scheduler: Any, max_epochs: int | None) -> str | None:
    """Set the length of a per-epoch ``CosineAnnealingLR``/``PolynomialLR`` to ``max_epochs``.

    Args:
        scheduler: any scheduler; others are left as they are.
        max_epochs: the trainer's epoch limit; ``None`` or ``-1`` (no limit) leaves the length as configured.

    Returns:
        What changed (``"CosineAnnealingLR T_max 50 -> 300 (trainer.max_epochs)"``), or ``None``.
    """
    name = EPOCH_LENGTH_ARGUMENT.get(type(scheduler))
    if name is None or max_epochs is None or max_epochs < 1:
        return None
    previous = getattr(scheduler, name)
    if previous == max_epochs:
        return None
    setattr(scheduler, name, max_epochs)
    return f"{type(scheduler).__name__} {name} {previous} -> {max_epochs} (trainer.max_epochs)"
