"""Where a ``medseg cv`` or ``medseg benchmark`` is: "model 2/3 seg3d_unetpp, fold 4/5, epoch 12/50", how much is
done and about how long is left (from the folds trained so far, or the first fold's epochs).

On a terminal it is one line that updates (tqdm); otherwise (a log file, a pipe) plain lines: when a fold starts
and ends, and at most one per ``interval`` seconds in between. It goes to stderr. Each fold's trainer gets
:class:`EpochProgress` (given by :mod:`medseg.evaluation.crossval` to :func:`medseg.training.fit`), which reports
its epochs to the :class:`CvProgress` of the fold running now; Lightning's own progress bar and model summary
are turned off for folds (:data:`QUIET_FOLD_ARGS`, before the user's overrides, which can turn them on again).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from pytorch_lightning import Callback

from medseg.console import duration

QUIET_FOLD_ARGS = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
PLAIN_INTERVAL = 60.0  # plain lines: the fewest seconds between two epoch lines

_ACTIVE: list[CvProgress] = []  # the progress of the fold training now (at most one)


class CvProgress:
    """The progress of the folds of one or more models (``cv``: one; ``benchmark``: one per config).

    Args:
        models: the models' names, in the order they run.
        title: what the plain lines start with, e.g. ``"medseg benchmark"``.
        stream: where to write (default: ``sys.stderr`` at each write); a terminal gets the updating line.
        interval: plain lines: the fewest seconds between two epoch lines (default :data:`PLAIN_INTERVAL`).
    """

    def __init__(self, models: Sequence[str], title: str = "medseg cv", stream: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.models, self.title, self._stream = list(models), title, stream
        self.interval = PLAIN_INTERVAL if interval is None else interval
        self.fold_seconds: list[float] = []  # folds trained in this run (a fold found done does not count)
        self.done = 0
        self.folds_of: dict[str, int] = {}
        self.now: dict[str, Any] = {}
        self._bar: Any = None
        self._said = 0.0

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @contextmanager
    def fold(self, model: str, folds: int, label: str) -> Iterator[None]:
        """Around one fold of ``model`` (which has ``folds`` folds to run); ``label`` names it (``"fold 2/5"``)."""
        self.folds_of[model] = folds
        self.now = {"model": model, "label": label, "start": time.perf_counter(), "epoch": None, "epochs": None,
                    "first": None, "metric": ""}
        _ACTIVE[:] = [self]
        self._show(f"{self.where()}: training", force=True)
        try:
            yield
        except BaseException:
            self.close()
            raise
        finally:
            _ACTIVE.clear()
        seconds = time.perf_counter() - self.now["start"]
        self.now["finished"] = True
        if self.now["first"] is not None:
            self.fold_seconds.append(seconds)
        self.done += 1
        left = self.total() - self.done
        ending = f"; {left} fold(s) left, {self._left_text()}" if left and not self.stream.isatty() else ""
        self._show(f"{self.where(epochs=False)} done in {duration(seconds)}{ending}", force=True)
        if not left:
            self.close()

    def train_start(self, epoch: int, epochs: int | None) -> None:
        """The fold's trainer starts at ``epoch`` (later than 0 when it resumes) of ``epochs``."""
        self.now.update(first=epoch, epoch=epoch, epochs=epochs if epochs and epochs > 0 else None,
                        train_start=time.perf_counter())

    def epoch(self, done: int, epochs: int | None, metric: str = "") -> None:
        """``done`` epochs of the fold's ``epochs`` are finished; ``metric`` is e.g. ``"val/dice 0.83"``."""
        if self.now.get("first") is None:
            self.train_start(done - 1, epochs)
        self.now.update(epoch=done, epochs=epochs if epochs and epochs > 0 else None, metric=metric)
        self._show(self.where())

    def where(self, epochs: bool = True) -> str:
        """``"model 2/3 seg3d_unetpp, fold 4/5, epoch 12/50"`` (no model count for a single model)."""
        model = self.now.get("model", "")
        index = self.models.index(model) + 1 if model in self.models else 0
        text = f"model {index}/{len(self.models)} {model}, " if len(self.models) > 1 else f"{model} "
        text += self.now.get("label", "")
        if epochs and self.now.get("epoch") is not None:
            text += f", epoch {self.now['epoch']}" + (f"/{self.now['epochs']}" if self.now["epochs"] else "")
            text += f", {self.now['metric']}" if self.now["metric"] else ""
        return text

    def total(self) -> int:
        """Folds of every model (a model not started yet: as many as the last one started)."""
        last = next(reversed(self.folds_of.values()), 1)
        return sum(self.folds_of.get(m, last) for m in self.models) if self.models else last

    def time_left(self) -> float | None:
        """Seconds left: the mean time of the folds trained so far times the folds left, less what the current
        fold has run; before any fold ends, from the current fold's epochs; ``None`` when nothing tells yet."""
        now = self.now
        busy = bool(now) and not now.get("finished")
        running = time.perf_counter() - now["start"] if busy else 0.0
        after = max(self.total() - self.done - busy, 0)
        if self.fold_seconds:
            per_fold = statistics.fmean(self.fold_seconds)
        elif now.get("first") is not None and now.get("epochs") and now["epoch"] > now["first"]:
            trained = time.perf_counter() - now["train_start"]
            per_fold = running + trained / (now["epoch"] - now["first"]) * (now["epochs"] - now["epoch"])
            return per_fold - running + per_fold * after
        else:
            return None
        return (max(per_fold - running, 0.0) if busy else 0.0) + per_fold * after

    def close(self) -> None:
        """End the updating line (a later fold starts a new one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _left_text(self) -> str:
        left = self.time_left()
        return "time left not known yet" if left is None else f"about {duration(left)} left"

    def _fraction(self) -> float:
        now = self.now
        if not now.get("finished") and now.get("epochs") and now.get("epoch") is not None:
            return min(now["epoch"] / now["epochs"], 1.0)
        return 0.0

    def _show(self, line: str, force: bool = False) -> None:
        if self.stream.isatty():
            self._update_bar(line)
            return
        if force or time.perf_counter() - self._said >= self.interval:
            self._said = time.perf_counter()
            extra = f" ({self._left_text()})" if not force else ""
            print(f"{self.title}: {line}{extra}", file=self.stream, flush=True)

    def _update_bar(self, line: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self.total(), file=self.stream, dynamic_ncols=True, leave=True,
                             bar_format="{desc} |{bar:20}| {percentage:3.0f}% [{elapsed}{postfix}]")
        self._bar.total = self.total()
        self._bar.n = round(self.done + self._fraction(), 3)
        self._bar.set_description_str(line, refresh=False)
        self._bar.set_postfix_str(self._left_text(), refresh=False)
        self._bar.refresh()


class EpochProgress(Callback):
    """Reports each finished training epoch (and the monitored metric) to the fold running now; given to
    :func:`medseg.training.fit` by cv, so a fold's saved ``config.yaml`` does not name it."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if _ACTIVE and trainer.is_global_zero:
            _ACTIVE[0].train_start(trainer.current_epoch, trainer.max_epochs)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not _ACTIVE or not trainer.is_global_zero:
            return
        metric = ""
        monitors = [c.monitor for c in trainer.checkpoint_callbacks if c.monitor]
        value = trainer.callback_metrics.get(monitors[0]) if monitors else None
        if value is not None:
            metric = f"{monitors[0]} {float(value):.4f}"
        _ACTIVE[0].epoch(trainer.current_epoch + 1, trainer.max_epochs, metric)
