"""OpenAI Responses client -> Chat Completions provider (``translate/responses_chat.py``).

Provider bodies are checked with the openai SDK's Chat request TypedDict; replies with
``Response.model_validate``; every stream event with the SDK's ``ResponseStreamEvent`` union and
the SDK's own stream accumulator (``ResponseStream`` over the framed bytes), which raises on a
grammar it cannot follow. Chat chunk sequences follow OpenAI's streaming format: a role chunk,
content / tool_calls deltas, a finish_reason chunk, a ``choices: []`` usage chunk, ``[DONE]``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx2
import openai
import pytest
from openai._streaming import Stream
from openai._types import omit
from openai.lib.streaming.responses import ResponseStream
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from plano_extproc.errors import GatewayError
from plano_extproc.translate import responses_chat as tx
from plano_extproc.translate.base import SseOut, Untranslatable
from plano_extproc.translate.sse import encode

CHAT_BODY = TypeAdapter(CompletionCreateParamsStreaming)
EVENT = TypeAdapter(ResponseStreamEvent)
CTX: dict[str, Any] = {"stream": False, "model": "gpt-4.1", "tool_choice": "auto"}
SCTX: dict[str, Any] = {"stream": True, "model": "gpt-4.1", "tool_choice": "auto"}


def req(model_id: str = "llama-3", **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    body: dict[str, Any] = {"model": "gpt-4.1", "input": "hi"}
    body.update(kw)
    out, ctx = tx.request(body, model_id)
    CHAT_BODY.validate_python(out | {"stream": True})
    json.dumps(ctx)
    return out, ctx


def msgs(*items: Any, **kw: Any) -> list[dict[str, Any]]:
    return req(input=list(items), **kw)[0]["messages"]


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def fcall(call_id: str = "call_1", name: str = "get_weather", args: str = "{}") -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": args}


def fout(call_id: str = "call_1", output: Any = "sunny") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def tool_call(ident: str, name: str, args: str) -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": args}}


def refused(exc: pytest.ExceptionInfo[Any], field: str) -> None:
    assert isinstance(exc.value, Untranslatable), exc.value
    assert exc.value.status == 400 and exc.value.field == field
    assert f"'{field}' cannot be translated for a OpenAI Chat Completions model" in str(exc.value)


def bad(exc: pytest.ExceptionInfo[Any], path: str) -> None:
    assert isinstance(exc.value, GatewayError) and not isinstance(exc.value, Untranslatable)
    assert exc.value.status == 400 and f"'{path}'" in exc.value.message, exc.value.message


# ---------------------------------------------------------------- request: input


def test_instructions_and_string_input() -> None:
    out, ctx = req(instructions="be brief")
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert out["model"] == "llama-3"
    assert ctx == {"stream": False, "model": "gpt-4.1", "tool_choice": "auto"} | {
        "parallel_tool_calls": True
    }
    assert req(instructions="")[0]["messages"] == [{"role": "user", "content": "hi"}]


def test_message_items_roles_and_text_parts() -> None:
    got = msgs(
        {"role": "developer", "content": "dev rules"},
        {"role": "system", "content": [{"type": "input_text", "text": "sys"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}
        ]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "ok", "annotations": [], "logprobs": []}]},
        {"role": "user", "content": "again"},
    )  # fmt: skip
    assert got == [
        {"role": "system", "content": "dev rules"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]


def test_images_by_url_and_data_keep_detail() -> None:
    got = msgs(
        user(
            [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "high"},
                {
                    "type": "input_image",
                    "image_url": "data:image/png;base64,AAAA",
                    "detail": "auto",
                },
                {"type": "input_image", "image_url": "https://x.test/b.png", "detail": "original"},
            ]
        )
    )
    assert got[0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/b.png"}},
    ]


def test_image_file_id_and_files_are_refused() -> None:
    with pytest.raises(Untranslatable) as exc:
        msgs(user([{"type": "input_image", "file_id": "file-1"}]))
    refused(exc, "input[0].content[0].file_id")
    for kind in ("input_file", "input_audio"):
        with pytest.raises(Untranslatable) as exc:
            msgs(user([{"type": "input_text", "text": "x"}, {"type": kind, "file_id": "f"}]))
        refused(exc, "input[0].content[1].type")
    with pytest.raises(Untranslatable) as exc:  # images only in user turns
        msgs({"role": "assistant", "content": [{"type": "input_image", "image_url": "https://x"}]})
    refused(exc, "input[0].content[0].type")


def test_refusal_part_is_sent_as_assistant_text() -> None:
    got = msgs(
        user("q"),
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't"}]},
        user("why"),
    )
    assert got[1] == {"role": "assistant", "content": "I can't"}


def test_function_calls_join_the_assistant_text_before_them() -> None:
    got = msgs(
        user("weather?"),
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "checking"}]},
        {"type": "reasoning", "id": "rs_2", "summary": []},
        fcall("call_1", args='{"city":"Paris"}'),
        fcall("call_2", name="get_time", args='{"tz":"CET"}'),
        fout("call_1", "sunny"),
        fout("call_2", "noon"),
        fcall("call_3"),
        fout("call_3", ""),
    )
    assert got == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "checking",
            "tool_calls": [
                tool_call("call_1", "get_weather", '{"city":"Paris"}'),
                tool_call("call_2", "get_time", '{"tz":"CET"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("call_3", "get_weather", "{}")],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": ""},
    ]


def test_function_call_after_user_opens_its_own_assistant_message() -> None:
    got = msgs(user("x"), fcall(), fout())
    assert got[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [tool_call("call_1", "get_weather", "{}")],
    }
    # an empty assistant message before the calls is not sent on its own
    got = msgs(user("x"), {"role": "assistant", "content": ""}, fcall(), fout())
    assert [m["role"] for m in got] == ["user", "assistant", "tool"]


def test_tool_output_parts_and_images_follow_the_tool_messages() -> None:
    got = msgs(
        user("x"),
        fcall("call_1"),
        fcall("call_2"),
        fout(
            "call_1",
            [
                {"type": "input_text", "text": "here"},
                {"type": "input_image", "image_url": "data:image/png;base64,AA"},
            ],
        ),
        fout("call_2", [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]),
        user("thanks"),
    )
    assert got[2:] == [
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": "here\n[1 image(s) attached in the next user message]",
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "a\nb"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Images returned by call_1:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            ],
        },
        {"role": "user", "content": "thanks"},
    ]
    with pytest.raises(Untranslatable) as exc:
        msgs(user("x"), fcall(), fout(output=[{"type": "input_file", "file_id": "f"}]))
    refused(exc, "input[2].output[0].type")


def test_long_call_ids_become_the_same_digest_on_call_and_output() -> None:
    long_id = "fc_" + "x" * 60
    got = msgs(user("x"), fcall(long_id), fout(long_id))
    ident = got[1]["tool_calls"][0]["id"]
    assert ident.startswith("call_") and len(ident) == 37
    assert got[2]["tool_call_id"] == ident
    assert msgs(user("x"), fcall("call.1"), fout("call.1"))[2]["tool_call_id"] != "call.1"


@pytest.mark.parametrize(
    "kind",
    [
        "item_reference",
        "compaction",
        "web_search_call",
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "mcp_call",
        "custom_tool_call",
        "custom_tool_call_output",
    ],
)
def test_stateful_and_hosted_items_are_refused(kind: str) -> None:
    with pytest.raises(Untranslatable) as exc:
        msgs(user("x"), {"type": kind, "id": "x_1"})
    refused(exc, "input[1].type")


def test_unknown_members_of_items_are_refused() -> None:
    with pytest.raises(Untranslatable) as exc:
        msgs({"role": "user", "content": "x", "cache_hint": True})
    refused(exc, "input[0].cache_hint")
    with pytest.raises(Untranslatable) as exc:
        msgs(user("x"), fcall() | {"namespace": "ns"})
    refused(exc, "input[1].namespace")
    with pytest.raises(Untranslatable) as exc:
        msgs(user("x"), fcall(), fout() | {"extra": 1})
    refused(exc, "input[2].extra")


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (42, "input"),
        ([], "input"),
        (["hi"], "input[0]"),
        ([{"role": "robot", "content": "x"}], "input[0].role"),
        ([{"role": 5, "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": 5}], "input[0].content"),
        ([{"role": "user", "content": [5]}], "input[0].content[0]"),
        ([{"role": "user", "content": [{"type": 1}]}], "input[0].content[0].type"),
        ([user([{"type": "text", "text": "x"}])], "input[0].content[0].type"),
        ([user([{"type": "input_text", "text": None}])], "input[0].content[0].text"),
        ([user([{"type": "input_image"}])], "input[0].content[0].image_url"),
        ([user([{"type": "input_image", "image_url": "file:///etc/passwd"}])],
         "input[0].content[0].image_url"),
        ([user([{"type": "input_image", "image_url": "https://x", "detail": 3}])],
         "input[0].content[0].detail"),
        ([{"type": 7}], "input[0].type"),
        ([{"type": "function_call", "call_id": "c", "name": "bad name", "arguments": "{}"}],
         "input[0].name"),
        ([{"type": "function_call", "call_id": "c", "name": "x" * 65, "arguments": "{}"}],
         "input[0].name"),
        ([{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}],
         "input[0].call_id"),
        ([{"type": "function_call", "call_id": "c" * 1025, "name": "f", "arguments": "{}"}],
         "input[0].call_id"),
        ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}],
         "input[0].arguments"),
        ([{"type": "function_call_output", "call_id": 3, "output": "x"}], "input[0].call_id"),
        ([{"type": "function_call_output", "call_id": "c", "output": 3}], "input[0].output"),
        ([{"type": "function_call_output", "call_id": "c", "output": [{"type": "x"}]}],
         "input[0].output[0].type"),
    ],
)  # fmt: skip
def test_hostile_input_is_a_400_naming_the_path(value: Any, path: str) -> None:
    with pytest.raises(GatewayError) as exc:
        tx.request({"model": "m", "input": value}, "m")
    bad(exc, path)


def test_missing_input_and_bad_instructions() -> None:
    with pytest.raises(GatewayError) as exc:
        tx.request({"model": "m"}, "m")
    bad(exc, "input")
    with pytest.raises(GatewayError) as exc:
        tx.request({"model": "m", "input": "x", "instructions": ["x"]}, "m")
    bad(exc, "instructions")


# ---------------------------------------------------------------- request: parameters


def test_function_tools_are_nested_and_choice_mapped() -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    }
    out, ctx = req(tools=[tool, {"type": "function", "name": "noop"}], tool_choice="required")
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather",
                "parameters": tool["parameters"],
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "noop"}},
    ]
    assert out["tool_choice"] == "required" and ctx["tool_choice"] == "required"
    for choice in ("auto", "none"):
        assert req(tools=[tool], tool_choice=choice)[0]["tool_choice"] == choice
    out, ctx = req(tools=[tool], tool_choice={"type": "function", "name": "get_weather"})
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert ctx["tool_choice"] == {"type": "function", "name": "get_weather"}
    out, ctx = req(tools=[tool], parallel_tool_calls=False)
    assert out["parallel_tool_calls"] is False and ctx["parallel_tool_calls"] is False
    assert "tool_choice" not in out


def test_tool_choice_and_parallel_are_not_sent_without_tools() -> None:
    out, ctx = req(tool_choice="none", parallel_tool_calls=False, tools=[])
    assert "tool_choice" not in out and "parallel_tool_calls" not in out and "tools" not in out
    assert ctx["tool_choice"] == "none" and ctx["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    "kind",
    [
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "image_generation",
        "mcp",
        "local_shell",
        "custom",
        "namespace",
        "shell",
        "apply_patch",
    ],
)
def test_hosted_tools_are_refused_naming_the_tool(kind: str) -> None:
    fn = {"type": "function", "name": "f"}
    with pytest.raises(Untranslatable) as exc:
        req(tools=[fn, {"type": kind, "name": "x"}])
    refused(exc, "tools[1].type")


def test_tool_choice_refusals_and_bad_values() -> None:
    tools = [{"type": "function", "name": "f"}]
    for choice in (
        {"type": "allowed_tools", "mode": "auto", "tools": []},
        {"type": "web_search_preview"},
        {"type": "mcp", "server_label": "x"},
        {"type": "custom", "name": "x"},
    ):
        with pytest.raises(Untranslatable) as exc:
            req(tools=tools, tool_choice=choice)
        refused(exc, "tool_choice.type")
    for choice, path in (("any", "tool_choice"), ({"type": "function"}, "tool_choice.name")):
        with pytest.raises(GatewayError) as err:
            req(tools=tools, tool_choice=choice)
        bad(err, path)
    with pytest.raises(Untranslatable) as exc:
        req(tools=[{"type": "function", "name": "f", "defer_loading": True}])
    refused(exc, "tools[0].defer_loading")
    for tool, path in (
        ({"type": "function", "name": "f g"}, "tools[0].name"),
        ({"type": "function", "name": "f", "parameters": "x"}, "tools[0].parameters"),
        ({"type": "function", "name": "f", "strict": "yes"}, "tools[0].strict"),
        ("f", "tools[0]"),
    ):
        with pytest.raises(GatewayError) as err:
            req(tools=[tool])
        bad(err, path)


def test_max_output_tokens_follows_the_messages_chat_rule() -> None:
    out, ctx = req(max_output_tokens=300)
    assert out["max_tokens"] == 300 and "max_completion_tokens" not in out
    assert ctx["max_output_tokens"] == 300
    for model in ("gpt-5-mini", "o3", "openai/o4-mini"):
        out, _ = req(model, max_output_tokens=300)
        assert out["max_completion_tokens"] == 300 and "max_tokens" not in out
    for value in (0, True, "10", 1.5):
        with pytest.raises(GatewayError) as exc:
            req(max_output_tokens=value)
        bad(exc, "max_output_tokens")


def test_sampling_user_and_reasoning() -> None:
    out, ctx = req(
        temperature=0.2,
        top_p=0.9,
        user="u-1",
        safety_identifier="s-1",
        reasoning={"effort": "high", "summary": "auto"},
    )
    assert out["temperature"] == 0.2 and out["top_p"] == 0.9
    assert out["user"] == "u-1" and "safety_identifier" not in out
    assert out["reasoning_effort"] == "high" and "reasoning" not in out
    assert ctx["temperature"] == 0.2 and ctx["top_p"] == 0.9
    assert req(safety_identifier="s-1")[0]["user"] == "s-1"
    assert "reasoning_effort" not in req(reasoning={"summary": "auto"})[0]
    for kw, path in (
        ({"temperature": 3}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"user": "u" * 257}, "user"),
        ({"safety_identifier": 5}, "safety_identifier"),
        ({"reasoning": {"effort": "max"}}, "reasoning.effort"),
        ({"reasoning": "high"}, "reasoning"),
        ({"stream": "yes"}, "stream"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ):
        with pytest.raises(GatewayError) as exc:
            req(**kw)
        bad(exc, path)


def test_text_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    out, _ = req(
        text={
            "format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True},
            "verbosity": "low",
        }
    )
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    assert "verbosity" not in out
    assert req(text={"format": {"type": "json_object"}})[0]["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in req(text={"format": {"type": "text"}})[0]
    for text, path in (
        ({"format": {"type": "json_schema", "schema": schema}}, "text.format.name"),
        ({"format": {"type": "json_schema", "name": "x"}}, "text.format.schema"),
        ({"format": {"type": "yaml"}}, "text.format.type"),
        ({"format": "json"}, "text.format"),
    ):
        with pytest.raises(GatewayError) as exc:
            req(text=text)
        bad(exc, path)


def test_stream_asks_for_usage() -> None:
    out, ctx = req(stream=True, stream_options={"include_obfuscation": False})
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert ctx["stream"] is True
    out, ctx = req(stream=False)
    assert "stream" not in out and "stream_options" not in out and ctx["stream"] is False


def test_dropped_members_are_not_sent() -> None:
    out, _ = req(
        metadata={"k": "v"},
        store=True,
        service_tier="flex",
        truncation="auto",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        max_tool_calls=3,
        background=False,
        top_logprobs=0,
        include=["reasoning.encrypted_content", "web_search_call.action.sources"],
        previous_response_id=None,
    )
    assert set(out) == {"model", "messages"}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"previous_response_id": "resp_abc"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"background": True}, "background"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"include": ["reasoning.encrypted_content", "new.thing"]}, "include[1]"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        ({"x" * 100: 1}, "x" * 64),
    ],
)
def test_untranslatable_members_are_refused(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(Untranslatable) as exc:
        req(**kw)
    refused(exc, field)


def test_stateful_refusals_say_why() -> None:
    with pytest.raises(Untranslatable) as exc:
        req(previous_response_id="resp_1")
    assert "keeps no response state" in str(exc.value)


def test_context_is_small_and_carries_no_prompt_text() -> None:
    secret = "TOP-SECRET-INSTRUCTIONS"
    _, ctx = tx.request(
        {
            "model": "ü" * 5000,
            "instructions": secret,
            "input": [user(secret), fcall(secret[:20]), fout(secret[:20], secret)],
            "tools": [{"type": "function", "name": "tool_" + "x" * 59, "description": secret}],
            "tool_choice": {"type": "function", "name": "tool_" + "x" * 59},
            "max_output_tokens": 10**12,
            "temperature": 1.5,
            "top_p": 0.5,
            "parallel_tool_calls": False,
            "stream": True,
        },
        "m",
    )
    text = json.dumps(ctx, ensure_ascii=False)
    assert secret not in text and "TOP-SECRET" not in text
    assert len(ctx["model"]) == 256
    assert len(text.encode()) < 1024


def test_request_does_not_modify_the_client_body() -> None:
    body = {
        "model": "m",
        "instructions": "x",
        "input": [user([{"type": "input_text", "text": "a"}]), fcall(), fout()],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    }
    before = copy.deepcopy(body)
    tx.request(body, "m")
    assert body == before


# ---------------------------------------------------------------- response


def chat_reply(message: dict[str, Any], finish: str = "stop", **kw: Any) -> dict[str, Any]:
    out = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700,
        "model": "llama-3-70b",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
    out.update(kw)
    return out


def resp(body: dict[str, Any], ctx: dict[str, Any] = CTX) -> dict[str, Any]:
    out = tx.response(body, ctx)
    Response.model_validate(out)
    json.dumps(out)
    return out


def test_text_reply() -> None:
    out = resp(chat_reply({"role": "assistant", "content": "Hello"}))
    assert out["id"] == "resp_chatcmpl-abc" and out["object"] == "response"
    assert out["created_at"] == 1700 and out["model"] == "llama-3-70b"
    assert out["status"] == "completed" and out["error"] is None
    assert out["incomplete_details"] is None
    assert out["output"] == [
        {
            "id": "msg_chatcmpl-abc",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        }
    ]
    assert out["usage"] == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 17,
    }
    assert out["tools"] == [] and out["tool_choice"] == "auto" and out["parallel_tool_calls"]


def test_echoes_from_the_context() -> None:
    ctx = CTX | {
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
        "temperature": 0.3,
        "top_p": 0.8,
        "max_output_tokens": 99,
    }
    out = resp(chat_reply({"role": "assistant", "content": "x"}), ctx)
    assert out["tool_choice"] == {"type": "function", "name": "f"}
    assert out["parallel_tool_calls"] is False
    assert (out["temperature"], out["top_p"], out["max_output_tokens"]) == (0.3, 0.8, 99)
    # hostile context values fall back to defaults
    out = resp(chat_reply({"role": "assistant", "content": "x"}), {"tool_choice": 5, "top_p": "x"})
    assert out["tool_choice"] == "auto" and out["top_p"] is None and out["model"] == "llama-3-70b"


def test_tool_calls_reasoning_and_usage_details() -> None:
    out = resp(
        chat_reply(
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "thinking hard",
                "tool_calls": [
                    tool_call("call_a", "get_weather", '{"city":"Paris"}'),
                    tool_call("call_b", "noop", ""),
                ],
            },
            "tool_calls",
            usage={
                "prompt_tokens": 100,
                "completion_tokens": 40,
                "total_tokens": 140,
                "prompt_tokens_details": {"cached_tokens": 64},
                "completion_tokens_details": {"reasoning_tokens": 30},
            },
        )
    )
    assert out["status"] == "completed"
    assert out["output"] == [
        {
            "id": "rs_chatcmpl-abc",
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "thinking hard"}],
        },
        {
            "id": "fc_chatcmpl-abc_0",
            "type": "function_call",
            "status": "completed",
            "arguments": '{"city":"Paris"}',
            "call_id": "call_a",
            "name": "get_weather",
        },
        {
            "id": "fc_chatcmpl-abc_1",
            "type": "function_call",
            "status": "completed",
            "arguments": "{}",
            "call_id": "call_b",
            "name": "noop",
        },
    ]
    assert out["usage"]["input_tokens"] == 100  # both APIs count cached tokens in input
    assert out["usage"]["input_tokens_details"]["cached_tokens"] == 64
    assert out["usage"]["output_tokens_details"]["reasoning_tokens"] == 30


def test_reasoning_field_deepseek_cache_and_part_content() -> None:
    out = resp(
        chat_reply(
            {"role": "assistant", "reasoning": "r", "content": [{"type": "text", "text": "hi"}]},
            usage={"prompt_tokens": 10, "completion_tokens": 2, "prompt_cache_hit_tokens": 8},
        )
    )
    assert out["output"][0]["summary"][0]["text"] == "r"
    assert out["output"][1]["content"][0]["text"] == "hi"
    assert out["usage"]["input_tokens_details"]["cached_tokens"] == 8
    assert out["usage"]["total_tokens"] == 12


@pytest.mark.parametrize(
    ("finish", "status", "reason"),
    [
        ("stop", "completed", None),
        ("tool_calls", "completed", None),
        ("function_call", "completed", None),
        (None, "completed", None),
        ("length", "incomplete", "max_output_tokens"),
        ("content_filter", "incomplete", "content_filter"),
    ],
)
def test_finish_reason_to_status(finish: Any, status: str, reason: str | None) -> None:
    out = resp(chat_reply({"role": "assistant", "content": "partial"}, finish))
    assert out["status"] == status
    assert out["incomplete_details"] == (None if reason is None else {"reason": reason})
    expected = "completed" if status == "completed" else "incomplete"
    assert out["output"][0]["status"] == expected


def test_refusal_becomes_a_refusal_part() -> None:
    out = resp(chat_reply({"role": "assistant", "content": None, "refusal": "No."}, "stop"))
    assert out["output"][0]["content"] == [{"type": "refusal", "refusal": "No."}]


def test_empty_reply_and_no_usage() -> None:
    out = resp(chat_reply({"role": "assistant", "content": ""}, usage=None))
    assert out["output"] == [] and out["usage"] is None


def test_missing_ids_are_derived_deterministically() -> None:
    body = chat_reply(
        {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, "tool_calls"
    )
    del body["id"]
    body["id"] = "<script>"
    out = resp(body)
    assert out["id"] == "resp_script"
    assert out["output"][0]["call_id"] == "call_script_0"
    assert json.dumps(resp(body)) == json.dumps(out)


@pytest.mark.parametrize(
    "body",
    [{}, {"choices": []}, {"choices": ["x"]}, {"choices": [{"message": "x"}]}],
)
def test_malformed_provider_reply_is_502(body: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as exc:
        tx.response(body, CTX)
    assert exc.value.status == 502


# ---------------------------------------------------------------- stream


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **kw: Any) -> Any:
    out: dict[str, Any] = {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700,
        "model": "llama-3-70b",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    out.update(kw)
    return out


def usage_chunk(prompt: int = 12, completion: int = 5, **details: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    return chunk(choices=[], usage=usage | details)


def tc(index: int, ident: str | None = None, name: str | None = None, args: str = "") -> Any:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if ident is not None:
        call |= {"id": ident, "type": "function"}
        call["function"]["name"] = name
    return {"tool_calls": [call]}


def run(events: list[Any], ctx: dict[str, Any] = SCTX, end: bool = True) -> list[SseOut]:
    s = tx.stream(ctx)
    out: list[SseOut] = []
    for data in events:
        out += s.event(None, data)
    if end:
        out += s.end()
    check_grammar(out)
    return out


def check_grammar(out: list[SseOut]) -> None:
    """Every event is an SDK event, named as its type, numbered 0.., created first, one
    terminal event last, no [DONE]; the SDK's accumulator follows it."""
    types = []
    for n, (name, data) in enumerate(out):
        assert isinstance(data, dict), data
        EVENT.validate_python(data)
        assert name == data["type"] and data["sequence_number"] == n
        types.append(data["type"])
    assert types[:2] == ["response.created", "response.in_progress"]
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert types[-1] in terminal and not terminal & set(types[:-1])
    for name, data in out:
        if name in ("response.created", "response.in_progress"):
            assert isinstance(data, dict) and data["response"]["status"] == "in_progress"
    sdk_events(out)


