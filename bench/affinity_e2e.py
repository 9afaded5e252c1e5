"""End-to-end cost of model affinity through the real gateway (Envoy + ext_proc).

Sequential requests (concurrency 1) from one keep-alive client, alternating between gateways
with the memory backend, Redis with its near cache and Redis without (all running at once, so
drift hits them alike), against the decision endpoint and the proxy path, with the embedded
router, comparing: no affinity header (router runs), a pinned session (router skipped), and
first calls that miss and store. Starts everything itself on free 127.0.0.1 ports (its own
redis-server, never the machine's) and stops it afterwards. Usage:

    .venv/bin/python bench/affinity_e2e.py [--requests 400] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import seed_config  # noqa: E402
from tests.fakes import FakeProvider  # noqa: E402
from tests.gateway_proc import GatewayProcess  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

PROMPT = (
    "Write a Python function that implements binary search over a sorted list of integers and "
    "returns the index of the target, or minus one when it is missing; include type hints, a "
    "docstring and a few doctest examples so that it can be dropped straight into our codebase."
)  # ~50 words


Headers = Callable[[int], dict[str, str]]


def one(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    # A different text each time: the embedded router caches embeddings by text.
    text = f"{PROMPT} (ticket {time.time_ns()})"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    r = client.post(url, json=body, headers=headers)
    elapsed = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return elapsed


def interleaved(
    client: httpx.Client, urls: list[str], n: int, headers_for: Headers, max_seconds: float
) -> list[list[float]]:
    """n requests to each URL, alternating between them so drift hits all equally."""
    out: list[list[float]] = [[] for _ in urls]
    deadline = time.monotonic() + max_seconds
    for i in range(n):
        if time.monotonic() > deadline:
            break
        for j, url in enumerate(urls):
            out[j].append(one(client, url, headers_for(i)))
    return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    openai_fake = FakeProvider("openai").start()
    anthropic_fake = FakeProvider("anthropic").start()
    redis_srv = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="plano-bench-"))
    # One router decision at a time per gateway: two gateways share 2 cores here.
    base = seed_config(
        openai_fake.base_url,
        anthropic_fake.base_url,
        router="  router: {type: embedded, threads: 1}",
    )
    backends = {
        "memory": base,
        "redis, near cache": base
        + f"  session_cache:\n    type: redis\n    url: {redis_srv.url}\n",
        "redis, no near cache": base
        + f"  session_cache:\n    type: redis\n    url: {redis_srv.url}\n"
        + "    near_cache_seconds: 0\n",
    }
    rows: list[tuple[str, str, list[float]]] = []
    try:
        with contextlib.ExitStack() as stack:
            gws = [stack.enter_context(GatewayProcess(cfg, tmp)) for cfg in backends.values()]
            client = stack.enter_context(httpx.Client(timeout=30))
            for path, label in (
                ("/routing/v1/chat/completions", "decision"),
                ("/v1/chat/completions", "proxy"),
            ):
                urls = [gw.url + path for gw in gws]
                pin: Headers = lambda i: {"x-model-affinity": "pinned"}  # noqa: E731
                interleaved(client, urls, 50, lambda i: {}, args.max_seconds)  # warm-up
                interleaved(client, urls, 1, pin, 10)  # pin the session everywhere
                no_header = interleaved(client, urls, args.requests, lambda i: {}, args.max_seconds)
                rows.append((label, "no header (router runs)", [x for xs in no_header for x in xs]))
                hits = interleaved(client, urls, args.requests, pin, args.max_seconds)
                for name, xs in zip(backends, hits, strict=True):
                    rows.append((label, f"pinned hit, {name} (router skipped)", xs))

                def fresh(i: int, p: str = path) -> dict[str, str]:
                    return {"x-model-affinity": f"new-{p}-{i}-{time.time_ns()}"}

                firsts = interleaved(client, urls, args.requests, fresh, args.max_seconds)
                for name, xs in zip(backends, firsts, strict=True):
                    rows.append((label, f"first call, {name} (router + store)", xs))
    finally:
        redis_srv.stop()
        openai_fake.stop()
        anthropic_fake.stop()
    print("| path | case | n | p50 ms | p99 ms | mean ms |")
    print("|---|---|---:|---:|---:|---:|")
    for label, case, xs in rows:
        print(
            f"| {label} | {case} | {len(xs)} | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} | "
            f"{statistics.fmean(xs):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
