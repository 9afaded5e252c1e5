"""The embedded router under concurrent load: queued decisions batched vs one at a time per lane.

One process, two routers built the same way except for decisions in flight per lane
(``IN_FLIGHT_PER_LANE``): ``own pass`` = 1 (every decision runs alone, with its own forward
pass, as before routing/lanes.py), ``shared`` = the shipped value (decisions queued behind
busy lanes are decided together, their texts in one pass). Both have ``--lanes`` lanes
(``routing.router.threads``). Each round sends ``--decisions`` decisions through
``EmbeddedRouter.route`` (the async path the gateway uses) with ``--concurrency`` of them in
flight, a distinct 50-word prompt each so the text cache never answers, against the dev route
list ``general8``; rows alternate per round.

Reported per row: decisions/s, process CPU per decision (all threads), p50/p99 latency, and
texts per forward pass. Medians over ``--rounds``.

    .venv/bin/python bench/router_batching.py [--concurrency 1,4,16] [--decisions 300] [--rounds 3]
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
from plano_extproc.routing import embedded
from plano_extproc.routing.embedded import EmbeddedRouter

BASE = (
    "Please write a Python function that reads a large CSV export of customer orders, "
    "groups them by region and month, computes totals and averages, and writes a tidy "
    "summary table to a new spreadsheet with one sheet per region and a chart per sheet."
).split()


def prompt(i: int, words: int = 50) -> str:
    body = (BASE * (words // len(BASE) + 1))[: words - 2]
    return " ".join([f"v{i}", *body, f"w{i}"])


def build(per_lane: int, lanes: int) -> EmbeddedRouter:
    saved = embedded.IN_FLIGHT_PER_LANE
    embedded.IN_FLIGHT_PER_LANE = per_lane
    try:
        router = EmbeddedRouter(max_concurrency=lanes)
    finally:
        embedded.IN_FLIGHT_PER_LANE = saved
    return router


async def one_round(
    router: EmbeddedRouter, prefs: list, concurrency: int, n: int, offset: int
) -> tuple[float, float, list[float], float]:
    """(decisions/s, CPU ms per decision, latencies ms, texts per forward pass)."""
    queue = list(range(offset, offset + n))
    latencies: list[float] = []
    texts = 0

    async def worker() -> None:
        nonlocal texts
        while queue:
            i = queue.pop()
            msg = [ChatMessage("user", prompt(i))]
            t0 = time.perf_counter()
            result = await router.route(msg, prefs, request_id=str(i))
            latencies.append((time.perf_counter() - t0) * 1000)
            if result.error:
                raise SystemExit(f"router error: {result.error}")
            texts += 1 + len(embedded.focus_spans(prompt(i)))

    b0 = router.encoder.passes
    c0, w0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    passes = max(1, router.encoder.passes - b0)
    return n / wall, cpu / n * 1000, latencies, texts / passes


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--decisions", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--per-lane", type=int, default=embedded.IN_FLIGHT_PER_LANE)
    args = ap.parse_args()
    prefs, _ = load_route_set(SETS_DIR / "dev" / "general8")
    rows = {
        "own pass": build(1, args.lanes),
        "shared": build(args.per_lane, args.lanes),
    }
    for router in rows.values():
        await router.start()
        router.prepare(prefs)
        await one_round(router, prefs, 4, 40, 10_000_000)  # warm-up
    offset = 0
    print(f"machine: {os.cpu_count()} CPUs, lanes {args.lanes}, 50-word prompts, general8")
    print("| row | in flight | decisions/s | CPU ms/decision | p50 ms | p99 ms | texts/pass |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for conc in (int(c) for c in args.concurrency.split(",")):
        got: dict[str, list[tuple[float, float, list[float], float]]] = {k: [] for k in rows}
        for _ in range(args.rounds):
            for name, router in rows.items():
                got[name].append(await one_round(router, prefs, conc, args.decisions, offset))
                offset += args.decisions
        for name, samples in got.items():
            lat = sorted(x for s in samples for x in s[2])
            print(
                f"| {name} | {conc} | {statistics.median(s[0] for s in samples):.0f} "
                f"| {statistics.median(s[1] for s in samples):.2f} "
                f"| {lat[len(lat) // 2]:.2f} | {lat[int(len(lat) * 0.99)]:.2f} "
                f"| {statistics.median(s[3] for s in samples):.1f} |",
                flush=True,
            )
    for router in rows.values():
        await router.close()


if __name__ == "__main__":
    asyncio.run(main())
