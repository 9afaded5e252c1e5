"""OpenAI Chat Completions client -> Anthropic Messages provider (native ``/v1/messages``).

Serves ``POST /v1/chat/completions`` from Anthropic without its OpenAI-compatible endpoint
(Anthropic calls that a testing aid). The Responses -> Anthropic pair composes with this module
(Responses -> Chat -> here), so the Chat side it produces is complete: reasoning, tool call ids,
cached tokens. Choices made here, and why:

Request
- Every ``system`` and ``developer`` message, wherever it stands, becomes ``system`` text blocks
  in order: Anthropic has one system prompt, so later ones are hoisted to it (as Anthropic's own
  OpenAI layer does) rather than dropped. Blank text is skipped (Anthropic rejects it).
- User parts: ``text``; ``image_url`` with a ``data:<type>;base64,`` URL -> base64 image source
  (jpeg/png/gif/webp only, else 400 naming the part), an http(s) URL -> url source; ``detail`` is
  dropped. ``input_audio`` and ``file`` parts are refused (no Anthropic equivalent here).
- Assistant ``content`` (string, text or refusal parts) and ``refusal`` -> text blocks, then one
  ``tool_use`` per call with ``input`` = the parsed arguments (a JSON object; "" means {}; else a
  400 naming the field). No empty text block for "" / null content. ``reasoning_content`` sent
  back is dropped: Anthropic only accepts thinking blocks with its signature.
- ``role: tool`` -> ``tool_result{tool_use_id, content}`` in a user turn (``is_error`` is never
  set: Chat has no such flag, and guessing it from the text could mislabel a result).
  Consecutive same-role messages merge into one turn (Anthropic wants alternating roles):
  parallel tool results share one user turn, and a user message after them joins it; tool
  results go first in that turn, as Anthropic requires. ``name`` fields are dropped. A trailing
  assistant message is refused: Anthropic would continue it (prefill) where OpenAI answers anew.
- Tool call ids: kept when they match ``[A-Za-z0-9_-]{1,64}`` (Anthropic's charset), else
  ``toolu_`` + 32 hex of their SHA-256, the same on the call and on its result (no state).
- ``max_completion_tokens`` (preferred) or ``max_tokens`` -> ``max_tokens``; absent ->
  ``DEFAULT_MAX_TOKENS``. ``temperature`` above Anthropic's 1.0 is clamped to 1.0 (both ends are
  "most random"; Anthropic's OpenAI layer caps it the same way) rather than failing a valid
  OpenAI request; outside OpenAI's 0..2 is a 400. ``top_p`` as is; ``stop`` (string or list) ->
  ``stop_sequences``; ``user`` (else ``safety_identifier``) -> ``metadata.user_id``.
- Tools: ``function`` tools -> ``{name, description, input_schema, strict}``; other tool types,
  ``functions``/``function_call`` (deprecated), ``web_search_options`` are refused. ``tool_choice``
  auto/required/none/named -> auto/any/none/tool; ``parallel_tool_calls: false`` ->
  ``disable_parallel_tool_use`` on the tool_choice (auto when none was given). Both only with tools.
- ``response_format``: ``json_schema`` -> ``output_config.format`` (Anthropic structured outputs,
  GA in the Messages API; models without it answer 400); ``json_object`` is refused (Anthropic has
  no schema-less JSON mode); ``text`` is the default.
- ``reasoning_effort`` -> ``thinking``: none -> disabled, else enabled with
  ``THINKING_BUDGETS`` (1024 is Anthropic's minimum). Anthropic requires ``budget_tokens <
  max_tokens`` (a client max is lowered to fit, below 1025 it is refused; without one max_tokens
  is the budget + ``DEFAULT_MAX_TOKENS``), no temperature other than 1, ``top_p`` in 0.95..1 and
  no forced tool use: others are refused. A request continuing a tool call (last turn is tool
  results) gets no thinking: Anthropic then wants the signed thinking block of the call's turn,
  which a Chat client cannot send back.
- Refused: ``n`` > 1, ``logprobs``/``top_logprobs``, non-empty ``logit_bias``, ``audio`` or
  non-text ``modalities``, any unknown member. Dropped (sampling or bookkeeping hints with no
  Anthropic field; the answer's meaning is kept): ``seed``, ``presence_penalty``,
  ``frequency_penalty``, ``store``, ``metadata``, ``prediction``, ``prompt_cache_key``,
  ``prompt_cache_retention``, ``service_tier``, ``verbosity``, ``stream_options``
  (``include_usage`` is kept in the context: Anthropic always reports usage).

Response
- ``id`` = "chatcmpl-" + the message id; ``created`` = the request time the context carries
  (0 without it), so one request's chunks and reply agree; ``model`` = Anthropic's.
- ``content`` = all text blocks joined (null when only tool calls came), ``tool_calls`` from
  ``tool_use`` (arguments = compact JSON of ``input``), ``reasoning_content`` from thinking blocks
  (the vendor field DeepSeek and vLLM use; redacted thinking is left out).
- stop_reason: end_turn/stop_sequence/pause_turn -> stop, max_tokens and
  model_context_window_exceeded -> length, tool_use -> tool_calls, refusal -> content_filter.
- Usage: prompt_tokens = input + cache_read + cache_creation (Anthropic's input excludes both),
  ``prompt_tokens_details.cached_tokens`` = cache_read (always present), thinking tokens ->
  ``completion_tokens_details.reasoning_tokens``.

Stream
- ``message_start`` -> a chunk with ``delta.role``; text/thinking deltas -> ``content`` /
  ``reasoning_content``; a ``tool_use`` block start -> a ``tool_calls`` entry (index = a running
  tool counter from 0, id, name, arguments ""), its ``input_json_delta`` pieces -> arguments on that
  index. ``message_delta`` is remembered; ``message_stop`` -> one chunk with ``finish_reason``
  (with ``content: ""`` when nothing at all was produced, as the JSON reply has), then a
  ``choices: []`` usage chunk when the client asked for ``include_usage``, then ``[DONE]``.
  ``ping`` -> nothing. An ``error`` event, or the stream ending before ``message_stop``, -> one
  ``{"error": {message, type, code, param}}`` chunk (the openai SDK raises APIError on it) and the
  end, without ``[DONE]``: never a clean stop.
"""

