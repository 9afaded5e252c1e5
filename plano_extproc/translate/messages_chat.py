"""Anthropic Messages client -> OpenAI Chat Completions provider.

Serves ``POST /v1/messages`` from any OpenAI-compatible Chat provider (openai, azure, gemini,
groq, mistral, deepseek, xai, together, ollama, vLLM, ...). Choices made here, and why:

Request
- ``system`` (string or text blocks) -> one leading ``system`` message, blocks joined by a blank
  line; no message when it is empty. ``cache_control`` anywhere is dropped (a caching hint).
- User/assistant text -> a string content (parts only when images ride along: some providers take
  no part arrays). Images: base64 source -> ``data:`` URL, url source -> the URL; ``file`` sources
  (Files API ids) are refused.
- ``tool_result`` blocks -> ``role: tool`` messages placed before the rest of their user turn
  (Chat wants tool answers right after the assistant's calls). ``is_error`` keeps its meaning as a
  ``[tool error]`` prefix on the content. Images inside a tool result cannot go into a Chat tool
  message: they follow in one user message, after all tool messages of the turn, introduced by a
  line naming the tool call. A user turn of only tool results yields no empty user message.
- Assistant ``tool_use`` -> ``tool_calls`` (arguments = compact JSON of ``input``). Tool ids outside
  ``[A-Za-z0-9_-]{1,40}`` (OpenAI caps ids at 40) become ``toolu_`` + 32 hex of their SHA-256, the
  same on the call and on its result, so no state is needed. ``thinking``/``redacted_thinking``
  history blocks are dropped: their signatures only mean something to Anthropic. An assistant
  turn left empty is skipped; a trailing assistant turn (prefill) is refused: Chat would answer
  anew instead of continuing it.
- ``max_tokens`` -> ``max_tokens``, except ``max_completion_tokens`` for OpenAI reasoning model
  ids (o1/o3/o4/gpt-5 families, also behind an ``org/`` prefix). Evidence: OpenAI documents
  ``max_tokens`` as deprecated and "not compatible with o-series models" (gpt-5 rejects it too),
  while Ollama's OpenAI layer lists only ``max_tokens`` and Mistral, DeepSeek, Together and older
  vLLM know only ``max_tokens``; OpenAI still accepts ``max_tokens`` for its other models. An
  Azure deployment of a reasoning model under another name gets ``max_tokens`` (the translator
  sees only the model id).
- ``stop_sequences`` -> ``stop``; ``temperature``/``top_p`` as is; ``top_k`` dropped (no Chat
  field); ``metadata.user_id`` -> ``user``; ``stream`` -> ``stream`` + ``stream_options.
  include_usage`` (usage is otherwise lost). ``thinking`` and ``output_config.effort`` are dropped
  (effort hints with no portable Chat field); ``output_config.format`` -> ``response_format``
  json_schema (strict). ``service_tier``, ``speed``, ``diagnostics`` are dropped (hints).
- Tools: custom tools -> functions (names validated ``[a-zA-Z0-9_-]{1,64}``, passed through);
  ``tool_choice`` auto/any/tool/none -> auto/required/named/none, ``disable_parallel_tool_use``
  -> ``parallel_tool_calls: false`` (both sent only with tools: OpenAI rejects them otherwise).
- Refused (Untranslatable, nothing sent): server/hosted tools (web_search, bash, code execution,
  ...), ``container``, ``mcp_servers``, ``context_management``, ``inference_geo``, document /
  search_result / server-tool blocks, any unknown top-level member.

Response
- ``id`` = ``msg_`` + the provider id reduced to ``[A-Za-z0-9_-]``; ``model`` = the provider's.
- Reasoning (``reasoning_content`` / ``reasoning``) becomes a leading ``thinking`` block only when
  the client enabled thinking, with ``signature: ""`` (the SDK requires the field; no real
  signature exists, and this translator drops thinking blocks when they come back).
- Text, then ``refusal`` text, then one ``tool_use`` per call. Arguments that are not a JSON object
  become ``{"_raw_arguments": "<text>"}``: never an empty input the client would run a tool with,
  and the model sees what it produced when the tool rejects it. Empty arguments are ``{}``.
- finish_reason: stop -> end_turn (``stop_sequence`` + value when the provider names the matched
  string, as vLLM does in ``stop_reason``), length -> max_tokens, tool_calls/function_call ->
  tool_use (also when a provider says stop but returned calls), content_filter -> refusal.
- Usage: input_tokens = prompt_tokens - cached, cache_read_input_tokens = cached
  (``prompt_tokens_details.cached_tokens`` or DeepSeek's ``prompt_cache_hit_tokens``),
  output_tokens = completion_tokens, reasoning_tokens -> output_tokens_details.thinking_tokens.

Stream
- ``message_start`` on the first chunk (input tokens 0 unless that chunk has usage; the real count
  goes into ``message_delta.usage``). Text and thinking stream live. The first tool call streams
  live as ``input_json_delta`` pieces exactly as received; later tool calls (and any text after a
  tool started) are buffered and emitted whole, in order of appearance, at ``finish_reason``:
  Anthropic blocks cannot interleave and Chat may interleave argument deltas across calls.
  Buffered arguments are normalised as in ``response``. ``message_delta`` + ``message_stop`` go
  out when the usage chunk arrives (or ``[DONE]``/end after ``finish_reason``; ``[DONE]`` without
  a ``finish_reason`` closes as end_turn, as C2's "missing" row). A tool call starts only with an
  id or a name (stray argument deltas are ignored); a new id on a known index is a new call.
  Chat ``error`` types map to Anthropic's (rate_limit_exceeded -> rate_limit_error, unknown ->
  api_error), message capped at 1000 characters. An ``error`` chunk
  -> Anthropic ``error`` event and the end; a stream ending before ``finish_reason`` -> ``error``
  (api_error), never a clean stop.
"""

