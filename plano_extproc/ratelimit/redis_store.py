"""Token budgets in Redis: one budget shared by every worker of every gateway replica.

Key layout: one Redis hash per bucket, ``{key_prefix}{bucket.key}`` (default prefix
``plano:budget:``), with fields ``u`` (tokens used and not yet refilled) and ``t`` (Redis's
clock, in seconds, when ``u`` was written). Every write sets the key's expiry to the time the
bucket takes to refill completely (``used / rate``, in milliseconds rounded up, plus a small
margin): a full bucket and a missing key mean the same thing, so idle budgets vanish and
Redis memory stays bounded by the budgets in use.

Why Lua: ``take`` must check every bucket of a group and charge them all, atomically, across
several keys, and tell every group's wait, in one round trip. A script does that on Redis's
own clock (``TIME``), so the replicas' clocks never matter. A ``MULTI``/``WATCH`` loop would
need at least two round trips and would retry under contention, which is exactly when a
budget is hot. Numbers cross the script boundary as strings (``%.17g``): a Lua number
returned to Redis is truncated to an integer.

Leases (``lease.py``): for a busy group of buckets the take script also charges a lease, tokens
this worker then hands out for that group's next requests without a round trip (``take_now``).
Its leftover is given back with the group's next take (the script counts it before checking),
and a background sweep gives back leases held longer than their ttl. Requests that find the
lease spent while another call is fetching the next wait for that call.

Redis Cluster: a multi-key script needs all its keys in one hash slot. This store talks to
one Redis node (a standalone server, or the primary behind Sentinel or a proxy); it does not
route by slot. To run it against a Cluster, give ``key_prefix`` a hash tag (for example
``plano:budget:{rl}:``): Cluster hashes only the first ``{...}`` of a key, which is then in
the prefix, so every budget lands in one slot whatever braces a bucket key holds. The cost is
that all budgets live on one shard; they are small and short-lived, so that is the choice.

Failures: Redis down, slow or refusing scripts never fails or slows a request beyond the
short timeouts. The call is served by ``fallback`` (an in-process store), a circuit breaker
then skips Redis, and a background probe (the ``take`` script with no buckets, so a server
that forbids scripting stays skipped) sends calls back to Redis once it answers, without a
restart. Nothing raises to the caller; failures are counted in ``health()``.

What was counted in the fallback during an outage is not merged back into Redis: Redis holds
the shared truth, and the other replicas may also have served the same clients from their
own fallbacks in that time, so adding the local counts would charge those tokens twice (and
a charge whose reply was lost to a timeout may already be in Redis). The outage is bounded;
a budget is at worst overspent by what the replicas admitted locally during it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from plano_extproc.ratelimit.budget import Bucket, BudgetStore, Verdict
from plano_extproc.ratelimit.lease import Leases
from plano_extproc.redis_health import RedisBreaker, is_outage, mask_url, scripting_forbidden


class _Script:
    """A Lua script called by its SHA1 (loaded again after a Redis restart forgot it)."""

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text, usedforsecurity=False).hexdigest().encode()


def _bulk(*parts: bytes) -> bytes:
    """Bulk strings in RESP framing (the elements of a command array)."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _pack(*parts: bytes) -> bytes:
    """One command in RESP framing: an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + _bulk(*parts)


def _evalsha(script: _Script, head: bytes, vary: Sequence[bytes], tail: bytes, count: int) -> bytes:
    """EVALSHA with its arguments framed in three pieces (only ``vary`` changes between
    the checks of one set of buckets): ``count`` elements in ``head`` and ``tail``."""
    return (
        b"*%d\r\n" % (count + 2 + len(vary))
        + _bulk(b"EVALSHA", script.sha)
        + head
        + _bulk(*vary)
        + tail
    )


log = logging.getLogger("plano_extproc.ratelimit")

# Added to every key's expiry: the key outlives the moment its bucket is full by this much,
# so rounding never drops a bucket that still has tokens in use.
_TTL_MARGIN_MS = 100
_TAKEN = Verdict(0, (0.0,))  # one group, charged
_MAX_FRAMES = 4096  # cached take frames (sets of buckets); cleared when full
# Per-command errors (not outages) are logged at most this often.
_ERROR_LOG_INTERVAL = 60.0

# Shared by both scripts: read a bucket's ``used`` drained to ``now``, and write one back.
_LUA_COMMON = """
local function fmt(x)
  if x == math.huge then return 'inf' end
  return string.format('%.17g', x)
