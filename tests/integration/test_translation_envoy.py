"""Issue #8 end to end: any client API to any provider API, through the real Envoy.

The official SDKs (anthropic, openai: chat.completions and responses) talk to the gateway; the
scripted fake providers answer in each provider's real wire format (tests/fakes.py ``Script``),
so the SDKs' own parsers and stream helpers validate every translated answer. For each
translated pair (Messages -> Chat, Chat -> Messages, Responses -> Chat, Responses -> Messages)
these tests check what reached the provider (path, auth style, model id, body in the provider's
format) and what the client got (text, tool calls, stop reason, usage, errors). Native pairs
must still reach the provider byte for byte except ``model``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes import FakeProvider, Recorded, Script, ToolCall, Usage, running_providers
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

CLIENT_KEY = "sk-client-SECRET-7f3a"  # the client's own credential: must never go upstream
OPENAI_KEY = "sk-openai-test"
ANTHROPIC_KEY = "sk-ant-test"
UNICODE = "é你🎉"
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
    "awAAAABJRU5ErkJggg=="
)
IMAGE_URL = "https://example.com/cat.png"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@dataclass(frozen=True)
class Target:
    """A provider as the client names it (an alias) and as the provider sees it."""

    alias: str
    fake: str  # fixture key in FAKES
    fmt: str  # "chat" | "messages": the API the provider is called with
    model_id: str
    served: str  # x-plano-model


CHAT_OPENAI = Target("chat-model", "openai", "chat", "gpt-4o-mini", "openai/gpt-4o-mini")
CHAT_LOCAL = Target("local-model", "ollama", "chat", "llama3.1", "ollama/llama3.1")
CLAUDE = Target(
    "claude", "anthropic", "messages", "claude-sonnet-4-20250514",
    "anthropic/claude-sonnet-4-20250514",
)  # fmt: skip


@dataclass(frozen=True)
class Pair:
    client: str  # "messages" | "chat" | "responses"
    target: Target

    def __str__(self) -> str:
        return f"{self.client}_to_{self.target.fake}"


MESSAGES_TO_CHAT = Pair("messages", CHAT_OPENAI)
CHAT_TO_MESSAGES = Pair("chat", CLAUDE)
RESPONSES_TO_CHAT = Pair("responses", CHAT_LOCAL)
RESPONSES_TO_MESSAGES = Pair("responses", CLAUDE)


def with_pairs(*items: Any) -> list[Any]:
    """``items`` (pairs or tuples starting with a pair) as params named by their pair."""
    out = []
    for item in items:
        pair = item if isinstance(item, Pair) else item[0]
        values = (item,) if isinstance(item, Pair) else item
        out.append(pytest.param(*values, id=str(pair)))
    return out


PAIRS = [MESSAGES_TO_CHAT, CHAT_TO_MESSAGES, RESPONSES_TO_CHAT, RESPONSES_TO_MESSAGES]
pairs = pytest.mark.parametrize("pair", with_pairs(*PAIRS))
PATHS = {"messages": "/v1/messages", "chat": "/v1/chat/completions", "responses": "/v1/responses"}


def config(openai_url: str, anthropic_url: str, ollama_url: str) -> str:
    """Seed-style config: an OpenAI provider, a keyless custom Chat provider and Anthropic,
    reached through aliases (no router: the decision is the named model)."""
    return f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    port: 12000
    timeout: 30s
model_providers:
  - model: openai/gpt-4o-mini
    base_url: {openai_url}/v1
    access_key: {OPENAI_KEY}
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    base_url: {anthropic_url}/v1
    access_key: {ANTHROPIC_KEY}
  - model: ollama/llama3.1
    base_url: {ollama_url}/v1
model_aliases:
  chat-model:
    target: openai/gpt-4o-mini
  claude:
    target: anthropic/claude-sonnet-4-20250514
  local-model:
    target: ollama/llama3.1
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    with running_providers("openai", "anthropic", "ollama") as made:
        yield made


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeProvider]
) -> Iterator[GatewayProcess]:
    cfg = config(fakes["openai"].base_url, fakes["anthropic"].base_url, fakes["ollama"].base_url)
    with GatewayProcess(cfg, tmp_path_factory.mktemp("tx")) as g:
        yield g


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeProvider]) -> Iterator[None]:
    for fake in fakes.values():
        fake.clear()
    yield
    # Whatever a test did, the client's credential never reached a provider.
    for fake in fakes.values():
        for rec in fake.requests:
            assert CLIENT_KEY not in json.dumps(rec.headers), (fake.name, rec.headers)
            assert CLIENT_KEY.encode() not in rec.body, fake.name


def ant(gw: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


def oai(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def fake_of(fakes: dict[str, FakeProvider], pair: Pair) -> FakeProvider:
    return fakes[pair.target.fake]


def others(fakes: dict[str, FakeProvider], pair: Pair) -> list[FakeProvider]:
    return [f for name, f in fakes.items() if name != pair.target.fake]


# --------------------------------------------------------------------------- client side


@dataclass
class Answer:
    """A client's answer in neutral terms, read from the SDK's parsed object."""

    text: str
    tools: list[tuple[str, str, Any]]  # (id, name, parsed arguments)
    stop: str  # stop_reason / finish_reason / Responses status[:incomplete reason]
    usage: dict[str, int]
    raw: Any


def _read_messages(msg: anthropic.types.Message) -> Answer:
    text = "".join(b.text for b in msg.content if b.type == "text")
    tools = [(b.id, b.name, b.input) for b in msg.content if b.type == "tool_use"]
    u = msg.usage
    usage = {
        "input": u.input_tokens,
        "output": u.output_tokens,
        "cached": u.cache_read_input_tokens or 0,
    }
    return Answer(text, tools, str(msg.stop_reason), usage, msg)


def _read_chat(resp: Any) -> Answer:
    choice = resp.choices[0]
    message = choice.message
    tools = [
        (tc.id, tc.function.name, json.loads(tc.function.arguments))
        for tc in message.tool_calls or []
    ]
    usage: dict[str, int] = {}
    if resp.usage is not None:
        details = resp.usage.prompt_tokens_details
        usage = {
            "input": resp.usage.prompt_tokens,
            "output": resp.usage.completion_tokens,
            "total": resp.usage.total_tokens,
            "cached": (details.cached_tokens or 0) if details else 0,
        }
    return Answer(message.content or "", tools, str(choice.finish_reason), usage, resp)


def _read_responses(resp: Any) -> Answer:
    text = "".join(
        part.text
        for item in resp.output
        if item.type == "message"
        for part in item.content
        if part.type == "output_text"
    )
    tools = [
        (item.call_id, item.name, json.loads(item.arguments))
        for item in resp.output
        if item.type == "function_call"
    ]
    stop = str(resp.status)
    if resp.status == "incomplete" and resp.incomplete_details is not None:
        stop += ":" + str(resp.incomplete_details.reason)
    usage: dict[str, int] = {}
    if resp.usage is not None:
        usage = {
            "input": resp.usage.input_tokens,
            "output": resp.usage.output_tokens,
            "total": resp.usage.total_tokens,
            "cached": resp.usage.input_tokens_details.cached_tokens,
        }
    return Answer(text, tools, stop, usage, resp)


def user_message(client: str, text: str, images: list[dict[str, str]] | None = None) -> Any:
    """One user turn in the client's format; images as {"b64": ...} or {"url": ...}."""
    parts: list[dict[str, Any]] = []
    for img in images or []:
        if client == "messages":
            source = (
                {"type": "base64", "media_type": "image/png", "data": img["b64"]}
                if "b64" in img
                else {"type": "url", "url": img["url"]}
            )
            parts.append({"type": "image", "source": source})
        else:
            url = f"data:image/png;base64,{img['b64']}" if "b64" in img else img["url"]
            if client == "chat":
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "input_image", "image_url": url, "detail": "auto"})
    if not parts:
        return {"role": "user", "content": text}
    kind = {"messages": "text", "chat": "text", "responses": "input_text"}[client]
    return {"role": "user", "content": [*parts, {"type": kind, "text": text}]}


