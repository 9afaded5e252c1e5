"""The LLM router: Plano-Orchestrator / Arch-Router served on an OpenAI-compatible endpoint.

Prompt construction and output parsing are pure functions (golden-tested byte for byte
against the templates the models were trained on). The HTTP client has a hard timeout and
turns every failure into ``RouterResult.error`` so the request fails open.

``RouterResult.error`` reaches the unauthenticated ``/routing/v1/*`` replies and the log, so it
is a status and a short fixed reason, never text from the router's reply: a router that echoes
its credential in an error body must not hand it to every client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Any

import aiohttp

from plano_extproc.routing.base import ChatMessage, RoutePreference, RouterResult

log = logging.getLogger("plano_extproc.router")

ORCHESTRATOR_V1_TEMPLATE = """
You are a helpful assistant that selects the most suitable routes based on user intent.
You are provided with a list of available routes enclosed within <routes></routes> XML tags:
<routes>
{routes}
</routes>

You are also given the conversation context enclosed within <conversation></conversation> XML tags:
<conversation>
{conversation}
</conversation>

## Instructions
1. Analyze the latest user intent from the conversation.
2. Compare it against the available routes to find which routes can help fulfill the request.
3. Respond only with the exact route names from <routes>.
4. If no routes can help or the intent is already fulfilled, return an empty list.

## Response Format
Return your answer strictly in JSON as follows:
{{"route": ["route_name_1", "route_name_2", "..."]}}
If no routes are needed, return an empty list for `route`.
"""

ARCH_ROUTER_V1_TEMPLATE = """
You are a helpful assistant designed to find the best suited route.
You are provided with route description within <routes></routes> XML tags:
<routes>
{routes}
</routes>

<conversation>
{conversation}
</conversation>

Your task is to decide which route is best suit with user intent on the conversation in <conversation></conversation> XML tags.  Follow the instruction:
1. If the latest intent from user is irrelevant or user intent is full filled, response with other route {"route": "other"}.
2. You must analyze the route descriptions and find the best match route for user latest intent.
3. You only response the name of the route that best matches the user's request, use the exact name in the <routes></routes>.

Based on your analysis, provide your response in the following JSON formats if you decide to match any route:
{"route": "route_name"}
"""  # noqa: E501

MAX_ROUTING_TURNS = 16
ARCH_ROUTER_MAX_TOKENS = 2048
#: Largest router reply read (a chat completion naming a route is a few hundred bytes).
MAX_REPLY_BYTES = 1 << 20
_IGNORED_ROLES = frozenset({"system", "developer", "tool"})


def _tokens(text: str) -> int:
    return len(text.encode("utf-8")) // 4


def _middle_trim(text: str, max_bytes: int) -> str:
    """Keep ~60% head and ~40% tail of the text within ``max_bytes`` (char-boundary safe)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    head = int(max_bytes * 0.6)
    tail = max_bytes - head
    left = data[:head].decode("utf-8", errors="ignore")
    right = data[len(data) - tail :].decode("utf-8", errors="ignore") if tail > 0 else ""
    return left + "…" + right


def select_messages(
    messages: Sequence[ChatMessage],
    *,
    max_tokens: int,
    template: str,
    cap_turns: bool = True,
    trim_overflow: bool = True,
) -> list[ChatMessage]:
    """Plano's conversation selection: user/assistant text turns, newest first within budget."""
    usable = [m for m in messages if m.role not in _IGNORED_ROLES and m.content.strip()]
    if cap_turns:
        usable = usable[-MAX_ROUTING_TURNS:]
    if not usable:
        return []
    used = _tokens(template)
    picked: list[ChatMessage] = []
    for msg in reversed(usable):
        cost = _tokens(msg.content)
        if used + cost > max_tokens:
            remaining = max_tokens - used
            if msg.role == "user" and (remaining > 0 or not trim_overflow):
                content = _middle_trim(msg.content, remaining * 4) if trim_overflow else msg.content
                picked.append(ChatMessage(msg.role, content))
            break
        picked.append(msg)
        used += cost
    if not picked:
        picked = [usable[-1]]
    picked.reverse()
    return picked


def build_orchestrator_prompt(
    messages: Sequence[ChatMessage], prefs: Sequence[RoutePreference], *, max_tokens: int = 8192
) -> str:
    routes = "\n".join(
        json.dumps(
            {
                "name": p.name,
                "description": p.description,
                "parameters": {"type": "object", "properties": {}, "required": []},
            },
            ensure_ascii=False,
        )
        for p in prefs
    )
    selected = select_messages(messages, max_tokens=max_tokens, template=ORCHESTRATOR_V1_TEMPLATE)
    conversation = json.dumps(
        [{"role": m.role, "content": m.content} for m in selected], indent=4, ensure_ascii=False
    )
    return ORCHESTRATOR_V1_TEMPLATE.replace("{routes}", routes).replace(
        "{conversation}", conversation
    )


