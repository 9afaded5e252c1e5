"""The shared cooldown table and the Retry-After reader, on an injected clock (no sleeping)."""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plano_extproc.config import FailoverConfig
from plano_extproc.cooldown import Cooldowns, retry_after_seconds

NAMES = ["openai/gpt-4o", "anthropic/claude-sonnet-4-20250514", "openai/gpt-4o-mini"]
A, B, C = NAMES


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def table(
    clock: Callable[[], float] | None = None, path: str | None = None, **policy: object
) -> Cooldowns:
    merged: dict[str, object] = {"eject_after_failures": 100, **policy}
    return Cooldowns(NAMES, FailoverConfig(**merged), path, clock or Clock())  # type: ignore[arg-type]


# ---------------------------------------------------------------- 429 rests


def test_429_rests_for_retry_after_then_is_available_again() -> None:
    clock = Clock()
    cd = table(clock)
    assert cd.rate_limited(A, 12.0) == 12.0
    assert cd.resting(A) == 12.0
    clock.now += 11.5
    assert cd.resting(A) == pytest.approx(0.5)
    clock.now += 0.5
    assert cd.resting(A) == 0.0
    assert cd.resting(B) == 0.0  # only the model that answered 429


def test_429_retry_after_is_capped_at_cooldown_max() -> None:
    cd = table(cooldown_max_seconds=20.0)
    assert cd.rate_limited(A, 3600.0) == 20.0
    assert cd.resting(A) == 20.0


def test_429_without_retry_after_rests_for_the_default() -> None:
    cd = table(cooldown_default_seconds=7.0)
    assert cd.rate_limited(A, None) == 7.0
    assert cd.resting(A) == 7.0


def test_a_shorter_hint_does_not_shorten_a_longer_rest() -> None:
    cd = table()
    cd.rate_limited(A, 30.0)
    cd.rate_limited(A, 1.0)
    assert cd.resting(A) == 30.0


# ---------------------------------------------------------------- available()


def test_available_skips_resting_models_in_order() -> None:
    clock = Clock()
    cd = table(clock)
    cd.rate_limited(B, 10.0)
    assert cd.available(NAMES, str) == [A, C]
    assert cd.available([C, B, A], str) == [C, A]
    clock.now += 10.0
    assert cd.available(NAMES, str) == NAMES


def test_available_returns_all_in_order_when_all_rest() -> None:
    cd = table()
    for name in NAMES:
        cd.rate_limited(name, 10.0)
    assert cd.available([C, A, B], str) == [C, A, B]


def test_available_takes_a_name_function() -> None:
    cd = table()
    cd.rate_limited(A, 10.0)
    items = [(A, 1), (B, 2)]
    assert cd.available(items, lambda item: item[0]) == [(B, 2)]


# ---------------------------------------------------------------- ejection


def test_consecutive_failures_eject_then_the_count_restarts() -> None:
    clock = Clock()
    cd = table(clock, eject_after_failures=3, eject_seconds=30.0)
    cd.failed(A)
    cd.failed(A)
    assert cd.resting(A) == 0.0  # two failures: not yet
    cd.failed(A)
    assert cd.resting(A) == 30.0
    clock.now += 30.0
    assert cd.resting(A) == 0.0
    # The counter restarted at the ejection: two more failures do not eject again.
    cd.failed(A)
    cd.failed(A)
    assert cd.resting(A) == 0.0
    cd.failed(A)
    assert cd.resting(A) == 30.0


def test_429s_count_toward_an_ejection() -> None:
    cd = table(eject_after_failures=2, eject_seconds=40.0)
    cd.rate_limited(A, 1.0)
    cd.rate_limited(A, 1.0)
    assert cd.resting(A) == 40.0


def test_success_clears_the_rest_and_the_failure_count() -> None:
    cd = table(eject_after_failures=3, eject_seconds=30.0)
    cd.rate_limited(A, 10.0)
    cd.failed(A)
    cd.succeeded(A)
    assert cd.resting(A) == 0.0
    # Not consecutive any more: two failures after the success do not eject.
    cd.failed(A)
    cd.failed(A)
    assert cd.resting(A) == 0.0


def test_unknown_names_never_rest() -> None:
    cd = table(eject_after_failures=1)
    assert cd.rate_limited("openai/not-configured", 10.0) == 10.0
    cd.failed("openai/not-configured")
    cd.succeeded("openai/not-configured")
    assert cd.resting("openai/not-configured") == 0.0
    assert cd.available(["openai/not-configured", A], str) == ["openai/not-configured", A]
    assert all(cd.resting(n) == 0.0 for n in NAMES)


# ---------------------------------------------------------------- shared by workers


def test_two_tables_on_the_same_file_see_each_others_writes(tmp_path: Path) -> None:
    clock = Clock()
    path = str(tmp_path / "cooldowns")
    one = table(clock, path)
    # Another worker: same models, listed in another order (slots follow the sorted names).
    other = Cooldowns(list(reversed(NAMES)), one.policy, path, clock)
    one.rate_limited(B, 15.0)
    assert other.resting(B) == 15.0
    assert other.resting(A) == other.resting(C) == 0.0
    other.succeeded(B)
    assert one.resting(B) == 0.0
    other.rate_limited(C, 5.0)
    assert one.available(NAMES, str) == [A, B]


def test_in_memory_tables_are_independent() -> None:
    clock = Clock()
    one, other = table(clock), table(clock)
    one.rate_limited(A, 10.0)
    assert other.resting(A) == 0.0


# ---------------------------------------------------------------- Retry-After


NOW = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def http_date(offset: float) -> str:
    return email.utils.formatdate(NOW + offset, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": " 12 "}, 12.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer hint wins
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "-5", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "inf", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "nan", "retry-after": "9"}, 9.0),
        ({"retry-after": http_date(30)}, 30.0),
        ({"retry-after": http_date(-30)}, 0.0),  # already past: no wait
        ({}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "-inf"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "-1"}, None),
        ({"retry-after": "Wed, 99 Foo 2026 99:99:99 GMT"}, None),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    got = retry_after_seconds(headers, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_scattered_failures_among_many_attempts_do_not_eject() -> None:
    """First attempts that succeed are never seen (no stream observes them): failures must be
    at least half of a window's attempts to eject, and the window restarts."""
    from plano_extproc.cooldown import EJECT_WINDOW_SECONDS

    now = [1000.0]
    policy = FailoverConfig(eject_after_failures=3, eject_seconds=30.0)
    table = Cooldowns(["m"], policy, None, lambda: now[0])
    for _ in range(3):  # 3 failures among 100 attempts: a 3% error rate
        for _ in range(33):
            table.attempted("m")
        table.failed("m")
    assert table.resting("m") == 0.0
    now[0] += EJECT_WINDOW_SECONDS + 1  # a new window: three failures of three attempts
    for _ in range(3):
        table.attempted("m")
        table.failed("m")
    assert table.resting("m") == 30.0