def tools_for(client: str) -> list[dict[str, Any]]:
    t = WEATHER_TOOL
    if client == "messages":
        return [{"name": t["name"], "description": t["description"], "input_schema": t["schema"]}]
    if client == "chat":
        fn = {"name": t["name"], "description": t["description"], "parameters": t["schema"]}
        return [{"type": "function", "function": fn}]
    return [
        {
            "type": "function",
            "name": t["name"],
            "description": t["description"],
            "parameters": t["schema"],
            "strict": False,
        }
    ]


def ask(
    gw: GatewayProcess,
    pair: Pair,
    history: list[Any],
    *,
    stream: bool = False,
    tools: bool = False,
    **extra: Any,
) -> Answer:
    """One request through the gateway with the client's SDK; streams use the SDK's helpers
    (so the SDK checks the event grammar) and return the accumulated final object."""
    model = pair.target.alias
    if pair.client == "messages":
        kw: dict[str, Any] = {"model": model, "max_tokens": 256, "messages": history, **extra}
        if tools:
            kw["tools"] = tools_for("messages")
        if stream:
            with ant(gw).messages.stream(**kw) as s:
                return _read_messages(s.get_final_message())
        return _read_messages(ant(gw).messages.create(**kw))
    if pair.client == "chat":
        kw = {"model": model, "messages": history, **extra}
        if tools:
            kw["tools"] = tools_for("chat")
        if stream:
            kw.setdefault("stream_options", {"include_usage": True})
            with oai(gw).chat.completions.stream(**kw) as s:
                try:
                    return _read_chat(s.get_final_completion())
                except (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError):
                    # The helper refuses to parse these stops; its snapshot is the answer.
                    return _read_chat(s.current_completion_snapshot)
        return _read_chat(oai(gw).chat.completions.create(**kw))
    kw = {"model": model, "input": history, **extra}
    if tools:
        kw["tools"] = tools_for("responses")
    if stream:
        with oai(gw).responses.stream(**kw) as s:
            # get_final_response() insists on response.completed; a length or content-filter
            # stop ends with response.incomplete (as OpenAI's own API does).
            final = None
            for event in s:
                if event.type in ("response.completed", "response.incomplete"):
                    final = event.response
            if final is None:  # response.failed / error: what get_final_response() raises
                raise RuntimeError("the stream ended without response.completed/incomplete")
            return _read_responses(final)
    return _read_responses(oai(gw).responses.create(**kw))