end
local function load(key, rate, now)
  local h = redis.call('HMGET', key, 'u', 't')
  local u = tonumber(h[1]) or 0
  if u <= 0 then return 0 end
  local el = now - (tonumber(h[2]) or now)
  if el < 0 then el = 0 end
  u = u - rate * el
  if u < 0 then u = 0 end
  return u
end
local function store(key, used, rate, now, margin)
  if used <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'u', fmt(used), 't', fmt(now))
  if rate > 0 then
    redis.call('PEXPIRE', key, math.ceil(used / rate * 1000) + margin)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# budget.take on Redis. KEYS: the distinct bucket keys. ARGV: cost, tokens given back to the
# first group (a lease's leftover, lease.py), lease wanted for the first group, the lease's
# unit (the estimate it is counted in), expiry margin (ms), number of groups, one drain rate
# per key, then per group its size followed by one (key index 1-based, capacity, rate) triple
# per bucket.
# The leftover is given back before the check, so it counts. A lease is granted only when the
# first group is charged (a renewal asks with cost 0), in whole units, and only as far as every
# bucket of the group stays at least half full after it.
# Reply: one string, "<charged group index (0-based, -1: none)> <wait of group 1> ... <lease>",
# the numbers as '%.17g' ('inf' for a cost above a capacity): one bulk string parses in a
# fraction of the time an array of them takes (bench/redis_call.py).
_TAKE_LUA = (
    _LUA_COMMON
    + """
local cost = tonumber(ARGV[1])
local back = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local unit = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local ngroups = tonumber(ARGV[6])
local nkeys = #KEYS
local rate, used, dirty = {}, {}, {}
for k = 1, nkeys do
  rate[k] = tonumber(ARGV[6 + k])
  used[k] = load(KEYS[k], rate[k], now)
end
local pos = 7 + nkeys
local taken = -1
local lease = 0
local out = {}
for g = 1, ngroups do
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  local first = pos
  if g == 1 and back > 0 then
    for j = 0, n - 1 do
      local k = tonumber(ARGV[first + 3 * j])
      used[k] = used[k] - back
      if used[k] < 0 then used[k] = 0 end
      dirty[k] = true
    end
  end
  local longest = 0
  for j = 1, n do
    local k = tonumber(ARGV[pos])
    local cap = tonumber(ARGV[pos + 1])
    local r = tonumber(ARGV[pos + 2])
    pos = pos + 3
    local w = 0
    if cost > cap then
      w = math.huge
    else
      local over = used[k] + cost - cap
      if over > 0 then w = over / r end
    end
    if w > longest then longest = w end
  end
  if taken < 0 and longest == 0 then
    taken = g - 1
    for j = 0, n - 1 do
      local k = tonumber(ARGV[first + 3 * j])
      used[k] = used[k] + cost
      dirty[k] = true
    end
    if g == 1 and want > 0 and unit > 0 then
      lease = want
      for j = 0, n - 1 do
        local k = tonumber(ARGV[first + 3 * j])
        local room = tonumber(ARGV[first + 3 * j + 1]) / 2 - used[k]
        if room < lease then lease = room end
      end
      lease = math.floor(lease / unit) * unit
      if lease > 0 then
        for j = 0, n - 1 do
          local k = tonumber(ARGV[first + 3 * j])
          used[k] = used[k] + lease
          dirty[k] = true
        end
      else
        lease = 0
      end
    end
  end
  out[g] = fmt(longest)
end
table.insert(out, 1, tostring(taken))
out[#out + 1] = fmt(lease)
for k = 1, nkeys do
  if dirty[k] then store(KEYS[k], used[k], rate[k], now, margin) end
end
return table.concat(out, ' ')
"""
)

# adjust: KEYS: one per bucket (in order, repeats allowed: each counts, as in ``take``).
# ARGV: expiry margin (ms), then per key its delta and its rate. Reply: the number of buckets.
_ADJUST_LUA = (
    _LUA_COMMON
    + """
local margin = tonumber(ARGV[1])
local used, rate, seen = {}, {}, {}
for k = 1, #KEYS do
  local key = KEYS[k]
  if seen[key] == nil then
    seen[key] = k
    rate[k] = tonumber(ARGV[1 + 2 * k])
    used[k] = load(key, rate[k], now)
  end
  local i = seen[key]
  used[i] = used[i] + tonumber(ARGV[2 * k])
  if used[i] < 0 then used[i] = 0 end
end
for k = 1, #KEYS do
  if seen[KEYS[k]] == k then store(KEYS[k], used[k], rate[k], now, margin) end
end
return #KEYS
"""
)


