"""Concurrent encodes sharing forward passes (routing/coalesce.py), with a recording ``run``."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from plano_extproc.routing.coalesce import Coalescer


class Recorder:
    """A forward pass: one row per text (its length and its index in the batch). The first
    pass blocks until ``release`` is set, so the test can queue callers behind it."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.batches.append(list(texts))
            first = len(self.batches) == 1
        if first:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("encoder failed")
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


def wait_queued(co: Coalescer, n: int) -> None:
    for _ in range(1000):
        with co._lock:
            if len(co._waiting) >= n:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{n} callers never queued")


def test_lone_call_runs_at_once() -> None:
    rec = Recorder()
    rec.release.set()
    co = Coalescer(rec, lanes=2)
    rows = co(["a", "bbb"])
    assert rows[:, 0].tolist() == [1, 3]
    assert rec.batches == [["a", "bbb"]]
    assert co.batches == 1


def test_callers_behind_a_busy_lane_share_the_next_pass() -> None:
    rec = Recorder()
    co = Coalescer(rec, lanes=1)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(co, ["x"])
        assert rec.entered.wait(10)
        later = [pool.submit(co, [t * k for t in ("p", "q")]) for k in (2, 3, 4)]
        wait_queued(co, 3)
        rec.release.set()
        assert first.result(10)[:, 0].tolist() == [1]
        results = [f.result(10) for f in later]
    # One pass for the three queued callers, each getting back its own rows, in its order.
    assert len(rec.batches) == 2
    assert sorted(rec.batches[1]) == sorted(["pp", "qq", "ppp", "qqq", "pppp", "qqqq"])
    for k, rows in zip((2, 3, 4), results, strict=True):
        assert rows[:, 0].tolist() == [k, k]
        assert rows.base is None  # a copy: a cached row must not pin the whole batch


def test_a_failed_pass_fails_every_caller_in_it_and_frees_the_lane() -> None:
    rec = Recorder(fail_on="boom")
    co = Coalescer(rec, lanes=1)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(co, ["x"])
        assert rec.entered.wait(10)
        bad = pool.submit(co, ["boom"])
        good = pool.submit(co, ["y"])
        wait_queued(co, 2)
        rec.release.set()
        first.result(10)
        for f in (bad, good):  # shared the failing pass
            with pytest.raises(RuntimeError, match="encoder failed"):
                f.result(10)
        # The lane was passed on, not lost (a lost lane would block this call).
        assert pool.submit(co, ["z"]).result(10)[:, 0].tolist() == [1]
    assert co._running == 0


def test_a_shared_pass_holds_at_most_max_texts() -> None:
    rec = Recorder()
    co = Coalescer(rec, lanes=1, max_texts=4)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(co, ["x"])
        assert rec.entered.wait(10)
        later = [pool.submit(co, ["a", "b", "c"]) for _ in range(3)]
        wait_queued(co, 3)
        rec.release.set()
        first.result(10)
        for f in later:
            assert f.result(10)[:, 0].tolist() == [1, 1, 1]
    assert [len(b) for b in rec.batches] == [1, 3, 3, 3]


def test_lanes_run_in_parallel() -> None:
    barrier = threading.Barrier(2, timeout=10)

    def run(texts: list[str]) -> np.ndarray:
        barrier.wait()  # only passes if two passes are in flight at once
        return np.zeros((len(texts), 1), dtype=np.float32)

    co = Coalescer(run, lanes=2)
    with ThreadPoolExecutor(2) as pool:
        assert [f.result(10).shape for f in [pool.submit(co, ["a"]), pool.submit(co, ["b"])]] == [
            (1, 1),
            (1, 1),
        ]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Coalescer(lambda t: t, lanes=0)
