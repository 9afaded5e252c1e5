"""Anthropic Messages client -> OpenAI Chat provider (``translate/messages_chat.py``).

Outputs are checked against the Anthropic SDK's own pydantic types (``Message``,
``RawMessageStreamEvent``), streams against the event grammar (one message_start, nested
block start/delta/stop with increasing indices, message_delta then one message_stop).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from plano_extproc.errors import GatewayError
from plano_extproc.translate import messages_chat as tx
from plano_extproc.translate.base import Untranslatable

EVENT = TypeAdapter(RawMessageStreamEvent)
CTX = {"stream": False, "model": "claude-x", "thinking": False, "stop": False}


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }
    b.update(kw)
    return b


def req(model_id: str = "gpt-4.1", **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return tx.request(body(**kw), model_id)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


# --------------------------------------------------------------------------- request


def test_module_is_the_pair() -> None:
    assert tx.client.value == "messages" and tx.provider.value == "chat_completions"


def test_minimal_request_and_context() -> None:
    chat, ctx = req()
    assert chat == {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
    }
    assert ctx == {"stream": False, "model": "claude-sonnet-4-5", "thinking": False, "stop": False}
    assert len(json.dumps(ctx)) < 1024


def test_context_stays_small_with_hostile_model_name() -> None:
    _, ctx = tx.request(body(model="m" * 100_000), "gpt-4.1")
    assert len(ctx["model"]) == 256 and len(json.dumps(ctx)) < 1024


def test_system_string_and_blocks() -> None:
    chat, _ = req(system="be brief")
    assert chat["messages"][0] == {"role": "system", "content": "be brief"}
    blocks = [
        {"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "two"},
    ]
    chat, _ = req(system=blocks)
    assert chat["messages"][0] == {"role": "system", "content": "one\n\ntwo"}
    assert "cache_control" not in json.dumps(chat)
    chat, _ = req(system=[])
    assert chat["messages"][0]["role"] == "user"


def test_text_blocks_become_one_string() -> None:
    chat, _ = req(messages=[user([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])])
    assert chat["messages"] == [{"role": "user", "content": "a\nb"}]


def test_images_base64_and_url() -> None:
    content = [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
    ]
    chat, _ = req(messages=[user(content)])
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
    ]


def test_image_file_source_is_untranslatable() -> None:
    content = [{"type": "image", "source": {"type": "file", "file_id": "file_1"}}]
    with pytest.raises(Untranslatable) as e:
        req(messages=[user(content)])
    assert e.value.status == 400 and "messages[0].content[0].source" in e.value.message


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        "cache_control": {"type": "ephemeral"},
    },
    {"type": "custom", "name": "noop", "input_schema": {"type": "object"}, "strict": True},
]


def test_tool_definitions() -> None:
    chat, _ = req(tools=TOOLS)
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object"}, "strict": True},
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        (
            {"type": "tool", "name": "noop"},
            {"type": "function", "function": {"name": "noop"}},
            None,
        ),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any", "disable_parallel_tool_use": False}, "required", None),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any, parallel: Any) -> None:
    chat, _ = req(tools=TOOLS, tool_choice=choice)
    assert chat["tool_choice"] == expected
    assert chat.get("parallel_tool_calls") == parallel


def test_tool_choice_without_tools_is_not_sent() -> None:
    chat, _ = req(tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert "tool_choice" not in chat and "parallel_tool_calls" not in chat


def test_tool_loop_history() -> None:
    messages = [
        user("weather in Paris and Rome?"),
        assistant(
            [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ]
        ),
        user(
            [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "timeout"}],
                    "is_error": True,
                },
                {"type": "text", "text": "and tomorrow?"},
            ]
        ),
    ]
    chat, _ = req(messages=messages, tools=TOOLS)
    assert chat["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "[tool error] timeout"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert "hmm" not in json.dumps(chat) and "sig" not in json.dumps(chat)


def test_tool_only_turn_and_tool_only_assistant() -> None:
    messages = [
        user("go"),
        assistant([{"type": "tool_use", "id": "t1", "name": "noop", "input": {}}]),
        user([{"type": "tool_result", "tool_use_id": "t1"}]),
    ]
    chat, _ = req(messages=messages)
    assert chat["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "noop", "arguments": "{}"}}
        ],
    }
    # no empty user message after the tool answer
    assert chat["messages"][2:] == [{"role": "tool", "tool_call_id": "t1", "content": ""}]


def test_images_in_tool_result_follow_in_a_user_message() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x.test/s.png"}}
    messages = [
        user("shot"),
        assistant([{"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}]),
        user(
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "text", "text": "ok"}, image],
                }
            ]
        ),
    ]
    chat, _ = req(messages=messages)
    assert chat["messages"][2] == {
        "role": "tool",
        "tool_call_id": "t1",
        "content": "ok\n[1 image(s) attached in the next user message]",
    }
    assert chat["messages"][3] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Images returned by tool call t1:"},
            {"type": "image_url", "image_url": {"url": "https://x.test/s.png"}},
        ],
    }


def test_odd_tool_ids_map_the_same_on_call_and_result() -> None:
    long_id = "functions.Bash:0-" + "x" * 60
    messages = [
        user("go"),
        assistant([{"type": "tool_use", "id": long_id, "name": "noop", "input": {}}]),
        user([{"type": "tool_result", "tool_use_id": long_id, "content": "ok"}]),
    ]
    chat, _ = req(messages=messages)
    call_id = chat["messages"][1]["tool_calls"][0]["id"]
    assert call_id == chat["messages"][2]["tool_call_id"]
    assert call_id.startswith("toolu_") and len(call_id) <= 40 and call_id != long_id
    assert tx.request(body(messages=messages), "m")[0] == chat | {"model": "m"}  # stable


def test_empty_assistant_turn_is_skipped() -> None:
    messages = [
        user("a"),
        assistant([{"type": "thinking", "thinking": "x", "signature": "s"}]),
        user("b"),
    ]
    chat, _ = req(messages=messages)
    assert [m["role"] for m in chat["messages"]] == ["user", "user"]


@pytest.mark.parametrize(
    ("model_id", "key"),
    [
        ("gpt-4.1", "max_tokens"),
        ("llama3.1:8b", "max_tokens"),
        ("mistral-large-latest", "max_tokens"),
        ("o3-mini", "max_completion_tokens"),
        ("o1", "max_completion_tokens"),
        ("gpt-5-mini", "max_completion_tokens"),
        ("openai/o4-mini", "max_completion_tokens"),
    ],
)
def test_max_tokens_field_by_model(model_id: str, key: str) -> None:
    chat, _ = req(model_id)
    assert chat[key] == 100
    other = {"max_tokens", "max_completion_tokens"} - {key}
    assert not other & chat.keys()


def test_sampling_stop_user_and_stream() -> None:
    chat, ctx = req(
        stop_sequences=["END", "STOP"],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
        stream=True,
    )
    assert chat["stop"] == ["END", "STOP"]
    assert chat["temperature"] == 0.2 and chat["top_p"] == 0.9
    assert "top_k" not in chat
    assert chat["user"] == "u-1"
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert ctx["stream"] is True and ctx["stop"] is True


def test_hints_are_dropped() -> None:
    chat, ctx = req(
        service_tier="auto",
        cache_control={"type": "ephemeral"},
        thinking={"type": "enabled", "budget_tokens": 2048},
        output_config={"effort": "high"},
        container=None,
        mcp_servers=[],
    )
    assert set(chat) == {"model", "messages", "max_tokens"}
    assert ctx["thinking"] is True
    _, ctx = req(thinking={"type": "adaptive", "display": "omitted"})
    assert ctx["thinking"] is False


def test_output_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    chat, _ = req(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
        ({"tools": [{**TOOLS[1], "defer_loading": True}]}, "tools[0].defer_loading"),
        ({"container": "container_1"}, "container"),
        ({"mcp_servers": [{"type": "url", "url": "https://m.test", "name": "m"}]}, "mcp_servers"),
        (
            {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
            "context_management",
        ),
        ({"inference_geo": "eu"}, "inference_geo"),
        ({"brand_new_feature": {"x": 1}}, "brand_new_feature"),
        (
            {
                "messages": [
                    user(
                        [
                            {
                                "type": "document",
                                "source": {"type": "text", "media_type": "text/plain", "data": "d"},
                                "citations": {"enabled": True},
                            }
                        ]
                    )
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    user("q"),
                    assistant(
                        [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]
                    ),
                    user("r"),
                ]
            },
            "messages[1].content[0].type",
        ),
        ({"messages": [user("q"), assistant("The answer is (")]}, "messages[1]"),
    ],
)
def test_untranslatable(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(Untranslatable) as e:
        req(**kw)
    assert e.value.status == 400 and e.value.field == field
    assert f"'{field}'" in e.value.message and "OpenAI Chat Completions" in e.value.message


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [user(["text"])]}, "messages[0].content[0]"),
        ({"messages": [user([{"type": 7}])]}, "messages[0].content[0].type"),
        ({"messages": [user([{"type": "text", "text": None}])]}, "messages[0].content[0].text"),
        ({"messages": [user([{"type": "image", "source": "x"}])]}, "messages[0].content[0].source"),
        (
            {
                "messages": [
                    user(
                        [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "text/html",
                                    "data": "x",
                                },
                            }
                        ]
                    )
                ]
            },
            "messages[0].content[0].source.media_type",
        ),
        (
            {
                "messages": [
                    user(
                        [{"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}]
                    )
                ]
            },
            "messages[0].content[0].source.url",
        ),
        (
            {
                "messages": [
                    user("q"),
                    assistant([{"type": "tool_use", "id": "t", "name": "n", "input": "{}"}]),
                    user("r"),
                ]
            },
            "messages[1].content[0].input",
        ),
        (
            {
                "messages": [
                    user("q"),
                    assistant([{"type": "tool_use", "id": 5, "name": "n", "input": {}}]),
                    user("r"),
                ]
            },
            "messages[1].content[0].id",
        ),
        (
            {"messages": [user([{"type": "tool_result", "tool_use_id": "t", "content": [42]}])]},
            "messages[0].content[0].content[0]",
        ),
        (
            {"messages": [user([{"type": "tool_result", "tool_use_id": "t", "is_error": "yes"}])]},
            "messages[0].content[0].is_error",
        ),
        (
            {"messages": [user([{"type": "tool_result", "tool_use_id": "x" * 5000}])]},
            "messages[0].content[0].tool_use_id",
        ),
        ({"tools": [{"name": "a" * 65, "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"name": "", "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"name": ["x"], "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"name": "ok", "input_schema": "object"}]}, "tools[0].input_schema"),
        ({"tools": {"name": "ok"}}, "tools"),
        ({"tools": ["ok"]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "a" * 200}}, "tool_choice.name"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"system": 3}, "system"),
        ({"system": [{"type": "image"}]}, "system[0].type"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": False}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stop_sequences": ["END", 3]}, "stop_sequences[1]"),
        ({"metadata": {"user_id": 7}}, "metadata.user_id"),
        ({"metadata": {"user_id": "u" * 300}}, "metadata.user_id"),
        ({"metadata": "u"}, "metadata"),
        ({"stream": "yes"}, "stream"),
        ({"thinking": {"type": "maybe"}}, "thinking.type"),
        ({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens"),
        ({"output_config": {"format": {"type": "regex"}}}, "output_config.format.type"),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": []}}},
            "output_config.format.schema",
        ),
    ],
)
def test_hostile_values_are_400_naming_the_path(kw: dict[str, Any], path: str) -> None:
    with pytest.raises(GatewayError) as e:
        req(**kw)
    assert e.value.status == 400 and not isinstance(e.value, Untranslatable)
    assert f"'{path}'" in e.value.message


def test_missing_max_tokens_is_400() -> None:
    b = body()
    del b["max_tokens"]
    with pytest.raises(GatewayError, match="'max_tokens' is required"):
        tx.request(b, "gpt-4.1")


def test_request_does_not_mutate_the_client_body() -> None:
    b = body(system=[{"type": "text", "text": "s"}], tools=TOOLS, stream=True)
    before = copy.deepcopy(b)
    tx.request(b, "gpt-4.1")
    assert b == before


# --------------------------------------------------------------------------- response


def completion(message: dict[str, Any], finish: Any = "stop", **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "id": "chatcmpl-AbC123",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150},
    }
    b.update(kw)
    return b


def message_of(chat: dict[str, Any], ctx: dict[str, Any] = CTX) -> dict[str, Any]:
    out = tx.response(chat, ctx)
    Message.model_validate(out)
    return out


def test_response_text() -> None:
    out = message_of(completion({"content": "Hello"}))
    assert out == {
        "id": "msg_chatcmpl-AbC123",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4.1-2025-04-14",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 120, "output_tokens": 30},
    }


def test_response_tool_calls() -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "id": "functions.Bash:0",
            "type": "function",
            "function": {"name": "noop", "arguments": ""},
        },
        {"type": "function", "function": {"name": "broken", "arguments": '{"city": "Pa'}},
        {"id": "call_4", "type": "function", "function": {"name": "listy", "arguments": "[1, 2]"}},
    ]
    out = message_of(completion({"content": None, "tool_calls": calls}, "tool_calls"))
    assert out["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "functionsBash0", "name": "noop", "input": {}},
        {
            "type": "tool_use",
            "id": "toolu_chatcmpl-AbC123_2",
            "name": "broken",
            "input": {"_raw_arguments": '{"city": "Pa'},
        },
        {
            "type": "tool_use",
            "id": "call_4",
            "name": "listy",
            "input": {"_raw_arguments": "[1, 2]"},
        },
    ]
    assert out["stop_reason"] == "tool_use"


def test_response_text_then_tool_and_stop_with_calls_is_tool_use() -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    out = message_of(completion({"content": "Let me check.", "tool_calls": calls}, "stop"))
    assert [b["type"] for b in out["content"]] == ["text", "tool_use"]
    assert out["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
        ("something_new", "end_turn"),
    ],
)
def test_response_finish_reasons(finish: Any, reason: str) -> None:
    assert message_of(completion({"content": "x"}, finish))["stop_reason"] == reason


def test_response_stop_sequence_when_provider_names_it() -> None:
    chat = completion({"content": "x"})
    chat["choices"][0]["stop_reason"] = "END"  # vLLM names the matched stop string
    assert message_of(chat)["stop_reason"] == "end_turn"  # client sent no stop_sequences
    out = message_of(chat, CTX | {"stop": True})
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "END")
    chat["choices"][0]["stop_reason"] = 128009  # a stop token id is not a stop sequence
    assert message_of(chat, CTX | {"stop": True})["stop_reason"] == "end_turn"


def test_response_refusal() -> None:
    out = message_of(
        completion({"content": None, "refusal": "I can't help with that."}, "content_filter")
    )
    assert out["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert out["stop_reason"] == "refusal"


def test_response_empty_completion() -> None:
    out = message_of(completion({"content": ""}))
    assert out["content"] == [] and out["stop_reason"] == "end_turn"


def test_response_usage_with_cached_tokens() -> None:
    usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1920},
        "completion_tokens_details": {"reasoning_tokens": 100},
    }
    out = message_of(completion({"content": "x"}, usage=usage))
    assert out["usage"] == {
        "input_tokens": 86,
        "output_tokens": 300,
        "cache_read_input_tokens": 1920,
        "output_tokens_details": {"thinking_tokens": 100},
    }
    deepseek = {"prompt_tokens": 50, "completion_tokens": 5, "prompt_cache_hit_tokens": 40}
    out = message_of(completion({"content": "x"}, usage=deepseek))
    assert out["usage"] == {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 40}
    hostile = {"prompt_tokens": "many", "completion_tokens": -3}
    assert message_of(completion({"content": "x"}, usage=hostile))["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
    }
    assert message_of(completion({"content": "x"}, usage=None))["usage"]["output_tokens"] == 0


def test_response_reasoning_only_when_thinking_was_asked() -> None:
    chat = completion({"content": "42", "reasoning_content": "six times seven"})
    assert [b["type"] for b in message_of(chat)["content"]] == ["text"]
    out = message_of(chat, CTX | {"thinking": True})
    assert out["content"][0] == {"type": "thinking", "thinking": "six times seven", "signature": ""}
    other = completion({"content": "42", "reasoning": "r"})  # OpenRouter / vLLM spelling
    assert message_of(other, CTX | {"thinking": True})["content"][0]["thinking"] == "r"


def test_response_ids_and_model_are_sanitised() -> None:
    out = message_of(completion({"content": "x"}, id='evil"\n<id>' + "z" * 500, model=None))
    assert out["id"] == "msg_evilid" + "z" * 118  # first 128 characters, filtered
    assert out["model"] == "claude-x"  # the requested model when the provider names none
    assert message_of(completion({"content": "x"}, id=None))["id"] == "msg_chat"


def test_response_text_parts_content() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "other"}, {"type": "text", "text": "b"}]
    assert message_of(completion({"content": content}))["content"] == [
        {"type": "text", "text": "ab"}
    ]


@pytest.mark.parametrize(
    "chat", [{}, {"choices": []}, {"choices": ["x"]}, {"choices": [{"message": "x"}]}]
)
def test_response_unusable_body_is_502(chat: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as e:
        tx.response(chat, CTX)
    assert e.value.status == 502


# --------------------------------------------------------------------------- stream


def chunk(delta: dict[str, Any] | None = None, finish: Any = None, **kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "id": "chatcmpl-S1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4.1-2025-04-14",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    c.update(kw)
    return c


def usage_chunk(prompt: int = 10, completion_tokens: int = 5, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return chunk(choices=[], usage=usage)


def tool_delta(
    index: int, id_: str | None = None, name: str | None = None, args: str = ""
) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if id_ is not None:
        item["id"] = id_
        item["type"] = "function"
        item["function"]["name"] = name
    return {"tool_calls": [item]}


def run(
    events: list[Any], ctx: dict[str, Any] | None = None, end: bool = True
) -> list[tuple[Any, Any]]:
    st = tx.stream(ctx or CTX | {"stream": True})
    out: list[tuple[Any, Any]] = []
    for ev in events:
        name, data = ev if isinstance(ev, tuple) else (None, ev)
        out.extend(st.event(name, data))
    if end:
        out.extend(st.end())
    return out


def check_grammar(out: list[tuple[Any, Any]]) -> None:
    """The Anthropic event grammar, each event validated by the SDK's types."""
    names = [n for n, _ in out]
    for name, data in out:
        assert isinstance(data, dict) and data["type"] == name
        if name == "error":
            ErrorResponse.model_validate(data)
        else:
            EVENT.validate_python(data)
    if "error" in names:
        assert names[-1] == "error" and names.count("error") == 1
        assert "message_stop" not in names
        names = names[:-1]
    else:
        assert names.count("message_stop") == 1 and names[-1] == "message_stop"
        assert names[-2] == "message_delta" and names.count("message_delta") == 1
    if not names:
        return
    assert names[0] == "message_start" and names.count("message_start") == 1
    open_index = None
    last = -1
    for name, data in out:
        if name == "content_block_start":
            assert open_index is None and data["index"] == last + 1
            open_index = last = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        elif name in ("message_delta", "message_stop"):
            assert open_index is None