from __future__ import annotations

import json
from typing import Any

from plano_extproc.errors import GatewayError, bad_request
from plano_extproc.providers import ClientApi
from plano_extproc.translate.base import Context, SseOut, Untranslatable
from plano_extproc.translate.chat import (
    message_content,
    reasoning_of,
    text_of,
    tool_message_text,
)
from plano_extproc.translate.fields import (
    MAX_SHORT,
    OPENAI_MAX_ID,
    clean_id,
    client_id,
    need_array,
    need_int,
    need_name,
    need_number,
    need_object,
    need_str,
    short_text,
    token_count,
)

client: ClientApi = ClientApi.MESSAGES
provider: ClientApi = ClientApi.CHAT

_TARGET = ClientApi.CHAT.label
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")

# Top-level members: handled elsewhere in ``request``, dropped hints, and refused features.
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
    }
)
_DROPPED = frozenset({"cache_control", "service_tier", "speed", "diagnostics"})
_TOOL_KEYS = frozenset(
    {"type", "name", "description", "input_schema", "cache_control", "strict"}
    | {"eager_input_streaming"}
)


# ---------------------------------------------------------------- validation helpers


def _tool_id(value: Any, where: str) -> str:
    """A client tool id as the provider gets it: kept when Chat-safe, else a stable digest."""
    return client_id(value, where, OPENAI_MAX_ID, "toolu_")


def _text_block(block: dict[str, Any], where: str) -> str:
    return need_str(block.get("text"), f"{where}.text")


def _block_type(block: Any, where: str) -> tuple[dict[str, Any], str]:
    block = need_object(block, where)
    return block, need_str(block.get("type"), f"{where}.type")


