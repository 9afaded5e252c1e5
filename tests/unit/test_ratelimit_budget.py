"""The token-bucket arithmetic every budget store shares (pure functions, no store)."""

from __future__ import annotations

import pytest

from plano_extproc.ratelimit.budget import NEVER, Bucket, Verdict, drained, take, ttl, wait

A = Bucket("a", capacity=100.0, rate=10.0)
B = Bucket("b", capacity=50.0, rate=5.0)
C = Bucket("c", capacity=1000.0, rate=1.0)


def test_take_charges_only_the_first_group_that_holds_the_cost() -> None:
    state = {"a": 90.0}  # A holds 10, B and C are full
    verdict = take(state, [[A, C], [B, C], [C]], 20.0)
    assert verdict.taken == 1
    assert state == {"a": 90.0, "b": 20.0, "c": 20.0}  # A untouched, B and C charged once


def test_later_groups_waits_see_the_charge() -> None:
    state = {"b": 20.0}
    # The first group charges B (20 + 20 = 40 of 50); the second offers B again: 40 + 20 is
    # 10 over, which is 2 seconds at 5 per second.
    verdict = take(state, [[B], [B]], 20.0)
    assert verdict == Verdict(0, (0.0, 2.0))
    assert state["b"] == 40.0


def test_the_wait_of_a_group_is_its_longest_bucket() -> None:
    state = {"a": 100.0, "b": 50.0}
    verdict = take(state, [[A, B]], 10.0)
    assert verdict == Verdict(None, (2.0,))  # A: 10/10 = 1 s, B: 10/5 = 2 s
    assert state == {"a": 100.0, "b": 50.0}


def test_a_cost_above_capacity_waits_never() -> None:
    state: dict[str, float] = {}
    verdict = take(state, [[B], [A]], 60.0)
    assert verdict == Verdict(1, (NEVER, 0.0))
    assert wait(0.0, B, 50.0001) == NEVER
    assert wait(0.0, B, 50.0) == 0.0  # a full window may be spent at once


def test_a_bucket_in_debt_blocks_even_a_cost_of_zero() -> None:
    state = {"a": 130.0}  # 30 over capacity, after an adjust
    verdict = take(state, [[A]], 0.0)
    assert verdict == Verdict(None, (3.0,))  # the debt over the rate
    assert wait(130.0, A, 0.0) == pytest.approx(3.0)
    assert wait(100.0, A, 0.0) == 0.0  # exactly full is not in debt


def test_drained_refills_by_rate_and_never_goes_negative() -> None:
    assert drained(100.0, stamp=10.0, rate=10.0, now=13.0) == 70.0
    assert drained(100.0, stamp=10.0, rate=10.0, now=1000.0) == 0.0
    assert drained(-5.0, stamp=10.0, rate=10.0, now=10.0) == 0.0
    assert drained(50.0, stamp=10.0, rate=10.0, now=9.0) == 50.0  # a stamp ahead: no refill


def test_ttl_is_the_time_to_full() -> None:
    assert ttl(30.0, 10.0) == 3.0
    assert ttl(0.0, 10.0) == 0.0


def test_an_empty_group_is_taken_with_nothing_charged() -> None:
    state = {"a": 100.0}
    verdict = take(state, [[A], []], 10.0)
    assert verdict == Verdict(1, (1.0, 0.0))
    assert state == {"a": 100.0}


def test_no_group_at_all_takes_nothing() -> None:
    assert take({}, [], 1.0) == Verdict(None, ())
