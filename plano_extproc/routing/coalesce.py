"""Concurrent encodes share one forward pass: texts that arrive while every lane is busy wait
and go through together in the next batch.

The sentence encoder's cost per text falls by about 30% from one text per call to four or
more in one flat batch (small matrix products use the CPU poorly; docs/benchmarks.md). Under
load the router has several decisions in flight, so instead of each thread running its own
small batch, at most ``lanes`` batches run at once and everything queued behind them is the
next batch. A lone request never waits: with a free lane it runs at once, as before.

The thread whose batch finishes hands the queue to the first waiting thread, which runs it
(so no thread serves other requests after its own result is ready, and no extra thread is
needed). Pure threading, free of the model: ``run`` is any function of a list of texts to an
array with one row per text.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

#: Texts per shared batch at most (the encoder splits a batch further by tokens).
MAX_TEXTS = 64


class _Job:
    __slots__ = ("batch", "error", "event", "rows", "texts")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.event = threading.Event()
        self.rows: Any = None
        self.error: BaseException | None = None
        self.batch: list[_Job] | None = None  # set when this job's thread runs a batch


class Coalescer:
    """``run`` over shared batches, at most ``lanes`` at a time; see the module docstring."""

    def __init__(
        self, run: Callable[[list[str]], Any], lanes: int, max_texts: int = MAX_TEXTS
    ) -> None:
        if lanes < 1 or max_texts < 1:
            raise ValueError("lanes and max_texts must be at least 1")
        self._run = run
        self._lanes = lanes
        self._max_texts = max_texts
        self._lock = threading.Lock()
        self._running = 0
        self._waiting: deque[_Job] = deque()
        self.batches = 0  # batches run (for tests and benchmarks)

    def __call__(self, texts: list[str]) -> Any:
        """Rows for ``texts`` (a copy: never a view that would keep a whole batch alive)."""
        job = _Job(texts)
        with self._lock:
            if self._running < self._lanes:
                self._running += 1
                job.batch = [job]
            else:
                self._waiting.append(job)
        if job.batch is None:
            job.event.wait()  # served by another thread's batch, or handed the queue
        if job.batch is not None:
            self._lead(job.batch)
        if job.error is not None:
            raise job.error
        return job.rows

    def _lead(self, batch: list[_Job]) -> None:
        """Run ``batch`` (its first job is this thread's), then pass the lane on."""
        try:
            flat = [t for job in batch for t in job.texts]
            try:
                out = self._run(flat)
            except BaseException as exc:  # each caller raises it (the router fails open)
                for job in batch:
                    job.error = exc
            else:
                start = 0
                for job in batch:
                    end = start + len(job.texts)
                    job.rows = out[start:end].copy() if len(batch) > 1 else out
                    start = end
        finally:
            handed: _Job | None = None
            with self._lock:
                self.batches += 1
                if self._waiting:
                    take = [self._waiting.popleft()]
                    count = len(take[0].texts)
                    while self._waiting and count + len(self._waiting[0].texts) <= self._max_texts:
                        count += len(self._waiting[0].texts)
                        take.append(self._waiting.popleft())
                    handed = take[0]
                    handed.batch = take
                else:
                    self._running -= 1
            for job in batch[1:]:
                job.batch = None
                job.event.set()
            batch[0].batch = None
            if handed is not None:
                handed.event.set()
