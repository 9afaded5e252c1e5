"""What one Redis call costs the worker, by layer: why the budget store skips redis-py's client.

One process, one throw-away redis-server (tests/redis_server.py, free port), uvloop as in the
workers, sequential awaits (the latency-bound case of a c=1 request), interleaved rounds:

- ``client PING``: ``redis.asyncio.Redis.ping()`` through its connection pool (what the
  session cache uses);
- ``connection PING``: redis-py's ``Connection`` alone (``send_packed_command`` +
  ``read_response``), which still does connect, AUTH, SELECT, TLS and reply parsing;
- ``raw PING``: asyncio streams with the command bytes written by hand (the floor);
- ``RedisBudgets.take``: the budget store's check on one bucket (EVALSHA of the take script
  on a ``Connection``, as shipped).

Prints CPU (process time) and wall microseconds per call, medians over the rounds.

    .venv/bin/python bench/redis_call.py [--calls 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
import uvloop
from redis.asyncio.connection import Connection, parse_url

from plano_extproc.ratelimit.budget import Bucket
from plano_extproc.ratelimit.memory import SharedBudgets
from plano_extproc.ratelimit.redis_store import RedisBudgets
from tests.redis_server import RedisServer, find_redis_server

PING = b"*1\r\n$4\r\nPING\r\n"


async def measure(call: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await call()
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def main(calls: int, rounds: int) -> None:
    server = RedisServer(binary=find_redis_server())
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url)
        conn = Connection(**parse_url(server.url))
        await conn.connect()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        store = RedisBudgets(server.url, SharedBudgets())
        await store.start()
        bucket = [[Bucket("bench", 1e15, 1e12)]]

        async def by_connection() -> None:
            await conn.send_packed_command(PING, False)
            await conn.read_response()

        async def raw() -> None:
            writer.write(PING)
            await reader.readuntil(b"\r\n")

        variants: dict[str, Callable[[], Awaitable[object]]] = {
            "client PING": client.ping,
            "connection PING": by_connection,
            "raw PING": raw,
            "RedisBudgets.take": lambda: store.take(bucket, 1.0),
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for call in variants.values():  # warm up
            await measure(call, 200)
        for _ in range(rounds):
            for name, call in variants.items():
                results[name].append(await measure(call, calls))
        assert store.healthy and store.fallbacks == 0, store.health()
        print(f"{calls} sequential calls x {rounds} interleaved rounds, medians")
        print("| call | CPU us/call | wall us/call |\n|---|---:|---:|")
        for name, xs in results.items():
            cpu = statistics.median(x[0] for x in xs)
            wall = statistics.median(x[1] for x in xs)
            print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
        await store.close()
        await client.aclose()
        await conn.disconnect()
        writer.close()
    finally:
        server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    uvloop.run(main(args.calls, args.rounds))
