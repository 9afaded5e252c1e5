"""What the admission check of one token rate limit costs the worker, in-process (no Envoy).

``RateLimiter.admit`` for the request of bench/ratelimit.py (one model, one ``x-tenant``
limit, an estimate of 80 tokens, a budget so large nothing is refused), one admission after
another on one event loop, against each budget store:

- ``memory``: the table every worker of a gateway maps (``SharedBudgets`` on a file, flock);
- ``redis exact``: ``RedisBudgets`` that never leases (``Leases(max_requests=0)``): one take
  script per request, as before leases;
- ``redis lease``: ``RedisBudgets`` as shipped: a busy tenant's requests are answered from
  a lease, and one take script per lease (ratelimit/lease.py).

redis-server is a throwaway one on a free port (tests/redis_server.py). Reported: worker CPU
(process time) and wall time per admission, and script calls per admission, medians of
``--rounds`` interleaved rounds of ``--calls`` admissions each; redis-server's own CPU per
admission from its ``INFO cpu``. The event loop is uvloop, as in the worker.

    .venv/bin/python bench/ratelimit_admit.py [--rounds 7] [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from plano_extproc.config import RateLimitConfig
from plano_extproc.ratelimit.lease import Leases
from plano_extproc.ratelimit.limiter import Admitted, RateLimiter
from plano_extproc.ratelimit.memory import SharedBudgets
from plano_extproc.ratelimit.redis_store import RedisBudgets
from tests.redis_server import RedisServer, find_redis_server

MODEL = "openai/gpt-4o-mini"
HEADERS = {"x-tenant": "bench"}
ESTIMATE = 80


def limit() -> RateLimitConfig:
    return RateLimitConfig(
        model=MODEL,
        models=(MODEL,),
        header="x-tenant",
        value=None,
        tokens=100_000_000,
        unit="minute",
    )


async def run(limiter: RateLimiter, calls: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``calls`` admissions."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        verdict = await limiter.admit((MODEL,), HEADERS, ESTIMATE)
        if not isinstance(verdict, Admitted):
            raise SystemExit(f"refused: {verdict}")
    return time.process_time() - cpu, time.perf_counter() - wall


def evalsha(admin: redis.Redis) -> int:
    return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def server_cpu(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    server = RedisServer(binary=find_redis_server()).start()
    table = Path(tempfile.mkdtemp(prefix="plano-admit-")) / "budgets"
    admin = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        memory = SharedBudgets(str(table))
        exact = RedisBudgets(server.url, SharedBudgets(), leases=Leases(max_requests=0))
        leased = RedisBudgets(server.url, SharedBudgets(), key_prefix="plano:lease:")
        for store in (exact, leased):
            await store.start()
        rows = {
            "memory": RateLimiter([limit()], memory),
            "redis exact": RateLimiter([limit()], exact),
            "redis lease": RateLimiter([limit()], leased),
        }
        cpu: dict[str, list[float]] = {k: [] for k in rows}
        wall: dict[str, list[float]] = {k: [] for k in rows}
        scripts: dict[str, list[float]] = {k: [] for k in rows}
        server_us: dict[str, list[float]] = {k: [] for k in rows}
        for name, limiter in rows.items():  # warm-up: scripts loaded, leases grown
            await run(limiter, 500)
        for _ in range(args.rounds):
            for name, limiter in rows.items():
                before, server_before = evalsha(admin), server_cpu(admin)
                c, w = await run(limiter, args.calls)
                cpu[name].append(c / args.calls * 1e6)
                wall[name].append(w / args.calls * 1e6)
                scripts[name].append((evalsha(admin) - before) / args.calls)
                server_us[name].append((server_cpu(admin) - server_before) / args.calls * 1e6)
        for store in (exact, leased):
            await store.close()
    finally:
        admin.close()
        server.stop()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{args.rounds} interleaved rounds of {args.calls} admissions, medians")
    print()
    print(
        "| store | worker CPU µs/admission | wall µs/admission | scripts/admission "
        "| redis-server CPU µs/admission |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in rows:
        print(
            f"| {name} | {statistics.median(cpu[name]):.1f} | {statistics.median(wall[name]):.1f}"
            f" | {statistics.median(scripts[name]):.3f} | {statistics.median(server_us[name]):.1f} |"
        )


if __name__ == "__main__":
    import uvloop  # the worker's event loop (server/app.py)

    uvloop.run(main())
