"""Redis session cache: pins shared by all gateway replicas, in Plano's classic key/value format.

Design goals (where Plano 0.4.x was weak):

* first writer wins: a pin is written atomically only if absent, and every racer gets the
  winner's value back, so two replicas never pin one session to two models;
* Redis being down never fails or slows a request: every operation is bounded by short
  timeouts, and after a failure a circuit breaker skips Redis entirely until a background
  probe sees it answer again; recovery needs no restart;
* nothing raises to the caller; failures are counted and visible in ``health()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from plano_extproc.affinity.base import PinnedDecision
from plano_extproc.affinity.keys import REDIS_PREFIX
from plano_extproc.redis_health import RedisBreaker, is_outage, mask_url, scripting_forbidden

log = logging.getLogger("plano_extproc.affinity")

# Why a script rather than ``SET NX EX`` followed by ``GET``: it is one round trip on both
# the win and the lose path, the read of the winner cannot observe the key expiring between
# the two commands, and it can replace a malformed value (which a plain NX would keep pinned
# until its TTL ran out). ``SET ... NX GET`` would also be one trip but needs Redis >= 7.0.
# If EVAL is forbidden (ACLs, some proxies) the cache falls back to SET NX + GET.
_PUT_IF_ABSENT_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and type(doc['model_name']) == 'string'
     and doc['model_name'] ~= '' then
    local r = doc['route_name']
    if r == nil or r == cjson.null or type(r) == 'string' then
      return cur
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""


def encode_decision(value: PinnedDecision) -> str:
    """Plano's classic stored value: ``{"model_name": ..., "route_name": ...|null}``."""
    return json.dumps({"model_name": value.model, "route_name": value.route})