# ---------------------------------------------------------------- request


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = need_object(block.get("source"), f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        media = need_str(source.get("media_type"), f"{where}.source.media_type")
        if media not in _IMAGE_TYPES:
            raise bad_request(f"'{where}.source.media_type' must be one of {sorted(_IMAGE_TYPES)}")
        data = need_str(source.get("data"), f"{where}.source.data")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = need_str(source.get("url"), f"{where}.source.url")
        if not url.startswith(("https://", "http://")):
            raise bad_request(f"'{where}.source.url' must be an http(s) URL")
    elif kind == "file":
        raise Untranslatable(f"{where}.source", _TARGET, "Files API ids exist only at Anthropic")
    else:
        raise bad_request(f"'{where}.source.type' must be 'base64' or 'url'")
    return {"type": "image_url", "image_url": {"url": url}}


def _system(value: Any) -> str:
    if isinstance(value, str):
        return value
    texts = []
    for j, block in enumerate(need_array(value, "system")):
        block, kind = _block_type(block, f"system[{j}]")
        if kind != "text":
            raise bad_request(f"'system[{j}].type' must be 'text'")
        texts.append(_text_block(block, f"system[{j}]"))
    return "\n\n".join(t for t in texts if t)


def _tool_result(block: dict[str, Any], where: str) -> tuple[dict[str, Any], list[Any]]:
    """One ``role: tool`` message and the image parts that must follow in a user message."""
    call_id = _tool_id(block.get("tool_use_id"), f"{where}.tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for k, part in enumerate(need_array(content, f"{where}.content")):
            at = f"{where}.content[{k}]"
            part, kind = _block_type(part, at)
            if kind == "text":
                texts.append(_text_block(part, at))
            elif kind == "image":
                images.append(_image_part(part, at))
            else:
                raise Untranslatable(f"{at}.type", _TARGET, f"'{kind}' in a tool result")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise bad_request(f"'{where}.is_error' must be a boolean")
    text = tool_message_text(texts, len(images))
    if is_error:
        text = f"[tool error] {text}"
    extra: list[Any] = []
    if images:
        extra = [{"type": "text", "text": f"Images returned by tool call {call_id}:"}, *images]
    return {"role": "tool", "tool_call_id": call_id, "content": text}, extra


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_msgs: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(need_array(content, where)):
        at = f"{where}[{j}]"
        block, kind = _block_type(block, at)
        if kind == "text":
            parts.append({"type": "text", "text": _text_block(block, at)})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_result":
            msg, extra = _tool_result(block, at)
            tool_msgs.append(msg)
            parts.extend(extra)
        else:
            raise Untranslatable(f"{at}.type", _TARGET, f"'{kind}' content blocks")
    out = tool_msgs
    if parts or not tool_msgs:
        out = [*tool_msgs, {"role": "user", "content": message_content(parts)}]
    return out


def _assistant(content: Any, where: str) -> dict[str, Any] | None:
    if isinstance(content, str):
        return {"role": "assistant", "content": content} if content else None
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(need_array(content, where)):
        at = f"{where}[{j}]"
        block, kind = _block_type(block, at)
        if kind == "text":
            texts.append(_text_block(block, at))
        elif kind == "tool_use":
            args = need_object(block.get("input"), f"{at}.input")
            calls.append(
                {
                    "id": _tool_id(block.get("id"), f"{at}.id"),
                    "type": "function",
                    "function": {
                        "name": need_name(block.get("name"), f"{at}.name"),
                        "arguments": json.dumps(args, ensure_ascii=False, separators=(",", ":")),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # Anthropic-signed reasoning: meaningless to another provider
        else:
            raise Untranslatable(f"{at}.type", _TARGET, f"'{kind}' content blocks")
    text = "\n".join(t for t in texts if t)
    if not text and not calls:
        return None
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(value: Any) -> list[dict[str, Any]]:
    items = need_array(value, "messages")
    if not items:
        raise bad_request("'messages' must contain at least one message")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(items):
        where = f"messages[{i}]"
        msg = need_object(msg, where)
        role = msg.get("role")
        content = msg.get("content")
        if not isinstance(content, str | list):
            raise bad_request(f"'{where}.content' must be a string or an array of blocks")
        if role == "user":
            out.extend(_user(content, f"{where}.content"))
        elif role == "assistant":
            converted = _assistant(content, f"{where}.content")
            if i == len(items) - 1:
                raise Untranslatable(where, _TARGET, "a trailing assistant turn (prefill)")
            if converted is not None:
                out.append(converted)
        else:
            raise bad_request(f"'{where}.role' must be 'user' or 'assistant'")
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(need_array(value, "tools")):
        where = f"tools[{i}]"
        tool = need_object(tool, where)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            label = kind if isinstance(kind, str) else "non-custom"
            raise Untranslatable(f"{where}.type", _TARGET, f"server tool '{label[:64]}'")
        for key in tool:
            if key not in _TOOL_KEYS:
                raise Untranslatable(f"{where}.{key[:64]}", _TARGET)
        fn: dict[str, Any] = {"name": need_name(tool.get("name"), f"{where}.name")}
        if tool.get("description") is not None:
            fn["description"] = need_str(tool["description"], f"{where}.description")
        schema = need_object(tool.get("input_schema"), f"{where}.input_schema")
        fn["parameters"] = schema
        strict = tool.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise bad_request(f"'{where}.strict' must be a boolean")
            fn["strict"] = strict
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: Any, chat: dict[str, Any]) -> None:
    choice = need_object(value, "tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        name = need_name(choice.get("name"), "tool_choice.name")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise bad_request("'tool_choice.type' must be one of auto, any, tool, none")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None:
        if not isinstance(disable, bool):
            raise bad_request("'tool_choice.disable_parallel_tool_use' must be a boolean")
        if disable and kind != "none":
            chat["parallel_tool_calls"] = False


def _output_format(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    fmt = need_object(value, where)
    if fmt.get("type") != "json_schema":
        raise bad_request(f"'{where}.type' must be 'json_schema'")
    schema = need_object(fmt.get("schema"), f"{where}.schema")
    return {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


def _thinking_shown(value: Any) -> bool:
    if value is None:
        return False
    cfg = need_object(value, "thinking")
    kind = cfg.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise bad_request("'thinking.type' must be one of enabled, disabled, adaptive")
    if cfg.get("budget_tokens") is not None:
        need_int(cfg["budget_tokens"], "thinking.budget_tokens")
    return kind != "disabled" and cfg.get("display") != "omitted"


def uses_completion_tokens(model_id: str) -> bool:
    name = model_id.rsplit("/", 1)[-1].lower()
    return name.startswith(_REASONING_PREFIXES)


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context]:
    """The Chat body for ``model_id`` and the context ``response``/``stream`` need."""
    for key, value in body.items():
        if key in _HANDLED or key in _DROPPED or value is None or value == [] or value == {}:
            continue  # an absent, null or empty member asks for nothing
        raise Untranslatable(key[:64], _TARGET)
    requested = body.get("model")
    requested = short_text(requested)

    messages = _messages(body.get("messages"))
    if body.get("system") is not None:
        system = _system(body["system"])
        if system:
            messages.insert(0, {"role": "system", "content": system})
    if "max_tokens" not in body:
        raise bad_request("'max_tokens' is required")
    max_tokens = need_int(body["max_tokens"], "max_tokens", 1)

    chat: dict[str, Any] = {"model": model_id, "messages": messages}
    key = "max_completion_tokens" if uses_completion_tokens(model_id) else "max_tokens"
    chat[key] = max_tokens
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = need_number(body[name], name)
    if body.get("top_k") is not None:
        need_int(body["top_k"], "top_k")  # validated, then dropped: Chat has no top_k
    stops = body.get("stop_sequences")
    if stops is not None:
        stops = [
            need_str(s, f"stop_sequences[{i}]")
            for i, s in enumerate(need_array(stops, "stop_sequences"))
        ]
        if stops:
            chat["stop"] = stops
    if body.get("metadata") is not None:
        user = need_object(body["metadata"], "metadata").get("user_id")
        if user is not None:
            user = need_str(user, "metadata.user_id")
            if len(user) > MAX_SHORT:
                raise bad_request(f"'metadata.user_id' must be at most {MAX_SHORT} characters")
            chat["user"] = user
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        if tools:
            chat["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
        if "tools" not in chat:  # Chat rejects both without tools; Anthropic allows it
            chat.pop("tool_choice", None)
            chat.pop("parallel_tool_calls", None)
    fmt = _output_format(body.get("output_format"), "output_format")
    if body.get("output_config") is not None:
        cfg = need_object(body["output_config"], "output_config")
        fmt = _output_format(cfg.get("format"), "output_config.format") or fmt
    if fmt is not None:
        chat["response_format"] = fmt
    thinking = _thinking_shown(body.get("thinking"))
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    ctx: Context = {
        "stream": bool(stream),
        "model": requested,
        "thinking": thinking,
        "stop": bool(chat.get("stop")),
    }
    return chat, ctx


# ---------------------------------------------------------------- response


def _provider_model(body: dict[str, Any], ctx: Context) -> str:
    model = body.get("model")
    if isinstance(model, str) and model:
        return model[:MAX_SHORT]
    fallback = ctx.get("model")
    return fallback if isinstance(fallback, str) else ""


def _usage(usage: Any) -> dict[str, Any]:
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    details = usage.get("prompt_tokens_details")
    cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = cached or token_count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    prompt = token_count(usage.get("prompt_tokens"))
    out: dict[str, Any] = {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": token_count(usage.get("completion_tokens")),
    }
    if cached:
        out["cache_read_input_tokens"] = cached
    details = usage.get("completion_tokens_details")
    reasoning = token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    if reasoning:
        out["output_tokens_details"] = {"thinking_tokens": reasoning}
    return out


def _tool_input(arguments: Any) -> dict[str, Any]:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, dict):
        return arguments
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": text}


def _block_id(value: Any, message_id: str, n: int) -> str:
    """An Anthropic-charset tool id; derived from the message id when the provider gave none."""
    ident = clean_id(value)
    return ident or f"toolu_{message_id[4:]}_{n}"


def _stop_reason(finish: Any, has_tools: bool, matched: Any, ctx: Context) -> tuple[str, Any]:
    if finish == "length":
        return "max_tokens", None
    if finish == "content_filter":
        return "refusal", None
    if finish in ("tool_calls", "function_call") or has_tools:
        return "tool_use", None
    if ctx.get("stop") and isinstance(matched, str) and matched:
        return "stop_sequence", matched[:MAX_SHORT]
    return "end_turn", None


def _provider_error(message: str) -> GatewayError:
    return GatewayError(502, "api_error", f"provider reply: {message}")


def response(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A Chat completion as an Anthropic Message."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _provider_error("no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _provider_error("choices[0].message is not an object")
    msg_id = "msg_" + (clean_id(body.get("id")) or "chat")
    content: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning and ctx.get("thinking"):
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = text_of(message.get("content"))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        text = f"{text}\n{refusal}" if text else refusal
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for n, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            name = fn.get("name")
            content.append(
                {
                    "type": "tool_use",
                    "id": _block_id(call.get("id"), msg_id, n),
                    "name": short_text(name),
                    "input": _tool_input(fn.get("arguments")),
                }
            )
    has_tools = any(b["type"] == "tool_use" for b in content)
    stop_reason, stop_sequence = _stop_reason(
        choice.get("finish_reason"), has_tools, choice.get("stop_reason"), ctx
    )
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": _provider_model(body, ctx),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(body.get("usage")),
    }


# ---------------------------------------------------------------- stream

_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "overloaded_error": "overloaded_error",
    "timeout_error": "timeout_error",
}


def _error_event(error: Any) -> SseOut:
    kind, message = "api_error", "the provider reported an error"
    if isinstance(error, dict):
        raw_type = error.get("type") or error.get("code")
        if isinstance(raw_type, str):
            kind = _ERROR_TYPES.get(raw_type, "api_error")
        if isinstance(error.get("message"), str) and error["message"]:
            message = error["message"][:1000]
    elif isinstance(error, str) and error:
        message = error[:1000]
    return "error", {"type": "error", "error": {"type": kind, "message": message}}


class _Tool:
    __slots__ = ("args", "id", "n", "name", "raw_id")

    def __init__(self, n: int) -> None:
        self.n = n  # order of appearance, as the position in a non-streamed reply
        self.raw_id = ""  # as the provider spells it (some repeat it on every delta)
        self.id = ""
        self.name = ""
        self.args: list[str] = []


class MessagesStream:
    """Chat chunks -> Anthropic events. See the module docstring for the buffering rule."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._thinking = bool(ctx.get("thinking"))
        self._started = False
        self._done = False
        self._msg_id = "msg_chat"
        self._model = ctx.get("model") if isinstance(ctx.get("model"), str) else ""
        self._index = -1  # last block index used
        self._open: str | None = None  # kind of the open live block: text, thinking, tool
        self._live_tool: _Tool | None = None
        self._tools: dict[int, _Tool] = {}  # provider tool index -> call
        self._tool_count = 0
        self._pending: list[Any] = []  # after the live tool: _Tool, or [kind, pieces]
        self._finish: Any = None
        self._finished = False
        self._matched: Any = None
        self._usage: Any = None

    # -- helpers

    def _start(self, chunk: dict[str, Any], out: list[SseOut]) -> None:
        self._started = True
        ident = clean_id(chunk.get("id"))
        if ident:
            self._msg_id = "msg_" + ident
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self._model = model[:MAX_SHORT]
        usage = {"input_tokens": 0, "output_tokens": 0}
        if isinstance(chunk.get("usage"), dict):
            usage["input_tokens"] = _usage(chunk["usage"])["input_tokens"]
        message: dict[str, Any] = {
            "id": self._msg_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        out.append(("message_start", {"type": "message_start", "message": message}))

    def _close(self, out: list[SseOut]) -> None:
        if self._open is not None:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
            self._open = None

    def _open_block(self, block: dict[str, Any], out: list[SseOut]) -> None:
        self._close(out)
        self._index += 1
        self._open = block["type"]
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self._index, "content_block": block},
            )
        )

    def _delta(self, delta: dict[str, Any], out: list[SseOut]) -> None:
        out.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self._index, "delta": delta},
            )
        )

    def _piece(self, kind: str, text: str, out: list[SseOut]) -> None:
        """Live text/thinking before any tool call; buffered after one."""
        if self._live_tool is not None:
            last = self._pending[-1] if self._pending else None
            if isinstance(last, list) and last[0] == kind:
                last[1].append(text)
            else:
                self._pending.append([kind, [text]])
            return
        if self._open != kind:
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            self._open_block(block, out)
        if kind == "text":
            self._delta({"type": "text_delta", "text": text}, out)
        else:
            self._delta({"type": "thinking_delta", "thinking": text}, out)

    def _tool_delta(self, item: Any, position: int, out: list[SseOut]) -> None:
        if not isinstance(item, dict):
            return
        index = item.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            index = position
        ident = item.get("id")
        fn = item.get("function")
        if not isinstance(fn, dict):
            fn = {}
        tool = self._tools.get(index)
        new_id = isinstance(ident, str) and ident != "" and (tool is None or ident != tool.raw_id)
        if tool is None and not new_id and not isinstance(fn.get("name"), str):
            return  # arguments for a call that was never announced
        if tool is None or (new_id and tool.raw_id):
            tool = _Tool(self._tool_count)
            self._tools[index] = tool
            self._tool_count += 1
            if self._live_tool is None:
                self._live_tool = tool
            else:
                self._pending.append(tool)
        if isinstance(ident, str) and ident and not tool.raw_id:
            tool.raw_id = ident
            tool.id = _block_id(ident, self._msg_id, tool.n)
        name = fn.get("name")
        if isinstance(name, str) and name and not tool.name:
            tool.name = name[:MAX_SHORT]
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = ""
        if tool is not self._live_tool:
            if args:
                tool.args.append(args)
            return
        if self._open != "tool_use":
            if not tool.name:  # the block needs its name: hold pieces until it arrives
                if args:
                    tool.args.append(args)
                return
            if not tool.id:
                tool.id = _block_id(None, self._msg_id, tool.n)
            self._open_block(
                {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}, out
            )
            held = "".join(tool.args)
            tool.args.clear()
            if held:
                self._delta({"type": "input_json_delta", "partial_json": held}, out)
        if args:
            self._delta({"type": "input_json_delta", "partial_json": args}, out)

    def _emit_whole_tool(self, tool: _Tool, out: list[SseOut]) -> None:
        ident = tool.id or _block_id(None, self._msg_id, tool.n)
        self._open_block({"type": "tool_use", "id": ident, "name": tool.name, "input": {}}, out)
        raw = "".join(tool.args)
        if raw.strip():  # re-serialised: always a JSON object the client SDK can parse
            text = json.dumps(_tool_input(raw), ensure_ascii=False, separators=(",", ":"))
            self._delta({"type": "input_json_delta", "partial_json": text}, out)

    def _flush_blocks(self, out: list[SseOut]) -> None:
        live = self._live_tool
        if live is not None and self._open != "tool_use":
            self._emit_whole_tool(live, out)  # its name never came: emit it whole
        self._close(out)
        for item in self._pending:
            if isinstance(item, _Tool):
                self._emit_whole_tool(item, out)
            else:
                kind, pieces = item
                self._live_tool = None
                self._piece(kind, "".join(pieces), out)
            self._close(out)
        self._pending = []

    def _message_end(self, out: list[SseOut]) -> None:
        has_tools = self._tool_count > 0
        reason, seq = _stop_reason(self._finish, has_tools, self._matched, self._ctx)
        usage = _usage(self._usage)
        out.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": seq},
                    "usage": usage,
                },
            )
        )
        out.append(("message_stop", {"type": "message_stop"}))
        self._done = True

    # -- StreamTranslator

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        if self._done:
            return []
        out: list[SseOut] = []
        if isinstance(data, str):
            if data.strip() == "[DONE]" and self._started:
                if not self._finished:
                    self._finished = True
                    self._flush_blocks(out)
                self._message_end(out)
            return out
        if data.get("error") is not None or name == "error":
            self._done = True
            return [_error_event(data.get("error", data))]
        if name == "ping":
            return out
        if not self._started:
            self._start(data, out)
        usage = data.get("usage")
        if not isinstance(usage, dict):
            x_groq = data.get("x_groq")
            usage = x_groq.get("usage") if isinstance(x_groq, dict) else None
        if isinstance(usage, dict):
            self._usage = usage
        choices = data.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict) and not self._finished:
                reasoning = reasoning_of(delta)
                if reasoning and self._thinking:
                    self._piece("thinking", reasoning, out)
                text = delta.get("content")
                if isinstance(text, str) and text:
                    self._piece("text", text, out)
                refusal = delta.get("refusal")
                if isinstance(refusal, str) and refusal:
                    self._piece("text", refusal, out)
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    for position, item in enumerate(calls):
                        self._tool_delta(item, position, out)
            finish = choice.get("finish_reason")
            if finish is not None and not self._finished:
                self._finished = True
                self._finish = finish
                self._matched = choice.get("stop_reason")
                self._flush_blocks(out)
        if self._finished and isinstance(usage, dict):
            self._message_end(out)
        return out

    def end(self) -> list[SseOut]:
        if self._done:
            return []
        out: list[SseOut] = []
        if self._finished:
            self._message_end(out)
            return out
        self._done = True
        message = "the provider stream ended early, before a finish_reason"
        return [("error", {"type": "error", "error": {"type": "api_error", "message": message}})]


def stream(ctx: Context) -> MessagesStream:
    """A translator for one Chat SSE stream."""
    return MessagesStream(ctx)
