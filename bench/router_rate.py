"""The embedded router's CPU per decision at any request rate: sparse vs back to back.

Issue #14 found the old encoder's thread pool spin-waiting between requests (about 56 ms of CPU
per decision at 1 request/s against 11-13 ms under load). This measures the router as shipped
the same way: one ``EmbeddedRouter`` (the gateway's async ``route`` path, its lanes), the dev
route list ``general8``, a distinct two-sentence 50-word prompt per decision so the text cache
never answers, and rounds that alternate

- ``sparse``: ``--sparse`` decisions, one every ``--gap`` seconds (the process idles between);
- ``dense``: ``--dense`` decisions back to back.

Reported: process CPU (all threads, idle gaps included, so any spinning between decisions is
counted) per decision and p50 latency, medians over ``--rounds``.

    .venv/bin/python bench/router_rate.py [--sparse 20] [--gap 0.25,1.0] [--dense 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_eval import SETS_DIR, load_route_set

from plano_extproc.conversation import ChatMessage
from plano_extproc.routing.embedded import EmbeddedRouter, focus_spans

FIRST = (
    "I maintain a small Python service that reads customer orders from a queue and stores "
    "them in Postgres."
)
LAST = (
    "Please write a function that removes duplicate orders before the insert and explain how "
    "to test it with pytest."
)


def prompt(i: int) -> str:
    """A distinct 50-word, two-sentence prompt (the router encodes it and both sentences)."""
    middle = f"Order batch {i} arrived twice yesterday after a consumer restart."
    return f"Ticket {i}: {FIRST} {middle} {LAST}"


async def decide(router: EmbeddedRouter, prefs: list, i: int) -> float:
    t0 = time.perf_counter()
    result = await router.route([ChatMessage("user", prompt(i))], prefs, request_id=str(i))
    if result.error:
        raise SystemExit(f"router error: {result.error}")
    return (time.perf_counter() - t0) * 1000


async def run(router: EmbeddedRouter, prefs: list, n: int, gap: float, offset: int) -> tuple:
    """(CPU ms per decision, p50 ms) for ``n`` decisions ``gap`` seconds apart (0: no gap)."""
    latencies = []
    c0 = time.process_time()
    for i in range(offset, offset + n):
        latencies.append(await decide(router, prefs, i))
        if gap:
            await asyncio.sleep(gap)
    return (time.process_time() - c0) * 1000 / n, statistics.median(latencies)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparse", type=int, default=20)
    ap.add_argument("--gap", default="0.25,1.0", help="seconds between sparse decisions")
    ap.add_argument("--dense", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    gaps = [float(g) for g in args.gap.split(",")]
    words = len(prompt(0).split())
    spans = len(focus_spans(prompt(0)))
    router = EmbeddedRouter()
    await router.start()
    prefs = load_route_set(SETS_DIR / "dev" / "general8")[0]
    await run(router, prefs, 20, 0.0, 10**6)  # warm-up: model loaded, route index built
    rows: dict[str, list[tuple[float, float]]] = {}
    offset = 0
    for _ in range(args.rounds):
        for gap in gaps:
            rows.setdefault(f"sparse, one every {gap:g} s", []).append(
                await run(router, prefs, args.sparse, gap, offset)
            )
            offset += args.sparse
        rows.setdefault("dense, back to back", []).append(
            await run(router, prefs, args.dense, 0.0, offset)
        )
        offset += args.dense
    await router.close()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{words}-word prompt, {spans} focus sentences, {args.rounds} rounds, medians")
    print()
    print("| load | CPU ms per decision (process, idle included) | p50 ms |")
    print("|---|---:|---:|")
    for name, values in rows.items():
        cpu = statistics.median(v[0] for v in values)
        p50 = statistics.median(v[1] for v in values)
        print(f"| {name} | {cpu:.2f} | {p50:.2f} |")


if __name__ == "__main__":
    import uvloop  # the worker's event loop (server/app.py)

    uvloop.run(main())
