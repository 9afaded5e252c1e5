"""What both Redis users share (session cache, token budgets): the circuit breaker, the error
classification, and the URL with its password masked for logs and health.

Redis being down must never fail or slow a request: after an outage the owner stops calling
Redis (``healthy`` is False) and a background probe calls it every ``retry_interval`` seconds
until it answers; then the owner uses Redis again, without a restart. The owner classifies its
errors (an outage trips the breaker, one command's error does not), logs in its own words,
and supplies the probe (what "Redis answers" means for it: a PING, a script that must run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def is_outage(exc: BaseException) -> bool:
    """Errors meaning "Redis is not usable right now" (trip the breaker), as opposed to a
    per-command error such as WRONGTYPE on one key."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError))


def scripting_forbidden(exc: ResponseError) -> bool:
    """True when the server refuses EVALSHA/EVAL itself (ACL or a proxy without scripting)."""
    if isinstance(exc, NoPermissionError):  # redis-py strips the NOPERM prefix
        return True
    text = str(exc).lower()
    return "noperm" in text or "unknown command" in text or "not supported" in text


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs and health)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable redis url>"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RedisBreaker:
    """``healthy``, the failure counters, and the probe that closes the breaker again."""

    def __init__(
        self,
        what: str,
        masked_url: str,
        retry_interval: float,
        probe: Callable[[], Awaitable[Any]],
        log: logging.Logger,
    ) -> None:
        self.what = what  # "session cache", "rate limits": the start of each log line
        self.masked_url = masked_url
        self.retry_interval = retry_interval
        self.healthy = False
        self.errors = 0  # failed calls (the probe's failures are not counted)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._probe = probe
        self._log = log
        self._closed = False
        self._probe_task: asyncio.Task[None] | None = None

    def record(self, exc: BaseException) -> None:
        """A failed call: counted, and kept as the last error."""
        self.errors += 1
        self.last_error = describe(exc)
        self.last_error_at = time.time()

    def trip(self) -> None:
        """Open the breaker: the owner skips Redis until the background probe succeeds."""
        self.healthy = False
        if self._closed:
            return
        if self._probe_task is None or self._probe_task.done():
            name = f"{self.what.replace(' ', '-')}-redis-probe"
            self._probe_task = asyncio.create_task(self._probe_loop(), name=name)

    def opened(self) -> None:
        """``start`` saw Redis answer (or a caller knows it does)."""
        self._closed = False
        self.healthy = True

    async def close(self) -> None:
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def health(self) -> dict[str, Any]:
        """The ``/ready`` fields every Redis-backed store shares."""
        return {
            "backend": "redis",
            "healthy": self.healthy,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "url": self.masked_url,
        }

    @property
    def probing(self) -> bool:
        return self._probe_task is not None and not self._probe_task.done()

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.retry_interval)
            try:
                await self._probe()
            except Exception as exc:
                self.last_error = describe(exc)  # not counted in ``errors``
                self.last_error_at = time.time()
                self._log.debug("%s: Redis probe failed: %s", self.what, self.last_error)
                continue
            self.healthy = True
            self._log.warning("%s: Redis at %s usable again", self.what, self.masked_url)
            return
