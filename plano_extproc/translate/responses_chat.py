"""OpenAI Responses client -> OpenAI Chat Completions provider.

Serves ``POST /v1/responses`` from any Chat provider; ``responses_messages`` composes this module
with ``chat_messages`` for Anthropic. Choices made here, and why:

Request
- ``instructions`` -> a leading ``system`` message; ``input`` string -> one ``user`` message.
- Message items (``role`` user/assistant/system/developer; ``type`` may be omitted): text parts
  (``input_text``/``output_text``, and ``refusal`` as text: other providers take no refusal
  input) -> one string joined by newlines; ``input_image`` with ``image_url`` -> an ``image_url``
  part (``detail`` low/high/auto kept), then the content is a part list. ``developer`` becomes
  ``system`` (OpenAI maps one to the other; most other providers know only ``system``).
  ``input_image.file_id``, ``input_file`` and ``input_audio`` are refused (Files API ids exist only
  at OpenAI).
- ``function_call`` items -> ``tool_calls`` of one assistant message: consecutive calls share it,
  and join the assistant text directly before them. ``function_call_output`` -> ``role: tool``
  (text parts joined; images follow in one user message after the run of tool messages, as
  ``messages_chat`` does for Anthropic tool results). Call ids outside ``[A-Za-z0-9_-]{1,40}``
  (OpenAI's cap) become ``call_`` + 32 hex of their SHA-256 on both the call and its output.
- ``reasoning`` items are dropped (their ``encrypted_content`` is bound to the provider that made
  it; another model reasons anew). ``item_reference``, ``compaction``, custom and hosted tool
  items are refused: their content lives at OpenAI or needs a tool this path cannot run.
- Tools: flat ``function`` tools -> nested Chat tools; every hosted tool type (web_search,
  file_search, code_interpreter, computer_use, image_generation, mcp, local_shell, custom, ...)
  is refused naming ``tools[i].type``. ``tool_choice`` auto/required/none/{function, name} ->
  Chat's forms; ``allowed_tools`` and hosted choices are refused. ``tool_choice`` and
  ``parallel_tool_calls`` are sent only with tools (OpenAI rejects them otherwise).
- ``max_output_tokens`` -> ``max_tokens``, or ``max_completion_tokens`` for OpenAI reasoning
  models: the same rule as ``messages_chat`` (its docstring has the evidence), since both
  translators call the same providers. ``temperature``/``top_p`` as is; ``user`` (else
  ``safety_identifier``) -> ``user``; ``reasoning.effort`` -> ``reasoning_effort`` (the summary
  setting is dropped); ``text.format`` json_schema/json_object -> ``response_format``;
  ``stream`` -> ``stream`` + ``stream_options.include_usage`` (else usage is lost).
- Dropped (hints or bookkeeping; the answer's meaning is kept): ``metadata`` (Chat keeps it only
  with ``store``), ``store`` (the gateway keeps nothing), ``service_tier``, ``stream_options``,
  ``prompt_cache_key``, ``prompt_cache_retention``, ``max_tool_calls`` (built-in tools only, which
  are refused), ``truncation`` (auto may make an over-long request fail instead of being cut),
  ``text.verbosity``, ``include`` values that only add hosted-tool or input echoes, or
  encrypted reasoning (never produced here; Codex always asks for it).
- Refused: ``previous_response_id`` and ``conversation`` (the gateway keeps no response state),
  ``background: true``, ``prompt`` (templates live at OpenAI), ``top_logprobs`` > 0 and the
  ``message.output_text.logprobs`` include (logprobs are not carried back), any unknown member.

Response
- ``id`` = ``resp_`` + the chat id (``[A-Za-z0-9_-]``); items ``rs_``/``msg_``/``fc_`` + the same.
  ``model`` = the provider's; ``created_at`` = the chat ``created``. Echoed from the context:
  ``tool_choice``, ``parallel_tool_calls``, ``temperature``, ``top_p``, ``max_output_tokens``;
  ``tools`` is [] (the tool list does not travel in the context).
- Output: a ``reasoning`` item when the provider sent ``reasoning_content``/``reasoning``, as a
  ``summary_text`` (what Responses clients display; OpenAI models send summaries only), then one
  message item (``output_text`` part, then a ``refusal`` part), then one ``function_call`` per
  tool call (``call_id`` = the chat tool id; empty arguments become ``{}``).
- finish_reason: stop/tool_calls -> completed; length -> incomplete (max_output_tokens);
  content_filter -> incomplete (content_filter); the items of an incomplete answer are
  ``incomplete``. Usage: input = prompt_tokens (both count cached tokens), cached_tokens,
  output, total, reasoning_tokens; no usage -> null.

Stream
- ``response.created``/``response.in_progress`` on the first chunk (or at the error), then items
  in order of first appearance, one at a time: reasoning (summary part, text deltas), message
  (text and refusal parts), function calls (arguments deltas). Chat may interleave parallel
  calls' argument deltas, Responses items may not: the first item that is a tool call streams
  live and every later item (tool calls, text after a tool started) is held and emitted whole
  at ``finish_reason``. A reasoning or message item closes when another item starts; more of its
  kind after that opens a new item. A tool call starts with an id or a name (stray argument
  deltas are ignored); a new id on a known index is a new call.
- The terminal event (``response.completed``/``response.incomplete`` with output and usage) goes
  out at the usage chunk after ``finish_reason``, at ``[DONE]`` (a ``[DONE]`` without finish
  counts as stop) or at the end after ``finish_reason``. A provider error chunk -> ``error`` and
  ``response.failed`` (code rate_limit_exceeded or server_error, the SDK's set); the stream
  ending before ``finish_reason`` -> the same with "the provider stream ended early". No
  ``[DONE]`` is sent (Responses has none).
"""

