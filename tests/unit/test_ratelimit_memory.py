"""The budgets every worker of a gateway shares: a fixed table in a mapped file (or this
process's memory), on an injected clock; several OS processes on one file for the lock."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import stat
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from plano_extproc.ratelimit.budget import NEVER, Bucket, Verdict
from plano_extproc.ratelimit.memory import BUDGET_FILE_ENV, SharedBudgets

SLOT_BYTES = 32


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedBudgets]:
    """The same behaviour whether the table is in this process or in a mapped file."""
    path = None if request.param == "memory" else str(tmp_path / "budgets")
    s = SharedBudgets(path, slots=1024, clock=Clock())
    yield s
    s.close()


def clock_of(s: SharedBudgets) -> Clock:
    assert isinstance(s.clock, Clock)
    return s.clock


A = Bucket("limit-a", capacity=100.0, rate=10.0)
B = Bucket("limit-b", capacity=1000.0, rate=1.0)


# ---------------------------------------------------------------- one process


def test_a_bucket_refills_over_time(store: SharedBudgets) -> None:
    clock = clock_of(store)
    assert store.take_now([[A]], 100.0) == Verdict(0, (0.0,))  # a full window at once
    assert store.take_now([[A]], 1.0) == Verdict(None, (0.1,))
    clock.now += 5.0  # 50 refilled
    assert store.take_now([[A]], 50.0) == Verdict(0, (0.0,))
    assert store.take_now([[A]], 1.0).taken is None
    clock.now += 100.0  # long full again: the entry has drained
    assert store.entries() == 0
    assert store.take_now([[A]], 100.0).taken == 0


def test_waits_are_what_retry_after_is_made_of(store: SharedBudgets) -> None:
    clock = clock_of(store)
    store.take_now([[A, B]], 90.0)
    clock.now += 1.0  # A: 80 used, B: 89 used
    verdict = store.take_now([[A, B], [B]], 40.0)
    # The first group waits for A (20 over at 10/s); the second takes B alone.
    assert verdict.taken == 1
    assert verdict.waits == pytest.approx((2.0, 0.0))
    assert store.take_now([[B]], 1001.0) == Verdict(None, (NEVER,))
    # Nothing was charged to A by the second group, nor by the refused takes.
    assert store.take_now([[A]], 20.0) == Verdict(0, (0.0,))


def test_adjust_up_puts_a_bucket_in_debt_and_down_refunds_to_zero(store: SharedBudgets) -> None:
    clock = clock_of(store)
    store.take_now([[A]], 50.0)
    store.adjust_now([A], 80.0)  # the reply used 130 where 50 was estimated
    verdict = store.take_now([[A]], 0.0)
    assert verdict.taken is None
    assert verdict.waits[0] == pytest.approx(3.0)  # 30 in debt at 10/s
    clock.now += 3.0
    assert store.take_now([[A]], 0.0).taken == 0
    store.adjust_now([A], -500.0)  # refund more than was used: floored at 0, entry freed
    assert store.entries() == 0
    assert store.take_now([[A]], 100.0).taken == 0
    store.adjust_now([A], math.nan)  # not a number: changes nothing
    assert store.take_now([[A]], 1.0) == Verdict(None, (0.1,))


def test_the_async_store_api_is_the_sync_one(store: SharedBudgets) -> None:
    async def run() -> tuple[Verdict, Verdict]:
        first = await store.take([[A]], 100.0)
        await store.adjust([A], -10.0)
        return first, await store.take([[A]], 10.0)

    assert asyncio.run(run()) == (Verdict(0, (0.0,)), Verdict(0, (0.0,)))


def test_a_cost_that_is_not_a_count_is_refused(store: SharedBudgets) -> None:
    with pytest.raises(ValueError):
        store.take_now([[A]], math.nan)
    with pytest.raises(ValueError):
        store.take_now([[A]], -1.0)
    assert store.entries() == 0


# ---------------------------------------------------------------- the file


def test_two_stores_on_one_file_see_one_budget(tmp_path: Path) -> None:
    path = str(tmp_path / "budgets")
    clock = Clock()
    one = SharedBudgets(path, slots=128, clock=clock)
    two = SharedBudgets(path, slots=128, clock=clock)
    try:
        assert one.take_now([[A]], 70.0).taken == 0
        assert two.take_now([[A]], 40.0) == Verdict(None, (1.0,))
        two.adjust_now([A], -30.0)
        assert one.take_now([[A]], 60.0).taken == 0
        assert two.entries() == one.entries() == 1
    finally:
        one.close()
        two.close()


def test_the_file_is_private_and_of_fixed_size(tmp_path: Path) -> None:
    path = tmp_path / "budgets"
    s = SharedBudgets(str(path), slots=256)
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 256 * SLOT_BYTES
    finally:
        s.close()


def test_from_env_maps_the_supervisors_file_or_keeps_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BUDGET_FILE_ENV, raising=False)
    alone = SharedBudgets.from_env()
    assert alone.path is None
    alone.close()
    path = str(tmp_path / "budgets")
    monkeypatch.setenv(BUDGET_FILE_ENV, path)
    one, two = SharedBudgets.from_env(), SharedBudgets.from_env()
    try:
        assert one.take_now([[A]], 100.0).taken == 0
        assert two.take_now([[A]], 100.0).taken is None
    finally:
        one.close()
        two.close()


# ---------------------------------------------------------------- several processes

CAPACITY = 500
TRIES = 300  # per process; 4 processes try 1200 times for 500
PROCESSES = 4
SCARCE = Bucket("scarce", capacity=float(CAPACITY), rate=1e-9)


def _taker(
    path: str, inherited: SharedBudgets | None, start: Barrier, out: multiprocessing.Queue
) -> None:
    store = inherited if inherited is not None else SharedBudgets(path, slots=64)
    start.wait()
    admitted = sum(1 for _ in range(TRIES) if store.take_now([[SCARCE]], 1.0).taken == 0)
    out.put(admitted)


@pytest.mark.parametrize("opened", ["in each process", "inherited across fork"])
def test_processes_taking_at_once_admit_exactly_the_budget(tmp_path: Path, opened: str) -> None:
    path = str(tmp_path / "budgets")
    ctx = multiprocessing.get_context("fork")
    parent = SharedBudgets(path, slots=64)
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    inherited = parent if opened == "inherited across fork" else None
    procs = [
        ctx.Process(target=_taker, args=(path, inherited, start, out)) for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        counts = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert sum(counts) == CAPACITY
    assert parent.take_now([[SCARCE]], 1.0).taken is None
    parent.close()


# ---------------------------------------------------------------- bounded memory


def test_hostile_keys_keep_the_table_fixed_and_a_hot_bucket_enforced(tmp_path: Path) -> None:
    path = tmp_path / "budgets"
    clock = Clock()
    s = SharedBudgets(str(path), slots=64, clock=clock)
    hot = Bucket("tenant-hot", capacity=10.0, rate=1e-6)
    admitted = 0
    try:
        for i in range(200_000):
            flood = Bucket(f"selector-{i}", capacity=1000.0, rate=1.0)
            assert s.take_now([[flood]], 1.0).taken == 0  # every new value is a full bucket
            if i % 1000 == 0:
                admitted += s.take_now([[hot]], 1.0).taken == 0
            if i % 20_000 == 0:
                clock.now += 0.5  # the flood never drains (1 used at 1/s) between checks
        assert admitted == 10
        assert os.stat(path).st_size == 64 * SLOT_BYTES
        assert s.entries() <= 64
        assert s.take_now([[hot]], 1.0).taken is None
    finally:
        s.close()


def test_eviction_takes_a_drained_entry_first_then_the_one_full_soonest() -> None:
    clock = Clock()
    s = SharedBudgets(None, slots=16, clock=clock)  # one window: the whole table
    lasting = [Bucket(f"lasting-{i}", capacity=1.0, rate=0.001) for i in range(14)]
    quick = Bucket("quick", capacity=1.0, rate=2.0)  # drained 0.5 s after its charge
    soon = Bucket("soon", capacity=1.0, rate=5.0)  # full again 0.2 s after its charge
    for b in [*lasting, quick]:
        assert s.take_now([[b]], 1.0).taken == 0
    clock.now += 0.45
    assert s.take_now([[soon]], 1.0).taken == 0
    assert s.entries() == 16
    clock.now += 0.15
    # quick has drained (its slot is still taken); soon, written later with a shorter time
    # to full, has not: 0.25 left, 0.05 s.
    assert s.entries() == 15
    newcomer = Bucket("newcomer-1", capacity=1.0, rate=0.001)
    assert s.take_now([[newcomer]], 1.0).taken == 0
    # The drained entry gave its slot; the one not yet full kept its.
    verdict = s.take_now([[soon]], 1.0)
    assert verdict.taken is None
    assert verdict.waits == pytest.approx((0.05,))
    assert s.take_now([[Bucket("newcomer-2", capacity=1.0, rate=0.001)]], 1.0).taken == 0
    # Now the one full soonest was evicted: it reads as a full bucket (budget back early).
    assert s.take_now([[soon]], 0.0) == Verdict(0, (0.0,))
    for b in [*lasting, newcomer]:
        assert s.take_now([[b]], 1.0).taken is None
    assert s.entries() == 16


def test_a_group_never_evicts_its_own_buckets() -> None:
    clock = Clock()
    s = SharedBudgets(None, slots=2, clock=clock)
    for name in ("other-1", "other-2"):
        s.take_now([[Bucket(name, capacity=10.0, rate=0.01)]], 5.0)
    p = Bucket("p", capacity=10.0, rate=100.0)  # full soonest once charged
    q = Bucket("q", capacity=10.0, rate=0.001)
    assert s.take_now([[p, q]], 10.0).taken == 0
    assert s.take_now([[p]], 1.0).taken is None
    assert s.take_now([[q]], 1.0).taken is None