from __future__ import annotations

import json
import time
from typing import Any

from plano_extproc.errors import GatewayError, bad_request
from plano_extproc.providers import ClientApi
from plano_extproc.translate.base import Context, SseOut, Untranslatable
from plano_extproc.translate.fields import (
    MAX_SHORT,
    clean_id,
    client_id,
    need_array,
    need_int,
    need_name,
    need_number_in,
    need_object,
    need_str,
    reply_model,
    short_text,
    token_count,
)

client: ClientApi = ClientApi.CHAT
provider: ClientApi = ClientApi.MESSAGES

DEFAULT_MAX_TOKENS = 4096
"""``max_tokens`` when a Chat client gives none: Anthropic requires it, OpenAI does not. 4096 is
the smallest output cap of current Claude models (Claude 3 Haiku), so no model rejects it, and
Plano uses the same default."""

THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 24576}
"""``reasoning_effort`` -> ``thinking.budget_tokens``: Anthropic's minimum (1024) for the lowest
level, then growing steps; the largest plus ``DEFAULT_MAX_TOKENS`` stays under 32000, the smallest
output cap among thinking-capable Claude models (Opus 4 / 4.1), so the default max is accepted."""

_TARGET = ClientApi.MESSAGES.label
_MAX_ID = 64  # Anthropic's tool id cap, as its name cap
_MAX_STOPS = 64
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "safety_identifier",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "response_format",
        "reasoning_effort",
        "stream",
        "stream_options",
        "modalities",
    }
)
_DROPPED = frozenset(
    {
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "store",
        "metadata",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "verbosity",
    }
)
# Message members: dropped ones (names, echoes of our own reply fields) and those read.
_MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
    | {"reasoning_content", "reasoning", "annotations", "parsed"}
)


# ---------------------------------------------------------------- validation helpers


