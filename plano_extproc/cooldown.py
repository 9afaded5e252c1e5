"""Which models are cooling down, shared by every worker of one gateway.

A model that answered 429 rests for its ``Retry-After`` (capped; a default when absent); a
model that failed ``eject_after_failures`` times (any reason: 429, 5xx, no answer) within
``EJECT_WINDOW_SECONDS``, those failures being at least half of its attempts there and no
success seen since, is ejected for ``eject_for``. A routed request skips resting models,
unless all of its route's models rest: then it tries them in order anyway (availability over
politeness).

The table is a few bytes per configured model in a file the supervisor creates and every
worker maps (``COOLDOWN_FILE_ENV``); a lone ``serve`` keeps it in its own memory. Times are
``CLOCK_MONOTONIC``, which all processes of a host share. Updates are not atomic across
processes: two workers recording at once may lose one failure count, which only delays an
ejection by one failure. Envoy's outlier detection was the alternative; it cannot read
``Retry-After``, does not count 429s, and with one host per provider cluster its panic mode
sends traffic to an ejected host anyway.
"""

from __future__ import annotations

import email.utils
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from plano_extproc.config import FailoverConfig

COOLDOWN_FILE_ENV = "PLANO_EXTPROC_COOLDOWN_FILE"
# rest until (monotonic seconds), failures and attempts in the current window, window start
_SLOT = struct.Struct("<dddd")
_UNTIL = struct.Struct("<d")  # the slot's first field alone: read on every routed request
# Failures count toward an ejection within this window, and only while they are at least half
# of the model's attempts in it: a model whose first attempts succeed unseen (no stream
# observes them) must not be ejected by a few scattered errors under heavy traffic.
EJECT_WINDOW_SECONDS = 10.0
T = TypeVar("T")


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """A provider's wait hint: ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP
    date); None when absent or unreadable (the caller then uses its default)."""
    raw_ms = headers.get("retry-after-ms", "").strip()
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        value = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, value)
    return value if math.isfinite(value) and value >= 0 else None


class Cooldowns:
    """The shared rest table of the models named at start (other names are never resting)."""

    def __init__(
        self,
        names: Sequence[str],
        policy: FailoverConfig,
        path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.clock = clock
        # Sorted: every worker of a gateway has the same config, hence the same slots.
        self._index = {name: i for i, name in enumerate(sorted(set(names)))}
        size = max(1, len(self._index)) * _SLOT.size
        self._table: mmap.mmap | bytearray
        if path is None:
            self._table = bytearray(size)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._table = mmap.mmap(fd, size)
            finally:
                os.close(fd)

    @classmethod
    def from_env(cls, names: Sequence[str], policy: FailoverConfig) -> Cooldowns:
        return cls(names, policy, os.environ.get(COOLDOWN_FILE_ENV) or None)

    def _read(self, name: str) -> tuple[int, float, float, float, float] | None:
        i = self._index.get(name)
        if i is None:
            return None
        until, failures, attempts, start = _SLOT.unpack_from(self._table, i * _SLOT.size)
        return i, until, failures, attempts, start

    def _write(self, i: int, until: float, failures: float, attempts: float, start: float) -> None:
        _SLOT.pack_into(self._table, i * _SLOT.size, until, failures, attempts, start)

    def resting(self, name: str) -> float:
        """Seconds ``name`` still rests (0: available)."""
        i = self._index.get(name)
        if i is None:
            return 0.0
        (until,) = _UNTIL.unpack_from(self._table, i * _SLOT.size)
        return max(0.0, until - self.clock()) if until else 0.0

    def available(self, candidates: Sequence[T], name: Callable[[T], str]) -> list[T]:
        """The candidates not resting, in order; all of them when every one rests."""
        fresh = [c for c in candidates if self.resting(name(c)) == 0.0]
        return fresh or list(candidates)

    def _windowed(self, name: str) -> tuple[int, float, float, float, float, float] | None:
        """(slot, until, failures, attempts, window start, now), the counts of a window that
        is over restarted."""
        slot = self._read(name)
        if slot is None:
            return None
        i, until, failures, attempts, start = slot
        now = self.clock()
        if now - start > EJECT_WINDOW_SECONDS:
            failures, attempts, start = 0.0, 0.0, now
        return i, until, failures, attempts, start, now

    def attempted(self, name: str) -> None:
        """A request was sent to ``name`` (its outcome may never be seen)."""
        slot = self._windowed(name)
        if slot is not None:
            i, until, failures, attempts, start, _ = slot
            self._write(i, until, failures, attempts + 1, start)

    def rate_limited(self, name: str, retry_after: float | None) -> float:
        """A 429: rest for the hint (capped) and count the failure; the rest in seconds."""
        p = self.policy
        seconds = p.cooldown_default_seconds if retry_after is None else retry_after
        seconds = min(max(seconds, 0.0), p.cooldown_max_seconds)
        self._fail(name, seconds)
        return seconds

    def failed(self, name: str) -> None:
        """Any other failure (5xx, refused, reset, timeout): counts toward an ejection."""
        self._fail(name, 0.0)

    def succeeded(self, name: str) -> None:
        slot = self._read(name)
        if slot is not None and (slot[1] or slot[2]):
            self._write(slot[0], 0.0, 0.0, slot[3], slot[4])

    def _fail(self, name: str, rest: float) -> None:
        slot = self._windowed(name)
        if slot is None:
            return
        i, until, failures, attempts, start, now = slot
        until = max(until, now + rest)
        failures += 1
        if failures >= self.policy.eject_after_failures and 2 * failures >= attempts:
            until = max(until, now + self.policy.eject_seconds)
            failures, attempts = 0.0, 0.0  # the next ejection takes as many failures again
        self._write(i, until, failures, attempts, start)