def sdk_events(out: list[SseOut]) -> ResponseStream[Any]:
    """The SDK's own stream helper reading the framed bytes (raises on grammar it rejects)."""
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9/v1")
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/responses")
    response = httpx2.Response(200, content=encode(out), request=request)
    raw: Stream[Any] = Stream(cast_to=ResponseStreamEvent, response=response, client=client)  # type: ignore[arg-type]
    helper: ResponseStream[Any] = ResponseStream(
        raw_stream=raw, text_format=omit, input_tools=omit, starting_after=None
    )
    list(helper)
    return helper


def types(out: list[SseOut]) -> list[str]:
    return [name or "" for name, _ in out]


def final(out: list[SseOut]) -> dict[str, Any]:
    data = out[-1][1]
    assert isinstance(data, dict)
    response: dict[str, Any] = data["response"]
    return response


def merge(out: list[SseOut]) -> list[dict[str, Any]]:
    """Rebuild output items from added + delta events only (what a delta consumer sees)."""
    items: dict[int, dict[str, Any]] = {}
    for name, data in out:
        assert isinstance(data, dict)
        if name == "response.output_item.added":
            items[data["output_index"]] = copy.deepcopy(data["item"])
        elif name == "response.content_part.added":
            items[data["output_index"]]["content"].append(copy.deepcopy(data["part"]))
        elif name == "response.output_text.delta":
            items[data["output_index"]]["content"][data["content_index"]]["text"] += data["delta"]
        elif name == "response.refusal.delta":
            part = items[data["output_index"]]["content"][data["content_index"]]
            part["refusal"] += data["delta"]
        elif name == "response.reasoning_summary_part.added":
            items[data["output_index"]]["summary"].append(copy.deepcopy(data["part"]))
        elif name == "response.reasoning_summary_text.delta":
            items[data["output_index"]]["summary"][data["summary_index"]]["text"] += data["delta"]
        elif name == "response.function_call_arguments.delta":
            items[data["output_index"]]["arguments"] += data["delta"]
        elif name == "response.output_item.done":
            status = data["item"].get("status")
            if status is not None:
                items[data["output_index"]]["status"] = status
    return [items[i] for i in sorted(items)]