# Client-side names for a provider's stop, per client API.
STOP = {
    "messages": {
        "stop": "end_turn", "tool": "tool_use", "length": "max_tokens", "refusal": "refusal"
    },
    "chat": {"stop": "stop", "tool": "tool_calls", "length": "length", "refusal": "content_filter"},
    "responses": {
        "stop": "completed",
        "tool": "completed",
        "length": "incomplete:max_output_tokens",
        "refusal": "incomplete:content_filter",
    },
}  # fmt: skip
# The provider's own finish value for a neutral stop, per provider API.
FINISH = {
    "chat": {"length": "length", "refusal": "content_filter"},
    "messages": {"length": "max_tokens", "refusal": "refusal"},
}


# --------------------------------------------------------------------------- provider side


def assert_provider_request(rec: Recorded, target: Target, *, stream: bool) -> dict[str, Any]:
    """The provider got its own path, auth style and model id; returns its body."""
    body = rec.json
    assert isinstance(body, dict)
    assert rec.method == "POST"
    assert body["model"] == target.model_id
    if target.fmt == "messages":
        assert rec.path == "/v1/messages"
        assert rec.headers["x-api-key"] == ANTHROPIC_KEY
        assert rec.headers["anthropic-version"]
        assert "authorization" not in rec.headers
        assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0
        for msg in body["messages"]:
            assert msg["role"] in ("user", "assistant")
    else:
        assert rec.path == "/v1/chat/completions"
        assert "x-api-key" not in rec.headers
        if target.fake == "openai":
            assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
        else:  # keyless provider: no credential at all
            assert "authorization" not in rec.headers
    assert bool(body.get("stream")) is stream
    return body


def text_of(content: Any) -> str:
    """The text of a provider message content (a string or parts)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def images_in(fmt: str, body: dict[str, Any]) -> list[tuple[str, ...]]:
    """The images of the provider request's last user message, normalised."""
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    out: list[tuple[str, ...]] = []
    for part in content if isinstance(content, list) else []:
        if fmt == "chat" and part.get("type") == "image_url":
            out.append(("url", part["image_url"]["url"]))
        if fmt == "messages" and part.get("type") == "image":
            src = part["source"]
            if src["type"] == "base64":
                out.append(("url", f"data:{src['media_type']};base64,{src['data']}"))
            else:
                assert src["type"] == "url", src
                out.append(("url", src["url"]))
    return out


