"""Queued work run in batches on a fixed set of lane threads (routing/lanes.py), with a
recording ``run``."""

from __future__ import annotations

import asyncio
import threading

import pytest

from plano_extproc.routing.lanes import Lanes


class Recorder:
    """A run: one result per item (the item doubled). Items named ``block*`` hold their batch
    until ``release`` is set, so a test can queue work behind busy lanes."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.blocked = threading.Semaphore(0)
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, items: list[str]) -> list[str]:
        with self.lock:
            self.batches.append(list(items))
        if any(i.startswith("block") for i in items):
            self.blocked.release()
            assert self.release.wait(10)
        if "boom" in items:
            raise RuntimeError("run failed")
        return [i * 2 for i in items]


async def blocked(rec: Recorder, n: int) -> None:
    """Wait until ``n`` batches are held in ``run``."""
    for _ in range(n):
        assert await asyncio.to_thread(rec.blocked.acquire, True, 10)


async def test_lone_item_runs_at_once() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 2)
    try:
        assert await lanes.submit("a") == "aa"
        assert rec.batches == [["a"]]
    finally:
        lanes.close()


async def test_items_queued_behind_a_busy_lane_run_in_one_batch() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 1)
    try:
        first = lanes.submit("block")
        await blocked(rec, 1)
        later = [lanes.submit(x) for x in ("p", "q", "r")]
        rec.release.set()
        assert await first == "blockblock"
        assert await asyncio.gather(*later) == ["pp", "qq", "rr"]
        assert rec.batches == [["block"], ["p", "q", "r"]]
        assert lanes.batches == 2
    finally:
        lanes.close()


async def test_a_lane_takes_its_share_of_the_queue() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 2)
    try:
        held = [lanes.submit("block1"), lanes.submit("block2")]
        await blocked(rec, 2)  # both lanes busy
        later = [lanes.submit(str(k)) for k in range(4)]
        rec.release.set()
        await asyncio.gather(*held)
        assert await asyncio.gather(*later) == ["00", "11", "22", "33"]
        after = rec.batches[2:]
        assert sorted(x for b in after for x in b) == ["0", "1", "2", "3"]
        # The first lane to free up takes half the queue, not all of it.
        assert len(after[0]) == 2 and all(len(b) <= 2 for b in after)
    finally:
        lanes.close()


async def test_a_failed_run_fails_every_item_in_it_and_the_lane_goes_on() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 1)
    try:
        first = lanes.submit("block")
        await blocked(rec, 1)
        bad, good = lanes.submit("boom"), lanes.submit("x")
        rec.release.set()
        await first
        for fut in (bad, good):  # shared the failing batch
            with pytest.raises(RuntimeError, match="run failed"):
                await fut
        assert await lanes.submit("z") == "zz"
    finally:
        lanes.close()


async def test_a_batch_holds_at_most_max_items() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 1, max_items=2)
    try:
        first = lanes.submit("block")
        await blocked(rec, 1)
        later = [lanes.submit(str(k)) for k in range(5)]
        rec.release.set()
        await first
        await asyncio.gather(*later)
        assert [len(b) for b in rec.batches] == [1, 2, 2, 1]
    finally:
        lanes.close()


async def test_an_abandoned_item_is_not_run() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 1)
    try:
        first = lanes.submit("block")
        await blocked(rec, 1)
        gone = lanes.submit("gone")
        gone.cancel()  # its caller timed out
        kept = lanes.submit("kept")
        rec.release.set()
        await first
        assert await kept == "keptkept"
        assert ["gone"] not in rec.batches and all("gone" not in b for b in rec.batches)
    finally:
        lanes.close()


async def test_wrong_number_of_results_fails_the_batch() -> None:
    lanes = Lanes(lambda items: items[:-1], 1)
    try:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            await lanes.submit("a")
    finally:
        lanes.close()


async def test_close_runs_what_is_queued_then_refuses() -> None:
    rec = Recorder()
    lanes = Lanes(rec, 1)
    first = lanes.submit("block")
    await blocked(rec, 1)
    queued = lanes.submit("q")
    closing = asyncio.create_task(asyncio.to_thread(lanes.close))
    rec.release.set()
    await closing
    assert await first == "blockblock"
    assert await queued == "qq"
    with pytest.raises(RuntimeError, match="closed"):
        lanes.submit("late")
    assert not any(t.is_alive() for t in lanes._threads)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Lanes(lambda items: items, 0)
