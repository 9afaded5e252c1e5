"""What API translation costs in the worker, per pair, without Envoy (issue #8).

For each translated (client API, provider API) pair:

- request + response: the CPU to translate a typical chat request (system prompt, two turns,
  one tool) and its JSON reply, per request (the added server CPU of a translated non-streamed
  request, apart from the extra ext_proc messages, which ``bench/overhead.py`` measures);
- stream: provider SSE events translated per second on one core, including the byte layer
  (cutting, UTF-8 decode, JSON parse, framing), for an answer of ``--events`` text deltas
  delivered in Envoy-sized reads (``--read`` bytes), and for one with parallel tool calls.

    .venv/bin/python bench/translation.py [--events 20000] [--read 1500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plano_extproc.providers import ClientApi
from plano_extproc.translate import translator
from plano_extproc.translate.sse import SseTranslation

PAIRS = [
    (ClientApi.MESSAGES, ClientApi.CHAT),
    (ClientApi.CHAT, ClientApi.MESSAGES),
    (ClientApi.RESPONSES, ClientApi.CHAT),
    (ClientApi.RESPONSES, ClientApi.MESSAGES),
]
TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# A tool call's arguments in the pieces providers stream them in.
_ARGS_JSON = '{"city": "Paris", "unit": "celsius", "days": 3}'
ARGS = [_ARGS_JSON[i * 6 : (i + 1) * 6] if i < 7 else _ARGS_JSON[42:] for i in range(8)]
SYSTEM = "You are a concise senior engineer."
PROMPT = "Explain optimistic vs pessimistic locking, with one short example of each."


def client_body(api: ClientApi, stream: bool) -> dict[str, Any]:
    if api is ClientApi.MESSAGES:
        return {
            "model": "m",
            "max_tokens": 256,
            "system": SYSTEM,
            "messages": [
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "Go on."},
            ],
            "tools": [
                {
                    "name": TOOL["name"],
                    "description": TOOL["description"],
                    "input_schema": TOOL["schema"],
                }
            ],
            "stream": stream,
        }
    if api is ClientApi.CHAT:
        return {
            "model": "m",
            "max_tokens": 256,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "Go on."},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": TOOL["name"],
                        "description": TOOL["description"],
                        "parameters": TOOL["schema"],
                    },
                }
            ],
            "stream": stream,
        }
    return {
        "model": "m",
        "instructions": SYSTEM,
        "max_output_tokens": 256,
        "input": [
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "Go on."},
        ],
        "tools": [
            {
                "type": "function",
                "name": TOOL["name"],
                "description": TOOL["description"],
                "parameters": TOOL["schema"],
            }
        ],
        "stream": stream,
    }


def provider_json(api: ClientApi) -> dict[str, Any]:
    text = "Optimistic locking checks a version at commit; pessimistic locking holds a lock."
    if api is ClientApi.CHAT:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60},
        }
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 40, "output_tokens": 20},
    }


def _sse(name: str | None, data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {name}\n" if name else "") + f"data: {text}\n\n"


def provider_stream(api: ClientApi, events: int, tools: int) -> tuple[bytes, int]:
    """A provider's SSE answer: ``events`` text deltas, then ``tools`` parallel tool calls
    whose argument pieces interleave. Returns (bytes, number of events)."""
    out: list[str] = []
    word = "lock "
    pieces = 8
    if api is ClientApi.CHAT:
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _sse(None, {**base, "choices": [choice]})

        out.append(chunk({"role": "assistant", "content": ""}))
        out += [chunk({"content": word}) for _ in range(events)]
        for t in range(tools):
            call = {"index": t, "id": f"call_{t}", "type": "function"}
            out.append(
                chunk({"tool_calls": [{**call, "function": {"name": "f", "arguments": ""}}]})
            )
        for p in range(pieces):
            for t in range(tools):
                arg = {"index": t, "function": {"arguments": ARGS[p]}}
                out.append(chunk({"tool_calls": [arg]}))
        out.append(chunk({}, "tool_calls" if tools else "stop"))
        usage = {"prompt_tokens": 40, "completion_tokens": events, "total_tokens": 40 + events}
        out.append(_sse(None, {**base, "choices": [], "usage": usage}))
        out.append(_sse(None, "[DONE]"))
    else:
        msg = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 40, "output_tokens": 1},
        }
        out.append(_sse("message_start", {"type": "message_start", "message": msg}))
        block = {"type": "text", "text": ""}
        start = {"type": "content_block_start", "index": 0, "content_block": block}
        out.append(_sse("content_block_start", start))
        delta = {"type": "content_block_delta", "index": 0}
        out += [
            _sse("content_block_delta", {**delta, "delta": {"type": "text_delta", "text": word}})
            for _ in range(events)
        ]
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        for t in range(tools):  # Anthropic sends blocks one after another, never interleaved
            i = t + 1
            use = {"type": "tool_use", "id": f"toolu_{t}", "name": "f", "input": {}}
            out.append(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": i, "content_block": use},
                )
            )
            for p in range(pieces):
                part = {"type": "input_json_delta", "partial_json": ARGS[p]}
                out.append(
                    _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": part},
                    )
                )
            out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
        stop = {"stop_reason": "tool_use" if tools else "end_turn", "stop_sequence": None}
        md = {"type": "message_delta", "delta": stop, "usage": {"output_tokens": events}}
        out.append(_sse("message_delta", md))
        out.append(_sse("message_stop", {"type": "message_stop"}))
    return "".join(out).encode(), len(out)


def _best_of(rounds: int, fn: Callable[[], None]) -> float:
    """Median CPU seconds of one call (process time: this box is shared and noisy)."""
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000, help="text deltas per stream")
    ap.add_argument("--read", type=int, default=1500, help="bytes per Envoy read")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per row (median)")
    ap.add_argument("--requests", type=int, default=2000, help="JSON translations per round")
    args = ap.parse_args(argv)
    print(f"python {platform.python_version()}, {platform.machine()}, {platform.node()}")
    print(
        "| pair (client > provider) | JSON request+reply, µs CPU (parse, translate, serialise) | "
        "stream text, events/s | stream 3 parallel tools, events/s |"
    )
    print("|---|---|---|---|")
    for client, provider in PAIRS:
        t = translator(client, provider)
        assert t is not None
        body = json.dumps(client_body(client, False)).encode()
        reply = json.dumps(provider_json(provider)).encode()

        def json_round(t: Any = t, body: bytes = body, reply: bytes = reply) -> None:
            # What the worker does for one translated request: parse, translate, serialise the
            # request; parse, translate, serialise the reply.
            for _ in range(args.requests):
                out, ctx = t.request(json.loads(body), "model-id")
                json.dumps(out)
                json.dumps(t.response(json.loads(reply), ctx))

        per_json = _best_of(args.rounds, json_round) / args.requests
        _, ctx = t.request(client_body(client, True), "model-id")
        rates = []
        for tools in (0, 3):
            data, n = provider_stream(
                provider, args.events if not tools else args.events // 10, tools
            )
            reads = [data[i : i + args.read] for i in range(0, len(data), args.read)]

            def stream_round(t: Any = t, reads: list[bytes] = reads, ctx: Any = ctx) -> None:
                run = SseTranslation(t.stream(ctx))
                for r in reads:
                    run.feed(r)
                run.end()

            rates.append(n / _best_of(args.rounds, stream_round))
        print(
            f"| {client.value} > {provider.value} | {per_json * 1e6:.0f} "
            f"| {rates[0]:,.0f} | {rates[1]:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
