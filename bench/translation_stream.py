"""Translated streams through the real gateway: time to first byte and memory over a soak.

Starts a fake OpenAI provider and ``plano-extproc up`` (router none, one ext_proc worker), all on
127.0.0.1 with free ports.

1. Time to first byte, A/B in one run, against a provider that streams like a model generates
   (``--ttfb-events`` events, one per write, ``--pace-ms`` apart): a native stream (OpenAI Chat
   client -> OpenAI model)
   and a translated one (Anthropic Messages client -> the same OpenAI model: the request is
   translated to Chat and every SSE event back to Anthropic's grammar), interleaved request by
   request, ``--requests`` each; p50/p99 of the time from sending the request to the first
   body byte, and to the end of the stream.
2. Soak, against the scripted fake of tests/fakes.py (real SSE wire format, a whole answer per
   write: the most events per second): ``--clients`` concurrent clients stream translated
   answers of ``--events`` events for
   ``--soak`` seconds; the ext_proc workers' RSS is sampled every ``--every`` seconds. Flat
   memory means no per-stream state outlives its stream.

    .venv/bin/python bench/translation_stream.py [--requests 300] [--soak 600] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead import children, machine
from tests.conftest import seed_config
from tests.fakes import FakeProvider, FakeServer, Script, Usage
from tests.gateway_proc import GatewayProcess

MODEL = "openai/gpt-4o-mini"


class PacedChatProvider(FakeServer):
    """An OpenAI Chat provider that streams like a model generates: one event per write,
    ``pace`` seconds apart (the scripted fake writes a whole answer at once, so its time to
    first byte would include translating every event)."""

    def __init__(self, events: int, pace: float) -> None:
        super().__init__()
        self.events = events
        self.pace = pace

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}

        def event(delta: dict[str, object], finish: str | None = None) -> bytes:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        await resp.write(event({"role": "assistant", "content": ""}))
        for i in range(self.events):
            await asyncio.sleep(self.pace)
            await resp.write(event({"content": f"w{i} "}))
        await resp.write(event({}, "stop"))
        usage = {"prompt_tokens": 5, "completion_tokens": self.events, "total_tokens": 5}
        await resp.write(
            f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode()
        )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def native_request(url: str) -> tuple[str, dict[str, str], bytes]:
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me about locks."}],
    }
    headers = {"authorization": "Bearer client-key", "content-type": "application/json"}
    return url + "/v1/chat/completions", headers, json.dumps(body).encode()


def translated_request(url: str) -> tuple[str, dict[str, str], bytes]:
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 512,
        "messages": [{"role": "user", "content": "Tell me about locks."}],
    }
    headers = {"x-api-key": "client-key", "content-type": "application/json"}
    return url + "/v1/messages", headers, json.dumps(body).encode()


def one_stream(
    client: httpx.Client, req: tuple[str, dict[str, str], bytes]
) -> tuple[float, float, int]:
    """(seconds to first body byte, seconds to end, bytes)."""
    url, headers, body = req
    t0 = time.perf_counter()
    first = 0.0
    size = 0
    with client.stream("POST", url, headers=headers, content=body) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"{url}: HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for chunk in resp.iter_raw():
            if not first:
                first = time.perf_counter() - t0
            size += len(chunk)
    return first, time.perf_counter() - t0, size


def drop_records(fake: FakeProvider) -> None:
    """The fake keeps every request it got: bounded memory over a long soak."""
    fake.requests.clear()
    fake.sent.clear()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="streams per kind for TTFB")
    ap.add_argument("--events", type=int, default=200, help="text events per answer")
    ap.add_argument("--soak", type=int, default=600, help="soak seconds (0: skip)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent soak clients")
    ap.add_argument("--every", type=int, default=30, help="RSS sample interval, seconds")
    ap.add_argument(
        "--pace-ms", type=float, default=5.0, help="TTFB part: ms between provider events"
    )
    ap.add_argument("--ttfb-events", type=int, default=20, help="TTFB part: events per answer")
    args = ap.parse_args(argv)

    paced = PacedChatProvider(args.ttfb_events, args.pace_ms / 1000).start()
    tmp = Path(tempfile.mkdtemp(prefix="plano-tx-stream-"))
    cfg = seed_config(paced.base_url, paced.base_url, router="  router:\n    type: none")
    gw = GatewayProcess(cfg, tmp).start()
    try:
        kinds = {"native chat>chat": native_request, "translated messages>chat": translated_request}
        ttfb: dict[str, list[float]] = {k: [] for k in kinds}
        total: dict[str, list[float]] = {k: [] for k in kinds}
        with httpx.Client(timeout=30) as client:
            for _ in range(20):  # warm-up
                for make in kinds.values():
                    one_stream(client, make(gw.url))
            for _ in range(args.requests):
                for name, make in kinds.items():
                    first, end, _ = one_stream(client, make(gw.url))
                    ttfb[name].append(first * 1000)
                    total[name].append(end * 1000)
        print(f"machine: {machine()}")
        print(
            f"{args.requests} streams per kind, interleaved, {args.ttfb_events} text events each "
            f"{args.pace_ms:g} ms apart (one per write), one ext_proc worker, sequential client\n"
        )
        print("| stream | TTFB p50 ms | TTFB p99 ms | whole stream p50 ms |")
        print("|---|---:|---:|---:|")
        for name in kinds:
            print(
                f"| {name} | {statistics.median(ttfb[name]):.2f} | {pct(ttfb[name], 0.99):.2f} "
                f"| {statistics.median(total[name]):.2f} |"
            )
        added = statistics.median(ttfb["translated messages>chat"]) - statistics.median(
            ttfb["native chat>chat"]
        )
        print(f"\nadded TTFB p50 (translated - native): {added:+.2f} ms")
    finally:
        gw.stop()
        paced.stop()
    if args.soak <= 0:
        return 0

    # Soak: the scripted fake writes whole answers at once (the most events per second).
    fake = FakeProvider("openai").start()
    assert isinstance(fake, FakeProvider)
    fake.script = Script(text=[f"w{i} " for i in range(args.events)], usage=Usage(), ping=False)
    cfg = seed_config(fake.base_url, fake.base_url, router="  router:\n    type: none")
    gw = GatewayProcess(cfg, tmp).start()
    try:
        assert gw.proc is not None
        workers = children(gw.proc.pid)

        stop = time.monotonic() + args.soak
        counts = [0] * args.clients
        errors: list[str] = []

        def soak(k: int) -> None:
            with httpx.Client(timeout=30) as client:
                while time.monotonic() < stop and not errors:
                    try:
                        one_stream(client, translated_request(gw.url))
                    except BaseException as e:  # reported, ends the soak
                        errors.append(repr(e))
                        return
                    counts[k] += 1

        threads = [threading.Thread(target=soak, args=(k,)) for k in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads):
            time.sleep(min(args.every, max(0.1, stop - time.monotonic())))
            samples.append(
                (time.monotonic() - t0, sum(counts), sum(rss_kib(p) for p in workers) / 1024)
            )
            drop_records(fake)
        for t in threads:
            t.join()
        if errors:
            print(f"soak failed: {errors[0]}")
            return 1
        print(
            f"\nsoak: {args.clients} clients, {args.soak} s, {sum(counts)} translated streams "
            f"({sum(counts) * args.events / args.soak:,.0f} provider events/s), worker RSS:\n"
        )
        print("| t s | streams | worker RSS MiB |")
        print("|---:|---:|---:|")
        for at, n, mib in samples:
            print(f"| {at:.0f} | {n} | {mib:.1f} |")
    finally:
        gw.stop()
        fake.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OPENAI_API_KEY", "sk-openai-test")
    raise SystemExit(main())