from __future__ import annotations

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
    need_bool,
    need_int,
    need_name,
    need_number_in,
    need_object,
    need_str,
    reply_model,
    short_text,
    token_count,
)
from plano_extproc.translate.messages_chat import uses_completion_tokens

client: ClientApi = ClientApi.RESPONSES
provider: ClientApi = ClientApi.CHAT

_TARGET = ClientApi.CHAT.label
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
_DETAILS = frozenset({"low", "high", "auto"})

_HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "user",
        "safety_identifier",
        "parallel_tool_calls",
        "reasoning",
        "text",
        "tools",
        "tool_choice",
        "stream",
        "include",
        "top_logprobs",
        "background",
        "truncation",
    }
)
_DROPPED = frozenset(
    {
        "metadata",
        "store",
        "service_tier",
        "stream_options",
        "prompt_cache_key",
        "prompt_cache_retention",
        "max_tool_calls",
    }
)
_REFUSED = {
    "previous_response_id": "the gateway keeps no response state",
    "conversation": "the gateway keeps no conversation state",
    "prompt": "prompt templates are stored at OpenAI",
}
# ``include`` values that ask for nothing this path produces (hosted-tool outputs, input
# echoes, encrypted reasoning): harmless to drop.
_HARMLESS_INCLUDES = frozenset(
    {
        "reasoning.encrypted_content",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "code_interpreter_call.outputs",
    }
)
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status", "phase"})
_CALL_KEYS = frozenset({"type", "id", "call_id", "name", "arguments", "status", "caller"})
_OUTPUT_KEYS = frozenset({"type", "id", "call_id", "output", "status"})
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})


# ---------------------------------------------------------------- validation helpers


def _short(value: Any, where: str) -> str:
    text = need_str(value, where)
    if len(text) > MAX_SHORT:
        raise bad_request(f"'{where}' must be at most {MAX_SHORT} characters")
    return text


def _kind(item: dict[str, Any], where: str) -> str:
    return need_str(item.get("type"), f"{where}.type")


def _label(value: Any) -> str:
    return value[:64] if isinstance(value, str) else "?"


def _call_id(value: Any, where: str) -> str:
    """A client call id as the provider gets it: kept when Chat-safe, else a stable digest."""
    return client_id(value, where, OPENAI_MAX_ID, "call_")


# ---------------------------------------------------------------- request: input items


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = part.get("image_url")
    if url is None:
        if part.get("file_id") is not None:
            raise Untranslatable(f"{where}.file_id", _TARGET, "Files API ids exist only at OpenAI")
        raise bad_request(f"'{where}.image_url' is required")
    url = need_str(url, f"{where}.image_url")
    if not url.startswith(("https://", "http://", "data:")):
        raise bad_request(f"'{where}.image_url' must be an http(s) URL or a data URL")
    spec: dict[str, Any] = {"url": url}
    detail = part.get("detail")
    if detail in _DETAILS:
        spec["detail"] = detail
    elif detail is not None:
        need_str(detail, f"{where}.detail")  # e.g. "original": no Chat equivalent, default kept
    return {"type": "image_url", "image_url": spec}


