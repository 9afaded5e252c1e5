"""A fixed set of worker threads ("lanes") that run queued work in batches.

The embedded router decides on lanes: the sentence encoder's cost per text falls by about 30%
from one text per forward pass to four or more in one flat batch (small matrix products use
the CPU poorly; docs/benchmarks.md), so under load a lane takes several queued decisions at
once and encodes all their texts in one pass. A lone request never waits for a batch: an idle
lane takes it at once.

Exactly ``lanes`` threads do the work, whatever the number of requests in flight: requests
wait in the queue (as asyncio futures, no thread each), so no more threads compete for the
cores than there are lanes. A lane that wakes takes its share of the queue (the queue divided
by the lanes, at most ``max_items``), so no lane idles while another runs everything. Free of
the model: ``run`` is any function of a list of items to a list with one result per item.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

#: Items per batch at most.
MAX_ITEMS = 16


class Lanes:
    """``run`` over batches of queued items on ``lanes`` threads; see the module docstring."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        lanes: int,
        max_items: int = MAX_ITEMS,
        name: str = "lane",
    ) -> None:
        if lanes < 1 or max_items < 1:
            raise ValueError("lanes and max_items must be at least 1")
        self._run = run
        self._lanes = lanes
        self._max_items = max_items
        self._cond = threading.Condition()
        self._queue: deque[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]] = deque()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(lanes)
        ]
        for thread in self._threads:
            thread.start()
        self.batches = 0  # batches run (for tests and benchmarks)

    def submit(self, item: Any) -> asyncio.Future[Any]:
        """Queue ``item``; the future gets its result (or the exception ``run`` raised). Call
        from the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._closing:
                raise RuntimeError("lanes closed")
            self._queue.append((item, future, loop))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Run what is queued, then stop the threads (blocks until they end)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _take(self) -> list[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            share = min(self._max_items, -(-len(self._queue) // self._lanes))
            return [self._queue.popleft() for _ in range(min(share, len(self._queue)))]

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            # Requests whose caller gave up (a timeout) are not run.
            live = [entry for entry in batch if not entry[1].done()]
            if not live:
                continue
            error: BaseException | None = None
            try:
                results = self._run([item for item, _, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"{len(results)} results for {len(live)} items")
            except BaseException as exc:  # every request of the batch gets it
                error = exc
            with self._cond:  # counted before the results are out, so a caller sees it
                self.batches += 1
            for i, (_, future, loop) in enumerate(live):
                if error is not None:
                    loop.call_soon_threadsafe(_fail, future, error)
                else:
                    loop.call_soon_threadsafe(_resolve, future, results[i])


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