def build_arch_router_prompt(
    messages: Sequence[ChatMessage], prefs: Sequence[RoutePreference]
) -> str:
    routes = json.dumps(
        [{"name": p.name, "description": p.description} for p in prefs],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    selected = select_messages(
        messages,
        max_tokens=ARCH_ROUTER_MAX_TOKENS,
        template=ARCH_ROUTER_V1_TEMPLATE,
        cap_turns=False,
        trim_overflow=False,
    )
    conversation = json.dumps(
        [{"role": m.role, "content": m.content} for m in selected],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return ARCH_ROUTER_V1_TEMPLATE.replace("{routes}", routes).replace(
        "{conversation}", conversation
    )


_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*|\s*```\s*$")


class RouterOutputError(ValueError):
    pass


def parse_route_output(content: str | None, route_names: Sequence[str]) -> str | None:
    """Both output shapes: ``{"route": "name"}`` and ``{"route": ["a", "b"]}``.

    Code fences are stripped, "other"/empty mean no route, unknown names are ignored and the
    first known name wins. Raises ``RouterOutputError`` when the output is not that JSON; its
    message never quotes the output (it is shown to clients).
    """
    if content is None or not content.strip():
        return None
    text = _FENCE.sub("", content.strip()).replace("\\n", "").replace("'", '"').strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        m = re.search(r"\{.*\}", text, re.DOTALL)
        if not m:
            raise RouterOutputError("router reply content was not JSON") from None
        try:
            data = json.loads(m.group(0))
        except json.JSONDecodeError:
            raise RouterOutputError("router reply content was not JSON") from None
    if not isinstance(data, dict) or "route" not in data:
        raise RouterOutputError("router reply content was not an object with 'route'")
    value = data["route"]
    names: list[Any]
    if value is None:
        return None
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, list):
        names = value
    else:
        raise RouterOutputError("router reply 'route' was not a string or a list")
    known = set(route_names)
    for name in names:
        if isinstance(name, str) and name and name != "other" and name in known:
            return name
    return None


class OrchestratorRouter:
    """POSTs the routing prompt to ``{base_url}/chat/completions`` and parses the answer."""

    def __init__(
        self,
        *,
        url: str,
        model_id: str,
        prompt: str = "plano_orchestrator_v1",
        timeout_ms: int = 3000,
        context_length: int = 8192,
        headers: dict[str, str] | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
        self.ca_file = ca_file  # overrides.upstream_tls_ca_path: trust it here too
        self.model_id = model_id
        self.prompt = prompt
        self.timeout = timeout_ms / 1000.0
        self.context_length = context_length
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            tls: ssl.SSLContext | bool = True
            if self.ca_file is not None:
                tls = ssl.create_default_context(cafile=self.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30, ssl=tls),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build_prompt(
        self, messages: Sequence[ChatMessage], prefs: Sequence[RoutePreference]
    ) -> str:
        if self.prompt == "arch_router_v1":
            return build_arch_router_prompt(messages, prefs)
        return build_orchestrator_prompt(messages, prefs, max_tokens=self.context_length)

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preferences: Sequence[RoutePreference],
        *,
        request_id: str,
    ) -> RouterResult:
        prompt = self.build_prompt(messages, preferences)
        if not prompt or not any(m.role not in _IGNORED_ROLES for m in messages):
            return RouterResult(route=None)
        payload = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.01,
        }
        if self._session is None:
            await self.start()
        assert self._session is not None
        headers = {**self.headers, "x-request-id": request_id}
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.post(self.url, json=payload, headers=headers) as resp:
                    if resp.status // 100 != 2:
                        # Never the body: it may echo the router's credential.
                        return RouterResult(route=None, error=f"router returned HTTP {resp.status}")
                    raw = await _read_bounded(resp.content, MAX_REPLY_BYTES + 1)
        except TimeoutError:
            return RouterResult(
                route=None, error=f"router timed out after {round(self.timeout * 1000)} ms"
            )
        except aiohttp.ClientError as e:
            return RouterResult(route=None, error=f"router unreachable ({type(e).__name__})")
        if len(raw) > MAX_REPLY_BYTES:
            return RouterResult(
                route=None, error=f"router reply was larger than {MAX_REPLY_BYTES} bytes"
            )
        return _parse_reply(raw, [p.name for p in preferences])


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """At most ``limit`` bytes of a reply body (a router streaming gigabytes costs nothing)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


_UNEXPECTED_SHAPE = "router reply had an unexpected shape"


def _parse_reply(raw: bytes, route_names: Sequence[str]) -> RouterResult:
    """The route named by a chat-completion reply; total: any failure (wrong shapes, deep
    nesting's RecursionError, huge numbers) is a ``RouterResult.error`` with a short reason."""
    try:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return RouterResult(route=None, error="router reply was not valid JSON")
        return RouterResult(route=parse_route_output(_content(data), route_names))
    except RouterOutputError as e:
        return RouterResult(route=None, error=str(e))
    except RecursionError:
        return RouterResult(route=None, error="router reply was nested too deeply")
    except Exception as e:  # any failure fails open
        return RouterResult(route=None, error=f"router reply was unreadable ({type(e).__name__})")


def _content(data: Any) -> str | None:
    """``choices[0].message.content`` of a chat completion (None without choices)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise RouterOutputError(_UNEXPECTED_SHAPE)
    if not choices:
        return None
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise RouterOutputError(_UNEXPECTED_SHAPE)
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise RouterOutputError(_UNEXPECTED_SHAPE)
    return content