def _num(x: float) -> str:
    """A float as Lua's ``tonumber`` reads it back exactly (``repr`` is shortest-exact)."""
    x = float(x)
    if math.isfinite(x):
        return repr(x)
    if math.isnan(x):
        raise ValueError("NaN in a budget")
    return "1e999" if x > 0 else "-1e999"  # strtod overflows to +-inf


class RedisBudgets:
    """``BudgetStore`` in Redis; see the module docstring. ``start()`` must be awaited first:
    until Redis has answered, calls are served by ``fallback``."""

    def __init__(
        self,
        url: str,
        fallback: BudgetStore,
        *,
        connect_timeout: float = 0.25,
        op_timeout: float = 0.25,
        retry_interval: float = 1.0,
        key_prefix: str = "plano:budget:",
        max_connections: int = 64,
        ca_file: str | None = None,
        leases: Leases | None = None,
    ) -> None:
        """Build the client; raises ``ValueError`` for an unusable URL (a config error).
        ``leases``: this worker's (lease.py; ``Leases(max_requests=0)`` never leases)."""
        self._fallback = fallback
        self._masked_url = mask_url(url)
        # How long a call may wait for a connection (a queue behind a hung Redis): as long
        # as the longest call, a connect then EVALSHA, NOSCRIPT, SCRIPT LOAD and EVALSHA.
        self._call_timeout = connect_timeout + 3 * op_timeout
        self._prefix = key_prefix
        # redis-py's Connection (connect, AUTH, SELECT, TLS, the reply parser), without its
        # client and pool layers: a budget check runs on every limited request, and those
        # layers cost about twice the rest of the call (docs/benchmarks.md, "Rate limits").
        kwargs: dict[str, Any] = dict(parse_url(url))
        self._connection_class = kwargs.pop("connection_class", Connection)
        if url.startswith("rediss://") and ca_file and "ssl_ca_certs" not in kwargs:
            # overrides.upstream_tls_ca_path: one CA setting for every TLS peer.
            kwargs["ssl_ca_certs"] = ca_file
        # No client-side retries: the breaker handles failures (redis-py's default retries
        # with backoff would add seconds to a request).
        self._connection_kwargs = {
            **kwargs,
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": op_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        self._connection_class(**self._connection_kwargs)  # a bad URL option fails here
        self._idle: list[Connection] = []
        self._open = 0  # connections open or opening (idle ones included)
        self._max_connections = max_connections
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._take_script = _Script(_TAKE_LUA)
        self._frames: dict[tuple[tuple[str, ...], ...], tuple[bytes, bytes, int]] = {}
        self._adjust_script = _Script(_ADJUST_LUA)
        self._breaker = RedisBreaker(
            "rate limits", self._masked_url, retry_interval, self._probe, log
        )
        self._fallbacks = 0
        self._adjust_fallbacks = 0
        self._last_logged_error = 0.0
        self._scripting_refused = False
        self._leases = leases if leases is not None else Leases()
        self._asking: dict[tuple[str, ...], asyncio.Future[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._renewals: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis once; if it does not answer, log and keep probing in the background.
        Starts the sweep that gives back leases held too long."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        try:
            await self._ping()
        except Exception as exc:
            self._breaker.record(exc)
            self._scripting_refused = isinstance(exc, ResponseError) and scripting_forbidden(exc)
            log.warning(
                "rate limits: Redis at %s unusable at start (%s); budgets are per gateway "
                "until it answers",
                self._masked_url,
                self._breaker.last_error,
            )
            self._breaker.trip()
            return
        self._breaker.opened()
        log.info("rate limits: budgets in Redis at %s", self._masked_url)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        # Renewals in flight end first (their calls are bounded by the timeouts), so what
        # they were granted is given back below rather than left reserved.
        await asyncio.gather(*self._renewals, return_exceptions=True)
        # Leases go back before the connections close, so a replica stopping (a rollout)
        # leaves no budget reserved for it.
        await self._give_back(self._leases.expired(time.monotonic(), every=True))
        await self._breaker.close()
        await self._drop_idle()

    # -- BudgetStore -------------------------------------------------------------------

    def take_now(self, groups: Sequence[Sequence[Bucket]], cost: float) -> Verdict | None:
        """The answer of this worker's lease for a one-group take, without awaiting; None
        when the lease cannot answer (then ``take`` asks Redis)."""
        if len(groups) == 1 and cost >= 0.0:
            if self._use(tuple(b.key for b in groups[0]), cost):
                return _TAKEN
        return None

    def _use(self, key: tuple[str, ...], cost: float) -> bool:
        """Answer from the group's lease; when that leaves it low, renew it in the background."""
        now = time.monotonic()
        if not self._leases.use(key, cost, now):
            return False
        want = self._leases.due(key, cost, now)
        if want:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside the event loop: renewed by the next take
                self._leases.failed(key)
                return True
            self._asking[key] = loop.create_future()
            task = loop.create_task(self._renew(key, cost, want))
            self._renewals.add(task)
            task.add_done_callback(self._renewals.discard)
        return True

    async def _renew(self, key: tuple[str, ...], cost: float, want: float) -> None:
        """Ask for a group's next lease ahead of need (a take of nothing that asks for a lease
        in units of ``cost``: nothing is charged unless a lease is granted)."""
        lease = 0.0
        try:
            if self._breaker.healthy:
                group = self._leases.buckets(key)
                _, lease = await self._take_script_call((group,), 0.0, 0.0, want, cost)
        except Exception as exc:
            self._fail(exc, "lease")
        finally:
            self._answered(key, lease)

    async def take(self, groups: Sequence[Sequence[Bucket]], cost: float) -> Verdict:
        if not cost >= 0.0:  # also NaN: a caller's bug, not a Redis failure
            raise ValueError(f"cost must be a number >= 0, not {cost!r}")
        if not groups:
            return Verdict(None, ())
        key: tuple[str, ...] | None = None
        if len(groups) == 1:  # one model: its lease may answer (lease.py)
            key = tuple(b.key for b in groups[0])
            if self._use(key, cost):
                return _TAKEN
            asked = self._asking.get(key)
            if asked is not None:  # the next lease is on its way: one round trip for a burst
                await self._answer(asked)
                if self._use(key, cost):
                    return _TAKEN
        if self._breaker.healthy:
            back = want = 0.0
            if key is not None:
                back, want = self._leases.ask(key, groups[0], cost, time.monotonic())
                if want:
                    self._asking[key] = asyncio.get_running_loop().create_future()
            try:
                verdict, lease = await self._take_script_call(groups, cost, back, want, cost)
                if key is not None:
                    if want:
                        want = 0.0  # answered: the finally clause has nothing left to do
                        self._answered(key, lease)
                    if verdict.taken is None:
                        return await self._from_lease(key, cost, verdict)
                return verdict
            except Exception as exc:
                # A leftover given back by a call that failed is not taken back: the call
                # may have run, and holding it again could admit it twice.
                self._fail(exc, "take")
            finally:
                if want and key is not None:  # failed or cancelled before the reply
                    self._answered(key, 0.0)
        self._fallbacks += 1
        return await self._fallback.take(groups, cost)

    def _answered(self, key: tuple[str, ...], lease: float) -> None:
        """The call that asked for ``key``'s lease is over; wake the calls that wait for it."""
        self._leases.granted(key, lease, time.monotonic())
        asked = self._asking.pop(key, None)
        if asked is not None and not asked.done():
            asked.set_result(None)

    async def _from_lease(self, key: tuple[str, ...], cost: float, refused: Verdict) -> Verdict:
        """Redis refused a one-group take: a lease granted to this worker meanwhile (or by a
        call still in flight) may hold the tokens the refusal missed; without this a burst's
        own lease could leave its tail refused while the budget still held it."""
        asked = self._asking.get(key)
        if asked is not None:
            await self._answer(asked)
        if self._use(key, cost):
            return _TAKEN
        return refused

    async def _answer(self, asked: asyncio.Future[None]) -> None:
        """Wait for a call asking for a lease, never longer than a call may take."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._call_timeout):
                await asyncio.shield(asked)

    async def adjust(self, buckets: Sequence[Bucket], delta: float) -> None:
        await self.adjust_many([(b, delta) for b in buckets])

    async def adjust_many(self, items: Sequence[tuple[Bucket, float]]) -> None:
        """Several buckets, each by its own delta, in one script call."""
        items = [(b, d) for b, d in items if d != 0 and math.isfinite(d)]
        if not items:
            return  # a usage report that is not a number changes nothing
        if self._breaker.healthy:
            try:
                await self._run(self._adjust_script, self._adjust_command(items))
                return
            except Exception as exc:
                self._fail(exc, "adjust")
        # Most likely the charge being corrected was taken from the fallback too.
        self._adjust_fallbacks += 1
        await self._fallback.adjust_many(items)

    def _adjust_command(self, items: Sequence[tuple[Bucket, float]]) -> bytes:
        parts = [str(len(items)).encode()]
        parts += [(self._prefix + b.key).encode() for b, _ in items]
        parts.append(str(_TTL_MARGIN_MS).encode())
        for b, d in items:
            parts += [_num(d).encode(), _num(b.rate).encode()]
        return _pack(b"EVALSHA", self._adjust_script.sha, *parts)

    async def _give_back(self, items: Sequence[tuple[Bucket, float]]) -> None:
        """Return leases' leftovers to Redis. Unlike ``adjust_many`` there is no fallback: the
        tokens were charged in Redis, so crediting the local table would admit them twice;
        when Redis cannot be reached they simply refill there."""
        if not items or not self._breaker.healthy:
            return
        try:
            await self._run(self._adjust_script, self._adjust_command([(b, -t) for b, t in items]))
        except Exception as exc:
            self._fail(exc, "lease return")

    async def _sweep(self) -> None:
        """Leases held longer than their ttl go back to Redis (lease.py)."""
        leases = self._leases
        while True:
            await asyncio.sleep(leases.ttl / 2)
            try:
                await self._give_back(leases.expired(time.monotonic()))
            except Exception:  # never let the sweep die: leases would stay reserved
                log.exception("rate limits: giving leases back failed")

    async def _run(self, script: _Script, command: bytes) -> Any:
        """One script call (``command``: its EVALSHA). A pooled socket from before a Redis
        restart fails on first use although Redis is back: drop the idle sockets and try once
        more on a fresh one, so a replica that saw no traffic during an outage does not trip
        its breaker after it."""
        # Bounded without a timer of its own: the connection's connect and socket timeouts
        # bound every step (one more timer per call measured about 25 us of CPU).
        try:
            return await self._call(script, command)
        except RedisConnectionError:
            await self._drop_idle()
            return await self._call(script, command)

    async def _call(self, script: _Script, command: bytes) -> Any:
        """EVALSHA on a connection of our own (at most ``max_connections`` at once); a
        connection that failed or timed out (it may still owe a reply) is closed, not reused."""
        conn = await self._acquire()
        done = False
        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.send_packed_command(command, False)
            try:
                reply = await conn.read_response()
            except NoScriptError:  # a restarted (or flushed) Redis forgot the script
                await conn.send_packed_command(_pack(b"SCRIPT", b"LOAD", script.text), False)
                await conn.read_response()
                await conn.send_packed_command(command, False)
                reply = await conn.read_response()
            done = True
            return reply
        finally:
            if done:
                self._release(conn)
            else:
                self._closed_one()
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    async def _acquire(self) -> Connection:
        """An idle connection, a new one while fewer than ``max_connections`` are open, else
        the next one a call releases (a plain list and counter: no lock on the common path)."""
        if self._idle:
            return self._idle.pop()
        if self._open < self._max_connections:
            self._open += 1
            return self._connection_class(**self._connection_kwargs)
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._call_timeout):  # a queue behind a hung Redis
                conn = await waiter
        except (asyncio.CancelledError, TimeoutError):
            if waiter.done() and not waiter.cancelled():  # handed over as we were cancelled
                handed = waiter.result()
                if handed is None:
                    self._closed_one()  # pass the free slot on
                else:
                    self._release(handed)
            raise
        if conn is None:  # a connection closed: open one in its place
            self._open += 1
            return self._connection_class(**self._connection_kwargs)
        return conn

    def _release(self, conn: Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _closed_one(self) -> None:
        self._open -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._closed_one()
            with contextlib.suppress(Exception):
                await conn.disconnect()

    def _take_frame(self, groups: Sequence[Sequence[Bucket]]) -> tuple[bytes, bytes, int]:
        """The take script's arguments around the cost, framed (cached: the same few sets
        of buckets recur, and framing them is most of a check's own CPU)."""
        key = tuple(tuple(b.key for b in g) for g in groups)
        frame = self._frames.get(key)
        if frame is None:
            keys, args = self._take_args(groups)
            head = [str(len(keys)).encode(), *(k.encode() for k in keys)]
            tail = [a.encode() if isinstance(a, str) else str(a).encode() for a in args]
            frame = (_bulk(*head), _bulk(*tail), len(head) + len(tail))
            if len(self._frames) >= _MAX_FRAMES:
                self._frames.clear()
            self._frames[key] = frame
        return frame

    def _take_args(self, groups: Sequence[Sequence[Bucket]]) -> tuple[list[str], list[str | int]]:
        """Keys, then the arguments after the cost (see _TAKE_LUA)."""
        index: dict[str, int] = {}
        keys: list[str] = []
        rates: list[str] = []
        layout: list[str | int] = []
        for group in groups:
            layout.append(len(group))
            for b in group:
                i = index.get(b.key)
                if i is None:
                    keys.append(self._prefix + b.key)
                    rates.append(_num(b.rate))  # a key drains at its first bucket's rate
                    i = index[b.key] = len(keys)
                layout += [i, _num(b.capacity), _num(b.rate)]
        return keys, [_TTL_MARGIN_MS, len(groups), *rates, *layout]

    @staticmethod
    def _verdict(reply: Any, ngroups: int) -> tuple[Verdict, float]:
        """The take script's reply: the verdict and the lease granted."""
        fields = reply.split() if isinstance(reply, bytes) else []
        if len(fields) != ngroups + 2:
            raise ValueError(f"unexpected reply from the take script: {reply!r}")
        taken = int(fields[0])
        waits = tuple(float(w) for w in fields[1:-1])  # 'inf' included
        lease = float(fields[-1])
        if not 0.0 <= lease < math.inf:
            raise ValueError(f"unexpected lease from the take script: {reply!r}")
        return Verdict(None if taken < 0 else taken, waits), lease

    async def _take_script_call(
        self,
        groups: Sequence[Sequence[Bucket]],
        cost: float,
        back: float,
        want: float,
        unit: float,
    ) -> tuple[Verdict, float]:
        """One call of the take script (see _TAKE_LUA for the arguments): the verdict and the
        lease granted."""
        head, tail, count = self._take_frame(groups)
        vary = tuple(_num(x).encode() for x in (cost, back, want, unit))
        reply = await self._run(
            self._take_script, _evalsha(self._take_script, head, vary, tail, count)
        )
        return self._verdict(reply, len(groups))

    async def _ping(self) -> None:
        """The take script with no buckets: Redis answers and lets this client script."""
        await self._take_script_call((), 0.0, 0.0, 0.0, 0.0)

    # -- failure handling --------------------------------------------------------------

    def _fail(self, exc: BaseException, op: str) -> None:
        """Count ``exc``; trip the breaker if Redis as a whole is unusable."""
        breaker = self._breaker
        breaker.record(exc)
        forbidden = isinstance(exc, ResponseError) and scripting_forbidden(exc)
        if forbidden or is_outage(exc):
            self._scripting_refused = forbidden
            if breaker.healthy:  # once per outage
                log.warning(
                    "rate limits: Redis %s failed (%s); budgets are per gateway, retrying "
                    "Redis every %.1fs",
                    op,
                    breaker.last_error,
                    breaker.retry_interval,
                )
            breaker.trip()
            return
        # One call's error (a foreign value under a budget key, a bad number): serve this
        # call from the fallback and keep using Redis.
        now = time.monotonic()
        if now - self._last_logged_error >= _ERROR_LOG_INTERVAL:
            self._last_logged_error = now
            log.warning("rate limits: Redis %s error: %s", op, breaker.last_error)

    async def _probe(self) -> None:
        """The take script runs (so a server that forbids scripting stays skipped), on a
        fresh connection: sockets from before the outage are dropped."""
        await self._drop_idle()
        await self._ping()
        self._scripting_refused = False

    # -- observability -----------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._breaker.healthy

    @property
    def fallbacks(self) -> int:
        """``take`` calls served by the fallback because Redis was unusable."""
        return self._fallbacks

    @property
    def errors(self) -> int:
        """Calls to Redis that failed (the probe's failures are not counted)."""
        return self._breaker.errors

    def health(self) -> dict[str, Any]:
        return {
            **self._breaker.health(),
            "fallbacks": self._fallbacks,
            "adjust_fallbacks": self._adjust_fallbacks,
            "scripting_refused": self._scripting_refused,
            "key_prefix": self._prefix,
            "lease_groups": len(self._leases),
            "lease_tokens": self._leases.held(),
        }
