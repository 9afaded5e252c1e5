"""UsageMeter: reported token usage and the first-token chunk, from any cut of any body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from plano_extproc.providers import ClientApi
from plano_extproc.translate import responses_chat
from plano_extproc.translate.sse import SseTranslation
from plano_extproc.usage import (
    MAX_COUNT,
    MAX_EVENT_BYTES,
    MAX_JSON_BYTES,
    TAIL_BYTES,
    Usage,
    UsageMeter,
)
from tests.fakes import (
    Script,
    ToolCall,
    anthropic_events,
    anthropic_message,
    chat_chunks,
    chat_completion,
)
from tests.fakes import Usage as FakeUsage

CHAT, MESSAGES, RESPONSES = ClientApi.CHAT, ClientApi.MESSAGES, ClientApi.RESPONSES
TEXT = ["héllo ", "你好 ", "🎉"]  # multi-byte characters, so cuts fall inside them
FAKE = FakeUsage(prompt=100, completion=20, cached=30, cache_creation=10)
EXPECTED = Usage(input=100, output=20, cached_input=30)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def chat_sse(chunks: list[Any], done: bool = True) -> bytes:
    out = "".join(f"data: {_dumps(c)}\n\n" for c in chunks)
    return (out + ("data: [DONE]\n\n" if done else "")).encode()


def named_sse(events: list[tuple[str, Any]]) -> bytes:
    return "".join(f"event: {name}\ndata: {_dumps(data)}\n\n" for name, data in events).encode()


def chat_body(script: Script | None = None, include_usage: bool = True) -> bytes:
    script = script or Script(text=TEXT, usage=FAKE)
    return chat_sse(list(chat_chunks(script, "m", "chatcmpl-1", include_usage)))


def messages_body(script: Script | None = None) -> bytes:
    script = script or Script(text=TEXT, usage=FAKE)
    return named_sse(list(anthropic_events(script, "m", "msg_1")))


def responses_body(script: Script | None = None) -> bytes:
    """A Responses stream as the gateway itself produces it (translated from Chat)."""
    _, ctx = responses_chat.request({"model": "m", "input": "hi", "stream": True}, "m")
    translation = SseTranslation(responses_chat.stream(ctx))
    return translation.feed(chat_body(script)) + translation.end()


def run(api: ClientApi, stream: bool, pieces: list[bytes]) -> tuple[Usage | None, list[int], int]:
    """(usage, indexes of the pieces feed() answered True to, output_events)."""
    meter = UsageMeter(api, stream)
    trues = [i for i, piece in enumerate(pieces) if meter.feed(piece)]
    return meter.finish(), trues, meter.output_events


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


def dispatch_offset(body: bytes, marker: bytes) -> int:
    """The offset of the byte that ends the first event holding ``marker`` (its blank line)."""
    start = body.index(marker)
    for end in (b"\r\n\r\n", b"\n\n", b"\r\r"):
        at = body.find(end, start)
        if at >= 0:
            return at + len(end) - (2 if end == b"\r\n\r\n" else 1)
    raise AssertionError("no event end")


def check_all_cuts(
    api: ClientApi, body: bytes, expected: Usage | None, marker: bytes | None, events: int
) -> None:
    """Every cut of ``body`` gives the same usage, event count and first-token piece."""
    at = dispatch_offset(body, marker) if marker is not None else -1
    cuts = [[body[:k], body[k:]] for k in range(1, len(body))]
    cuts += [split_every(body, n) for n in (1, 2, 3)]
    cuts.append([body])
    for pieces in cuts:
        usage, trues, count = run(api, True, pieces)
        assert usage == expected
        assert count == events
        if marker is None:
            assert trues == []
            continue
        assert len(trues) == 1
        begin = sum(len(p) for p in pieces[: trues[0]])
        assert begin <= at < begin + len(pieces[trues[0]]), (begin, at, len(pieces[trues[0]]))


# -- Chat Completions


def test_chat_json() -> None:
    body = _dumps(chat_completion(Script(text=TEXT, usage=FAKE), "m", "c")).encode()
    assert run(CHAT, False, [body]) == (EXPECTED, [], 0)
    assert run(CHAT, False, split_every(body, 7))[0] == EXPECTED


def test_chat_stream_every_cut() -> None:
    body = chat_body()
    assert b'"usage": null' in body  # include_usage: every other chunk carries a null usage
    check_all_cuts(CHAT, body, EXPECTED, '"content": "héllo '.encode(), len(TEXT))


def test_chat_stream_crlf_and_cr_line_ends() -> None:
    body = chat_body()
    marker = '"content": "héllo '.encode()
    check_all_cuts(CHAT, body.replace(b"\n", b"\r\n"), EXPECTED, marker, len(TEXT))
    check_all_cuts(CHAT, body.replace(b"\n", b"\r"), EXPECTED, marker, len(TEXT))


def test_chat_stream_first_token_kinds() -> None:
    # The role chunk ("content": "") is no token; reasoning, refusal and tool calls are.
    reasoning = Script(text=[], reasoning=["think"], usage=None)
    body = chat_body(reasoning)
    assert run(CHAT, True, [body]) == (None, [0], 1)
    check_all_cuts(CHAT, body, None, b'"reasoning_content"', 1)
    refusal = Script(text=[], refusal="no", usage=None)
    check_all_cuts(CHAT, chat_body(refusal), None, b'"refusal": "no"', 1)
    tools = Script(text=[], tool_calls=[ToolCall("f", '{"a": 1}')], usage=None)
    usage, trues, count = run(CHAT, True, split_every(chat_body(tools), 5))
    assert usage is None and len(trues) == 1 and count >= 2


def test_chat_stream_empty_deltas_after_the_first_token_are_not_counted() -> None:
    chunks: list[Any] = [
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"content": ""}}]},
        {"choices": [{"delta": {"content": None, "tool_calls": []}}]},
        {"choices": [{"delta": {"refusal": None}, "finish_reason": "stop"}]},
        {"choices": [{"delta": {"content": "b"}}]},
    ]
    assert run(CHAT, True, [chat_sse(chunks)]) == (None, [0], 2)


def test_chat_stream_without_usage_chunk() -> None:
    usage, trues, count = run(CHAT, True, [chat_body(include_usage=False)])
    assert usage is None and len(trues) == 1 and count == len(TEXT)


def test_chat_stream_error_event() -> None:
    body = chat_body(Script(text=TEXT, usage=FAKE, stream_error=True))
    assert b'"error"' in body
    usage, trues, count = run(CHAT, True, [body])
    assert usage is None and len(trues) == 1 and count == len(TEXT)
    # only an error: no token, no usage
    error = chat_sse([{"error": {"message": "boom", "type": "server_error"}}])
    assert run(CHAT, True, [error]) == (None, [], 0)


def test_chat_stream_last_usage_wins() -> None:
    chunks: list[Any] = [
        {"choices": [{"delta": {"content": "a"}}], "usage": {"prompt_tokens": 1}},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    assert run(CHAT, True, [chat_sse(chunks)])[0] == Usage(5, 2, 0)


def test_chat_stream_unterminated_last_event_counts() -> None:
    body = chat_body().removesuffix(b"data: [DONE]\n\n").rstrip(b"\n")
    assert run(CHAT, True, [body])[0] == EXPECTED


# -- Anthropic Messages


def test_messages_json() -> None:
    body = _dumps(anthropic_message(Script(text=TEXT, usage=FAKE), "m", "msg")).encode()
    assert run(MESSAGES, False, split_every(body, 3)) == (EXPECTED, [], 0)
    # cached input is added back to input_tokens: 60 uncached + 10 written + 30 read
    assert json.loads(body)["usage"]["input_tokens"] == 60


def test_messages_stream_every_cut() -> None:
    body = messages_body()
    check_all_cuts(MESSAGES, body, EXPECTED, b"content_block_delta", len(TEXT))
    check_all_cuts(MESSAGES, body.replace(b"\n", b"\r\n"), EXPECTED, b"content_block_delta", 3)


def test_messages_stream_message_delta_replaces_input_side() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}
    delta_usage = {
        "input_tokens": 7,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 2,
        "output_tokens": 9,
    }
    events = [
        ("message_start", start),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "x"}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4}}),
        ("message_delta", {"type": "message_delta", "usage": delta_usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    assert run(MESSAGES, True, [named_sse(events)]) == (Usage(12, 9, 3), [0], 1)
    # without any message_delta, message_start's counters stand (output_tokens 1)
    assert run(MESSAGES, True, [named_sse(events[:2])])[0] == Usage(5, 1, 0)


def test_messages_stream_without_event_names_uses_data_type() -> None:
    events = list(anthropic_events(Script(text=TEXT, usage=FAKE), "m", "msg"))
    body = chat_sse([data for _, data in events], done=False)
    assert run(MESSAGES, True, [body]) == (EXPECTED, [0], len(TEXT))


def test_messages_stream_ping_and_error() -> None:
    body = messages_body(Script(text=TEXT, usage=FAKE, stream_error=True))
    assert b"event: ping" in body and b"event: error" in body
    # message_start told the input side; output is its early count (1)
    assert run(MESSAGES, True, [body]) == (Usage(100, 1, 30), [0], len(TEXT))
    only_error = named_sse([("error", {"type": "error", "error": {"type": "overloaded_error"}})])
    assert run(MESSAGES, True, [only_error]) == (None, [], 0)


# -- OpenAI Responses


def test_responses_json() -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
        "usage": {
            "input_tokens": 100,
            "output_tokens": 20,
            "total_tokens": 120,
            "input_tokens_details": {"cached_tokens": 30},
            "output_tokens_details": {"reasoning_tokens": 5},
        },
    }
    assert run(RESPONSES, False, [_dumps(body).encode()]) == (EXPECTED, [], 0)


def test_responses_stream_every_cut() -> None:
    body = responses_body()
    assert b"event: response.created" in body and b"event: response.completed" in body
    assert body.count(b'"usage": null') + body.count(b'"usage":null') >= 1  # created: null
    check_all_cuts(RESPONSES, body, EXPECTED, b"response.output_text.delta", len(TEXT))


def test_responses_stream_failed_and_incomplete() -> None:
    failed = responses_body(Script(text=TEXT, usage=FAKE, stream_error=True))
    assert b"response.failed" in failed
    usage, trues, count = run(RESPONSES, True, [failed])
    assert usage is None and len(trues) == 1 and count == len(TEXT)
    incomplete = responses_body(Script(text=TEXT, usage=FAKE, finish="length"))
    assert b"response.incomplete" in incomplete
    assert run(RESPONSES, True, [incomplete])[0] == EXPECTED


def test_responses_stream_tool_call_delta_is_the_first_token() -> None:
    body = responses_body(Script(text=[], tool_calls=[ToolCall("f", '{"a": 1}')], usage=FAKE))
    assert b"response.output_text.delta" not in body
    check_all_cuts(RESPONSES, body, EXPECTED, b"response.function_call_arguments.delta", 1)


def test_responses_stream_without_usage() -> None:
    body = responses_body(Script(text=TEXT, usage=None))
    assert run(RESPONSES, True, [body])[0] is None


# -- bounds


def _big_text(n: int) -> str:
    return "é" * (n // 2)  # two bytes each, so the tail cut falls inside characters


@pytest.mark.parametrize("api", [CHAT, MESSAGES, RESPONSES])
def test_json_over_limit_reads_usage_from_the_tail(api: ClientApi) -> None:
    text = _big_text(MAX_JSON_BYTES + 100_000)
    if api is CHAT:
        obj = chat_completion(Script(text=[text], usage=FAKE), "m", "c")
    elif api is MESSAGES:
        obj = anthropic_message(Script(text=[text], usage=FAKE), "m", "c")
    else:
        obj = {
            "output": [{"content": [{"text": text, "usage": {"input_tokens": 1}}]}],
            "usage": {
                "input_tokens": 100,
                "output_tokens": 20,
                "input_tokens_details": {"cached_tokens": 30},
            },
            "metadata": {"usage": "not an object"},
        }
    body = _dumps(obj).encode()
    assert len(body) > MAX_JSON_BYTES
    meter = UsageMeter(api, False)
    for piece in split_every(body, 65_536):
        assert meter.feed(piece) is False
        assert sum(len(b) for b in meter._buf) <= max(MAX_JSON_BYTES, 2 * TAIL_BYTES) + 65_536
    assert meter.finish() == EXPECTED


def test_json_over_limit_without_usage_in_tail() -> None:
    body = b'{"usage": {"prompt_tokens": 1}, "x": "' + b"a" * (MAX_JSON_BYTES + 10) + b'"}'
    assert run(CHAT, False, split_every(body, 100_000))[0] is None


def test_responses_huge_completed_event_keeps_only_its_tail() -> None:
    text = _big_text(MAX_EVENT_BYTES + (1 << 20))
    body = responses_body(Script(text=[text], usage=FAKE))
    completed = body[body.index(b"event: response.completed") :]
    assert len(completed) > MAX_EVENT_BYTES
    meter = UsageMeter(RESPONSES, True)
    trues = 0
    cut = False
    for piece in split_every(body, 16_384):
        trues += meter.feed(piece)
        held = meter._tail_len + meter._data_len
        assert held <= MAX_EVENT_BYTES + 16_384
        cut = cut or meter._cut
    assert cut  # the big event was cut down to its tail
    assert trues == 1
    assert meter.finish() == EXPECTED


def test_chat_huge_delta_event_is_a_token_and_usage_survives() -> None:
    text = _big_text(MAX_EVENT_BYTES + (1 << 20))
    body = chat_body(Script(text=[text], usage=FAKE))
    meter = UsageMeter(CHAT, True)
    trues, cut = [], False
    for i, piece in enumerate(split_every(body, 100_003)):
        if meter.feed(piece):
            trues.append(i)
        cut = cut or meter._cut
    assert cut and len(trues) == 1
    assert meter.finish() == EXPECTED


def test_huge_comment_line_is_dropped_not_read_as_data() -> None:
    body = chat_body(include_usage=False)
    role_end = body.index(b"\n\n")  # the role chunk ("content": ""): no token
    comment = b"\n: " + b"x" * (MAX_EVENT_BYTES + (2 << 20))
    body = body[:role_end] + comment + body[role_end:]
    usage, trues, count = run(CHAT, True, split_every(body, 1 << 20))
    assert usage is None and len(trues) == 1 and count == len(TEXT)


def test_huge_event_without_usage_gives_none() -> None:
    body = b"event: response.completed\ndata: " + b"x" * (MAX_EVENT_BYTES + (2 << 20)) + b"\n\n"
    assert run(RESPONSES, True, split_every(body, 1 << 20)) == (None, [], 0)


# -- hostile input


@pytest.mark.parametrize(
    ("value", "counted"),
    [
        (5, 5),
        ("5", None),
        (5.0, None),
        (-5, None),
        (True, None),
        (None, None),
        ([5], None),
        ({"n": 5}, None),
        (10**30, MAX_COUNT),
    ],
)
def test_hostile_counters(value: Any, counted: int | None) -> None:
    chat = {"usage": {"prompt_tokens": value, "completion_tokens": 3}}
    usage = run(CHAT, False, [_dumps(chat).encode()])[0]
    assert usage == Usage(counted if counted is not None else 0, 3, 0)
    msgs = {"usage": {"input_tokens": value}}
    usage = run(MESSAGES, False, [_dumps(msgs).encode()])[0]
    assert usage == (None if counted is None else Usage(counted, 0, 0))
    resp = chat_sse(
        [{"type": "response.completed", "response": {"usage": {"output_tokens": value}}}]
    )
    usage = run(RESPONSES, True, [resp])[0]
    assert usage == (None if counted is None else Usage(0, counted, 0))


def test_cached_never_exceeds_input_and_sums_are_capped() -> None:
    chat = {"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 9}}}
    assert run(CHAT, False, [_dumps(chat).encode()])[0] == Usage(3, 0, 3)
    big = MAX_COUNT
    msgs = {"usage": {"input_tokens": big, "cache_read_input_tokens": big}}
    assert run(MESSAGES, False, [_dumps(msgs).encode()])[0] == Usage(big, 0, big)


@pytest.mark.parametrize("api", [CHAT, MESSAGES, RESPONSES])
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json at all",
        b'{"usage": ',
        b'{"usage": "lots"}',
        b'{"usage": [1, 2]}',
        b'{"usage": {}}',
        b"[1, 2, 3]",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
        b'{"error": {"message": "rate limited", "type": "rate_limit_error"}}',
        b'{"usage": {"prompt_tokens": 1' + b"9" * 5000 + b"}}",
    ],
)
def test_garbage_never_raises(api: ClientApi, body: bytes) -> None:
    assert run(api, False, [body])[0] is None
    assert run(api, True, [body])[0] is None
    assert run(api, True, [b"data: " + body + b"\n\n"]) == (None, [], 0)
    named = b"event: message_delta\ndata: " + body + b"\n\nevent: response.completed\ndata: "
    assert run(api, True, [named + body + b"\n\n"])[0] is None


def test_an_undecodable_event_does_not_stop_the_stream() -> None:
    events = named_sse([("content_block_delta", {"type": "content_block_delta"})])
    deep = b"event: message_start\ndata: " + b"[" * 100_000 + b"\n\n"
    delta = named_sse([("message_delta", {"usage": {"input_tokens": 4, "output_tokens": 2}})])
    assert run(MESSAGES, True, [deep, events, delta]) == (Usage(4, 2, 0), [1], 1)


def test_nested_garbage_in_stream_events() -> None:
    chunks: list[Any] = [
        {"choices": "nope", "usage": {"prompt_tokens": {"deep": [1]}}},
        {"choices": [None, 1, {"delta": "x"}, {"delta": {"content": 5}}]},
        {"choices": [{"delta": {"content": None, "tool_calls": []}}]},
    ]
    assert run(CHAT, True, [chat_sse(chunks)]) == (None, [], 0)
    events = [
        ("message_start", {"message": "x"}),
        ("message_delta", {"usage": [1]}),
        ("message_delta", {"usage": {"output_tokens": "9"}}),
    ]
    assert run(MESSAGES, True, [named_sse(events)]) == (None, [], 0)


def test_finish_is_idempotent_and_feed_after_finish_is_ignored() -> None:
    meter = UsageMeter(CHAT, True)
    assert meter.feed(chat_body()) is True
    assert meter.finish() == EXPECTED
    assert meter.feed(chat_body()) is False
    assert meter.finish() == EXPECTED


def test_first_token_reported_once_across_many_events() -> None:
    meter = UsageMeter(CHAT, True)
    answers = [meter.feed(p) for p in split_every(chat_body(), 40)]
    assert answers.count(True) == 1
    assert meter.output_events == len(TEXT)
