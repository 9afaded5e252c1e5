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
admission from its ``INFO cpu``.

A second table times the worker's whole request logic for bench/ratelimit.py's request
(``Gateway.on_headers`` + ``on_body``: parse, estimate, admission, the upstream request and
its metadata) and then the settlement of its usage record (``settle``, with ``flush`` once
per 100 records, as batches arrive), with no limit and with each store: what the limit adds
to the worker's CPU per request, without Envoy and the process noise of bench/ratelimit.py.
The event loop is uvloop, as in the worker.

    .venv/bin/python bench/ratelimit_admit.py [--rounds 7] [--calls 5000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead as ov
import ratelimit as rl
import redis

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.gateway import Gateway, RequestInfo, Upstream
from plano_extproc.ratelimit.lease import Leases
from plano_extproc.ratelimit.limiter import Admitted, RateLimiter
from plano_extproc.ratelimit.memory import SharedBudgets
from plano_extproc.ratelimit.redis_store import RedisBudgets
from plano_extproc.routing.base import NullRouter
from tests.redis_server import RedisServer, evalsha_calls, find_redis_server

MODEL = ov.MODEL
HEADERS = {"x-tenant": rl.TENANT}
ESTIMATE = 80


async def run(limiter: RateLimiter, calls: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``calls`` admissions."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        verdict = await limiter.admit((MODEL,), HEADERS, ESTIMATE)
        if not isinstance(verdict, Admitted):
            raise SystemExit(f"refused: {verdict}")
    return time.process_time() - cpu, time.perf_counter() - wall


HEADERS_IN = {
    ":method": "POST",
    ":path": "/v1/chat/completions",
    ":authority": "127.0.0.1",
    "content-type": "application/json",
    "authorization": "Bearer sk-client",
    "x-tenant": rl.TENANT,
}


async def run_gateway(gateway: Gateway, body: bytes, calls: int) -> float:
    """CPU seconds for ``calls`` requests through the worker's request logic, each then
    settled as its usage record would be (41 tokens, the fixed upstream's usage)."""
    limiter = gateway.limiter
    cpu = time.process_time()
    for i in range(calls):
        info = RequestInfo.build(HEADERS_IN, end_of_stream=False)
        if gateway.on_headers(info) is not None:
            raise SystemExit("answered at headers")
        up = await gateway.on_body(info, body)
        if not isinstance(up, Upstream):
            raise SystemExit(f"not proxied: {up}")
        if limiter is not None:
            settlement = up.ratelimit
            if not settlement:
                raise SystemExit("no settlement: the limit did not apply")
            limiter.settle(settlement, MODEL, 200, 41)
            if i % 100 == 99:
                limiter.flush()
    return time.process_time() - cpu


def server_cpu(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    bare = parse_config(ov.config_yaml(1, 2, "none"))
    cfg = parse_config(ov.config_yaml(1, 2, "none") + rl.LIMIT)  # bench/ratelimit.py's limit
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
            "memory": RateLimiter(cfg.ratelimits, memory),
            "redis exact": RateLimiter(cfg.ratelimits, exact),
            "redis lease": RateLimiter(cfg.ratelimits, leased),
        }
        cpu: dict[str, list[float]] = {k: [] for k in rows}
        wall: dict[str, list[float]] = {k: [] for k in rows}
        scripts: dict[str, list[float]] = {k: [] for k in rows}
        server_us: dict[str, list[float]] = {k: [] for k in rows}
        for limiter in rows.values():  # warm-up: scripts loaded, leases grown
            await run(limiter, 500)
        for _ in range(args.rounds):
            for name, limiter in rows.items():
                before, server_before = evalsha_calls(admin), server_cpu(admin)
                c, w = await run(limiter, args.calls)
                cpu[name].append(c / args.calls * 1e6)
                wall[name].append(w / args.calls * 1e6)
                scripts[name].append((evalsha_calls(admin) - before) / args.calls)
                server_us[name].append((server_cpu(admin) - server_before) / args.calls * 1e6)
        gateways = {
            "no limit": Gateway(bare, NullRouter(), MemorySessionCache()),
            "memory": Gateway(
                cfg, NullRouter(), MemorySessionCache(), limiter=RateLimiter(cfg.ratelimits, memory)
            ),
            "redis lease": Gateway(
                cfg, NullRouter(), MemorySessionCache(), limiter=RateLimiter(cfg.ratelimits, leased)
            ),
        }
        body = ov.chat_body().encode()
        per_request: dict[str, list[float]] = {k: [] for k in gateways}
        for gateway in gateways.values():
            await run_gateway(gateway, body, 500)
        for _ in range(args.rounds):
            for name, gateway in gateways.items():
                c = await run_gateway(gateway, body, args.calls)
                per_request[name].append(c / args.calls * 1e6)
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
        med = [statistics.median(x[name]) for x in (cpu, wall, scripts, server_us)]
        print(f"| {name} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.3f} | {med[3]:.1f} |")
    print()
    print("| worker request logic + settlement | CPU µs/request | Δ vs no limit (paired) |")
    print("|---|---:|---:|")
    base = per_request["no limit"]
    for name, values in per_request.items():
        delta = statistics.median(v - b for v, b in zip(values, base, strict=True))
        shown = "-" if name == "no limit" else f"{delta:+.1f}"
        print(f"| {name} | {statistics.median(values):.1f} | {shown} |")


if __name__ == "__main__":
    import uvloop  # the worker's event loop (server/app.py)

    uvloop.run(main())