def provider_tool_history(fmt: str, body: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(calls, results) the provider request's history carries, normalised to
    [(id, name, parsed args)] and [(id, result text)]."""
    calls: list[Any] = []
    results: list[Any] = []
    for msg in body["messages"]:
        if fmt == "chat":
            for tc in msg.get("tool_calls") or []:
                assert msg["role"] == "assistant" and tc["type"] == "function"
                fn = tc["function"]
                calls.append((tc["id"], fn["name"], json.loads(fn["arguments"])))
            if msg["role"] == "tool":
                results.append((msg["tool_call_id"], text_of(msg["content"])))
        else:
            for part in msg["content"] if isinstance(msg["content"], list) else []:
                if part["type"] == "tool_use":
                    assert msg["role"] == "assistant"
                    calls.append((part["id"], part["name"], part["input"]))
                if part["type"] == "tool_result":
                    assert msg["role"] == "user"
                    results.append((part["tool_use_id"], text_of(part["content"])))
    return calls, results


def provider_tools(fmt: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    if fmt == "chat":
        return [(t["function"]["name"], t["function"]["parameters"]) for t in body["tools"]]
    return [(t["name"], t["input_schema"]) for t in body["tools"]]


def tool_turn(client: str, answer: Answer, result: str) -> list[Any]:
    """The client's history items that replay ``answer``'s tool calls and give ``result``."""
    if client == "messages":
        blocks = [b.model_dump(exclude_none=True) for b in answer.raw.content]
        results = [
            {"type": "tool_result", "tool_use_id": i, "content": result} for i, _, _ in answer.tools
        ]
        return [{"role": "assistant", "content": blocks}, {"role": "user", "content": results}]
    if client == "chat":
        msg = answer.raw.choices[0].message
        turn: list[Any] = [msg.model_dump(exclude_none=True)]
        turn += [{"role": "tool", "tool_call_id": i, "content": result} for i, _, _ in answer.tools]
        return turn
    items: list[Any] = [
        {"type": "function_call", "call_id": i, "name": n, "arguments": json.dumps(a)}
        for i, n, a in answer.tools
    ]
    items += [
        {"type": "function_call_output", "call_id": i, "output": result} for i, _, _ in answer.tools
    ]
    return items


# --------------------------------------------------------------------------- translated pairs


@pairs
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_text(gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, stream: bool) -> None:
    fake = fake_of(fakes, pair)
    fake.script = Script(text=["Bonjour ", UNICODE, " !"], usage=Usage(100, 20, cached=40))
    got = ask(gw, pair, [user_message(pair.client, "say hi")], stream=stream)
    assert got.text == f"Bonjour {UNICODE} !"
    assert got.tools == []
    assert got.stop == STOP[pair.client]["stop"]
    # Usage: Anthropic counts input without cache reads, Chat and Responses with them.
    expected = {"input": 100, "output": 20, "cached": 40, "total": 120}
    if pair.client == "messages":
        expected = {"input": 60, "output": 20, "cached": 40}
    assert got.usage == expected
    assert len(fake.requests) == 1
    body = assert_provider_request(fake.last(), pair.target, stream=stream)
    if pair.target.fmt == "chat" and stream:
        assert body["stream_options"]["include_usage"] is True
    last_user = [m for m in body["messages"] if m["role"] == "user"][-1]
    assert text_of(last_user["content"]) == "say hi"
    for other in others(fakes, pair):
        assert not other.requests


@pairs
def test_model_header_names_what_served(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair
) -> None:
    fake_of(fakes, pair).script = Script(text=["ok"])
    body: dict[str, Any] = {"model": pair.target.alias}
    if pair.client == "responses":
        body["input"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    if pair.client == "messages":
        body["max_tokens"] = 16
    resp = httpx.post(
        gw.url + PATHS[pair.client],
        json=body,
        headers={"x-api-key": CLIENT_KEY, "authorization": f"Bearer {CLIENT_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-plano-model"] == pair.target.served
    assert resp.headers["content-type"].startswith("application/json")
    if "content-length" in resp.headers:  # translated: chunked, or a length that fits
        assert int(resp.headers["content-length"]) == len(resp.content)
    assert resp.json()  # a complete JSON body
    assert_provider_request(fake_of(fakes, pair).last(), pair.target, stream=False)


@pairs
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_tool_round_trip(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, stream: bool
) -> None:
    fake = fake_of(fakes, pair)
    call_id = "toolu_01A" if pair.target.fmt == "messages" else "call_01A"
    args = '{"city": "Paris"}'
    fake.queue(
        Script(text=[], tool_calls=[ToolCall("get_weather", args, pieces=4, id=call_id)]),
        Script(text=["Sunny, 22C"]),
    )
    history = [user_message(pair.client, "weather in Paris?")]
    first = ask(gw, pair, history, stream=stream, tools=True)
    assert first.stop == STOP[pair.client]["tool"]
    assert [(n, a) for _, n, a in first.tools] == [("get_weather", {"city": "Paris"})]
    assert first.text == ""
    body1 = assert_provider_request(fake.requests[0], pair.target, stream=stream)
    assert provider_tools(pair.target.fmt, body1) == [("get_weather", WEATHER_TOOL["schema"])]

    history += tool_turn(pair.client, first, "22C and sunny")
    second = ask(gw, pair, history, stream=stream, tools=True)
    assert second.text == "Sunny, 22C"
    assert second.stop == STOP[pair.client]["stop"]
    body2 = assert_provider_request(fake.requests[1], pair.target, stream=stream)
    # The provider sees its own call id back, with the call and its result in its format.
    calls, results = provider_tool_history(pair.target.fmt, body2)
    assert calls == [(call_id, "get_weather", {"city": "Paris"})]
    assert results == [(call_id, "22C and sunny")]
    if pair.target.fmt == "chat":
        roles = [m["role"] for m in body2["messages"]]
        assert roles[-2:] == ["assistant", "tool"]
    else:
        assert [m["role"] for m in body2["messages"]] == ["user", "assistant", "user"]


@pairs
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_parallel_tool_calls_with_arguments_in_pieces(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, stream: bool
) -> None:
    calls = [
        ToolCall("get_weather", json.dumps({"city": f"Paris {UNICODE}"}), pieces=7, id="c_1"),
        ToolCall("get_weather", '{"city": "Tokyo"}', pieces=3, id="c_2"),
        ToolCall("get_time", '{"tz": "Europe/Paris", "fmt": "24h"}', pieces=5, id="c_3"),
    ]
    fake_of(fakes, pair).script = Script(
        text=["Checking."], tool_calls=calls, interleave=True, split=5, split_utf8=True
    )
    got = ask(gw, pair, [user_message(pair.client, "weather?")], stream=stream, tools=True)
    assert [(n, a) for _, n, a in got.tools] == [
        ("get_weather", {"city": f"Paris {UNICODE}"}),
        ("get_weather", {"city": "Tokyo"}),
        ("get_time", {"tz": "Europe/Paris", "fmt": "24h"}),
    ]
    assert len({i for i, _, _ in got.tools}) == 3
    assert got.text == "Checking."
    assert got.stop == STOP[pair.client]["tool"]


@pairs
def test_stream_cut_anywhere_crlf_with_reasoning(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair
) -> None:
    # Every byte piece is 3 bytes or ends inside a multi-byte character; CRLF framing; a
    # reasoning/thinking part before the text (dropped or carried, never mixed into the text).
    fake_of(fakes, pair).script = Script(
        text=[UNICODE, " and ", UNICODE * 3],
        reasoning=["let me ", "think"],
        split=3,
        split_utf8=True,
        crlf=True,
        usage=Usage(10, 5),
    )
    got = ask(gw, pair, [user_message(pair.client, "hi")], stream=True)
    assert got.text == f"{UNICODE} and {UNICODE * 3}"
    assert got.stop == STOP[pair.client]["stop"]
    assert got.usage["output"] == 5


@pairs
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("kind", ["length", "refusal"])
def test_length_and_refusal_stops(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, stream: bool, kind: str
) -> None:
    finish = FINISH[pair.target.fmt][kind]
    fake_of(fakes, pair).script = Script(text=["partial"], finish=finish)
    got = ask(gw, pair, [user_message(pair.client, "hi")], stream=stream)
    assert got.stop == STOP[pair.client][kind]
    assert got.text == "partial"


@pairs
@pytest.mark.parametrize("source", ["b64", "url"])
def test_image_reaches_provider_in_its_format(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, source: str
) -> None:
    fake = fake_of(fakes, pair)
    fake.script = Script(text=["a cat"])
    img = {"b64": PNG_B64} if source == "b64" else {"url": IMAGE_URL}
    got = ask(gw, pair, [user_message(pair.client, "what is this?", [img])])
    assert got.text == "a cat"
    body = assert_provider_request(fake.last(), pair.target, stream=False)
    url = f"data:image/png;base64,{PNG_B64}" if source == "b64" else IMAGE_URL
    assert images_in(pair.target.fmt, body) == [("url", url)]
    last_user = [m for m in body["messages"] if m["role"] == "user"][-1]
    assert text_of(last_user["content"]) == "what is this?"


ERRORS: dict[str, dict[int, type[Exception]]] = {
    "messages": {429: anthropic.RateLimitError, 500: anthropic.InternalServerError},
    "chat": {429: openai.RateLimitError, 500: openai.InternalServerError},
    "responses": {429: openai.RateLimitError, 500: openai.InternalServerError},
}


@pairs
@pytest.mark.parametrize("status", [429, 500])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_provider_error_in_client_format(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, status: int, stream: bool
) -> None:
    message = f"upstream says no ({status}) {UNICODE}"
    fake_of(fakes, pair).script = Script(status=status, error_message=message, retry_after="7")
    with pytest.raises(ERRORS[pair.client][status]) as exc:
        ask(gw, pair, [user_message(pair.client, "hi")], stream=stream)
    err = exc.value
    assert isinstance(err, (anthropic.APIStatusError, openai.APIStatusError))
    assert err.status_code == status
    assert message in err.message
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
    body = err.body
    if pair.client == "messages":  # Anthropic's error shape
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["message"] == message
    else:  # OpenAI's: the SDK hands over the inner error object
        assert isinstance(body, dict) and body["message"] == message
    assert len(fake_of(fakes, pair).requests) == 1


def _raw_stream(gw: GatewayProcess, pair: Pair) -> tuple[int, str]:
    """A raw streamed request (no SDK): status and the whole SSE text (checks the headers)."""
    body: dict[str, Any] = {"model": pair.target.alias, "stream": True}
    if pair.client == "responses":
        body["input"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    if pair.client == "messages":
        body["max_tokens"] = 16
    with httpx.stream("POST", gw.url + PATHS[pair.client], json=body, timeout=30) as resp:
        text = resp.read().decode()
    if resp.status_code == 200:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-plano-model"] == pair.target.served
        assert "content-length" not in resp.headers
    return resp.status_code, text


def _events(sse: str) -> list[tuple[str | None, Any]]:
    out: list[tuple[str | None, Any]] = []
    for frame in sse.replace("\r\n", "\n").split("\n\n"):
        name = None
        data = []
        for line in frame.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            text = "\n".join(data)
            out.append((name, text if text == "[DONE]" else json.loads(text)))
    return out


def assert_client_error_ending(client: str, sse: str) -> None:
    """The stream ends with the client API's error event, never a clean stop."""
    events = _events(sse)
    assert events, sse
    if client == "messages":
        names = [n for n, _ in events]
        assert names[-1] == "error" and events[-1][1]["type"] == "error", names
        assert "message_stop" not in names
    elif client == "chat":
        datas = [d for _, d in events]
        assert any(isinstance(d, dict) and "error" in d for d in datas), datas
        finishes = [
            c.get("finish_reason")
            for d in datas
            if isinstance(d, dict)
            for c in d.get("choices") or []
        ]
        assert finishes == [None] * len(finishes), finishes  # no clean stop
    else:
        types = [d["type"] for _, d in events if isinstance(d, dict)]
        assert "[DONE]" not in sse
        assert types[-1] in ("error", "response.failed"), types
        assert "response.completed" not in types
        seq = [d["sequence_number"] for _, d in events if isinstance(d, dict)]
        assert seq == sorted(seq) and len(set(seq)) == len(seq)


@pairs
@pytest.mark.parametrize("fault", ["error_event", "ends_early"])
def test_stream_fault_after_200_ends_with_client_error(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, fault: str
) -> None:
    fake_of(fakes, pair).script = Script(
        text=["half"], stream_error=fault == "error_event", end_early=fault == "ends_early"
    )
    status, sse = _raw_stream(gw, pair)
    assert status == 200
    assert "half" in sse
    assert_client_error_ending(pair.client, sse)
    # The SDK raises instead of returning a clean answer (the Responses helper raises
    # RuntimeError when no response.completed came).
    raises = {
        "messages": (anthropic.APIError,),
        "chat": (openai.APIError,),
        "responses": (openai.APIError, RuntimeError),
    }
    with pytest.raises(raises[pair.client]):
        ask(gw, pair, [user_message(pair.client, "hi")], stream=True)


# --------------------------------------------------------------------------- untranslatable


@pytest.mark.parametrize(
    ("pair", "extra", "field"),
    with_pairs(
        (RESPONSES_TO_CHAT, {"previous_response_id": "resp_abc"}, "previous_response_id"),
        (RESPONSES_TO_MESSAGES, {"previous_response_id": "resp_abc"}, "previous_response_id"),
        (CHAT_TO_MESSAGES, {"n": 2}, "n"),
    ),
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_untranslatable_is_400_in_client_format_and_nothing_sent(
    gw: GatewayProcess,
    fakes: dict[str, FakeProvider],
    pair: Pair,
    extra: dict[str, Any],
    field: str,
    stream: bool,
) -> None:
    fake_of(fakes, pair).script = Script(text=["must not be asked"])
    with pytest.raises(openai.BadRequestError) as exc:
        if pair.client == "chat":
            oai(gw).chat.completions.create(
                model=pair.target.alias,
                messages=[{"role": "user", "content": "hi"}],
                stream=stream,
                **extra,
            )
        else:
            oai(gw).responses.create(model=pair.target.alias, input="hi", stream=stream, **extra)
    err = exc.value
    assert err.status_code == 400
    assert isinstance(err.body, dict) and f"'{field}'" in err.body["message"]
    assert err.response.headers["content-type"].startswith("application/json")
    for fake in fakes.values():
        assert not fake.requests, fake.name


def test_messages_client_bad_field_is_anthropic_400(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    # A wrong type in a translated Messages request: Anthropic's error shape, nothing sent.
    resp = httpx.post(
        gw.url + "/v1/messages",
        json={
            "model": CHAT_OPENAI.alias,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": [{"type": "image", "source": 7}]}],
        },
        timeout=30,
    )
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source" in body["error"]["message"]
    for fake in fakes.values():
        assert not fake.requests, fake.name


def test_messages_client_to_keyless_chat_provider(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    fakes["ollama"].script = Script(text=["local ", UNICODE])
    got = ask(gw, Pair("messages", CHAT_LOCAL), [user_message("messages", "hi")], stream=True)
    assert got.text == f"local {UNICODE}"
    assert_provider_request(fakes["ollama"].last(), CHAT_LOCAL, stream=True)


# --------------------------------------------------------------------------- native pairs


def test_native_chat_to_openai_is_byte_for_byte(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    raw = (
        b'{"model" : "chat-model", "messages":[{"role":"user","content":"caf\\u00e9 \xc3\xa9"}],'
        b' "n": 2, "logit_bias": {"50256": -100}, "temperature": 1.50, "x_vendor": [1, null]}'
    )
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    rec = fakes["openai"].last()
    assert rec.body == raw.replace(b'"chat-model"', b'"gpt-4o-mini"')
    assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert resp.headers["x-plano-model"] == CHAT_OPENAI.served


def test_native_messages_to_anthropic_is_byte_for_byte(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    fakes["anthropic"].script = Script(text=["native"], split=2, split_utf8=True)
    raw = (
        b'{"model":"claude","max_tokens":64, "stream": true,\n "messages":[{"role":"user",'
        b'"content":[{"type":"text","text":"\xe4\xbd\xa0 hi",'
        b'"cache_control":{"type":"ephemeral"}}]}],'
        b' "thinking": {"type": "enabled", "budget_tokens": 1024}, "top_k": 5}'
    )
    with httpx.stream(
        "POST",
        gw.url + "/v1/messages",
        content=raw,
        headers={"content-type": "application/json", "x-api-key": CLIENT_KEY},
        timeout=30,
    ) as resp:
        streamed = resp.read()
    assert resp.status_code == 200
    rec = fakes["anthropic"].last()
    assert rec.body == raw.replace(b'"claude"', b'"claude-sonnet-4-20250514"')
    assert rec.headers["x-api-key"] == ANTHROPIC_KEY
    # A native answer is not translated: the client gets the provider's bytes.
    assert streamed == fakes["anthropic"].sent[-1]


# --------------------------------------------------------------------------- request mapping


def _system_text(fmt: str, body: dict[str, Any]) -> str:
    if fmt == "messages":
        return text_of(body.get("system", ""))
    return "\n".join(text_of(m["content"]) for m in body["messages"] if m["role"] == "system")


def _max_tokens(fmt: str, body: dict[str, Any]) -> Any:
    if fmt == "messages":
        return body["max_tokens"]
    return body.get("max_completion_tokens", body.get("max_tokens"))


@pairs
def test_request_parameters_reach_provider_in_its_names(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair
) -> None:
    fake = fake_of(fakes, pair)
    fake.script = Script(text=["ok"])
    user = user_message(pair.client, "hi")
    sent: dict[str, Any] = {"model": pair.target.alias, "temperature": 0.5}
    if pair.client == "messages":
        sent |= {
            "max_tokens": 100,
            "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
            "messages": [user],
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"},
            "tools": tools_for("messages"),
            "tool_choice": {"type": "any"},
        }
    elif pair.client == "chat":
        sent |= {
            "max_completion_tokens": 100,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "be kind"},
                user,
            ],
            "stop": ["END"],
            "user": "u-1",
            "tools": tools_for("chat"),
            "tool_choice": "required",
        }
    else:
        sent |= {
            "max_output_tokens": 100,
            "instructions": "be brief\nbe kind",
            "input": [user],
            "tools": tools_for("responses"),
            "tool_choice": "required",
        }
    resp = httpx.post(gw.url + PATHS[pair.client], json=sent, timeout=30)
    assert resp.status_code == 200, resp.text
    body = assert_provider_request(fake.last(), pair.target, stream=False)
    fmt = pair.target.fmt
    system = _system_text(fmt, body)
    assert "be brief" in system and "be kind" in system
    assert _max_tokens(fmt, body) == 100
    assert body["temperature"] == 0.5
    if fmt == "messages":
        assert body["tool_choice"]["type"] == "any"
    else:
        assert body["tool_choice"] == "required"
    if pair.client != "responses":  # Responses has no stop sequences
        assert body["stop_sequences" if fmt == "messages" else "stop"] in (["END"], "END")
        if fmt == "messages":
            assert body["metadata"] == {"user_id": "u-1"}
        else:
            assert body["user"] == "u-1"


STATUS_CLASSES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    413: "APIStatusError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "InternalServerError",
    529: "InternalServerError",
}
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@pairs
@pytest.mark.parametrize("status", sorted(STATUS_CLASSES))
def test_every_provider_error_status_kept(
    gw: GatewayProcess, fakes: dict[str, FakeProvider], pair: Pair, status: int
) -> None:
    message = f"provider error {status}"
    fake_of(fakes, pair).script = Script(status=status, error_message=message)
    sdk: Any = anthropic if pair.client == "messages" else openai
    with pytest.raises(sdk.APIStatusError) as exc:
        ask(gw, pair, [user_message(pair.client, "hi")])
    err = exc.value
    assert err.status_code == status
    assert message in err.message
    # The SDK picked its exception class from the status (a subclass where it has one).
    assert isinstance(err, getattr(sdk, STATUS_CLASSES[status]))
    if pair.client == "messages":
        assert err.body["type"] == "error"
        if status in ANTHROPIC_TYPES:
            assert err.body["error"]["type"] == ANTHROPIC_TYPES[status]
    else:
        assert isinstance(err.body, dict) and isinstance(err.body.get("type"), str)


def test_native_responses_to_openai_is_byte_for_byte(
    gw: GatewayProcess, fakes: dict[str, FakeProvider]
) -> None:
    raw = (
        b'{"model":"chat-model","input":"\xe4\xbd\xa0","previous_response_id":"resp_1",'
        b' "store": true, "include": ["reasoning.encrypted_content"]}'
    )
    resp = httpx.post(
        gw.url + "/v1/responses",
        content=raw,
        headers={"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    rec = fakes["openai"].last()
    assert rec.path == "/v1/responses"
    assert rec.body == raw.replace(b'"chat-model"', b'"gpt-4o-mini"')