def _parts(content: Any, where: str, images: bool) -> list[dict[str, Any]]:
    """Chat text/image parts of a message or tool output content (string or part list)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out: list[dict[str, Any]] = []
    for j, part in enumerate(need_array(content, where)):
        at = f"{where}[{j}]"
        part = need_object(part, at)
        kind = _kind(part, at)
        if kind in ("input_text", "output_text"):
            out.append({"type": "text", "text": need_str(part.get("text"), f"{at}.text")})
        elif kind == "refusal":
            out.append({"type": "text", "text": need_str(part.get("refusal"), f"{at}.refusal")})
        elif kind == "input_image" and images:
            out.append(_image(part, at))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise Untranslatable(f"{at}.type", _TARGET, f"'{kind}' content parts here")
        else:
            raise bad_request(
                f"'{at}.type' must be one of input_text, output_text, refusal, input_image"
            )
    return out


class _Messages:
    """Builds the Chat message list and remembers where each message came from, so errors a
    composed translator raises in Chat terms can name the client's field (``origins``)."""

    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self.origins: dict[str, str] = {}
        self._calls: dict[str, Any] | None = None  # the assistant message taking tool calls
        self._images: list[dict[str, Any]] = []  # images of the current run of tool outputs

    def add(self, msg: dict[str, Any], origin: str) -> None:
        self._flush_images()
        self.origins[f"messages[{len(self.out)}]"] = origin
        self.origins[f"messages[{len(self.out)}].content"] = origin + ".content"
        self.out.append(msg)
        self._calls = msg if msg["role"] == "assistant" and "tool_calls" not in msg else None

    def call(self, item: dict[str, Any], where: str) -> None:
        self._flush_images()
        if self._calls is None:
            self.origins[f"messages[{len(self.out)}]"] = where
            self._calls = {"role": "assistant", "content": None}
            self.out.append(self._calls)
        calls = self._calls.setdefault("tool_calls", [])
        at = f"messages[{len(self.out) - 1}].tool_calls[{len(calls)}]"
        self.origins[at] = where
        self.origins[at + ".function"] = where
        self.origins[at + ".id"] = where + ".call_id"
        calls.append(
            {
                "id": _call_id(item.get("call_id"), f"{where}.call_id"),
                "type": "function",
                "function": {
                    "name": need_name(item.get("name"), f"{where}.name"),
                    "arguments": need_str(item.get("arguments"), f"{where}.arguments"),
                },
            }
        )

    def output(self, item: dict[str, Any], where: str) -> None:
        ident = _call_id(item.get("call_id"), f"{where}.call_id")
        output = item.get("output")
        texts: list[str] = []
        images: list[dict[str, Any]] = []
        if isinstance(output, str):
            texts.append(output)
        else:
            for part in _parts(need_array(output, f"{where}.output"), f"{where}.output", True):
                (texts.append(part["text"]) if part["type"] == "text" else images.append(part))
        text = tool_message_text(texts, len(images))
        pending = self._images
        self._images = []  # add() must not flush them before this tool message
        self.add({"role": "tool", "tool_call_id": ident, "content": text}, where)
        self.origins[f"messages[{len(self.out) - 1}].tool_call_id"] = where + ".call_id"
        self.origins[f"messages[{len(self.out) - 1}].content"] = where + ".output"
        self._images = pending
        if images:
            self._images += [{"type": "text", "text": f"Images returned by {ident}:"}, *images]

    def _flush_images(self) -> None:
        if self._images:
            images, self._images = self._images, []
            self.out.append({"role": "user", "content": images})

    def finish(self) -> list[dict[str, Any]]:
        self._flush_images()
        return self.out


def _message(item: dict[str, Any], where: str, msgs: _Messages) -> None:
    for key, value in item.items():
        if key not in _MESSAGE_KEYS and value is not None:
            raise Untranslatable(f"{where}.{key[:64]}", _TARGET)
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad_request(f"'{where}.role' must be one of user, assistant, system, developer")
    parts = _parts(item.get("content"), f"{where}.content", role == "user")
    if role == "assistant":
        text = "\n".join(p["text"] for p in parts)
        if text:  # an empty assistant turn asks for nothing (Chat rejects one without calls)
            msgs.add({"role": "assistant", "content": text}, where)
        return
    msgs.add(
        {"role": "system" if role == "developer" else role, "content": message_content(parts)},
        where,
    )


