"""Leases (ratelimit/lease.py): who asks for one, how much, when it is handed out and when it
goes back. Pure logic; the clock is passed in."""

from __future__ import annotations

from plano_extproc.ratelimit.budget import Bucket
from plano_extproc.ratelimit.lease import Leases

A = Bucket("lim:a", capacity=1000, rate=1)
B = Bucket("lim:b", capacity=1000, rate=1)
KEY = ("lim:a",)


def leased(tokens: float, key: tuple[str, ...] = KEY, buckets: tuple[Bucket, ...] = (A,)) -> Leases:
    """Leases whose group ``key`` was granted ``tokens`` at t=0.02 (two requests asked)."""
    leases = Leases()
    leases.ask(key, buckets, 10.0, now=0.0)
    leases.ask(key, buckets, 10.0, now=0.01)
    leases.granted(key, tokens, now=0.02)
    return leases


def test_a_quiet_group_never_asks() -> None:
    leases = Leases()
    # One request a second: every one is checked in Redis, none asks for a lease.
    for t in range(10):
        assert leases.ask(KEY, [A], 10.0, now=float(t) * 1.5) == (0.0, 0.0)
    assert leases.held() == 0.0


def test_a_busy_group_asks_once_at_a_time_sized_by_demand() -> None:
    leases = Leases(max_requests=4, horizon=0.5)
    assert leases.ask(KEY, [A], 10.0, now=0.0) == (0.0, 0.0)  # first of the second
    assert leases.ask(KEY, [A], 10.0, now=0.1) == (0.0, 20.0)  # second: two estimates
    assert leases.asking(KEY)
    assert leases.ask(KEY, [A], 10.0, now=0.2) == (0.0, 0.0)  # one call asks at a time
    leases.granted(KEY, 20.0, now=0.3)
    assert not leases.asking(KEY)
    assert leases.use(KEY, 10.0, now=0.4) and leases.use(KEY, 10.0, now=0.5)
    assert not leases.use(KEY, 10.0, now=0.6)  # spent
    for t in (0.61, 0.62, 0.63, 0.64):
        leases.ask(KEY, [A], 10.0, now=t)
        leases.failed(KEY)
    # 7 requests in this second: half a second of them is 4 (rounded up).
    assert leases.ask(KEY, [A], 10.0, now=0.7) == (0.0, 40.0)
    leases.failed(KEY)
    for i in range(20):
        leases.ask(KEY, [A], 10.0, now=0.8 + i * 0.001)
        leases.failed(KEY)
    # Demand is capped: at most max_requests estimates, whatever the rate.
    assert leases.ask(KEY, [A], 10.0, now=0.9) == (0.0, 40.0)


def test_the_leftover_goes_back_with_the_next_call() -> None:
    leases = leased(25.0)
    assert leases.use(KEY, 10.0, now=0.3)
    assert not leases.use(KEY, 20.0, now=0.4)  # 15 left: not enough for this one
    back, _ = leases.ask(KEY, [A], 20.0, now=0.4)
    assert back == 15.0
    assert leases.held() == 0.0


def test_an_old_lease_is_not_used_and_is_given_back_per_bucket() -> None:
    key = ("lim:a", "lim:b")
    leases = leased(30.0, key, (A, B))
    assert leases.expired(now=0.5) == []  # still young
    assert not leases.use(key, 10.0, now=1.3)  # older than the ttl: Redis decides
    assert leases.expired(now=1.3) == [(A, 30.0), (B, 30.0)]
    assert leases.held() == 0.0
    assert leases.expired(now=1.4) == []


def test_every_lease_goes_back_at_close_and_idle_groups_are_dropped() -> None:
    leases = leased(30.0)
    assert leases.expired(now=0.3, every=True) == [(A, 30.0)]
    assert len(leases) == 1
    leases.expired(now=5.0)
    assert len(leases) == 0


def test_groups_are_bounded_whatever_clients_send() -> None:
    """Every distinct selector value is a group: past max_groups, new ones never lease (and
    cost no memory) until idle ones are dropped."""
    leases = Leases(max_groups=100)
    for i in range(1000):
        key = (f"lim:{i}",)
        b = Bucket(key[0], capacity=1000, rate=1)
        leases.ask(key, [b], 1.0, now=0.0)
        leases.ask(key, [b], 1.0, now=0.0)
    assert len(leases) == 100
    fresh = ("lim:fresh",)
    fb = Bucket(fresh[0], capacity=1000, rate=1)
    assert leases.ask(fresh, [fb], 1.0, now=0.0) == (0.0, 0.0)
    assert leases.ask(fresh, [fb], 1.0, now=0.0) == (0.0, 0.0)
    for i in range(100):
        leases.failed((f"lim:{i}",))
    leases.expired(now=10.0)
    assert len(leases) == 0
    leases.ask(fresh, [fb], 1.0, now=10.0)
    assert leases.ask(fresh, [fb], 1.0, now=10.0) == (0.0, 2.0)


def test_a_free_request_never_asks() -> None:
    leases = Leases()
    for t in range(5):
        assert leases.ask(KEY, [A], 0.0, now=t * 0.1) == (0.0, 0.0)


def test_a_lease_is_renewed_ahead_once_half_spent() -> None:
    leases = leased(40.0)
    assert leases.use(KEY, 10.0, now=0.03)
    assert leases.due(KEY, 10.0, now=0.03) == 0.0  # 30 of 40 left
    assert leases.use(KEY, 10.0, now=0.04)
    assert leases.due(KEY, 10.0, now=0.04) == 0.0  # 20: half, not below
    assert leases.use(KEY, 10.0, now=0.05)
    want = leases.due(KEY, 10.0, now=0.05)  # 10 left: renew, the leftover keeps answering
    assert want >= 20.0 and leases.asking(KEY)
    assert leases.due(KEY, 10.0, now=0.05) == 0.0  # one renewal at a time
    assert leases.use(KEY, 10.0, now=0.06)
    assert not leases.use(KEY, 10.0, now=0.07)
    leases.granted(KEY, want, now=0.08)
    assert leases.held() == want and not leases.asking(KEY)
    assert leases.buckets(KEY) == (A,)
