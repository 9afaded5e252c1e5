"""End-to-end cost of model affinity through the real gateway (Envoy + ext_proc).

Sequential requests (concurrency 1) from one keep-alive client against the decision endpoint
and the proxy path, with the embedded router, comparing: no affinity header (router runs), a
pinned session (router skipped) on the memory backend and on Redis, and first calls that miss
and store. Starts everything itself on free 127.0.0.1 ports (its own redis-server, never the
machine's) and stops it afterwards. Usage:

    .venv/bin/python bench/affinity_e2e.py [--requests 400] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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


def measure(
    client: httpx.Client, url: str, n: int, headers_for: object, max_seconds: float
) -> list[float]:
    out: list[float] = []
    deadline = time.monotonic() + max_seconds
    for i in range(n):
        if time.monotonic() > deadline:
            break
        # A different text each time: the embedded router caches embeddings by text.
        text = f"{PROMPT} (ticket {time.time_ns()})"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
        headers = headers_for(i)  # type: ignore[operator]
        t0 = time.perf_counter()
        r = client.post(url, json=body, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")
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
    base = seed_config(openai_fake.base_url, anthropic_fake.base_url)
    redis_cfg = base + f"  session_cache:\n    type: redis\n    url: {redis_srv.url}\n"
    rows: list[tuple[str, str, list[float]]] = []
    try:
        for backend, cfg in (("memory", base), ("redis", redis_cfg)):
            with GatewayProcess(cfg, tmp) as gw, httpx.Client(timeout=30) as client:
                for path, label in (
                    ("/routing/v1/chat/completions", "decision"),
                    ("/v1/chat/completions", "proxy"),
                ):
                    url = gw.url + path
                    # warm-up: connections, caches, the pinned session
                    measure(client, url, 50, lambda i: {}, args.max_seconds)
                    measure(client, url, 1, lambda i: {"x-model-affinity": "pinned"}, 10)
                    if backend == "memory":
                        rows.append(
                            (
                                label,
                                "no header (router runs)",
                                measure(client, url, args.requests, lambda i: {}, args.max_seconds),
                            )
                        )
                    rows.append(
                        (
                            label,
                            f"pinned hit, {backend} (router skipped)",
                            measure(
                                client,
                                url,
                                args.requests,
                                lambda i: {"x-model-affinity": "pinned"},
                                args.max_seconds,
                            ),
                        )
                    )
                    rows.append(
                        (
                            label,
                            f"first call, {backend} (router + store)",
                            measure(
                                client,
                                url,
                                args.requests,
                                lambda i, p=path: {
                                    "x-model-affinity": f"new-{p}-{i}-{time.time_ns()}"
                                },
                                args.max_seconds,
                            ),
                        )
                    )
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