TEXT = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
]
TEXT_STREAM = [*TEXT, chunk({}, "stop"), usage_chunk(), "[DONE]"]


def test_text_stream_grammar_and_reassembly() -> None:
    out = run(TEXT_STREAM)
    assert types(out) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final(out) == tx.response(chat_reply({"role": "assistant", "content": "Hello"}), SCTX)
    assert merge(out) == final(out)["output"]
    helper = sdk_events(out)
    got = helper.get_final_response()
    assert got.output_text == "Hello" and got.usage is not None and got.usage.total_tokens == 17


PARALLEL = [
    chunk({"role": "assistant", "content": None, "reasoning_content": "let me"}),
    chunk({"reasoning_content": " think"}),
    chunk({"content": "Checking."}),
    chunk(tc(0, "call_a", "get_weather")),
    chunk(tc(1, "call_b", "get_time", '{"tz"')),
    chunk(tc(0, args='{"city":')),
    chunk(tc(1, args=':"CET"}')),
    chunk(tc(0, args='"Paris"}')),
    chunk(tc(2, "call_c", "noop")),
    chunk({}, "tool_calls"),
    usage_chunk(20, 9, completion_tokens_details={"reasoning_tokens": 3}),
    "[DONE]",
]
PARALLEL_JSON = chat_reply(
    {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "let me think",
        "tool_calls": [
            tool_call("call_a", "get_weather", '{"city":"Paris"}'),
            tool_call("call_b", "get_time", '{"tz":"CET"}'),
            tool_call("call_c", "noop", ""),
        ],
    },
    "tool_calls",
    usage={
        "prompt_tokens": 20,
        "completion_tokens": 9,
        "total_tokens": 29,
        "completion_tokens_details": {"reasoning_tokens": 3},
    },
)