def _input(value: Any, msgs: _Messages) -> None:
    if isinstance(value, str):
        msgs.add({"role": "user", "content": value}, "input")
        return
    items = need_array(value, "input")
    if not items:
        raise bad_request("'input' must contain at least one item")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        item = need_object(item, where)
        kind = item.get("type")
        if kind is None or kind == "message":
            _message(item, where, msgs)
        elif kind == "function_call":
            for key, val in item.items():
                if key not in _CALL_KEYS and val is not None:
                    raise Untranslatable(f"{where}.{key[:64]}", _TARGET)
            msgs.call(item, where)
        elif kind == "function_call_output":
            for key, val in item.items():
                if key not in _OUTPUT_KEYS and val is not None:
                    raise Untranslatable(f"{where}.{key[:64]}", _TARGET)
            msgs.output(item, where)
        elif kind == "reasoning":
            continue  # provider-bound reasoning (module docstring); transparent for grouping
        elif isinstance(kind, str):
            why = "the gateway keeps no items" if kind == "item_reference" else ""
            raise Untranslatable(f"{where}.type", _TARGET, why or f"'{kind[:64]}' items")
        else:
            raise bad_request(f"'{where}.type' must be a string")


# ---------------------------------------------------------------- request: parameters


def _tools(value: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(need_array(value, "tools")):
        where = f"tools[{i}]"
        tool = need_object(tool, where)
        kind = tool.get("type")
        if kind != "function":
            raise Untranslatable(f"{where}.type", _TARGET, f"'{_label(kind)}' tools")
        for key, val in tool.items():
            if key not in _TOOL_KEYS and val is not None and val is not False:
                raise Untranslatable(f"{where}.{key[:64]}", _TARGET)
        fn: dict[str, Any] = {"name": need_name(tool.get("name"), f"{where}.name")}
        if tool.get("description") is not None:
            fn["description"] = need_str(tool["description"], f"{where}.description")
        if tool.get("parameters") is not None:
            fn["parameters"] = need_object(tool["parameters"], f"{where}.parameters")
        if tool.get("strict") is not None:
            fn["strict"] = need_bool(tool["strict"], f"{where}.strict")
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: Any) -> tuple[Any, Any]:
    """(Chat tool_choice, the Responses form to echo)."""
    if value in ("auto", "required", "none"):
        return value, value
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "function":
            name = need_name(value.get("name"), "tool_choice.name")
            return {"type": "function", "function": {"name": name}}, {
                "type": "function",
                "name": name,
            }
        if isinstance(kind, str) and kind:
            raise Untranslatable("tool_choice.type", _TARGET, f"'{kind[:64]}' tool choice")
    raise bad_request("'tool_choice' must be auto, required, none or a named function")