def decode_decision(raw: bytes | str) -> PinnedDecision | None:
    """Parse a stored value; None when it is not a well-formed classic pin."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    model = doc.get("model_name")
    route = doc.get("route_name")
    if not isinstance(model, str) or not model:
        return None
    if route is not None and not isinstance(route, str):
        return None
    return PinnedDecision(model=model, route=route)


class RedisSessionCache:
    """Session cache in Redis under ``plano:affinity:{key}``; see the module docstring.

    ``start()`` must be awaited first: until it has seen Redis answer, calls skip Redis.
    """

    def __init__(
        self,
        url: str,
        ttl_seconds: int = 600,
        connect_timeout: float = 0.25,
        op_timeout: float = 0.25,
        *,
        retry_interval: float = 1.0,
        max_connections: int = 64,
        key_prefix: str = REDIS_PREFIX,
        near_cache_seconds: float = 30.0,
        near_cache_entries: int = 10000,
        ca_file: str | None = None,
    ) -> None:
        """Build the client; raises ``ValueError`` for an unusable URL (a config error).

        ``near_cache_seconds`` > 0 keeps pins this process has seen in memory until the
        Redis key's own expiry (at most that many seconds). A pin never changes while its key
        lives (set-if-absent), so this only saves round trips for the hot sessions of agent
        loops; the cost is that a key deleted by hand in Redis stays pinned here for at most
        ``near_cache_seconds``.
        """
        self._url = url
        self._masked_url = mask_url(url)
        self._ttl = max(1, int(ttl_seconds))
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout
        # Whole-operation bound: a connect plus the command (and at most a script load).
        self._call_timeout = connect_timeout + 2 * op_timeout
        self._prefix = key_prefix
        tls: dict[str, Any] = {}
        if url.startswith("rediss://") and ca_file and "ssl_ca_certs=" not in url:
            # overrides.upstream_tls_ca_path: one CA setting for every TLS peer.
            tls["ssl_ca_certs"] = ca_file
        # No client-side retries: the breaker handles failures, and redis-py's default
        # (3 retries with exponential backoff) would add seconds to a request.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=op_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=op_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **tls,
        )
        self._client = Redis(connection_pool=self._pool)
        self._script = self._client.register_script(_PUT_IF_ABSENT_LUA)
        self._use_script = True
        self._breaker = RedisBreaker(
            "session cache", self._masked_url, retry_interval, self._probe, log
        )
        self._malformed = 0
        self._skipped = 0
        self._near_seconds = max(0.0, near_cache_seconds)
        self._near_entries = max(1, near_cache_entries)
        self._near: OrderedDict[str, tuple[PinnedDecision, float]] = OrderedDict()
        self._near_hits = 0

    # -- near cache --------------------------------------------------------------------

    def _near_get(self, rkey: str) -> PinnedDecision | None:
        item = self._near.get(rkey)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._near[rkey]
            return None
        self._near.move_to_end(rkey)
        self._near_hits += 1
        return item[0]

    def _near_put(self, rkey: str, value: PinnedDecision, ttl_seconds: float) -> None:
        if self._near_seconds <= 0 or ttl_seconds <= 0:
            return
        self._near[rkey] = (value, time.monotonic() + min(ttl_seconds, self._near_seconds))
        self._near.move_to_end(rkey)
        while len(self._near) > self._near_entries:
            self._near.popitem(last=False)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis once; if it does not answer, log and keep probing in the background."""
        try:
            async with asyncio.timeout(self._call_timeout):
                await self._client.ping()
        except Exception as exc:
            self._breaker.record(exc)
            log.warning(
                "session cache: Redis at %s unavailable at start (%s); serving without "
                "affinity until it answers",
                self._masked_url,
                self._breaker.last_error,
            )
            self._trip()
            return
        self._breaker.opened()
        log.info("session cache: connected to Redis at %s", self._masked_url)

    async def close(self) -> None:
        await self._breaker.close()
        with contextlib.suppress(Exception):
            await self._client.aclose()
        with contextlib.suppress(Exception):
            await self._pool.disconnect()

    # -- operations --------------------------------------------------------------------

    async def get(self, key: str, *, near: bool = True) -> PinnedDecision | None:
        rkey = self._prefix + key
        if near:
            local = self._near_get(rkey)
            if local is not None:
                return local
        if not self._breaker.healthy:
            self._skipped += 1
            return None
        try:
            async with asyncio.timeout(self._call_timeout):
                if near and self._near_seconds > 0:
                    async with self._client.pipeline(transaction=False) as pipe:
                        pipe.get(rkey)
                        pipe.pttl(rkey)
                        raw, pttl = await pipe.execute()
                else:
                    raw, pttl = await self._client.get(rkey), -1
        except Exception as exc:
            self._fail(exc, "get")
            return None
        if raw is None:
            return None
        decision = decode_decision(raw)
        if decision is None:
            self._malformed += 1
            log.warning("session cache: malformed value under %s treated as a miss", rkey)
        elif isinstance(pttl, int) and pttl > 0:
            self._near_put(rkey, decision, pttl / 1000.0)
        return decision

    async def put_if_absent(self, key: str, value: PinnedDecision) -> PinnedDecision:
        if not self._breaker.healthy:
            self._skipped += 1
            return value
        rkey = self._prefix + key
        payload = encode_decision(value)
        try:
            async with asyncio.timeout(self._call_timeout):
                if self._use_script:
                    try:
                        existing = await self._script(keys=[rkey], args=[payload, self._ttl])
                    except ResponseError as exc:
                        if not scripting_forbidden(exc):
                            raise
                        self._use_script = False
                        log.warning(
                            "session cache: Lua scripts unavailable (%s); using SET NX + GET",
                            exc,
                        )
                        existing = await self._set_nx_then_get(rkey, payload)
                else:
                    existing = await self._set_nx_then_get(rkey, payload)
        except Exception as exc:
            self._fail(exc, "put")
            return value
        if existing is None:
            self._near_put(rkey, value, self._ttl)
            return value
        winner = decode_decision(existing)
        if winner is None:
            self._malformed += 1
            log.warning("session cache: malformed value under %s left in place", rkey)
            return value
        return winner

    async def put(self, key: str, value: PinnedDecision) -> None:
        if not self._breaker.healthy:
            self._skipped += 1
            return
        rkey = self._prefix + key
        try:
            async with asyncio.timeout(self._call_timeout):
                await self._client.set(rkey, encode_decision(value), ex=self._ttl)
        except Exception as exc:
            self._fail(exc, "put")
            return
        self._near.pop(rkey, None)  # never serve a replaceable value from the near cache

    async def _set_nx_then_get(self, rkey: str, payload: str) -> bytes | str | None:
        """Fallback without scripting: atomic SET NX; on loss read the winner."""
        if await self._client.set(rkey, payload, nx=True, ex=self._ttl):
            return None
        raw: bytes | str | None = await self._client.get(rkey)
        return raw

    # -- failure handling --------------------------------------------------------------

    def _fail(self, exc: BaseException, op: str) -> None:
        breaker = self._breaker
        breaker.record(exc)
        if is_outage(exc):
            if breaker.healthy:
                log.warning(
                    "session cache: Redis %s failed (%s); skipping Redis, retrying every %.1fs",
                    op,
                    breaker.last_error,
                    breaker.retry_interval,
                )
            self._trip()
        else:
            log.warning("session cache: Redis %s error: %s", op, breaker.last_error)

    def _trip(self) -> None:
        """Open the breaker: requests skip Redis until the background probe succeeds."""
        # Redis may come back empty (no persistence) and other replicas may then pin anew:
        # forget local copies so this replica follows Redis again instead of old pins.
        self._near.clear()
        self._breaker.trip()

    async def _probe(self) -> None:
        """Redis answers a PING, on a fresh connection (idle sockets from before the outage
        are dropped, so the first requests after it use fresh ones too)."""
        with contextlib.suppress(Exception):
            await self._pool.disconnect(inuse_connections=False)
        async with asyncio.timeout(self._call_timeout):
            await self._client.ping()

    @property
    def healthy(self) -> bool:
        return self._breaker.healthy

    @property
    def failures(self) -> int:
        return self._breaker.errors + self._skipped

    def health(self) -> dict[str, Any]:
        return {
            **self._breaker.health(),
            "malformed": self._malformed,
            "skipped": self._skipped,
            "ttl_seconds": self._ttl,
            "atomic_put": "lua" if self._use_script else "set-nx+get",
            "near_cache_entries": len(self._near),
            "near_cache_hits": self._near_hits,
        }