def test_parallel_interleaved_tool_calls_with_reasoning_and_text() -> None:
    out = run(PARALLEL)
    assert final(out) == tx.response(PARALLEL_JSON, SCTX)
    assert merge(out) == final(out)["output"]
    # one item at a time, in output_index order
    seen: list[int] = []
    open_item = None
    for name, data in out:
        assert isinstance(data, dict)
        if name == "response.output_item.added":
            assert open_item is None
            open_item = data["output_index"]
            seen.append(open_item)
        elif "output_index" in data:
            assert data["output_index"] == open_item, (name, data)
        if name == "response.output_item.done":
            open_item = None
    assert seen == [0, 1, 2, 3, 4]
    # the first tool call streamed live, before the finish; the others came whole after it
    first_args = [
        d for n, d in out if n == "response.function_call_arguments.delta"
    ]  # fmt: skip
    assert [d["delta"] for d in first_args if isinstance(d, dict)] == [
        '{"city":',
        '"Paris"}',
        '{"tz":"CET"}',
        "{}",
    ]
    sdk = sdk_events(out).get_final_response()
    assert [i.type for i in sdk.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
        "function_call",
    ]


def test_tool_arguments_in_one_piece_and_content_with_finish() -> None:
    out = run(
        [
            chunk({"role": "assistant", "content": "a"}),
            chunk({"content": "b"}, "stop"),  # content and finish in one chunk
            "[DONE]",
        ]
    )
    assert final(out)["output"][0]["content"][0]["text"] == "ab"
    assert final(out)["usage"] is None  # no usage chunk: null, not zeros
    out = run(
        [
            chunk({"role": "assistant", **tc(0, "call_a", "f", '{"x":1}')}),
            chunk({}, "tool_calls"),
            usage_chunk(),
            "[DONE]",
        ]
    )
    assert merge(out)[0]["arguments"] == '{"x":1}'
    assert final(out)["output"][0]["call_id"] == "call_a"