def _tool_id(value: Any, where: str) -> str:
    """A client tool call id in Anthropic's charset: kept when it fits, else a stable digest."""
    return client_id(value, where, _MAX_ID, "toolu_")


def _text(text: str) -> dict[str, Any] | None:
    """A text block, or None for blank text (Anthropic rejects whitespace-only text blocks)."""
    return {"type": "text", "text": text} if text.strip() else None


# ---------------------------------------------------------------- request: content


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    spec = part.get("image_url")
    if isinstance(spec, str):  # some clients send the URL itself
        url = spec
        where = f"{where}.image_url"
    else:
        url = need_str(need_object(spec, f"{where}.image_url").get("url"), f"{where}.image_url.url")
        where = f"{where}.image_url.url"
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding.lower() != "base64" or not data:
            raise bad_request(f"'{where}' must be a base64 data URL (data:<type>;base64,<data>)")
        media_type = media_type.lower()
        if media_type not in _IMAGE_TYPES:
            raise bad_request(
                f"'{where}' has image type {media_type[:64]!r}: Anthropic takes "
                "image/jpeg, image/png, image/gif or image/webp"
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise bad_request(f"'{where}' must be an http(s) URL or a base64 data URL")


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        block = _text(content)
        return [block] if block else []
    out: list[dict[str, Any]] = []
    for j, part in enumerate(need_array(content, where)):
        at = f"{where}[{j}]"
        part = need_object(part, at)
        kind = part.get("type")
        if kind == "text":
            block = _text(need_str(part.get("text"), f"{at}.text"))
            if block:
                out.append(block)
        elif kind == "image_url":
            out.append(_image(part, at))
        elif kind in ("input_audio", "file"):
            raise Untranslatable(at, _TARGET, f"'{kind}' content parts")
        else:
            raise bad_request(f"'{at}.type' must be one of text, image_url, input_audio, file")
    return out


def _text_parts(content: Any, where: str, kinds: tuple[str, ...] = ("text",)) -> list[str]:
    """Texts of a string or of text-like parts (system, developer, tool, assistant content)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(need_array(content, where)):
        at = f"{where}[{j}]"
        part = need_object(part, at)
        kind = part.get("type")
        if kind not in kinds:
            raise bad_request(f"'{at}.type' must be {' or '.join(kinds)}")
        texts.append(need_str(part.get(kind), f"{at}.{kind}"))
    return texts


def _arguments(value: Any, where: str) -> dict[str, Any]:
    text = need_str(value, where)
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        raise bad_request(f"'{where}' must be a JSON object (it does not parse)") from None
    if not isinstance(parsed, dict):
        raise bad_request(f"'{where}' must be a JSON object")
    return parsed


def _assistant_blocks(msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts = _text_parts(msg.get("content"), f"{where}.content", ("text", "refusal"))
    if msg.get("refusal") is not None:
        texts.append(need_str(msg["refusal"], f"{where}.refusal"))
    for text in texts:
        block = _text(text)
        if block:
            out.append(block)
    calls = msg.get("tool_calls")
    if calls is None:
        return out
    for k, call in enumerate(need_array(calls, f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{k}]"
        call = need_object(call, at)
        kind = call.get("type", "function")
        if kind != "function":
            label = kind[:64] if isinstance(kind, str) else "non-function"
            raise Untranslatable(f"{at}.type", _TARGET, f"'{label}' tool calls")
        fn = need_object(call.get("function"), f"{at}.function")
        out.append(
            {
                "type": "tool_use",
                "id": _tool_id(call.get("id"), f"{at}.id"),
                "name": need_name(fn.get("name"), f"{at}.function.name"),
                "input": _arguments(fn.get("arguments", ""), f"{at}.function.arguments"),
            }
        )
    return out


def _tool_result(msg: dict[str, Any], where: str) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": _tool_id(msg.get("tool_call_id"), f"{where}.tool_call_id"),
    }
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        texts = [_text(t) for t in _text_parts(content, f"{where}.content")]
        blocks = [t for t in texts if t]
        if blocks:
            block["content"] = blocks
    return block


def _convert(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, alternating user/assistant turns) from the Chat message list."""
    items = need_array(messages, "messages")
    if not items:
        raise bad_request("'messages' must contain at least one message")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    last_kept = -1
    for i, msg in enumerate(items):
        where = f"messages[{i}]"
        msg = need_object(msg, where)
        role = msg.get("role")
        for key, value in msg.items():
            if key not in _MESSAGE_KEYS and value is not None:
                raise Untranslatable(f"{where}.{key[:64]}", _TARGET)
        if role in ("system", "developer"):
            for text in _text_parts(msg.get("content"), f"{where}.content"):
                block = _text(text)
                if block:
                    system.append(block)
            continue
        if role == "user":
            kind, blocks = "user", _user_blocks(msg.get("content"), f"{where}.content")
        elif role == "assistant":
            kind, blocks = "assistant", _assistant_blocks(msg, where)
        elif role == "tool":
            kind, blocks = "user", [_tool_result(msg, where)]
        elif role == "function":
            raise Untranslatable(f"{where}.role", _TARGET, "deprecated 'function' messages")
        else:
            raise bad_request(
                f"'{where}.role' must be one of system, developer, user, assistant, tool"
            )
        if not blocks:
            continue  # an empty message asks for nothing; its neighbours merge
        last_kept = i
        if turns and turns[-1]["role"] == kind:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": kind, "content": blocks})
    if not turns:
        raise bad_request("'messages' must contain a user message with content")
    if turns[-1]["role"] == "assistant":
        raise Untranslatable(
            f"messages[{last_kept}]",
            _TARGET,
            "a trailing assistant message would be continued (prefill), not answered",
        )
    for turn in turns:  # Anthropic wants a turn's tool results before anything else in it
        content = turn["content"]
        if turn["role"] == "user" and len(content) > 1:
            content.sort(key=lambda b: b["type"] != "tool_result")  # stable
    return system, turns


# ---------------------------------------------------------------- request: parameters


def _tools(value: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(need_array(value, "tools")):
        where = f"tools[{i}]"
        tool = need_object(tool, where)
        kind = tool.get("type")
        if kind != "function":
            label = kind[:64] if isinstance(kind, str) else "non-function"
            raise Untranslatable(f"{where}.type", _TARGET, f"'{label}' tools")
        fn = need_object(tool.get("function"), f"{where}.function")
        spec: dict[str, Any] = {"name": need_name(fn.get("name"), f"{where}.function.name")}
        if fn.get("description") is not None:
            spec["description"] = need_str(fn["description"], f"{where}.function.description")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        spec["input_schema"] = need_object(schema, f"{where}.function.parameters")
        strict = fn.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise bad_request(f"'{where}.function.strict' must be a boolean")
            if strict:
                spec["strict"] = True
        out.append(spec)
    return out


def _tool_choice(value: Any) -> dict[str, Any]:
    if value == "auto":
        return {"type": "auto"}
    if value == "required":
        return {"type": "any"}
    if value == "none":
        return {"type": "none"}
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "function":
            fn = need_object(value.get("function"), "tool_choice.function")
            return {"type": "tool", "name": need_name(fn.get("name"), "tool_choice.function.name")}
        if isinstance(kind, str) and kind:
            raise Untranslatable("tool_choice.type", _TARGET, f"'{kind[:64]}' tool choice")
    raise bad_request("'tool_choice' must be auto, required, none or a named function")


def _response_format(value: Any, out: dict[str, Any]) -> None:
    fmt = need_object(value, "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        raise Untranslatable("response_format.type", _TARGET, "no JSON mode without a schema")
    if kind != "json_schema":
        raise bad_request("'response_format.type' must be text, json_object or json_schema")
    spec = need_object(fmt.get("json_schema"), "response_format.json_schema")
    schema = need_object(spec.get("schema"), "response_format.json_schema.schema")
    out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}


def _user_id(body: dict[str, Any]) -> str | None:
    for key in ("user", "safety_identifier"):
        if body.get(key) is not None:
            value = need_str(body[key], key)
            if len(value) > MAX_SHORT:
                raise bad_request(f"'{key}' must be at most {MAX_SHORT} characters")
            if value:
                return value
    return None


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if key in _HANDLED or key in _DROPPED or value is None:
            continue
        raise Untranslatable(key[:64], _TARGET)
    n = body.get("n")
    if n is not None and need_int(n, "n", 1) > 1:
        raise Untranslatable("n", _TARGET, "one choice per request")
    if body.get("logprobs") is not None:
        if not isinstance(body["logprobs"], bool):
            raise bad_request("'logprobs' must be a boolean")
        if body["logprobs"]:
            raise Untranslatable("logprobs", _TARGET)
    if body.get("top_logprobs") is not None and need_int(body["top_logprobs"], "top_logprobs", 0):
        raise Untranslatable("top_logprobs", _TARGET)
    if body.get("logit_bias") is not None and need_object(body["logit_bias"], "logit_bias"):
        raise Untranslatable("logit_bias", _TARGET)
    modalities = body.get("modalities")
    if modalities is not None:
        for i, m in enumerate(need_array(modalities, "modalities")):
            if need_str(m, f"modalities[{i}]") != "text":
                raise Untranslatable(f"modalities[{i}]", _TARGET, "text output only")


def _thinking(
    body: dict[str, Any], out: dict[str, Any], continuing_tool_call: bool, given_max: bool
) -> None:
    effort = body.get("reasoning_effort")
    if effort is None:
        return
    if effort == "none":
        out["thinking"] = {"type": "disabled"}
        return
    if effort not in THINKING_BUDGETS:
        raise bad_request("'reasoning_effort' must be one of none, " + ", ".join(THINKING_BUDGETS))
    if continuing_tool_call:
        return  # Anthropic would want the call turn's signed thinking block (module docstring)
    budget = THINKING_BUDGETS[effort]
    if given_max:
        if out["max_tokens"] <= THINKING_BUDGETS["minimal"]:
            raise Untranslatable(
                "reasoning_effort",
                _TARGET,
                "max tokens must exceed Anthropic's minimum thinking budget of 1024",
            )
        budget = min(budget, out["max_tokens"] - 1)
    else:
        out["max_tokens"] = budget + DEFAULT_MAX_TOKENS
    temperature = out.pop("temperature", None)
    if temperature is not None and temperature != 1:
        raise Untranslatable("temperature", _TARGET, "thinking (reasoning_effort) needs 1")
    top_p = out.get("top_p")
    if top_p is not None and top_p < 0.95:
        raise Untranslatable("top_p", _TARGET, "thinking (reasoning_effort) needs 0.95 to 1")
    if out.get("tool_choice", {}).get("type") in ("any", "tool"):
        raise Untranslatable("tool_choice", _TARGET, "forced tool use with thinking")
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context]:
    """The Anthropic Messages body for ``model_id`` and the context the response side needs."""
    _refuse_unsupported(body)
    requested = body.get("model")
    requested = short_text(requested)
    system, turns = _convert(body.get("messages"))

    out: dict[str, Any] = {"model": model_id}
    if system:
        out["system"] = system
    out["messages"] = turns
    given_max = False
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            out["max_tokens"] = need_int(body[key], key, 1)
            given_max = True
            break
    else:
        out["max_tokens"] = DEFAULT_MAX_TOKENS
    if body.get("temperature") is not None:
        out["temperature"] = min(need_number_in(body["temperature"], "temperature", 0, 2), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = need_number_in(body["top_p"], "top_p", 0, 1)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else need_array(stop, "stop")
        if len(stops) > _MAX_STOPS:
            raise bad_request(f"'stop' must have at most {_MAX_STOPS} sequences")
        where = "stop" if isinstance(stop, str) else "stop[{}]"
        sequences = []
        for i, s in enumerate(stops):
            at = where.format(i)
            if not need_str(s, at).strip():
                raise bad_request(f"'{at}' must not be blank")
            sequences.append(s)
        if sequences:
            out["stop_sequences"] = sequences
    user = _user_id(body)
    if user:
        out["metadata"] = {"user_id": user}
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        if tools:
            out["tools"] = tools
    choice = _tool_choice(body["tool_choice"]) if body.get("tool_choice") is not None else None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean")
    if "tools" in out:  # Anthropic's tool_choice means nothing without tools
        if parallel is False and (choice is None or choice["type"] != "none"):
            choice = dict(choice or {"type": "auto"}, disable_parallel_tool_use=True)
        if choice is not None:
            out["tool_choice"] = choice
    if body.get("response_format") is not None:
        _response_format(body["response_format"], out)
    last = turns[-1]["content"]
    _thinking(body, out, any(b["type"] == "tool_result" for b in last), given_max)

    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        flag = need_object(options, "stream_options").get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise bad_request("'stream_options.include_usage' must be a boolean")
        include_usage = bool(flag)
    if stream:
        out["stream"] = True
    ctx: Context = {
        "stream": bool(stream),
        "model": requested,
        "include_usage": include_usage and bool(stream),
        "created": int(time.time()),
    }
    return out, ctx


# ---------------------------------------------------------------- response


def _created(ctx: Context) -> int:
    value = ctx.get("created")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _finish(stop_reason: Any) -> str:
    if stop_reason in ("max_tokens", "model_context_window_exceeded"):
        return "length"
    if stop_reason == "tool_use":
        return "tool_calls"
    if stop_reason == "refusal":
        return "content_filter"
    return "stop"  # end_turn, stop_sequence, pause_turn, or none given


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage (input excludes cache reads and writes) as OpenAI's (prompt includes)."""
    cached = token_count(usage.get("cache_read_input_tokens"))
    prompt = (
        token_count(usage.get("input_tokens"))
        + cached
        + token_count(usage.get("cache_creation_input_tokens"))
    )
    completion = token_count(usage.get("output_tokens"))
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    details = usage.get("output_tokens_details")
    thinking = token_count(details.get("thinking_tokens")) if isinstance(details, dict) else 0
    if thinking:
        out["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return out


def _arguments_json(value: Any) -> str:
    return json.dumps(
        value if isinstance(value, dict) else {}, ensure_ascii=False, separators=(",", ":")
    )


def _call_id(value: Any, n: int, message_id: str) -> str:
    return clean_id(value) or f"toolu_{message_id}_{n}"


def response(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """An Anthropic Message as a chat.completion."""
    content = body.get("content")
    if not isinstance(content, list):
        raise GatewayError(502, "server_error", "provider reply: content is not an array")
    msg_id = clean_id(body.get("id")) or "anthropic"
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            name = block.get("name")
            calls.append(
                {
                    "id": _call_id(block.get("id"), len(calls), msg_id),
                    "type": "function",
                    "function": {
                        "name": short_text(name),
                        "arguments": _arguments_json(block.get("input")),
                    },
                }
            )
    text = "".join(texts)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if not text and calls else text,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    reasoning = "".join(thinking)
    if reasoning:
        message["reasoning_content"] = reasoning
    usage = body.get("usage")
    return {
        "id": "chatcmpl-" + msg_id,
        "object": "chat.completion",
        "created": _created(ctx),
        "model": reply_model(body.get("model"), ctx),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish(body.get("stop_reason")),
            }
        ],
        "usage": _usage(usage if isinstance(usage, dict) else {}),
    }


# ---------------------------------------------------------------- stream

# Anthropic error types -> OpenAI's (platform.openai.com/docs/guides/error-codes); the
# Anthropic type rides along as ``code``.
_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
}
_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens_details",
)