def _text_format(value: Any) -> dict[str, Any] | None:
    cfg = need_object(value, "text")
    if cfg.get("format") is None:
        return None
    fmt = need_object(cfg["format"], "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request("'text.format.type' must be text, json_object or json_schema")
    spec: dict[str, Any] = {
        "name": need_name(fmt.get("name"), "text.format.name"),
        "schema": need_object(fmt.get("schema"), "text.format.schema"),
    }
    if fmt.get("description") is not None:
        spec["description"] = need_str(fmt["description"], "text.format.description")
    if fmt.get("strict") is not None:
        spec["strict"] = need_bool(fmt["strict"], "text.format.strict")
    return {"type": "json_schema", "json_schema": spec}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if value is None or key in _HANDLED or key in _DROPPED:
            continue
        raise Untranslatable(key[:64], _TARGET, _REFUSED.get(key, ""))
    if body.get("background") is not None and need_bool(body["background"], "background"):
        raise Untranslatable("background", _TARGET, "background responses need stored state")
    if body.get("top_logprobs") is not None and need_int(body["top_logprobs"], "top_logprobs", 0):
        raise Untranslatable("top_logprobs", _TARGET, "logprobs are not carried back")
    if body.get("truncation") not in (None, "auto", "disabled"):
        raise bad_request("'truncation' must be auto or disabled")
    if body.get("include") is not None:
        for i, value in enumerate(need_array(body["include"], "include")):
            if need_str(value, f"include[{i}]") not in _HARMLESS_INCLUDES:
                raise Untranslatable(f"include[{i}]", _TARGET, f"'{value[:64]}' output")


def convert(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context, dict[str, str]]:
    """``request`` plus the origins map (Chat path -> client path) for error messages."""
    _refuse_unsupported(body)
    requested = body.get("model")
    requested = short_text(requested)
    msgs = _Messages()
    if body.get("instructions") is not None:
        instructions = need_str(body["instructions"], "instructions")
        if instructions:
            msgs.add({"role": "system", "content": instructions}, "instructions")
    if "input" not in body:
        raise bad_request("'input' is required")
    _input(body["input"], msgs)
    chat: dict[str, Any] = {"model": model_id, "messages": msgs.finish()}
    ctx: Context = {"stream": False, "model": requested}
    origins = msgs.origins
    origins["messages"] = "input"

    if body.get("max_output_tokens") is not None:
        limit = need_int(body["max_output_tokens"], "max_output_tokens", 1)
        key = "max_completion_tokens" if uses_completion_tokens(model_id) else "max_tokens"
        chat[key] = ctx["max_output_tokens"] = limit
        origins[key] = "max_output_tokens"
    if body.get("temperature") is not None:
        chat["temperature"] = ctx["temperature"] = need_number_in(
            body["temperature"], "temperature", 0, 2
        )
    if body.get("top_p") is not None:
        chat["top_p"] = ctx["top_p"] = need_number_in(body["top_p"], "top_p", 0, 1)
    for key in ("user", "safety_identifier"):
        if body.get(key) is not None and _short(body[key], key) and "user" not in chat:
            chat["user"] = body[key]
            origins["user"] = key
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    choice, echo = "auto", "auto"
    if body.get("tool_choice") is not None:
        choice, echo = _tool_choice(body["tool_choice"])
    ctx["tool_choice"] = echo
    parallel = True
    if body.get("parallel_tool_calls") is not None:
        parallel = need_bool(body["parallel_tool_calls"], "parallel_tool_calls")
    ctx["parallel_tool_calls"] = parallel
    if tools:
        chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = choice
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = parallel
    for i in range(len(tools)):
        origins[f"tools[{i}].function"] = f"tools[{i}]"
    origins["tool_choice.function"] = "tool_choice"
    if body.get("reasoning") is not None:
        effort = need_object(body["reasoning"], "reasoning").get("effort")
        if effort is not None:
            if effort not in _EFFORTS:
                raise bad_request(
                    "'reasoning.effort' must be one of " + ", ".join(sorted(_EFFORTS))
                )
            chat["reasoning_effort"] = effort
            origins["reasoning_effort"] = "reasoning.effort"
    if body.get("text") is not None:
        fmt = _text_format(body["text"])
        if fmt is not None:
            chat["response_format"] = fmt
            origins["response_format"] = "text.format"
    stream = body.get("stream")
    if stream is not None and need_bool(stream, "stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
        ctx["stream"] = True
    return chat, ctx, origins


def request(body: dict[str, Any], model_id: str) -> tuple[dict[str, Any], Context]:
    """The Chat body for ``model_id`` and the context ``response``/``stream`` need."""
    chat, ctx, _ = convert(body, model_id)
    return chat, ctx


# ---------------------------------------------------------------- response


def _usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    prompt = token_count(usage.get("prompt_tokens"))
    completion = token_count(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = token_count(details.get("cached_tokens")) or token_count(
        usage.get("prompt_cache_hit_tokens")
    )
    written = token_count(details.get("cache_write_tokens"))
    out_details = usage.get("completion_tokens_details")
    reasoning = (
        token_count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
    )
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": token_count(usage.get("total_tokens")) or prompt + completion,
    }


def _status(finish: Any) -> tuple[str, dict[str, Any] | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _echo_number(ctx: Context, key: str) -> Any:
    value = ctx.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _envelope(
    resp_id: str,
    created: Any,
    model: str,
    ctx: Context,
    status: str,
    output: list[dict[str, Any]],
) -> dict[str, Any]:
    """A Response object; ``usage``, ``error`` and ``incomplete_details`` are set by callers."""
    choice = ctx.get("tool_choice")
    if not (choice in ("auto", "required", "none") or isinstance(choice, dict)):
        choice = "auto"
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created if isinstance(created, int | float) and created >= 0 else 0,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": _echo_number(ctx, "max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": ctx.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "temperature": _echo_number(ctx, "temperature"),
        "tool_choice": choice,
        "tools": [],
        "top_p": _echo_number(ctx, "top_p"),
        "truncation": "disabled",
        "usage": None,
        "metadata": {},
    }


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) and value.strip() else "{}"


def _call_item(fc_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": fc_id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def _provider_call_id(value: Any, fallback: str) -> str:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_SHORT else fallback


def response(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A chat.completion as a Response object."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GatewayError(502, "server_error", "provider reply: no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise GatewayError(
            502, "server_error", "provider reply: choices[0].message is not an object"
        )
    base = clean_id(body.get("id")) or "chat"
    status, incomplete = _status(choice.get("finish_reason"))
    item_status = "completed" if status == "completed" else "incomplete"
    output: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning:
        output.append(_reasoning_item(f"rs_{base}", reasoning))
    parts: list[dict[str, Any]] = []
    text = text_of(message.get("content"))
    if text:
        parts.append({"type": "output_text", "text": text, "annotations": []})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    if parts:
        output.append(_message_item(f"msg_{base}", parts, item_status))
    calls = message.get("tool_calls")
    for n, call in enumerate(calls if isinstance(calls, list) else []):
        if not isinstance(call, dict):
            continue
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        name = fn.get("name")
        output.append(
            _call_item(
                f"fc_{base}_{n}",
                _provider_call_id(call.get("id"), f"call_{base}_{n}"),
                short_text(name),
                _arguments(fn.get("arguments")),
                item_status,
            )
        )
    out = _envelope(
        f"resp_{base}",
        body.get("created"),
        reply_model(body.get("model"), ctx),
        ctx,
        status,
        output,
    )
    out["incomplete_details"] = incomplete
    out["usage"] = _usage(body.get("usage"))
    return out


def _reasoning_item(ident: str, text: str) -> dict[str, Any]:
    return {"id": ident, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def _message_item(ident: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": ident, "type": "message", "status": status, "role": "assistant", "content": parts}


# ---------------------------------------------------------------- stream


def _error_code(error: Any) -> tuple[str, str]:
    """(Responses error code from the SDK's set, message) for a provider error object."""
    code, message = "server_error", "the provider reported an error"
    if isinstance(error, dict):
        raw = error.get("code") or error.get("type")
        kinds = {raw, error.get("type")}
        if kinds & {"rate_limit_exceeded", "rate_limit_error", "insufficient_quota"}:
            code = "rate_limit_exceeded"
        if isinstance(error.get("message"), str) and error["message"]:
            message = error["message"][:1000]
    elif isinstance(error, str) and error:
        message = error[:1000]
    return code, message


class _Item:
    """One output item being streamed or held. Its text lives in ``parts`` (message: one
    [kind, text] per content part; reasoning: one summary part; function call: arguments)."""

    __slots__ = ("call_id", "emitted", "ident", "index", "kind", "name", "open", "parts")

    def __init__(self, kind: str, ident: str, index: int) -> None:
        self.kind = kind  # "reasoning" | "message" | "function_call"
        self.ident = ident
        self.index = index
        self.parts: list[list[str]] = []
        self.emitted = False  # output_item.added went out
        self.open = True  # more deltas may come
        self.call_id = ""
        self.name = ""

    def snapshot(self, status: str) -> dict[str, Any]:
        """The item as ``output_item.done`` and the final response carry it (a fresh dict)."""
        if self.kind == "reasoning":
            text = "".join(p[1] for p in self.parts)
            return _reasoning_item(self.ident, text)
        if self.kind == "message":
            return _message_item(self.ident, [_part(k, t) for k, t in self.parts], status)
        args = _arguments("".join(p[1] for p in self.parts))
        return _call_item(self.ident, self.call_id, self.name, args, status)


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": []}


class ResponsesStream:
    """chat.completion.chunk data -> Responses events (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._seq = 0
        self._base = "chat"
        self._created: Any = 0
        self._model = reply_model(None, ctx)
        self._started = False
        self._done = False
        self._items: list[_Item] = []
        self._live: _Item | None = None  # the item whose deltas go out now
        self._held = False  # a tool call went live: every later item waits for the finish
        self._current: dict[str, _Item] = {}  # open reasoning / message item by kind
        self._tools: dict[int, _Item] = {}  # Chat tool index -> its item
        self._finish: Any = None
        self._finished = False
        self._usage: dict[str, Any] | None = None

    # -- event building

    def _ev(self, kind: str, fields: dict[str, Any]) -> SseOut:
        data: dict[str, Any] = {"type": kind, "sequence_number": self._seq}
        data.update(fields)
        self._seq += 1
        return kind, data

    def _envelope(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return _envelope(
            "resp_" + self._base, self._created, self._model, self._ctx, status, output
        )

    def _start(self, chunk: dict[str, Any] | None, out: list[SseOut]) -> None:
        self._started = True
        if chunk is not None:
            self._base = clean_id(chunk.get("id")) or self._base
            created = chunk.get("created")
            self._created = created if isinstance(created, int | float) else 0
            self._model = reply_model(chunk.get("model"), self._ctx)
        out.append(self._ev("response.created", {"response": self._envelope("in_progress", [])}))
        out.append(
            self._ev("response.in_progress", {"response": self._envelope("in_progress", [])})
        )

    # -- items

    def _new_item(self, kind: str, n: int) -> _Item:
        """Item ``n`` of its kind: ids as ``response`` derives them (fc_<id>_<n>, msg_<id>,
        then msg_<id>_1 for a second message)."""
        ident = {"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}[kind] + self._base
        if n or kind == "function_call":
            ident += f"_{n}"
        item = _Item(kind, ident, len(self._items))
        self._items.append(item)
        return item

    def _count(self, kind: str) -> int:
        return sum(1 for i in self._items if i.kind == kind)

    def _ids(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.ident, "output_index": item.index}

    def _added(self, item: _Item, out: list[SseOut]) -> None:
        item.emitted = True
        if item.kind == "reasoning":
            added: dict[str, Any] = {"id": item.ident, "type": "reasoning", "summary": []}
        elif item.kind == "message":
            added = _message_item(item.ident, [], "in_progress")
        else:
            added = _call_item(item.ident, item.call_id, item.name, "", "in_progress")
        out.append(
            self._ev("response.output_item.added", {"output_index": item.index, "item": added})
        )

    def _part_added(self, item: _Item, kind: str, out: list[SseOut]) -> None:
        if item.kind == "reasoning":
            fields = self._ids(item) | {"summary_index": 0}
            fields["part"] = {"type": "summary_text", "text": ""}
            out.append(self._ev("response.reasoning_summary_part.added", fields))
        elif item.kind == "message":
            fields = self._ids(item) | {"content_index": len(item.parts) - 1}
            fields["part"] = _part(kind, "")
            out.append(self._ev("response.content_part.added", fields))

    def _delta(self, item: _Item, text: str, out: list[SseOut]) -> None:
        if item.kind == "function_call":
            fields = self._ids(item) | {"delta": text}
            out.append(self._ev("response.function_call_arguments.delta", fields))
        elif item.kind == "reasoning":
            fields = self._ids(item) | {"summary_index": 0, "delta": text}
            out.append(self._ev("response.reasoning_summary_text.delta", fields))
        elif item.parts[-1][0] == "refusal":
            fields = self._ids(item) | {"content_index": len(item.parts) - 1, "delta": text}
            out.append(self._ev("response.refusal.delta", fields))
        else:
            fields = self._ids(item) | {"content_index": len(item.parts) - 1, "delta": text}
            fields["logprobs"] = []
            out.append(self._ev("response.output_text.delta", fields))

    def _part_done(self, item: _Item, out: list[SseOut]) -> None:
        if not item.parts:
            return
        kind, text = item.parts[-1]
        if item.kind == "reasoning":
            fields = self._ids(item) | {"summary_index": 0, "text": text}
            out.append(self._ev("response.reasoning_summary_text.done", fields))
            fields = self._ids(item) | {"summary_index": 0}
            fields["part"] = {"type": "summary_text", "text": text}
            out.append(self._ev("response.reasoning_summary_part.done", fields))
            return
        at = self._ids(item) | {"content_index": len(item.parts) - 1}
        if kind == "refusal":
            out.append(self._ev("response.refusal.done", at | {"refusal": text}))
        else:
            out.append(self._ev("response.output_text.done", at | {"text": text, "logprobs": []}))
        out.append(self._ev("response.content_part.done", at | {"part": _part(kind, text)}))

    def _append(self, item: _Item, kind: str, text: str, out: list[SseOut]) -> None:
        """Text for ``item`` (a part of ``kind``): streamed when live, else held."""
        live = item is self._live
        if not item.parts or item.parts[-1][0] != kind:
            if live and item.kind == "message":
                self._part_done(item, out)
            item.parts.append([kind, ""])
            if live:
                self._part_added(item, kind, out)
        item.parts[-1][1] += text
        if live and text:
            self._delta(item, text, out)

    def _item_done(self, item: _Item, status: str, out: list[SseOut]) -> None:
        """Close ``item``: a held one goes out whole (added, one delta per part, done)."""
        item.open = False
        if self._current.get(item.kind) is item:
            del self._current[item.kind]
        was_live = item.emitted
        if not was_live:
            self._added(item, out)
        if item.kind == "function_call":
            args = "".join(p[1] for p in item.parts)
            if not was_live and args:
                self._delta(item, args, out)
            if not args:  # a call without arguments still gets a JSON object
                self._delta(item, "{}", out)
            item.parts = [["arguments", args or "{}"]]
            fields = self._ids(item) | {"arguments": _arguments(args)}
            out.append(self._ev("response.function_call_arguments.done", fields))
        elif was_live:
            self._part_done(item, out)
        else:
            parts, item.parts = item.parts, []
            for kind, text in parts:
                item.parts.append([kind, text])
                self._part_added(item, kind, out)
                if text:
                    self._delta(item, text, out)
                self._part_done(item, out)
        done = item.snapshot(status)
        out.append(
            self._ev("response.output_item.done", {"output_index": item.index, "item": done})
        )
        if self._live is item:
            self._live = None

    def _activate(self, item: _Item, out: list[SseOut]) -> None:
        """Make a new item live unless a tool call is (then it is held for the finish)."""
        live = self._live
        if live is not None and live.kind != "function_call":
            self._item_done(live, "completed", out)
            live = None
        if live is None and not self._held:
            self._live = item
            self._held = item.kind == "function_call"
            self._added(item, out)

    def _text(self, kind: str, part: str, text: str, out: list[SseOut]) -> None:
        item = self._current.get(kind)
        if item is None or not item.open:
            item = self._current[kind] = self._new_item(kind, self._count(kind))
            self._activate(item, out)
        self._append(item, part, text, out)

    def _tool(self, delta: Any, position: int, out: list[SseOut]) -> None:
        if not isinstance(delta, dict):
            return
        index = delta.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else position
        fn = delta.get("function")
        fn = fn if isinstance(fn, dict) else {}
        ident, name, args = delta.get("id"), fn.get("name"), fn.get("arguments")
        item = self._tools.get(index)
        new_id = isinstance(ident, str) and ident and item is not None and ident != item.call_id
        if item is None or new_id:
            if not (isinstance(ident, str) and ident) and not (isinstance(name, str) and name):
                return  # arguments for a call that never started
            n = self._count("function_call")
            item = self._tools[index] = self._new_item("function_call", n)
            item.call_id = _provider_call_id(ident, f"call_{self._base}_{n}")
            item.name = short_text(name)
            self._activate(item, out)
        elif isinstance(name, str) and name and not item.name:  # the done item names it
            item.name = name[:MAX_SHORT]
        if isinstance(args, str) and args:
            self._append(item, "arguments", args, out)

    def _choice(self, choice: dict[str, Any], out: list[SseOut]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = reasoning_of(delta)
            if reasoning:
                self._text("reasoning", "summary_text", reasoning, out)
            text = text_of(delta.get("content"))
            if text:
                self._text("message", "output_text", text, out)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._text("message", "refusal", refusal, out)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, call in enumerate(calls):
                    self._tool(call, position, out)
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
            self._close_items(out)

    def _close_items(self, out: list[SseOut]) -> None:
        self._finished = True
        status = "completed" if _status(self._finish)[0] == "completed" else "incomplete"
        for item in self._items:
            if item.open:
                self._item_done(item, status, out)

    def _terminal(self, out: list[SseOut]) -> None:
        self._done = True
        status, incomplete = _status(self._finish)
        item_status = "completed" if status == "completed" else "incomplete"
        resp = self._envelope(status, [i.snapshot(item_status) for i in self._items])
        resp["incomplete_details"] = incomplete
        resp["usage"] = self._usage
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._ev(kind, {"response": resp}))

    def _fail(self, error: Any, out: list[SseOut]) -> None:
        self._done = True
        if not self._started:
            self._start(None, out)
        code, message = _error_code(error)
        out.append(self._ev("error", {"code": code, "message": message, "param": None}))
        resp = self._envelope(
            "failed", [i.snapshot("incomplete") for i in self._items if i.emitted]
        )
        resp["error"] = {"code": code, "message": message}
        resp["usage"] = self._usage
        out.append(self._ev("response.failed", {"response": resp}))

    # -- StreamTranslator

    def event(self, name: str | None, data: dict[str, Any] | str) -> list[SseOut]:
        if self._done:
            return []
        out: list[SseOut] = []
        if not isinstance(data, dict):
            if isinstance(data, str) and data.strip() == "[DONE]":
                if not self._started:
                    self._start(None, out)
                if not self._finished:
                    self._close_items(out)
                self._terminal(out)
            return out
        if name == "error" or data.get("error") is not None:
            self._fail(data.get("error", data), out)
            return out
        if name == "ping" or data.get("type") == "ping":
            return out
        if not self._started:
            self._start(data, out)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage(usage)
        choices = data.get("choices")
        if isinstance(choices, list) and choices:
            if isinstance(choices[0], dict) and not self._finished:
                self._choice(choices[0], out)
        elif self._finished and isinstance(usage, dict):
            self._terminal(out)  # the usage chunk after finish_reason
        return out

    def end(self) -> list[SseOut]:
        if self._done:
            return []
        out: list[SseOut] = []
        if self._finished:
            self._terminal(out)
        else:
            self._fail("the provider stream ended early, before finish_reason", out)
        return out


def stream(ctx: Context) -> ResponsesStream:
    """A translator for one Chat SSE stream."""
    return ResponsesStream(ctx)