def test_empty_completion() -> None:
    out = run([chunk({"role": "assistant", "content": ""}), chunk({}, "stop"), usage_chunk(3, 0)])
    assert types(out)[2:] == ["response.completed"]
    assert final(out)["output"] == [] and final(out)["status"] == "completed"


def test_refusal_and_content_filter() -> None:
    out = run(
        [
            chunk({"role": "assistant", "content": "Sure"}),
            chunk({"refusal": "I can't"}),
            chunk({"refusal": " help."}),
            chunk({}, "content_filter"),
            usage_chunk(),
        ]
    )
    assert "response.refusal.delta" in types(out) and "response.refusal.done" in types(out)
    got = final(out)
    assert got["status"] == "incomplete"
    assert got["incomplete_details"] == {"reason": "content_filter"}
    assert types(out)[-1] == "response.incomplete"
    assert got["output"][0]["content"] == [
        {"type": "output_text", "text": "Sure", "annotations": []},
        {"type": "refusal", "refusal": "I can't help."},
    ]
    assert merge(out) == got["output"]
    assert got == tx.response(
        chat_reply(
            {"role": "assistant", "content": "Sure", "refusal": "I can't help."},
            "content_filter",
        ),
        SCTX,
    )


def test_length_stop_is_incomplete() -> None:
    out = run([*TEXT, chunk({}, "length"), usage_chunk(), "[DONE]"])
    got = final(out)
    assert types(out)[-1] == "response.incomplete"
    assert got["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got["output"][0]["status"] == "incomplete"
    assert got == tx.response(chat_reply({"role": "assistant", "content": "Hello"}, "length"), SCTX)


def test_terminal_waits_for_the_usage_chunk_and_ignores_what_follows() -> None:
    s = tx.stream(SCTX)
    out: list[SseOut] = []
    for data in [*TEXT, chunk({}, "stop")]:
        out += s.event(None, data)
    assert types(out)[-1] == "response.output_item.done"  # items closed, terminal held
    out += s.event(None, usage_chunk())
    assert types(out)[-1] == "response.completed"
    assert s.event(None, "[DONE]") == [] and s.end() == []
    assert s.event(None, chunk({"content": "late"})) == []
    check_grammar(out)


def test_usage_on_the_finish_chunk_then_done_and_end_without_done() -> None:
    finish = chunk({}, "stop", usage={"prompt_tokens": 4, "completion_tokens": 2})
    out = run([*TEXT, finish, "[DONE]"])
    assert final(out)["usage"]["total_tokens"] == 6
    out = run([*TEXT, chunk({}, "stop")])  # end() after finish without [DONE]: completed
    assert types(out)[-1] == "response.completed"


def test_done_without_finish_counts_as_stop() -> None:
    out = run([*TEXT, "[DONE]"])
    assert types(out)[-1] == "response.completed"


def test_ping_and_unknown_strings_are_ignored() -> None:
    s = tx.stream(SCTX)
    assert s.event("ping", {"type": "ping"}) == []
    assert s.event(None, "keep-alive") == []
    out = run([*TEXT, {"type": "ping"}, chunk({}, "stop"), usage_chunk()])
    assert final(out)["output"][0]["content"][0]["text"] == "Hello"


def test_provider_error_after_200_is_error_then_failed() -> None:
    s = tx.stream(SCTX)
    out: list[SseOut] = []
    for data in TEXT:
        out += s.event(None, data)
    out += s.event(None, {"error": {"message": "overloaded", "type": "server_error"}})
    assert s.end() == [] and s.event(None, chunk({"content": "x"})) == []
    check_grammar(out)
    assert types(out)[-2:] == ["error", "response.failed"]
    err = out[-2][1]
    assert isinstance(err, dict)
    assert err["code"] == "server_error" and err["message"] == "overloaded"
    got = final(out)
    assert got["status"] == "failed"
    assert got["error"] == {"code": "server_error", "message": "overloaded"}
    assert got["output"][0]["content"][0]["text"] == "Hello"  # what came before is kept
    with pytest.raises(RuntimeError):
        sdk_events(out).get_final_response()


def test_rate_limit_error_code_and_error_before_any_chunk() -> None:
    out = run([{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}], end=False)
    assert types(out) == ["response.created", "response.in_progress", "error", "response.failed"]
    assert final(out)["error"]["code"] == "rate_limit_exceeded"
    s = tx.stream(SCTX)
    out = s.event("error", {"message": "x" * 5000})
    assert len(final(out)["error"]["message"]) == 1000


def test_stream_ending_early_is_a_failure() -> None:
    out = run([*TEXT, chunk(tc(0, "call_a", "f", '{"a"'))])
    assert types(out)[-2:] == ["error", "response.failed"]
    assert "ended early" in final(out)["error"]["message"]
    out = run([])
    assert types(out) == ["response.created", "response.in_progress", "error", "response.failed"]


def test_call_without_arguments_gets_an_empty_object() -> None:
    out = run([chunk({"role": "assistant", **tc(0, "call_a", "noop")}), chunk({}, "tool_calls")])
    assert merge(out)[0]["arguments"] == "{}"
    assert final(out)["output"][0]["arguments"] == "{}"


def test_stray_arguments_are_ignored_and_a_new_id_on_an_index_is_a_new_call() -> None:
    out = run(
        [
            chunk({"role": "assistant", **tc(0, args='{"lost":1}')}),
            chunk(tc(0, "call_a", "f", "{}")),
            chunk(tc(0, "call_b", "g", '{"b":1}')),  # Gemini-style: every call on index 0
            chunk({}, "tool_calls"),
        ]
    )
    calls = final(out)["output"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        ("call_a", "f", "{}"),
        ("call_b", "g", '{"b":1}'),
    ]
    assert merge(out) == calls


def test_text_after_a_tool_call_is_a_later_message_item() -> None:
    out = run(
        [
            chunk({"role": "assistant", "content": "first"}),
            chunk(tc(0, "call_a", "f", "{}")),
            chunk({"content": "after"}),
            chunk({}, "tool_calls"),
        ]
    )
    got = final(out)["output"]
    assert [(i["type"], i["id"]) for i in got] == [
        ("message", "msg_chatcmpl-abc"),
        ("function_call", "fc_chatcmpl-abc_0"),
        ("message", "msg_chatcmpl-abc_1"),
    ]
    assert merge(out) == got


def test_stream_is_deterministic() -> None:
    assert encode(run(PARALLEL)) == encode(run(PARALLEL))


def test_output_through_the_sse_layer_has_no_done() -> None:
    raw = encode(run(PARALLEL)).decode()
    assert "[DONE]" not in raw
    assert raw.startswith("event: response.created\ndata: {")


def test_a_null_error_member_is_not_an_error() -> None:
    out = run([chunk({"role": "assistant", "content": "ok"}, error=None), chunk({}, "stop")])
    assert types(out)[-1] == "response.completed"