def assemble(out: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The Message a client SDK builds from the events."""
    msg: dict[str, Any] = {}
    parts: dict[int, list[str]] = {}
    for name, data in out:
        if name == "message_start":
            msg = copy.deepcopy(data["message"])
        elif name == "content_block_start":
            msg["content"].append(copy.deepcopy(data["content_block"]))
            parts[data["index"]] = []
        elif name == "content_block_delta":
            block, delta = msg["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                parts[data["index"]].append(delta["partial_json"])
        elif name == "content_block_stop":
            block = msg["content"][data["index"]]
            if block["type"] == "tool_use":
                raw = "".join(parts[data["index"]])
                block["input"] = json.loads(raw) if raw else {}
        elif name == "message_delta":
            msg.update(data["delta"])
            msg["usage"] = {**msg["usage"], **data["usage"]}
    Message.model_validate(msg)
    return msg


def test_stream_text_first_delta_goes_out_at_once() -> None:
    st = tx.stream(CTX)
    first = st.event(None, chunk({"role": "assistant", "content": ""}))
    assert [n for n, _ in first] == ["message_start"]
    second = st.event(None, chunk({"content": "Hel"}))
    assert [n for n, _ in second] == ["content_block_start", "content_block_delta"]
    assert second[1][1]["delta"] == {"type": "text_delta", "text": "Hel"}


def test_stream_text() -> None:
    out = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hello"}),
            chunk({"content": " world"}),
            chunk({}, "stop"),
            usage_chunk(30, 2, cached=20),
            "[DONE]",
        ]
    )
    check_grammar(out)
    assert [n for n, _ in out] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = out[0][1]["message"]
    assert start["id"] == "msg_chatcmpl-S1" and start["model"] == "gpt-4.1-2025-04-14"
    assert out[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 10, "output_tokens": 2, "cache_read_input_tokens": 20},
    }
    assert assemble(out)["content"] == [{"type": "text", "text": "Hello world"}]


def test_stream_message_ends_at_usage_chunk_without_waiting_for_done() -> None:
    st = tx.stream(CTX)
    st.event(None, chunk({"content": "x"}))
    finish = st.event(None, chunk({}, "stop"))
    assert [n for n, _ in finish] == ["content_block_stop"]  # message_delta waits for usage
    tail = st.event(None, usage_chunk())
    assert [n for n, _ in tail] == ["message_delta", "message_stop"]
    assert st.event(None, "[DONE]") == [] and st.end() == []


def test_stream_tool_call_in_pieces() -> None:
    out = run(
        [
            chunk({"role": "assistant", "content": None}),
            chunk(tool_delta(0, "call_1", "get_weather")),
            chunk(tool_delta(0, args='{"ci')),
            chunk(tool_delta(0, args='ty": "Paris"}')),
            chunk({}, "tool_calls"),
            usage_chunk(),
            "[DONE]",
        ]
    )
    check_grammar(out)
    start = out[1][1]["content_block"]
    assert start == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    pieces = [d["delta"]["partial_json"] for n, d in out if n == "content_block_delta"]
    assert pieces == ['{"ci', 'ty": "Paris"}']  # streamed as received
    msg = assemble(out)
    assert msg["content"][0]["input"] == {"city": "Paris"} and msg["stop_reason"] == "tool_use"


def test_stream_text_then_tool_get_distinct_indices() -> None:
    out = run(
        [
            chunk({"content": "Checking."}),
            chunk(tool_delta(0, "call_1", "f", '{"a":1}')),
            chunk({}, "tool_calls"),
            "[DONE]",
        ]
    )
    check_grammar(out)
    msg = assemble(out)
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use"]
    assert msg["content"][1]["input"] == {"a": 1}


def test_stream_parallel_interleaved_tool_calls() -> None:
    events = [
        chunk({"role": "assistant"}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    },
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "g", "arguments": ""},
                    },
                ]
            }
        ),
        chunk(tool_delta(1, args='{"y":')),
        chunk(tool_delta(0, args='{"x":')),
        chunk(tool_delta(2, "call_c", "h", "{}")),
        chunk(tool_delta(1, args="2}")),
        chunk(tool_delta(0, args="1}")),
        chunk({}, "tool_calls"),
        usage_chunk(),
        "[DONE]",
    ]
    out = run(events)
    check_grammar(out)
    msg = assemble(out)
    assert [(b["id"], b["name"], b["input"]) for b in msg["content"]] == [
        ("call_a", "f", {"x": 1}),
        ("call_b", "g", {"y": 2}),
        ("call_c", "h", {}),
    ]
    assert out == run(events)  # deterministic


def test_stream_repeated_odd_id_and_new_id_on_same_index() -> None:
    """Kimi-style ids are cleaned; repeating the id does not start a new call, a different
    id on the same index does (providers that send each whole call at index 0)."""
    out = run(
        [
            chunk(tool_delta(0, "functions.Bash:0", "Bash", '{"cmd":')),
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "functions.Bash:0", "function": {"arguments": '"ls"}'}}
                    ]
                }
            ),
            chunk(tool_delta(0, "functions.Read:1", "Read", '{"path": "a"}')),
            chunk({}, "tool_calls"),
        ]
    )
    check_grammar(out)
    assert [(b["id"], b["name"], b["input"]) for b in assemble(out)["content"]] == [
        ("functionsBash0", "Bash", {"cmd": "ls"}),
        ("functionsRead1", "Read", {"path": "a"}),
    ]


def test_stream_arguments_in_one_piece_and_invalid_buffered_arguments() -> None:
    out = run(
        [
            chunk(tool_delta(0, "call_1", "f", '{"a": 1}')),
            chunk(tool_delta(1, "call_2", "g", '{"broken')),
            chunk({}, "tool_calls"),
        ]
    )
    check_grammar(out)
    msg = assemble(out)
    assert msg["content"][0]["input"] == {"a": 1}
    assert msg["content"][1]["input"] == {"_raw_arguments": '{"broken'}


def test_stream_content_and_finish_in_one_chunk() -> None:
    out = run([chunk({"role": "assistant", "content": "all at once"}, "stop"), "[DONE]"])
    check_grammar(out)
    msg = assemble(out)
    assert msg["content"] == [{"type": "text", "text": "all at once"}]
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"]["output_tokens"] == 0  # no usage chunk: unknown, reported as 0


def test_stream_reasoning_then_text() -> None:
    events = [
        chunk({"role": "assistant", "reasoning_content": "Let me"}),
        chunk({"reasoning_content": " think."}),
        chunk({"content": "42"}),
        chunk({}, "stop"),
        usage_chunk(),
    ]
    out = run(events, CTX | {"thinking": True})
    check_grammar(out)
    assert assemble(out)["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": ""},
        {"type": "text", "text": "42"},
    ]
    hidden = run(events)
    check_grammar(hidden)
    assert assemble(hidden)["content"] == [{"type": "text", "text": "42"}]


def test_stream_reasoning_text_and_tool_in_one_chunk_are_split_in_order() -> None:
    delta = {"reasoning": "r", "content": "t", **tool_delta(0, "c1", "f", "{}")}
    out = run([chunk(delta, "tool_calls")], CTX | {"thinking": True})
    check_grammar(out)
    assert [b["type"] for b in assemble(out)["content"]] == ["thinking", "text", "tool_use"]


def test_stream_text_after_a_tool_comes_after_it() -> None:
    out = run(
        [
            chunk(tool_delta(0, "c1", "f", '{"a":')),
            chunk({"content": "note"}),
            chunk(tool_delta(0, args="1}")),
            chunk({}, "tool_calls"),
        ]
    )
    check_grammar(out)
    msg = assemble(out)
    assert msg["content"] == [
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
        {"type": "text", "text": "note"},
    ]


def test_stream_empty_tool_calls_list_opens_no_block() -> None:
    out = run([chunk({"content": "hi", "tool_calls": []}), chunk({}, "stop")])
    check_grammar(out)
    msg = assemble(out)
    assert msg["content"] == [{"type": "text", "text": "hi"}] and msg["stop_reason"] == "end_turn"


def test_stream_empty_completion() -> None:
    out = run(
        [chunk({"role": "assistant", "content": ""}), chunk({}, "stop"), usage_chunk(), "[DONE]"]
    )
    check_grammar(out)
    assert [n for n, _ in out] == ["message_start", "message_delta", "message_stop"]
    assert assemble(out)["content"] == []


def test_stream_refusal_and_content_filter() -> None:
    out = run([chunk({"refusal": "I can't"}), chunk({}, "content_filter"), "[DONE]"])
    check_grammar(out)
    msg = assemble(out)
    assert (
        msg["content"] == [{"type": "text", "text": "I can't"}] and msg["stop_reason"] == "refusal"
    )


def test_stream_length_stop() -> None:
    out = run([chunk({"content": "trunc"}), chunk({}, "length"), usage_chunk(5, 1)])
    check_grammar(out)
    assert assemble(out)["stop_reason"] == "max_tokens"


def test_stream_stop_sequence_named_by_provider() -> None:
    finish = chunk({}, "stop")
    finish["choices"][0]["stop_reason"] = "END"
    out = run([chunk({"content": "x"}), finish], CTX | {"stop": True})
    check_grammar(out)
    msg = assemble(out)
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "END")


def test_stream_done_arriving_separately_and_ping() -> None:
    st = tx.stream(CTX)
    out = st.event(None, chunk({"content": "a"}))
    out += st.event("ping", {"type": "ping"})
    out += st.event(None, chunk({}, "stop"))
    assert "message_stop" not in [n for n, _ in out]
    done = st.event(None, "[DONE]")
    assert [n for n, _ in done] == ["message_delta", "message_stop"]
    out += done + st.end() + st.event(None, "[DONE]")
    check_grammar(out)  # one message_stop, even with extra [DONE]/end


def test_stream_done_without_finish_reason_is_end_turn() -> None:
    out = run([chunk({"content": "a"}), "[DONE]"])
    check_grammar(out)
    assert assemble(out)["stop_reason"] == "end_turn"


def test_stream_provider_error_after_200() -> None:
    error = {
        "error": {"message": "Rate limit reached", "type": "rate_limit_exceeded", "code": None}
    }
    out = run([chunk({"content": "partial"}), error, chunk({"content": "ignored"})])
    check_grammar(out)
    assert out[-1] == (
        "error",
        {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}},
    )
    assert not any(d.get("delta", {}).get("text") == "ignored" for _, d in out)
    out = run([error])
    check_grammar(out)
    assert [n for n, _ in out] == ["error"]
    server = run([chunk({"content": "x"}), {"error": {"message": "boom", "type": "server_error"}}])
    assert server[-1][1]["error"]["type"] == "api_error"


def test_stream_ending_early_is_an_error_not_a_clean_stop() -> None:
    out = run([chunk({"content": "part"}), chunk(tool_delta(0, "c", "f", '{"a'))])
    check_grammar(out)
    assert out[-1][1]["error"]["type"] == "api_error"
    assert "ended early" in out[-1][1]["error"]["message"]
    assert run([]) == [
        (
            "error",
            {
                "type": "error",
                "error": {
                    "type": "api_error",
                    "message": "the provider stream ended early, before a finish_reason",
                },
            },
        )
    ]


def test_stream_after_finish_without_done_ends_cleanly() -> None:
    out = run([chunk({"content": "x"}), chunk({}, "stop")])
    check_grammar(out)
    assert "error" not in [n for n, _ in out]


def test_stream_hostile_chunks_do_not_break_the_grammar() -> None:
    out = run(
        [
            chunk({"content": 5, "tool_calls": "x", "reasoning_content": ["r"]}),
            {"choices": "nope"},
            {"choices": [None]},
            chunk({"tool_calls": [None, {"index": True, "function": "f"}]}),
            chunk({"content": "ok"}),
            chunk({}, "stop", usage={"prompt_tokens": "x"}),
        ]
    )
    check_grammar(out)
    assert assemble(out)["content"][0] == {"type": "text", "text": "ok"}


# A realistic OpenAI stream (shape of api.openai.com with stream_options.include_usage): text,
# then two parallel tool calls, usage chunk with cached tokens, [DONE].
REAL_ID = "chatcmpl-BkX9uZq2"


def real_chunk(delta: dict[str, Any], finish: Any = None) -> dict[str, Any]:
    return {
        "id": REAL_ID,
        "object": "chat.completion.chunk",
        "created": 1750000000,
        "model": "gpt-4.1-2025-04-14",
        "service_tier": "default",
        "system_fingerprint": "fp_51e1070cf2",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


REAL_STREAM: list[Any] = [
    real_chunk({"role": "assistant", "content": "", "refusal": None}),
    real_chunk({"content": "I'll"}),
    real_chunk({"content": " check both cities."}),
    real_chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_Xa1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    real_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    real_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}),
    real_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
    real_chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_Yb2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    real_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city": '}}]}),
    real_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"Rome"}'}}]}),
    real_chunk({}, "tool_calls"),
    {
        **real_chunk({}),
        "choices": [],
        "usage": {
            "prompt_tokens": 2200,
            "completion_tokens": 61,
            "total_tokens": 2261,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    },
    "[DONE]",
]

REAL_JSON = {
    "id": REAL_ID,
    "object": "chat.completion",
    "created": 1750000000,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "I'll check both cities.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_Xa1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_Yb2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 2200,
        "completion_tokens": 61,
        "total_tokens": 2261,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}


def test_realistic_stream_reassembles_to_the_json_translation() -> None:
    out = run(REAL_STREAM)
    check_grammar(out)
    expected = tx.response(REAL_JSON, CTX)
    assert assemble(out) == expected
    assert expected["usage"] == {
        "input_tokens": 1176,
        "output_tokens": 61,
        "cache_read_input_tokens": 1024,
    }


def test_realistic_stream_split_everywhere_matches_too() -> None:
    """Same stream with every argument piece one character long, and the tools' chunks
    interleaved: still one well-formed message equal to the JSON translation."""
    events: list[Any] = [
        REAL_STREAM[0],
        REAL_STREAM[1],
        REAL_STREAM[2],
        REAL_STREAM[3],
        REAL_STREAM[7],
    ]
    args = ['{"city": "Paris"}', '{"city": "Rome"}']
    for k in range(max(map(len, args))):
        for i, a in enumerate(args):
            if k < len(a):
                events.append(
                    real_chunk({"tool_calls": [{"index": i, "function": {"arguments": a[k]}}]})
                )
    events += REAL_STREAM[10:]
    out = run(events)
    check_grammar(out)
    assert assemble(out) == tx.response(REAL_JSON, CTX)