def _error_chunk(error: Any, fallback: str) -> SseOut:
    kind, message, code = "server_error", fallback, "api_error"
    if isinstance(error, dict):
        raw = error.get("type")
        if isinstance(raw, str) and raw:
            kind = _ERROR_TYPES.get(raw, "server_error")
            code = raw[:64]
        if isinstance(error.get("message"), str) and error["message"]:
            message = error["message"][:1000]
    return None, {"error": {"message": message, "type": kind, "code": code, "param": None}}


class ChatStream:
    """Anthropic events -> chat.completion.chunk data (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self._include_usage = ctx.get("include_usage") is True
        self._id = "chatcmpl-anthropic"
        self._created = _created(ctx)
        self._model = reply_model(None, ctx)
        self._started = False
        self._done = False
        self._produced = False  # any text or tool call went out (else the finish says "")
        self._tools: dict[int, int] = {}  # Anthropic block index -> tool_calls index
        self._stop_reason: Any = None
        self._usage: dict[str, Any] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> SseOut:
        return (
            None,
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            },
        )

    def _keep_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):  # cumulative counts: set what is present, keep the rest
            for key in _USAGE_KEYS:
                if usage.get(key) is not None:
                    self._usage[key] = usage[key]

    def _start(self, message: Any, out: list[SseOut]) -> None:
        self._started = True
        if isinstance(message, dict):
            ident = clean_id(message.get("id"))
            if ident:
                self._id = "chatcmpl-" + ident
            self._model = reply_model(message.get("model"), {"model": self._model})
            self._keep_usage(message.get("usage"))
        out.append(self._chunk({"role": "assistant"}))

    def _block_start(self, data: dict[str, Any], out: list[SseOut]) -> None:
        block = data.get("content_block")
        if not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "tool_use":
            index = len(self._tools)
            at = data.get("index")
            self._tools[at if isinstance(at, int) else -1 - index] = index
            name = block.get("name")
            raw = block.get("input")
            args = _arguments_json(raw) if isinstance(raw, dict) and raw else ""
            call = {
                "index": index,
                "id": _call_id(block.get("id"), index, self._id[9:]),
                "type": "function",
                "function": {
                    "name": short_text(name),
                    "arguments": args,
                },
            }
            self._produced = True
            out.append(self._chunk({"tool_calls": [call]}))
        elif kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            self._produced = True
            out.append(self._chunk({"content": block["text"]}))
        elif kind == "thinking" and isinstance(block.get("thinking"), str) and block["thinking"]:
            out.append(self._chunk({"reasoning_content": block["thinking"]}))

    def _block_delta(self, data: dict[str, Any], out: list[SseOut]) -> None:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                self._produced = True
                out.append(self._chunk({"content": text}))
        elif kind == "thinking_delta":
            text = delta.get("thinking")
            if isinstance(text, str) and text:
                out.append(self._chunk({"reasoning_content": text}))
        elif kind == "input_json_delta":
            piece = delta.get("partial_json")
            at = data.get("index")
            index = self._tools.get(at) if isinstance(at, int) else None
            if index is not None and isinstance(piece, str) and piece:
                call = {"index": index, "function": {"arguments": piece}}
                out.append(self._chunk({"tool_calls": [call]}))
        # signature_delta, citations_delta: nothing a Chat client reads

    def _close(self, out: list[SseOut]) -> None:
        self._done = True
        delta: dict[str, Any] = {} if self._produced else {"content": ""}
        out.append(self._chunk(delta, _finish(self._stop_reason)))
        if self._include_usage:
            usage = self._chunk({})
            data = usage[1]
            assert isinstance(data, dict)
            data["choices"] = []
            data["usage"] = _usage(self._usage)
            out.append(usage)
        out.append((None, "[DONE]"))

    # -- StreamTranslator

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        if self._done or not isinstance(data, dict):
            return []
        kind = data.get("type", name)
        if kind == "ping":
            return []
        if kind == "error" or name == "error":
            self._done = True
            return [_error_chunk(data.get("error"), "the provider reported an error")]
        out: list[SseOut] = []
        if not self._started:
            self._start(data.get("message") if kind == "message_start" else None, out)
            if kind == "message_start":
                return out
        if kind == "content_block_delta":
            self._block_delta(data, out)
        elif kind == "content_block_start":
            self._block_start(data, out)
        elif kind == "message_delta":
            delta = data.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                self._stop_reason = delta["stop_reason"]
            self._keep_usage(data.get("usage"))
        elif kind == "message_stop":
            self._close(out)
        return out

    def end(self) -> list[SseOut]:
        if self._done:
            return []
        self._done = True
        return [_error_chunk(None, "the provider stream ended early, before message_stop")]


def stream(ctx: Context) -> ChatStream:
    """A translator for one Anthropic SSE stream."""
    return ChatStream(ctx)
