"""Does token accounting cost streams time to first byte? This tree against a baseline tree.

Starts a paced fake OpenAI provider (one event per write, ``--pace-ms`` apart, like a model
generating) and two gateways (``plano-extproc up``, router none, one ext_proc worker each): one
from this tree, one from ``--baseline`` (a git worktree of the commit before the metrics work).
Requests alternate between the two gateways and between the stream kinds, ``--requests`` each:

- ``chat, include_usage``: an OpenAI Chat stream whose client asked for usage (this tree: the
  usage filter observes it, never holding it);
- ``chat, no usage asked``: the same without ``stream_options`` (this tree: the provider is asked
  for usage and the response filter takes it out of the client's stream again);
- ``messages>chat``: an Anthropic Messages stream translated from the same Chat provider.

Prints p50/p99 time to the first body byte and to the end of the stream per (tree, kind).

    .venv/bin/python bench/usage_stream.py --baseline /tmp/base [--requests 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead import Gateway, machine
from bench.translation_stream import (
    PacedChatProvider,
    native_request,
    one_stream,
    pct,
    translated_request,
)
from tests.conftest import seed_config

Make = Callable[[str], tuple[str, dict[str, str], bytes]]


def with_usage(url: str) -> tuple[str, dict[str, str], bytes]:
    target, headers, body = native_request(url)
    body = body[:-1] + b', "stream_options": {"include_usage": true}}'
    return target, headers, body


KINDS: dict[str, Make] = {
    "chat, include_usage": with_usage,
    "chat, no usage asked": native_request,
    "messages>chat": translated_request,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the baseline source tree")
    ap.add_argument("--requests", type=int, default=300, help="streams per (tree, kind)")
    ap.add_argument("--pace-ms", type=float, default=5.0, help="ms between provider events")
    ap.add_argument("--events", type=int, default=20, help="text events per answer")
    args = ap.parse_args(argv)

    paced = PacedChatProvider(args.events, args.pace_ms / 1000).start()
    tmp = Path(tempfile.mkdtemp(prefix="plano-usage-stream-"))
    config = tmp / "config.yaml"
    config.write_text(
        seed_config(paced.base_url, paced.base_url, router="  router:\n    type: none")
    )
    trees = {"this tree": None, "baseline": args.baseline.resolve()}
    gateways = {
        name: Gateway.start(str(config), 1, 1, tmp, name.replace(" ", "_"), tree=tree)
        for name, tree in trees.items()
    }
    ttfb: dict[tuple[str, str], list[float]] = {(t, k): [] for t in trees for k in KINDS}
    total: dict[tuple[str, str], list[float]] = {(t, k): [] for t in trees for k in KINDS}
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(20):  # warm-up
                for gw in gateways.values():
                    for make in KINDS.values():
                        one_stream(client, make(f"http://127.0.0.1:{gw.port}"))
            for _ in range(args.requests):
                for tree, gw in gateways.items():
                    for kind, make in KINDS.items():
                        first, end, _ = one_stream(client, make(f"http://127.0.0.1:{gw.port}"))
                        ttfb[(tree, kind)].append(first * 1000)
                        total[(tree, kind)].append(end * 1000)
    finally:
        for gw in gateways.values():
            gw.stop()
        paced.stop()
    print(f"machine: {machine()}")
    print(
        f"{args.requests} streams per (tree, kind), interleaved, {args.events} text events "
        f"{args.pace_ms:g} ms apart (one per write), one ext_proc worker, sequential client\n"
    )
    print("| stream | tree | TTFB p50 ms | TTFB p99 ms | whole stream p50 ms |")
    print("|---|---|---:|---:|---:|")
    for kind in KINDS:
        for tree in trees:
            t, w = ttfb[(tree, kind)], total[(tree, kind)]
            print(
                f"| {kind} | {tree} | {statistics.median(t):.2f} | {pct(t, 0.99):.2f} "
                f"| {statistics.median(w):.2f} |"
            )
    print()
    for kind in KINDS:
        delta = statistics.median(ttfb[("this tree", kind)]) - statistics.median(
            ttfb[("baseline", kind)]
        )
        print(f"TTFB p50 this tree - baseline, {kind}: {delta:+.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
