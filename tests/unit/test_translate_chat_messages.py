"""OpenAI Chat client -> Anthropic Messages provider (``translate/chat_messages.py``).

Replies are checked with the openai SDK's own types (``ChatCompletion``,
``ChatCompletionChunk``), streams with the SDK's chunk accumulator and its SSE reader (which
raises on an error chunk), and provider bodies with the anthropic SDK's request TypedDict.
Anthropic event sequences follow the streaming docs: message_start, content_block_start, ping,
content_block_delta..., content_block_stop, message_delta, message_stop.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from openai._streaming import Stream
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from plano_extproc.errors import GatewayError
from plano_extproc.translate import chat_messages as tx
from plano_extproc.translate.base import SseOut, Untranslatable

ANTHROPIC_BODY = TypeAdapter(MessageCreateParamsNonStreaming)
CTX: dict[str, Any] = {"stream": False, "model": "gpt-4o", "include_usage": False, "created": 1700}
SCTX: dict[str, Any] = {"stream": True, "model": "gpt-4o", "include_usage": True, "created": 1700}


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    b.update(kw)
    return b


def req(**kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    out, ctx = tx.request(body(**kw), "claude-sonnet-4-5")
    ANTHROPIC_BODY.validate_python({k: v for k, v in out.items() if k != "stream"})
    return out, ctx


def msgs(*messages: Any, **kw: Any) -> dict[str, Any]:
    return req(messages=list(messages), **kw)[0]


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def call(ident: str, name: str = "get_weather", args: str = '{"city":"Paris"}') -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": args}}


def tool_msg(ident: str, content: Any = "22C") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": ident, "content": content}


def bad(message_part: str, **kw: Any) -> GatewayError:
    with pytest.raises(GatewayError) as exc:
        tx.request(body(**kw), "claude-x")
    err = exc.value
    assert err.status == 400 and not isinstance(err, Untranslatable), err.message
    assert message_part in err.message, err.message
    return err


def refused(field: str, **kw: Any) -> Untranslatable:
    with pytest.raises(Untranslatable) as exc:
        tx.request(body(**kw), "claude-x")
    assert exc.value.status == 400
    assert exc.value.field == field and f"'{field}'" in exc.value.message, exc.value.message
    return exc.value


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

# --------------------------------------------------------------------------- request


def test_module_is_the_pair() -> None:
    assert tx.client.value == "chat_completions" and tx.provider.value == "messages"


def test_minimal_request_default_max_tokens_and_context() -> None:
    out, ctx = req()
    assert out == {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": [text("hi")]}],
        "max_tokens": tx.DEFAULT_MAX_TOKENS,
    }
    assert tx.DEFAULT_MAX_TOKENS == 4096
    assert ctx["stream"] is False and ctx["model"] == "gpt-4o" and ctx["include_usage"] is False
    assert isinstance(ctx["created"], int) and ctx["created"] > 0
    assert len(json.dumps(ctx)) < 1024


def test_context_is_small_even_for_a_huge_model_name() -> None:
    _, ctx = req(model="m" * 100_000)
    assert len(ctx["model"]) == 256 and len(json.dumps(ctx)) < 1024


def test_every_system_and_developer_message_is_hoisted_in_order() -> None:
    out = msgs(
        {"role": "system", "content": "be brief"},
        user("hi"),
        {"role": "developer", "content": [text("be kind"), text("  "), text("use SI")]},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "late rule", "name": "ops"},
        user("weather?"),
    )
    assert out["system"] == [text("be brief"), text("be kind"), text("use SI"), text("late rule")]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]


def test_no_system_member_when_there_is_no_system_text() -> None:
    out = msgs({"role": "system", "content": " \n"}, user("hi"))
    assert "system" not in out


def test_user_parts_text_and_images() -> None:
    out = msgs(
        user(
            [
                text("look"),
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                {"type": "image_url", "image_url": {"url": "data:IMAGE/WEBP;base64,UklG"}},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://x.test/c.gif", "detail": "low"},
                },
                {"type": "image_url", "image_url": "http://x.test/d.jpg"},
            ]
        )
    )
    assert out["messages"][0]["content"] == [
        text("look"),
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "UklG"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/c.gif"}},
        {"type": "image", "source": {"type": "url", "url": "http://x.test/d.jpg"}},
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/bmp;base64,Qk0=", "messages[0].content[1].image_url.url' has image type"),
        ("data:image/png,rawbytes", "messages[0].content[1].image_url.url' must be a base64"),
        ("data:image/png;base64,", "messages[0].content[1].image_url.url' must be a base64"),
        ("ftp://x.test/a.png", "messages[0].content[1].image_url.url' must be an http(s)"),
        ("file:///etc/passwd", "messages[0].content[1].image_url.url' must be an http(s)"),
    ],
)
def test_bad_image_urls_are_400_naming_the_part(url: str, message: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    bad(message, messages=[user([text("x"), part])])


def test_image_url_wrong_types_are_400() -> None:
    bad(
        "messages[0].content[0].image_url' must be an object",
        messages=[user([{"type": "image_url", "image_url": 7}])],
    )
    bad(
        "messages[0].content[0].image_url.url' must be a string",
        messages=[user([{"type": "image_url", "image_url": {"url": None}}])],
    )


@pytest.mark.parametrize("kind", ["input_audio", "file"])
def test_audio_and_file_parts_are_untranslatable(kind: str) -> None:
    part = {"type": kind, kind: {"data": "AAAA", "format": "wav"}}
    refused("messages[0].content[1]", messages=[user([text("x"), part])])


def test_assistant_text_and_tool_calls() -> None:
    out = msgs(
        user("weather?"),
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("call_1")]},
        tool_msg("call_1"),
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [
            text("Checking."),
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }


@pytest.mark.parametrize("content", ["", None, [], [text("")]])
def test_assistant_empty_content_with_tool_calls_has_no_text_block(content: Any) -> None:
    out = msgs(
        user("weather?"),
        {"role": "assistant", "content": content, "tool_calls": [call("call_1", args="")]},
        tool_msg("call_1"),
    )
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    ]


def test_assistant_refusal_becomes_text_and_echoed_reasoning_is_dropped() -> None:
    out = msgs(
        user("a"),
        {
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "I can't."}],
            "reasoning_content": "secret chain",
            "annotations": [],
            "name": "bot",
        },
        user("b"),
        {"role": "assistant", "content": None, "refusal": "No."},
        user("c"),
    )
    assert out["messages"][1]["content"] == [text("I can't.")]
    assert out["messages"][3]["content"] == [text("No.")]
    assert "secret chain" not in json.dumps(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{not json", "does not parse"),
        ("[1, 2]", "must be a JSON object"),
        ('"str"', "must be a JSON object"),
        ({"city": "Paris"}, "must be a string"),
    ],
)
def test_bad_tool_call_arguments_are_400_naming_the_field(args: Any, message: str) -> None:
    history = [
        user("w?"),
        {"role": "assistant", "content": None, "tool_calls": [call("c1"), call("c2", args=args)]},
        tool_msg("c1"),
        tool_msg("c2"),
    ]
    err = bad("messages[1].tool_calls[1].function.arguments", messages=history)
    assert message in err.message


def test_tool_call_shape_errors() -> None:
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function"}],
    }
    bad(
        "messages[1].tool_calls[0].function' must be an object",
        messages=[user("x"), assistant, tool_msg("c")],
    )
    nameless = {"role": "assistant", "tool_calls": [call("c", name="bad name!")]}
    bad("messages[1].tool_calls[0].function.name", messages=[user("x"), nameless, tool_msg("c")])
    idless = {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    bad("messages[1].tool_calls[0].id", messages=[user("x"), idless, tool_msg("c")])
    custom = {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {}}]}
    refused("messages[1].tool_calls[0].type", messages=[user("x"), custom, tool_msg("c")])
    bad(
        "messages[1].tool_calls' must be an array",
        messages=[user("x"), {"role": "assistant", "tool_calls": {}}],
    )


def test_parallel_tool_results_aggregate_and_the_next_user_message_joins_them() -> None:
    out = msgs(
        {"role": "system", "content": "sys"},
        user("weather in Paris and Tokyo?"),
        {"role": "assistant", "content": None, "tool_calls": [call("c_1"), call("c_2")]},
        tool_msg("c_1", "22C"),
        tool_msg("c_2", [text("30C"), text("humid")]),
        user("and tomorrow?"),
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c_1", "content": "22C"},
        {"type": "tool_result", "tool_use_id": "c_2", "content": [text("30C"), text("humid")]},
        text("and tomorrow?"),
    ]


def test_tool_results_go_first_in_their_user_turn() -> None:
    out = msgs(
        user("w?"),
        {"role": "assistant", "tool_calls": [call("c_1")]},
        user("hurry"),
        tool_msg("c_1", ""),
    )
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c_1"},
        text("hurry"),
    ]


def test_consecutive_same_role_messages_merge_and_empty_ones_vanish() -> None:
    out = msgs(
        user("one"),
        user(""),
        user([text("two")]),
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "b"},
        user("three"),
    )
    assert out["messages"] == [
        {"role": "user", "content": [text("one"), text("two")]},
        {"role": "assistant", "content": [text("a"), text("b")]},
        {"role": "user", "content": [text("three")]},
    ]


def test_tool_ids_are_sanitised_the_same_on_call_and_result() -> None:
    odd = "call.1/ü:" + "x" * 10
    long = "call_" + "a" * 200
    out = msgs(
        user("w?"),
        {"role": "assistant", "tool_calls": [call(odd), call(long), call("call_OK-1")]},
        tool_msg(odd),
        tool_msg(long),
        tool_msg("call_OK-1"),
    )
    uses = [b["id"] for b in out["messages"][1]["content"]]
    results = [b["tool_use_id"] for b in out["messages"][2]["content"]]
    assert uses == results
    assert uses[2] == "call_OK-1"
    for ident in uses:
        assert ident.replace("_", "").replace("-", "").isalnum() and len(ident) <= 64
    assert uses[0] != uses[1] and uses[0].startswith("toolu_")
    again = msgs(user("w?"), {"role": "assistant", "tool_calls": [call(odd)]}, tool_msg(odd))
    assert again["messages"][1]["content"][0]["id"] == uses[0]  # deterministic


def test_trailing_assistant_message_is_refused() -> None:
    refused("messages[1]", messages=[user("hi"), {"role": "assistant", "content": "Sure, "}])
    refused(
        "messages[1]",
        messages=[
            user("hi"),
            {"role": "assistant", "content": "x"},
            {"role": "system", "content": "s"},
        ],
    )


def test_message_list_errors() -> None:
    bad("'messages' must be an array", messages="hi")
    bad("at least one message", messages=[])
    bad("user message with content", messages=[{"role": "system", "content": "s"}])
    bad("'messages[0]' must be an object", messages=["hi"])
    bad("'messages[0].role' must be one of", messages=[{"role": "god", "content": "x"}])
    bad("'messages[0].content' must be an array", messages=[{"role": "user", "content": 5}])
    bad(
        "'messages[0].content[0].text' must be a string",
        messages=[user([{"type": "text", "text": 1}])],
    )
    bad("'messages[0].content[0].type' must be one of", messages=[user([{"type": "video"}])])
    bad(
        "'messages[0].content[0].type' must be text",
        messages=[{"role": "system", "content": [{"type": "image_url"}]}],
    )
    bad(
        "'messages[1].tool_call_id' must be a string",
        messages=[user("x"), {"role": "tool", "content": "r"}],
    )
    refused("messages[0].role", messages=[{"role": "function", "name": "f", "content": "x"}])
    refused("messages[0].audio", messages=[{"role": "user", "content": "x", "audio": {"id": "a"}}])
    refused(
        "messages[1].function_call",
        messages=[user("x"), {"role": "assistant", "function_call": {"name": "f"}}, user("y")],
    )


def test_hostile_keys_are_bounded_in_messages() -> None:
    err = refused(
        "messages[0]." + "k" * 64, messages=[{"role": "user", "content": "x", "k" * 5000: 1}]
    )
    assert len(err.message) < 300
    err2 = refused("k" * 64, **{"k" * 5000: 1})
    assert len(err2.message) < 300


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 200}, 200),
        ({"max_completion_tokens": 200, "max_tokens": 100}, 200),
        ({"max_tokens": None}, 4096),
    ],
)
def test_max_tokens(given: dict[str, Any], expected: int) -> None:
    assert req(**given)[0]["max_tokens"] == expected


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_bad_max_tokens(value: Any) -> None:
    bad("'max_tokens' must be an integer >= 1", max_tokens=value)


@pytest.mark.parametrize(("given", "sent"), [(0, 0), (0.5, 0.5), (1, 1), (1.5, 1.0), (2, 1.0)])
def test_temperature_clamped_to_anthropics_range(given: float, sent: float) -> None:
    assert req(temperature=given)[0]["temperature"] == sent


@pytest.mark.parametrize("value", [-0.1, 2.5, "hot", True])
def test_bad_temperature(value: Any) -> None:
    bad("'temperature' must be a number from 0 to 2", temperature=value)


def test_top_p_and_stop() -> None:
    out, _ = req(top_p=0.9, stop="END")
    assert out["top_p"] == 0.9 and out["stop_sequences"] == ["END"]
    assert req(stop=["a", "b"])[0]["stop_sequences"] == ["a", "b"]
    assert "stop_sequences" not in req(stop=[])[0]
    bad("'top_p' must be a number from 0 to 1", top_p=1.5)
    bad("'stop[1]' must be a string", stop=["a", 3])
    bad("'stop[0]' must not be blank", stop=[" "])
    bad("'stop' must not be blank", stop="")
    bad("'stop' must have at most 64", stop=["x"] * 65)
    bad("'stop' must be an array", stop={"a": 1})


def test_tools_mapping() -> None:
    strict = {"type": "function", "function": {"name": "noargs", "strict": True}}
    out, _ = req(tools=[WEATHER, strict])
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "noargs", "input_schema": {"type": "object", "properties": {}}, "strict": True},
    ]
    assert "tools" not in req(tools=[])[0]


def test_tool_definition_errors() -> None:
    refused("tools[0].type", tools=[{"type": "custom", "custom": {"name": "x"}}])
    refused("tools[1].type", tools=[WEATHER, {"type": "web_search"}])
    bad(
        "'tools[0].function.name' must be 1-64",
        tools=[{"type": "function", "function": {"name": "a b"}}],
    )
    bad(
        "'tools[0].function.name' must be 1-64",
        tools=[{"type": "function", "function": {"name": "a" * 65}}],
    )
    bad(
        "'tools[0].function.parameters' must be an object",
        tools=[{"type": "function", "function": {"name": "a", "parameters": []}}],
    )
    bad(
        "'tools[0].function.strict' must be a boolean",
        tools=[{"type": "function", "function": {"name": "a", "strict": "yes"}}],
    )
    bad("'tools' must be an array", tools={"a": 1})


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice(choice: Any, sent: dict[str, Any]) -> None:
    assert req(tools=[WEATHER], tool_choice=choice)[0]["tool_choice"] == sent


def test_tool_choice_errors_and_without_tools() -> None:
    assert "tool_choice" not in req(tool_choice="required")[0]
    refused(
        "tool_choice.type",
        tools=[WEATHER],
        tool_choice={"type": "allowed_tools", "allowed_tools": {}},
    )
    bad("'tool_choice' must be auto, required, none", tools=[WEATHER], tool_choice="always")
    bad(
        "'tool_choice.function.name'",
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {}},
    )


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        ),
        ("none", {"type": "none"}),
    ],
)
def test_parallel_tool_calls_false(choice: Any, sent: dict[str, Any]) -> None:
    out, _ = req(tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False)
    assert out["tool_choice"] == sent


def test_parallel_tool_calls_true_or_without_tools_adds_nothing() -> None:
    assert "tool_choice" not in req(tools=[WEATHER], parallel_tool_calls=True)[0]
    assert "tool_choice" not in req(parallel_tool_calls=False)[0]
    bad("'parallel_tool_calls' must be a boolean", parallel_tool_calls="no")


def test_user_to_metadata_user_id() -> None:
    assert req(user="u-1")[0]["metadata"] == {"user_id": "u-1"}
    assert req(safety_identifier="s-1")[0]["metadata"] == {"user_id": "s-1"}
    assert req(user="u-1", safety_identifier="s-1")[0]["metadata"] == {"user_id": "u-1"}
    assert "metadata" not in req(user="")[0]
    bad("'user' must be at most 256", user="u" * 257)
    bad("'user' must be a string", user=5)


def test_untranslatable_sampling_and_choice_members() -> None:
    assert "n" not in req(n=1)[0]
    refused("n", n=2)
    bad("'n' must be an integer >= 1", n=0)
    refused("logprobs", logprobs=True)
    assert "logprobs" not in req(logprobs=False)[0]
    refused("top_logprobs", top_logprobs=3)
    refused("logit_bias", logit_bias={"50256": -100})
    assert "logit_bias" not in req(logit_bias={})[0]
    refused("modalities[1]", modalities=["text", "audio"])
    assert "modalities" not in req(modalities=["text"])[0]
    for key, value in [
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("web_search_options", {}),
        ("x_vendor_thing", 1),
    ]:
        refused(key, **{key: value})


def test_dropped_hints_do_not_reach_anthropic() -> None:
    hints = {
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "store": True,
        "metadata": {"k": "v"},
        "prediction": {"type": "content", "content": "x"},
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "service_tier": "flex",
        "verbosity": "low",
    }
    out, _ = req(**hints)
    assert set(out) == {"model", "messages", "max_tokens"}


def test_response_format() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    assert req(response_format=fmt)[0]["output_config"] == {
        "format": {"type": "json_schema", "schema": schema}
    }
    assert "output_config" not in req(response_format={"type": "text"})[0]
    refused("response_format.type", response_format={"type": "json_object"})
    bad("'response_format.type' must be", response_format={"type": "xml"})
    bad(
        "'response_format.json_schema.schema' must be an object",
        response_format={"type": "json_schema", "json_schema": {"name": "x"}},
    )


@pytest.mark.parametrize("effort", ["minimal", "low", "medium", "high", "xhigh"])
def test_reasoning_effort_to_thinking_budget(effort: str) -> None:
    out, _ = req(reasoning_effort=effort)
    budget = tx.THINKING_BUDGETS[effort]
    assert out["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert out["max_tokens"] == budget + tx.DEFAULT_MAX_TOKENS
    assert budget >= 1024 and out["max_tokens"] <= 32000  # Opus 4's output cap


def test_reasoning_effort_within_a_client_max() -> None:
    out, _ = req(reasoning_effort="high", max_completion_tokens=5000)
    assert out["max_tokens"] == 5000 and out["thinking"]["budget_tokens"] == 4999
    out, _ = req(reasoning_effort="low", max_tokens=30000)
    assert out["thinking"]["budget_tokens"] == 2048
    refused("reasoning_effort", reasoning_effort="low", max_tokens=1024)


def test_reasoning_effort_constraints() -> None:
    assert req(reasoning_effort="none")[0]["thinking"] == {"type": "disabled"}
    out, _ = req(reasoning_effort="low", temperature=1)
    assert "temperature" not in out and out["thinking"]["type"] == "enabled"
    refused("temperature", reasoning_effort="low", temperature=0.2)
    refused("top_p", reasoning_effort="low", top_p=0.5)
    assert req(reasoning_effort="low", top_p=0.97)[0]["top_p"] == 0.97
    refused("tool_choice", reasoning_effort="low", tools=[WEATHER], tool_choice="required")
    assert req(reasoning_effort="low", tools=[WEATHER], tool_choice="auto")[0]["thinking"]
    bad("'reasoning_effort' must be one of", reasoning_effort="max")
    bad("'reasoning_effort' must be one of", reasoning_effort=3)


def test_reasoning_effort_is_left_out_when_continuing_a_tool_call() -> None:
    history = [user("w?"), {"role": "assistant", "tool_calls": [call("c")]}, tool_msg("c")]
    out, _ = req(messages=history, reasoning_effort="high", temperature=0.3)
    assert "thinking" not in out and out["temperature"] == 0.3
    assert out["max_tokens"] == tx.DEFAULT_MAX_TOKENS


def test_stream_flags_and_include_usage() -> None:
    out, ctx = req(stream=True, stream_options={"include_usage": True})
    assert out["stream"] is True and ctx["stream"] is True and ctx["include_usage"] is True
    out, ctx = req(stream=True)
    assert ctx["include_usage"] is False
    out, ctx = req(stream=False, stream_options={"include_usage": True})
    assert "stream" not in out and ctx["include_usage"] is False
    bad("'stream' must be a boolean", stream="yes")
    bad(
        "'stream_options.include_usage' must be a boolean",
        stream=True,
        stream_options={"include_usage": 1},
    )


def test_request_body_is_deterministic_and_input_untouched() -> None:
    b = body(
        messages=[
            {"role": "system", "content": "s"},
            user("w?"),
            {"role": "assistant", "tool_calls": [call("c.1")]},
            tool_msg("c.1"),
        ],
        tools=[WEATHER],
        parallel_tool_calls=False,
    )
    snapshot = json.dumps(b)
    one, _ = tx.request(b, "m")
    two, _ = tx.request(json.loads(snapshot), "m")
    assert json.dumps(one) == json.dumps(two)
    assert json.dumps(b) == snapshot


# --------------------------------------------------------------------------- response


def anthropic_message(
    content: list[dict[str, Any]], stop: str | None = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 5},
    }


def test_response_text_blocks_concatenated() -> None:
    out = tx.response(anthropic_message([text("Hello, "), text("world")]), CTX)
    ChatCompletion.model_validate(out)
    assert out["id"] == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert out["object"] == "chat.completion" and out["created"] == 1700
    assert out["model"] == "claude-sonnet-4-5-20250929"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello, world", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_response_thinking_and_tool_calls() -> None:
    blocks = [
        {"type": "thinking", "thinking": "Let me check.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "xx"},
        text("Checking."),
        {
            "type": "tool_use",
            "id": "toolu_01A",
            "name": "get_weather",
            "input": {"city": "Paris ü"},
        },
        {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}},
    ]
    out = tx.response(anthropic_message(blocks, "tool_use"), CTX)
    parsed = ChatCompletion.model_validate(out)
    msg = parsed.choices[0].message
    assert msg.content == "Checking."
    assert out["choices"][0]["message"]["reasoning_content"] == "Let me check."
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert msg.tool_calls is not None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [  # type: ignore[union-attr]
        ("toolu_01A", "get_weather", {"city": "Paris ü"}),
        ("toolu_01B", "get_time", {}),
    ]


def test_response_only_tool_calls_has_null_content_and_empty_has_empty_string() -> None:
    only = tx.response(
        anthropic_message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use"),
        CTX,
    )
    assert only["choices"][0]["message"]["content"] is None
    empty = tx.response(anthropic_message([]), CTX)
    ChatCompletion.model_validate(empty)
    assert empty["choices"][0]["message"]["content"] == ""
    assert "tool_calls" not in empty["choices"][0]["message"]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
        ("something_new", "stop"),
    ],
)
def test_response_finish_reason(stop: str | None, finish: str) -> None:
    out = tx.response(anthropic_message([text("x")], stop), CTX)
    ChatCompletion.model_validate(out)
    assert out["choices"][0]["finish_reason"] == finish


def test_response_usage_with_cache_and_thinking_tokens() -> None:
    usage = {
        "input_tokens": 60,
        "cache_read_input_tokens": 40,
        "cache_creation_input_tokens": 5,
        "output_tokens": 20,
        "output_tokens_details": {"thinking_tokens": 12},
    }
    out = tx.response(anthropic_message([text("x")], **usage), CTX)
    ChatCompletion.model_validate(out)
    assert out["usage"] == {
        "prompt_tokens": 105,
        "completion_tokens": 20,
        "total_tokens": 125,
        "prompt_tokens_details": {"cached_tokens": 40},
        "completion_tokens_details": {"reasoning_tokens": 12},
    }


def test_response_hostile_and_missing_fields() -> None:
    weird = {
        "id": "msg_<script>\n" + "a" * 500,
        "content": [
            5,
            {"type": "text", "text": 3},
            {"type": "tool_use", "name": 9, "input": [1]},
            text("ok"),
        ],
        "usage": {"input_tokens": -5, "output_tokens": "9", "cache_read_input_tokens": True},
    }
    out = tx.response(weird, {"model": "gpt-4o", "created": "soon"})
    ChatCompletion.model_validate(out)
    assert out["id"] == "chatcmpl-msg_script" + "a" * 115
    assert out["created"] == 0 and out["model"] == "gpt-4o"
    assert out["choices"][0]["message"]["content"] == "ok"
    assert out["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "",
        "arguments": "{}",
    }
    assert out["usage"]["total_tokens"] == 0
    with pytest.raises(GatewayError) as exc:
        tx.response({"content": "nope"}, CTX)
    assert exc.value.status == 502


# --------------------------------------------------------------------------- stream


def ev(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **fields}


def message_start(**usage: int) -> tuple[str, dict[str, Any]]:
    return ev(
        "message_start",
        message={
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5-20250929",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage or {"input_tokens": 25, "output_tokens": 1},
        },
    )


def block(index: int, content_block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ev("content_block_start", index=index, content_block=content_block)


def delta(index: int, **d: Any) -> tuple[str, dict[str, Any]]:
    return ev("content_block_delta", index=index, delta=d)


def stop(index: int) -> tuple[str, dict[str, Any]]:
    return ev("content_block_stop", index=index)


def end(reason: str = "end_turn", **usage: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ev(
            "message_delta",
            delta={"stop_reason": reason, "stop_sequence": None},
            usage=usage or {"output_tokens": 15},
        ),
        ev("message_stop"),
    ]


TEXT_STREAM = [
    message_start(),
    block(0, {"type": "text", "text": ""}),
    ev("ping"),
    delta(0, type="text_delta", text="Hello"),
    delta(0, type="text_delta", text="!"),
    stop(0),
    *end(),
]

THINKING_STREAM = [
    message_start(),
    block(0, {"type": "thinking", "thinking": "", "signature": ""}),
    delta(0, type="thinking_delta", thinking="Let me solve "),
    delta(0, type="thinking_delta", thinking="this."),
    delta(0, type="signature_delta", signature="EqQBCgIYAhIM1gbcDa9GJwZA"),
    stop(0),
    block(1, {"type": "text", "text": ""}),
    delta(1, type="text_delta", text="27 * 453 = 12,231"),
    stop(1),
    *end(output_tokens=40),
]

TOOLS_STREAM = [
    message_start(input_tokens=472, output_tokens=2, cache_read_input_tokens=100),
    block(0, {"type": "text", "text": ""}),
    delta(0, type="text_delta", text="Okay, let me check."),
    stop(0),
    block(
        1,
        {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    ),
    delta(1, type="input_json_delta", partial_json=""),
    delta(1, type="input_json_delta", partial_json='{"location": "San Fra'),
    ev("ping"),
    delta(1, type="input_json_delta", partial_json='ncisco, CA", "unit": "fahrenheit"}'),
    stop(1),
    block(2, {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}),
    delta(2, type="input_json_delta", partial_json='{"tz":'),
    delta(2, type="input_json_delta", partial_json=' "PST"}'),
    stop(2),
    *end("tool_use", output_tokens=89),
]


def run(
    events: list[tuple[str, Any]], ctx: dict[str, Any] = SCTX, finish: bool = True
) -> list[SseOut]:
    s = tx.stream(ctx)
    out: list[SseOut] = []
    for name, data in events:
        out += s.event(name, data)
    if finish:
        out += s.end()
    return out


def chunks(out: list[SseOut]) -> list[dict[str, Any]]:
    return [d for _, d in out if isinstance(d, dict)]


def assert_chat_grammar(out: list[SseOut], usage_chunk: bool) -> list[ChatCompletionChunk]:
    """One id/created/model, every chunk an SDK chunk, finish_reason once on the last choice
    chunk, then an optional usage chunk with no choices, then [DONE]; no event names."""
    assert all(name is None for name, _ in out)
    assert out[-1] == (None, "[DONE]")
    assert sum(1 for _, d in out if isinstance(d, str)) == 1
    datas = chunks(out)
    parsed = [ChatCompletionChunk.model_validate(d) for d in datas]
    assert len({(c.id, c.created, c.model) for c in parsed}) == 1
    assert all(c.object == "chat.completion.chunk" for c in parsed)
    assert parsed[0].choices[0].delta.role == "assistant"
    choice_chunks = [c for c in parsed if c.choices]
    finishes = [c.choices[0].finish_reason for c in choice_chunks]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] is not None
    if usage_chunk:
        assert parsed[-1].choices == [] and parsed[-1].usage is not None
        assert choice_chunks[-1] is parsed[-2]
    else:
        assert all(c.usage is None for c in parsed)
    return parsed


def reassemble(out: list[SseOut]) -> Any:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for d in chunks(out):
        state.handle_chunk(ChatCompletionChunk.model_validate(d))
    return state.get_final_completion()


def test_text_stream() -> None:
    out = run(TEXT_STREAM)
    parsed = assert_chat_grammar(out, usage_chunk=True)
    assert parsed[0].id == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert parsed[0].model == "claude-sonnet-4-5-20250929" and parsed[0].created == 1700
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == "Hello!"
    assert parsed[-2].choices[0].finish_reason == "stop"
    assert chunks(out)[-1]["usage"] == {
        "prompt_tokens": 25,
        "completion_tokens": 15,
        "total_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_no_usage_chunk_unless_asked() -> None:
    out = run(TEXT_STREAM, {**SCTX, "include_usage": False})
    assert_chat_grammar(out, usage_chunk=False)


def test_ping_alone_emits_nothing() -> None:
    s = tx.stream(SCTX)
    assert s.event("ping", {"type": "ping"}) == []


def test_thinking_stream_goes_to_reasoning_content_never_content() -> None:
    out = run(THINKING_STREAM)
    assert_chat_grammar(out, usage_chunk=True)
    deltas = [d["choices"][0]["delta"] for d in chunks(out) if d["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me solve this."
    assert "".join(d.get("content") or "" for d in deltas) == "27 * 453 = 12,231"
    assert "EqQB" not in json.dumps(out)
    final = reassemble(out)
    assert final.choices[0].message.content == "27 * 453 = 12,231"


def test_parallel_tool_use_stream() -> None:
    out = run(TOOLS_STREAM)
    parsed = assert_chat_grammar(out, usage_chunk=True)
    starts = [
        tc for c in parsed if c.choices for tc in c.choices[0].delta.tool_calls or [] if tc.id
    ]
    assert [
        (tc.index, tc.id, tc.type, tc.function.name, tc.function.arguments) for tc in starts
    ] == [  # type: ignore[union-attr]
        (0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "function", "get_weather", ""),
        (1, "toolu_02", "function", "get_time", ""),
    ]
    final = reassemble(out)
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (
            "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "get_weather",
            {"location": "San Francisco, CA", "unit": "fahrenheit"},
        ),
        ("toolu_02", "get_time", {"tz": "PST"}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.prompt_tokens == 572
    assert final.usage.prompt_tokens_details is not None
    assert final.usage.prompt_tokens_details.cached_tokens == 100
    # empty partial_json pieces send nothing
    args = [
        tc.function.arguments
        for c in parsed
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
        if not tc.id
    ]
    assert "" not in args


def test_tool_arguments_in_one_piece_and_content_with_tool_in_order() -> None:
    events = [
        message_start(),
        block(0, {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}}),
        delta(0, type="input_json_delta", partial_json='{"a": 1}'),
        stop(0),
        block(1, {"type": "text", "text": ""}),
        delta(1, type="text_delta", text="done"),
        stop(1),
        *end("tool_use"),
    ]
    final = reassemble(run(events))
    assert final.choices[0].message.content == "done"
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"a": 1}


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
    ],
)
def test_stream_stop_reasons(reason: str, finish: str) -> None:
    events = [
        message_start(),
        block(0, text("")),
        delta(0, type="text_delta", text="partial"),
        stop(0),
        *end(reason),
    ]
    parsed = assert_chat_grammar(run(events), usage_chunk=True)
    assert parsed[-2].choices[0].finish_reason == finish


def test_empty_completion_stream() -> None:
    out = run([message_start(), *end()], {**SCTX, "include_usage": False})
    assert_chat_grammar(out, usage_chunk=False)
    last = chunks(out)[-1]["choices"][0]
    assert last == {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop"}
    assert reassemble(out).choices[0].message.content == ""


def test_stream_usage_is_cumulative_and_fields_kept_when_absent_later() -> None:
    events = [
        message_start(
            input_tokens=30,
            cache_creation_input_tokens=7,
            cache_read_input_tokens=3,
            output_tokens=1,
        ),
        block(0, text("")),
        delta(0, type="text_delta", text="x"),
        stop(0),
        ev("message_delta", delta={"stop_reason": None}, usage={"output_tokens": 4}),
        ev(
            "message_delta",
            delta={"stop_reason": "end_turn"},
            usage={"output_tokens": 9, "input_tokens": 31},
        ),
        ev("message_delta", delta={}, usage=None),
        ev("message_stop"),
    ]
    out = run(events)
    parsed = assert_chat_grammar(out, usage_chunk=True)
    assert parsed[-2].choices[0].finish_reason == "stop"
    assert chunks(out)[-1]["usage"] == {
        "prompt_tokens": 41,
        "completion_tokens": 9,
        "total_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


def error_chunk(out: list[SseOut]) -> dict[str, Any]:
    assert out[-1][0] is None and isinstance(out[-1][1], dict)
    assert all(d != "[DONE]" for _, d in out)
    err = out[-1][1]["error"]
    assert set(err) == {"message", "type", "code", "param"}
    return err


def test_error_event_after_200() -> None:
    events = [
        message_start(),
        block(0, text("")),
        delta(0, type="text_delta", text="half"),
        ev("error", error={"type": "overloaded_error", "message": "Overloaded"}),
        delta(0, type="text_delta", text="after"),
        *end(),
    ]
    out = run(events)
    err = error_chunk(out)
    assert err == {
        "message": "Overloaded",
        "type": "server_error",
        "code": "overloaded_error",
        "param": None,
    }
    assert "after" not in json.dumps(out)
    finishes = [d["choices"][0]["finish_reason"] for d in chunks(out) if d.get("choices")]
    assert finishes == [None] * len(finishes)


def test_error_event_types_and_bounds() -> None:
    out = run(
        [message_start(), ev("error", error={"type": "rate_limit_error", "message": "m" * 5000})]
    )
    err = error_chunk(out)
    assert err["type"] == "rate_limit_error" and len(err["message"]) == 1000
    out = run([ev("error", error="weird")])
    assert error_chunk(out)["type"] == "server_error"


def test_stream_ending_early_is_an_error_never_a_clean_stop() -> None:
    out = run([message_start(), block(0, text("")), delta(0, type="text_delta", text="half")])
    err = error_chunk(out)
    assert "ended early" in err["message"]
    s = tx.stream(SCTX)
    assert error_chunk(s.end())
    assert s.end() == [] and s.event("message_stop", {"type": "message_stop"}) == []


def test_end_after_message_stop_adds_nothing_and_later_events_are_ignored() -> None:
    s = tx.stream(SCTX)
    for name, data in TEXT_STREAM:
        s.event(name, data)
    assert s.end() == []
    assert s.event("content_block_delta", delta(0, type="text_delta", text="x")[1]) == []


def sse_bytes(out: list[SseOut]) -> bytes:
    frames = []
    for _, data in out:
        payload = data if isinstance(data, str) else json.dumps(data)
        frames.append(f"data: {payload}\n\n")
    return "".join(frames).encode()


def sdk_stream(out: list[SseOut]) -> list[ChatCompletionChunk]:
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9/v1")
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(200, content=sse_bytes(out), request=request)
    return list(Stream(cast_to=ChatCompletionChunk, response=response, client=client))


def test_openai_sdk_reads_the_stream_and_raises_on_the_error_chunk() -> None:
    got = sdk_stream(run(TOOLS_STREAM))
    assert got[-1].choices == [] and got[-1].usage is not None
    with pytest.raises(openai.APIError) as exc:
        sdk_stream(
            run([message_start(), ev("error", error={"type": "api_error", "message": "boom"})])
        )
    assert "boom" in exc.value.message
    with pytest.raises(openai.APIError):
        sdk_stream(
            run([message_start(), block(0, text("")), delta(0, type="text_delta", text="h")])
        )


def test_hostile_provider_events_do_not_break_the_stream() -> None:
    events: list[tuple[str, Any]] = [
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "early"},
            },
        ),
        ("message_start", {"type": "message_start", "message": "not an object"}),
        ("content_block_start", {"type": "content_block_start", "index": "x", "content_block": 5}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 7,
                "delta": {"type": "input_json_delta", "partial_json": "{}"},
            },
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
        ),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": None}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "bad id/ü", "name": None},
            },
        ),
        (
            "message_delta",
            {"type": "message_delta", "delta": "x", "usage": {"output_tokens": "many"}},
        ),
        (None, "[DONE]"),
        ("message_stop", {"type": "message_stop"}),
    ]
    out = run(events, {"created": -1})
    parsed = assert_chat_grammar(out, usage_chunk=False)
    assert parsed[0].id == "chatcmpl-anthropic" and parsed[0].created == 0
    tool = parsed[2].choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert tool.id == "badid" and tool.function is not None and tool.function.name == ""


def test_stream_output_is_deterministic() -> None:
    assert json.dumps(run(TOOLS_STREAM)) == json.dumps(run(TOOLS_STREAM))


# ------------------------------------------------------------------ stream == JSON reply


def json_equivalent(events: list[tuple[str, Any]]) -> dict[str, Any]:
    """The Message a non-streamed call would return for ``events``."""
    start = events[0][1]["message"]
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, str] = {}
    usage = dict(start["usage"])
    reason = None
    for _, data in events:
        if data["type"] == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
        elif data["type"] == "content_block_delta":
            d, b = data["delta"], blocks[data["index"]]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + d["partial_json"]
        elif data["type"] == "message_delta":
            reason = data["delta"].get("stop_reason") or reason
            usage.update(data.get("usage") or {})
    for i, raw in partial.items():
        blocks[i]["input"] = json.loads(raw) if raw else {}
    return {
        **start,
        "content": [blocks[i] for i in sorted(blocks)],
        "stop_reason": reason,
        "usage": usage,
    }


@pytest.mark.parametrize(
    "events", [TEXT_STREAM, THINKING_STREAM, TOOLS_STREAM], ids=["text", "thinking", "tools"]
)
def test_streamed_chunks_reassemble_to_the_json_reply(events: list[tuple[str, Any]]) -> None:
    streamed = reassemble(run(events)).model_dump(exclude_none=True)
    whole = ChatCompletion.model_validate(tx.response(json_equivalent(events), SCTX)).model_dump(
        exclude_none=True
    )
    for msg in (streamed["choices"][0]["message"], whole["choices"][0]["message"]):
        msg.pop("parsed", None)
        for tc in msg.get("tool_calls", []):
            tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
            tc["function"].pop("parsed_arguments", None)
            tc.pop("index", None)  # the accumulator keeps the stream's index
    assert streamed == whole
