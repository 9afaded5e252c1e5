"""OpenAI Responses client -> Anthropic Messages provider (``translate/responses_messages.py``).

The pair composes ``responses_chat`` and ``chat_messages`` (each has its own tests); these tests
check the composition end to end: the Anthropic body (validated with the anthropic SDK's request
TypedDict), errors named in the client's terms, replies (``Response.model_validate``), and
Anthropic event streams shaped as the streaming docs show (message_start, content_block_start,
ping, content_block_delta..., content_block_stop, message_delta, message_stop) read by the
openai SDK's Responses stream helper.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from openai._streaming import Stream
from openai._types import omit
from openai.lib.streaming.responses import ResponseStream
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from plano_extproc.errors import GatewayError
from plano_extproc.translate import responses_messages as tx
from plano_extproc.translate.base import SseOut, Untranslatable
from plano_extproc.translate.sse import encode

ANTHROPIC_BODY = TypeAdapter(MessageCreateParamsNonStreaming)
EVENT = TypeAdapter(ResponseStreamEvent)
MODEL = "claude-sonnet-4-5"
TARGET = "Anthropic Messages"


def req(**kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    body: dict[str, Any] = {"model": "gpt-4.1", "input": "hi"}
    body.update(kw)
    out, ctx = tx.request(body, MODEL)
    ANTHROPIC_BODY.validate_python({k: v for k, v in out.items() if k != "stream"})
    assert len(json.dumps(ctx, ensure_ascii=False).encode()) < 1024
    return out, ctx


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def fcall(call_id: str = "call_1", name: str = "get_weather", args: str = "{}") -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": args}


def fout(call_id: str = "call_1", output: Any = "sunny") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def tool_use(ident: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": ident, "name": name, "input": args}


# ---------------------------------------------------------------- request


def test_request_is_anthropic_with_both_contexts() -> None:
    out, ctx = req(
        instructions="be brief",
        input=[
            {"role": "developer", "content": "dev"},
            user([{"type": "input_text", "text": "weather?"}]),
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "checking"}]},
            fcall("call_1", args='{"city":"Paris"}'),
            fcall("call_2", name="get_time", args=""),
            fout("call_1", "sunny"),
            fout("call_2", [{"type": "input_text", "text": "noon"}]),
        ],
        max_output_tokens=500,
        temperature=0.5,
        user="u-1",
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        tool_choice="required",
        parallel_tool_calls=False,
        stream=True,
    )
    assert out["model"] == MODEL and out["max_tokens"] == 500 and out["temperature"] == 0.5
    assert out["system"] == [{"type": "text", "text": "be brief"}, {"type": "text", "text": "dev"}]
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "checking"},
                tool_use("call_1", "get_weather", {"city": "Paris"}),
                tool_use("call_2", "get_time", {}),
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
            ],
        },
    ]  # fmt: skip
    assert out["metadata"] == {"user_id": "u-1"}
    assert out["tools"] == [{"name": "get_weather", "input_schema": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["stream"] is True
    assert ctx["responses"]["model"] == "gpt-4.1" and ctx["responses"]["stream"] is True
    assert ctx["chat"]["include_usage"] is True and ctx["chat"]["model"] == ""


def test_defaults_and_mapped_parameters() -> None:
    out, _ = req()
    assert out["max_tokens"] == 4096 and out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    ]
    schema = {"type": "object", "properties": {}}
    out, _ = req(
        text={"format": {"type": "json_schema", "name": "x", "schema": schema}},
        reasoning={"effort": "low"},
        max_output_tokens=8000,
    )
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    out, _ = req(input=[user([image, {"type": "input_text", "text": "what?"}])])
    assert out["messages"][0]["content"][0] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
    }


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"previous_response_id": "resp_abc"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        # refused by chat_messages, named in the client's terms
        ({"text": {"format": {"type": "json_object"}}}, "text.format.type"),
        ({"input": [user("x"), {"role": "assistant", "content": "prefill"}]}, "input[1]"),
        ({"reasoning": {"effort": "high"}, "temperature": 0.5}, "temperature"),
        ({"reasoning": {"effort": "high"}, "max_output_tokens": 1000}, "reasoning.effort"),
    ],
)
def test_untranslatable_names_the_client_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(Untranslatable) as exc:
        req(**kw)
    assert exc.value.status == 400 and exc.value.field == field
    assert str(exc.value).startswith(f"'{field}' cannot be translated for a")
    assert "reasoning_effort" not in str(exc.value)


@pytest.mark.parametrize(
    ("items", "path"),
    [
        ([user("x"), fcall(args="not json"), fout()], "input[1].arguments"),
        ([user("x"), fcall(args="[1]"), fout()], "input[1].arguments"),
        (
            [user([{"type": "input_image", "image_url": "data:image/bmp;base64,AA"}])],
            "input[0].content[0].image_url",
        ),
        (
            [user([{"type": "input_image", "image_url": "data:image/png,AA"}])],
            "input[0].content[0].image_url",
        ),
        ([{"type": "reasoning", "id": "rs_1"}], "input"),
        ([user("x"), {"role": 5}], "input[1].role"),
    ],
)
def test_bad_values_are_400_naming_the_client_path(items: list[Any], path: str) -> None:
    with pytest.raises(GatewayError) as exc:
        req(input=items)
    assert exc.value.status == 400
    assert exc.value.message.startswith(f"'{path}'"), exc.value.message


def test_inner_paths_without_a_client_origin_are_kept() -> None:
    # a Chat message index is not an input index: no guessing
    assert tx._client_path("messages[9].content[0]", {}) == "messages[9].content[0]"
    assert tx._client_path("messages", {}) == "input"
    assert tx._client_path("stop_sequences", {}) == "stop_sequences"
    assert tx._client_path("max_tokens", {}) == "max_output_tokens"
    assert tx._client_path("tools[2].function.name", {"tools[2].function": "tools[2]"}) == (
        "tools[2].name"
    )


# ---------------------------------------------------------------- response

CTX_JSON = req()[1]
CTX_STREAM = req(stream=True)[1]


def message(content: list[dict[str, Any]], stop: str = "end_turn", **usage: Any) -> Any:
    return {
        "id": "msg_01abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5} | usage,
    }


def resp(body: dict[str, Any]) -> dict[str, Any]:
    out = tx.response(body, CTX_JSON)
    Response.model_validate(out)
    return out


def test_text_tool_and_thinking_reply() -> None:
    out = resp(
        message(
            [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": 1}},
            ],
            "tool_use",
            cache_read_input_tokens=100,
            cache_creation_input_tokens=7,
        )
    )
    assert out["id"] == "resp_chatcmpl-msg_01abc" and out["status"] == "completed"
    assert out["model"] == "claude-sonnet-4-5-20250929"
    assert [i["type"] for i in out["output"]] == ["reasoning", "message", "function_call"]
    assert out["output"][0]["summary"] == [{"type": "summary_text", "text": "hmm"}]
    call = out["output"][2]
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "toolu_1",
        "get_weather",
        '{"c":1}',
    )
    usage = out["usage"]
    assert usage["input_tokens"] == 117  # Anthropic's input excludes cache reads and writes
    assert usage["input_tokens_details"]["cached_tokens"] == 100
    assert usage["output_tokens"] == 5 and usage["total_tokens"] == 122


@pytest.mark.parametrize(
    ("stop", "status", "reason"),
    [
        ("end_turn", "completed", None),
        ("stop_sequence", "completed", None),
        ("tool_use", "completed", None),
        ("max_tokens", "incomplete", "max_output_tokens"),
        ("refusal", "incomplete", "content_filter"),
    ],
)
def test_stop_reason_to_status(stop: str, status: str, reason: str | None) -> None:
    out = resp(message([{"type": "text", "text": "x"}], stop))
    assert out["status"] == status
    assert out["incomplete_details"] == (None if reason is None else {"reason": reason})


def test_model_falls_back_to_the_requested_one() -> None:
    body = message([{"type": "text", "text": "x"}])
    del body["model"]
    assert resp(body)["model"] == "gpt-4.1"


def test_bad_provider_reply_is_502() -> None:
    with pytest.raises(GatewayError) as exc:
        tx.response({"content": "x"}, CTX_JSON)
    assert exc.value.status == 502


# ---------------------------------------------------------------- stream


def ev(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **fields}


def message_start(**usage: Any) -> tuple[str, dict[str, Any]]:
    msg = message([], None, **usage)  # type: ignore[arg-type]
    msg["usage"]["output_tokens"] = 1
    return ev("message_start", message=msg)


def block(index: int, **content: Any) -> tuple[str, dict[str, Any]]:
    return ev("content_block_start", index=index, content_block=content)


def delta(index: int, **fields: Any) -> tuple[str, dict[str, Any]]:
    return ev("content_block_delta", index=index, delta=fields)


def stop(index: int) -> tuple[str, dict[str, Any]]:
    return ev("content_block_stop", index=index)


def finish(reason: str = "end_turn", output: int = 15) -> list[tuple[str, dict[str, Any]]]:
    return [
        ev("message_delta", delta={"stop_reason": reason, "stop_sequence": None},
           usage={"output_tokens": output}),
        ev("message_stop"),
    ]  # fmt: skip


TOOLS_STREAM = [
    message_start(cache_read_input_tokens=4),
    block(0, type="thinking", thinking="", signature=""),
    delta(0, type="thinking_delta", thinking="Let me "),
    delta(0, type="thinking_delta", thinking="think."),
    delta(0, type="signature_delta", signature="EqQB"),
    stop(0),
    block(1, type="text", text=""),
    ev("ping"),
    delta(1, type="text_delta", text="Checking "),
    delta(1, type="text_delta", text="both."),
    stop(1),
    block(2, type="tool_use", id="toolu_a", name="get_weather", input={}),
    delta(2, type="input_json_delta", partial_json=""),
    delta(2, type="input_json_delta", partial_json='{"city": '),
    delta(2, type="input_json_delta", partial_json='"Paris"}'),
    stop(2),
    block(3, type="tool_use", id="toolu_b", name="get_time", input={}),
    delta(3, type="input_json_delta", partial_json='{"tz":"CET"}'),
    stop(3),
    *finish("tool_use", 42),
]


def run(events: list[Any], ctx: dict[str, Any] = CTX_STREAM) -> list[SseOut]:
    s = tx.stream(ctx)
    out: list[SseOut] = []
    for name, data in events:
        out += s.event(name, data)
    out += s.end()
    assert s.end() == []
    names = []
    for n, (name, data) in enumerate(out):
        assert isinstance(data, dict)
        EVENT.validate_python(data)
        assert name == data["type"] and data["sequence_number"] == n
        names.append(name)
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] in terminal and not terminal & set(names[:-1])
    return out


def sdk(out: list[SseOut]) -> ResponseStream[Any]:
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9/v1")
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/responses")
    response = httpx2.Response(200, content=encode(out), request=request)
    raw: Stream[Any] = Stream(cast_to=ResponseStreamEvent, response=response, client=client)  # type: ignore[arg-type]
    helper: ResponseStream[Any] = ResponseStream(
        raw_stream=raw, text_format=omit, input_tools=omit, starting_after=None
    )
    list(helper)
    return helper


def final(out: list[SseOut]) -> dict[str, Any]:
    data = out[-1][1]
    assert isinstance(data, dict)
    response: dict[str, Any] = data["response"]
    return response


def test_stream_with_thinking_text_and_tools_reassembles_to_the_json_reply() -> None:
    out = run(TOOLS_STREAM)
    got = final(out)
    assert out[-1][0] == "response.completed"
    reply = message(
        [
            {"type": "thinking", "thinking": "Let me think.", "signature": "EqQB"},
            {"type": "text", "text": "Checking both."},
            tool_use("toolu_a", "get_weather", {"city": "Paris"}),
            tool_use("toolu_b", "get_time", {"tz": "CET"}),
        ],
        "tool_use",
        cache_read_input_tokens=4,
    )  # fmt: skip
    reply["usage"]["output_tokens"] = 42
    expected = tx.response(reply, CTX_STREAM)
    # the streamed arguments are the provider's own text; the JSON reply re-serialises input
    got_args = [i.pop("arguments") for i in got["output"] if i["type"] == "function_call"]
    exp_args = [i.pop("arguments") for i in expected["output"] if i["type"] == "function_call"]
    assert [json.loads(a) for a in got_args] == [json.loads(a) for a in exp_args]
    got.pop("created_at")
    expected.pop("created_at")
    assert got == expected
    final_sdk = sdk(out).get_final_response()
    assert final_sdk.output_text == "Checking both."
    assert final_sdk.usage is not None and final_sdk.usage.input_tokens_details.cached_tokens == 4


def test_max_tokens_and_refusal_streams_are_incomplete() -> None:
    text = [message_start(), block(0, type="text", text=""), delta(0, type="text_delta", text="x")]
    out = run([*text, stop(0), *finish("max_tokens")])
    assert out[-1][0] == "response.incomplete"
    assert final(out)["incomplete_details"] == {"reason": "max_output_tokens"}
    out = run([*text, stop(0), *finish("refusal")])
    assert final(out)["incomplete_details"] == {"reason": "content_filter"}


def test_empty_answer_completes() -> None:
    out = run([message_start(), *finish()])
    assert final(out)["status"] == "completed"
    sdk(out).get_final_response()


def test_anthropic_error_event_after_200_is_error_then_failed() -> None:
    out = run(
        [
            message_start(),
            block(0, type="text", text=""),
            delta(0, type="text_delta", text="half"),
            ev("error", error={"type": "overloaded_error", "message": "Overloaded"}),
        ]
    )
    assert [n for n, _ in out][-2:] == ["error", "response.failed"]
    assert final(out)["error"] == {"code": "server_error", "message": "Overloaded"}
    with pytest.raises(RuntimeError):
        sdk(out).get_final_response()
    out = run([message_start(), ev("error", error={"type": "rate_limit_error", "message": "slow"})])
    assert final(out)["error"]["code"] == "rate_limit_exceeded"


def test_stream_ending_before_message_stop_fails() -> None:
    out = run(
        [message_start(), block(0, type="text", text=""), delta(0, type="text_delta", text="x")]
    )
    assert [n for n, _ in out][-2:] == ["error", "response.failed"]
    assert "ended early" in final(out)["error"]["message"]
    out = run([])
    assert [n for n, _ in out] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]


def test_hostile_context_does_not_crash() -> None:
    for ctx in ({}, {"responses": 5, "chat": "x"}):
        out = run([message_start(), *finish()], ctx)
        assert out[-1][0] == "response.completed"
        assert tx.response(message([{"type": "text", "text": "x"}]), ctx)["status"] == "completed"
