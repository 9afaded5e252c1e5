"""Micro-benchmark: session-cache latency per operation, memory vs Redis on loopback.

Measures what one request pays for affinity: ``get`` hit, ``get`` miss, ``put_if_absent`` of a
new key (the write after routing) and of an existing key (losing a race). Redis is a private
redis-server started on a free port (never the machine's own Redis) and stopped afterwards.

    .venv/bin/python bench/affinity_cache.py [--iterations 5000] [--uvloop] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plano_extproc.affinity.base import PinnedDecision, SessionCache
from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.affinity.redis_cache import RedisSessionCache
from tests.redis_server import RedisServer

VALUE = PinnedDecision("openai/gpt-4o", "code_generation")
OTHER = PinnedDecision("anthropic/claude-sonnet-4", None)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(n: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    """Run ``op(i)`` n times sequentially; latencies in microseconds."""
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await op(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


async def bench_backend(
    name: str, cache: SessionCache, n: int, concurrency: int
) -> list[tuple[str, str, list[float]]]:
    await cache.start()
    rows: list[tuple[str, str, list[float]]] = []
    try:
        run = f"{name}-{time.monotonic_ns()}"
        await timed(200, lambda i: cache.put_if_absent(f"{run}:warm:{i}", VALUE))  # warm-up
        rows.append(
            (name, "put_if_absent (new key)", await timed(
                n, lambda i: cache.put_if_absent(f"{run}:k:{i}", VALUE)
            ))
        )  # fmt: skip
        rows.append(
            (name, "put_if_absent (exists)", await timed(
                n, lambda i: cache.put_if_absent(f"{run}:k:{i}", OTHER)
            ))
        )  # fmt: skip
        rows.append((name, "get hit", await timed(n, lambda i: cache.get(f"{run}:k:{i}"))))
        rows.append((name, "get miss", await timed(n, lambda i: cache.get(f"{run}:none:{i}"))))

        # Latency seen by each request when `concurrency` requests use the cache at once.
        lat: list[float] = []

        async def worker(w: int) -> None:
            for i in range(n // concurrency):
                t0 = time.perf_counter_ns()
                await cache.get(f"{run}:k:{(w * 7919 + i) % n}")
                lat.append((time.perf_counter_ns() - t0) / 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        rate = len(lat) / (time.perf_counter() - t0)
        rows.append((name, f"get hit, {concurrency} concurrent ({rate:,.0f} ops/s)", lat))
        health = cache.health()
        if health.get("errors"):
            print(f"warning: {name} reported errors: {health}", file=sys.stderr)
    finally:
        await cache.close()
    return rows


async def main_async(args: argparse.Namespace) -> None:
    rows = await bench_backend(
        "memory", MemorySessionCache(max_entries=10_000), args.iterations, args.concurrency
    )
    with RedisServer() as server:
        rows += await bench_backend(
            "redis", RedisSessionCache(server.url), args.iterations, args.concurrency
        )
    loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"# {platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {loop}, {args.iterations} iterations/op"
    )
    if args.markdown:
        print("| backend | operation | p50 µs | p99 µs | mean µs |")
        print("|---|---|---:|---:|---:|")
        for backend, op, s in rows:
            print(
                f"| {backend} | {op} | {pct(s, 0.5):.1f} | {pct(s, 0.99):.1f} "
                f"| {statistics.fmean(s):.1f} |"
            )
    else:
        for backend, op, s in rows:
            print(
                f"{backend:7} {op:32} p50 {pct(s, 0.5):8.1f} µs  p99 {pct(s, 0.99):8.1f} µs  "
                f"mean {statistics.fmean(s):8.1f} µs  n={len(s)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=5000, help="per operation (bounded)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the gateway)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    args.iterations = max(100, min(args.iterations, 200_000))
    args.concurrency = max(1, min(args.concurrency, 1024))
    if args.uvloop:
        import uvloop

        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
