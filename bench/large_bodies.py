"""Event-loop stalls while a worker parses large request bodies (issue #11, item 9).

Eight concurrent 30 MB requests are parsed on one event loop while a ticker task measures the
longest gap between its turns (what every other request on that worker waits). Three ways are
compared in one run, interleaved: the blocking parse, the blocking parse in a thread (the GIL
makes this no better), and ``JsonBody.parse_async`` (cooperative, the gateway's choice).

    .venv/bin/python bench/large_bodies.py [--mb 30] [--requests 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

from plano_extproc.body import JsonBody


def many_messages(mb: int) -> bytes:
    """A long chat history: many small messages (the costly shape: many objects)."""
    msg = {"role": "user", "content": "word " * 40}
    n = mb * 1024 * 1024 // len(json.dumps(msg))
    return json.dumps({"model": "m", "messages": [msg] * n}).encode()


def one_string(mb: int) -> bytes:
    """One huge prompt (the cheap shape: one string scan)."""
    content = "word " * (mb * 1024 * 1024 // 5)
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


async def _blocking(raw: bytes) -> None:
    JsonBody.parse(raw)


async def _thread(raw: bytes) -> None:
    await asyncio.to_thread(JsonBody.parse, raw)


async def _cooperative(raw: bytes) -> None:
    body = await JsonBody.parse_async(raw)
    await body.release()


async def one_round(parse: Callable[[bytes], Awaitable[None]], raw: bytes, n: int) -> float:
    done = False
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await asyncio.gather(*(parse(raw) for _ in range(n)))
    done = True
    await t
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=30)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ways = {"blocking": _blocking, "thread": _thread, "parse_async": _cooperative}
    for shape, make in (("many messages", many_messages), ("one string", one_string)):
        raw = make(args.mb)
        stalls: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():  # interleaved: the machine's noise hits all alike
                stalls[name].append(asyncio.run(one_round(fn, raw, args.requests)))
        print(f"{shape}: {len(raw) / 1e6:.1f} MB x {args.requests} concurrent")
        for name, values in stalls.items():
            print(
                f"  {name:12s} longest loop stall: median {statistics.median(values) * 1000:7.1f}"
                f" ms, max {max(values) * 1000:7.1f} ms"
            )


if __name__ == "__main__":
    main()
