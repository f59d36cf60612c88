"""Bounded work: ``workers`` inference threads sharing the loaded models, at most ``workers + queue`` requests
admitted at once, and at most ``max_voxels`` voxels being predicted at once.

A request takes its place (:meth:`WorkQueue.admit`) before its body is read and keeps it through the upload, the
header checks and the prediction, so uploads cannot pile up on disk or in memory beyond the queue: a request that
finds every place taken is refused at once (the caller answers 503 with ``Retry-After``). A prediction's memory
grows with its voxels (about 40 bytes each): a worker starts one only while the voxels already being predicted
leave room for it (one alone always runs; ``medseg serve --max-voxels`` bounds a single image), so several large
images wait for each other instead of running out of memory together.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every place is taken: ``workers`` requests predicting or about to, ``queue`` more uploading or waiting."""


class Slot:
    """One admitted request's place, from before its upload is read until it is answered and its prediction (if
    one was queued) has ended or was cancelled. :meth:`release` (or leaving a ``with`` block) when answered."""

    def __init__(self, queue: WorkQueue) -> None:
        self._queue = queue
        self._answered = False
        self._freed = False
        self._future: Future | None = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    def release(self) -> None:
        """The request is answered: the place is free now, or when its prediction ends (a prediction still
        running keeps its memory, so it keeps its place; a queued one that was cancelled frees it at once)."""
        with self._queue._lock:
            self._answered = True
            future = self._future
        if future is None or future.done():
            self._queue._free(self)

    def _prediction_ended(self, _: Future) -> None:  # done, failed or cancelled
        with self._queue._lock:
            answered = self._answered
        if answered:
            self._queue._free(self)


class WorkQueue:
    """A thread pool with a bounded number of admitted requests and a bound on the voxels predicted at once.

    Attributes:
        workers: threads that predict at once.
        queue: requests that may be admitted beyond ``workers`` (uploading, checked, or waiting for a worker).
        max_voxels: the most voxels predicted at once (``None``: no bound).
    """

    def __init__(self, workers: int = 1, queue: int = 8, max_voxels: int | None = None) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"--workers {workers} / --queue {queue}: at least one worker and no negative queue")
        self.workers, self.queue, self.max_voxels = workers, queue, max_voxels
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-serve")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._admitted = 0
        self._running = 0
        self._voxels = 0

    @property
    def depth(self) -> int:
        """Requests admitted and not predicting: uploading, being checked, or waiting for a worker."""
        with self._lock:
            return self._admitted - self._running

    @property
    def running(self) -> int:
        """Predictions running now."""
        with self._lock:
            return self._running

    @property
    def admitted(self) -> int:
        """Requests holding a place."""
        with self._lock:
            return self._admitted

    @property
    def voxels(self) -> int:
        """Voxels of the predictions running now."""
        with self._lock:
            return self._voxels

    def full(self) -> bool:
        """Whether a new request would be refused now."""
        with self._lock:
            return self._admitted >= self.workers + self.queue

    def admit(self) -> Slot:
        """A place for a new request; release it when the request is answered.

        Raises:
            QueueFull: every place is taken (nothing was admitted).
        """
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise QueueFull(f"{self._running} prediction(s) running and {self._admitted - self._running} "
                                f"request(s) uploading or waiting (--workers {self.workers}, --queue {self.queue})")
            self._admitted += 1
        return Slot(self)

    async def run(self, slot: Slot, function: Callable[..., T], *args: Any, voxels: int = 0) -> T:
        """``function(*args)`` on a worker thread, for the request holding ``slot``, awaited. The worker starts it
        when the voxels being predicted leave room for ``voxels`` more (or nothing else runs)."""
        if slot._future is not None or slot._freed:
            raise RuntimeError("one prediction per admitted request")
        future = self._executor.submit(self._job, function, args, voxels)
        with self._lock:
            slot._future = future
        future.add_done_callback(slot._prediction_ended)
        return await asyncio.wrap_future(future)

    def _job(self, function: Callable[..., T], args: tuple, voxels: int) -> T:
        with self._changed:
            while self._voxels and self.max_voxels is not None and self._voxels + voxels > self.max_voxels:
                self._changed.wait()
            self._voxels += voxels
            self._running += 1
        try:
            return function(*args)
        finally:
            with self._changed:
                self._running -= 1
                self._voxels -= voxels
                self._changed.notify_all()

    def _free(self, slot: Slot) -> None:
        with self._lock:
            if not slot._freed:
                slot._freed = True
                self._admitted -= 1

    def close(self) -> None:
        """Wait for the running predictions; drop the waiting ones (their places are freed)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
