"""The provider table: default endpoints, native client APIs, path layout and auth style.

One place answers "what does provider X expect": hosts and paths follow Plano 0.4's
``hermesllm`` endpoint table (reference §2); auth styles follow each provider's own docs
(Azure uses ``api-key``, where Plano sends a Bearer token).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote_plus

from plano_extproc.identifiers import path_segment


class ClientApi(StrEnum):
    """The request format a client speaks, chosen by the request path."""

    CHAT = "chat_completions"
    MESSAGES = "messages"
    RESPONSES = "responses"

    @property
    def label(self) -> str:
        return {
            ClientApi.CHAT: "OpenAI Chat Completions",
            ClientApi.MESSAGES: "Anthropic Messages",
            ClientApi.RESPONSES: "OpenAI Responses",
        }[self]


CLIENT_API_SUFFIX = {
    ClientApi.CHAT: "/chat/completions",
    ClientApi.MESSAGES: "/messages",
    ClientApi.RESPONSES: "/responses",
}


class AuthStyle(StrEnum):
    BEARER = "bearer"  # Authorization: Bearer <key>
    ANTHROPIC = "anthropic"  # x-api-key + anthropic-version
    AZURE = "azure"  # api-key: <key>


ANTHROPIC_VERSION = "2023-06-01"
AZURE_API_VERSION = "2025-01-01-preview"


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """``default_base_url`` is scheme://host[:port] plus the API prefix; ``None`` means the
    config must give ``base_url``."""

    name: str
    default_base_url: str | None
    native: frozenset[ClientApi]
    requires_base_url: bool = False

    def auth_style(self, api: ClientApi) -> AuthStyle:
        if api is ClientApi.MESSAGES:  # every Anthropic Messages upstream takes x-api-key
            return AuthStyle.ANTHROPIC
        if self.name == "azure_openai":
            return AuthStyle.AZURE
        return AuthStyle.BEARER


_CHAT = frozenset({ClientApi.CHAT})


def _spec(
    name: str, base: str | None, native: frozenset[ClientApi] = _CHAT, *, needs_base: bool = False
) -> ProviderSpec:
    return ProviderSpec(name, base, native, needs_base or base is None)


PROVIDERS: dict[str, ProviderSpec] = {
    s.name: s
    for s in (
        _spec(
            "openai", "https://api.openai.com/v1", frozenset({ClientApi.CHAT, ClientApi.RESPONSES})
        ),
        # Messages only: Chat and Responses clients are translated to the native /v1/messages
        # (Anthropic calls its OpenAI-compatible endpoint a testing aid, not for production).
        _spec("anthropic", "https://api.anthropic.com/v1", frozenset({ClientApi.MESSAGES})),
        _spec("deepseek", "https://api.deepseek.com/v1"),
        _spec("groq", "https://api.groq.com/openai/v1"),
        _spec("mistral", "https://api.mistral.ai/v1"),
        _spec("gemini", "https://generativelanguage.googleapis.com/v1beta/openai"),
        _spec("xai", "https://api.x.ai/v1", frozenset({ClientApi.CHAT, ClientApi.RESPONSES})),
        _spec("together_ai", "https://api.together.xyz/v1"),
        _spec("moonshotai", "https://api.moonshot.ai/v1"),
        _spec("zhipu", "https://open.bigmodel.cn/api/paas/v4"),
        _spec("xiaomi", "https://api.xiaomimimo.com/v1"),
        _spec("digitalocean", "https://inference.do-ai.run/v1"),
        _spec("plano", "https://archfc.katanemo.dev/v1"),
        _spec("chatgpt", "https://chatgpt.com/backend-api/codex", frozenset({ClientApi.RESPONSES})),
        _spec(
            "vercel",
            "https://ai-gateway.vercel.sh/v1",
            frozenset({ClientApi.CHAT, ClientApi.MESSAGES, ClientApi.RESPONSES}),
        ),
        _spec("openrouter", "https://openrouter.ai/api/v1"),
        _spec("edenai", "https://api.edenai.run/v3"),
        _spec("azure_openai", None),
        _spec("ollama", None),
        _spec("qwen", None),
        # Bedrock speaks Converse, which no client API maps to and no translator covers.
        _spec("amazon_bedrock", None, frozenset()),
    )
}

PROVIDER_ALIASES = {
    "google": "gemini",
    "together": "together_ai",
    "do": "digitalocean",
    "do_ai": "digitalocean",
    "amazon": "amazon_bedrock",
}

# Default API prefix used when a base_url has no path of its own.
_DEFAULT_PREFIX_WITH_BASE_URL = {
    "qwen": "/compatible-mode/v1",
    "ollama": "/v1",
    "azure_openai": "",
    "amazon_bedrock": "",
}

# Values accepted for provider_interface on an unknown provider prefix (Plano's schema enum).
PROVIDER_INTERFACES = frozenset(
    {
        "plano",
        "deepseek",
        "groq",
        "mistral",
        "openai",
        "xiaomi",
        "gemini",
        "chatgpt",
        "digitalocean",
        "vercel",
        "openrouter",
        "edenai",
        "moonshotai",
    }
)


def canonical_provider(prefix: str) -> str:
    return PROVIDER_ALIASES.get(prefix, prefix)


def default_prefix_for(interface: str) -> str:
    """The API path prefix a provider uses when ``base_url`` carries no path."""
    if interface in _DEFAULT_PREFIX_WITH_BASE_URL:
        return _DEFAULT_PREFIX_WITH_BASE_URL[interface]
    spec = PROVIDERS.get(interface)
    if spec is None or spec.default_base_url is None:
        return "/v1"
    after_scheme = spec.default_base_url.split("://", 1)[1]
    slash = after_scheme.find("/")
    return after_scheme[slash:] if slash >= 0 else ""


def _is_api_version(param: str) -> bool:
    name = unquote_plus(param.split("=", 1)[0]).strip().lower()
    return name == "api-version"


def upstream_path(interface: str, prefix: str, api: ClientApi, model_id: str, query: str) -> str:
    """Build the upstream ``:path`` for a request in ``api``, an API the provider speaks.

    Azure addresses the deployment in the path and requires ``api-version``; the client's own
    query string is kept for everyone else.
    """
    if interface == "azure_openai":
        # The id is one escaped segment (a wildcard id is client text), and api-version is the
        # gateway's: the client's copy is dropped however it spells the name.
        path = f"{prefix}/openai/deployments/{path_segment(model_id)}{CLIENT_API_SUFFIX[api]}"
        params = [p for p in query.split("&") if p and not _is_api_version(p)]
        params.insert(0, f"api-version={AZURE_API_VERSION}")
        return path + "?" + "&".join(params)
    path = prefix + CLIENT_API_SUFFIX[api]
    return f"{path}?{query}" if query else path


# Bare model names ("gpt-4.1", no provider prefix) resolve through the wildcard of the provider
# whose family they belong to, as Plano resolves them through its model list. Longest prefix wins.
_BARE_FAMILIES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        (
            ("gpt-", "openai"),
            ("chatgpt-", "openai"),
            ("o1", "openai"),
            ("o3", "openai"),
            ("o4", "openai"),
            ("codex-", "openai"),
            ("text-embedding-", "openai"),
            ("claude-", "anthropic"),
            ("gemini-", "gemini"),
            ("gemma-", "gemini"),
            ("grok-", "xai"),
            ("mistral-", "mistral"),
            ("magistral-", "mistral"),
            ("ministral-", "mistral"),
            ("codestral-", "mistral"),
            ("devstral-", "mistral"),
            ("pixtral-", "mistral"),
            ("deepseek-", "deepseek"),
            ("kimi-", "moonshotai"),
            ("moonshot-", "moonshotai"),
            ("glm-", "zhipu"),
            ("qwen", "qwen"),
            ("mimo-", "xiaomi"),
        ),
        key=lambda fp: -len(fp[0]),
    )
)


def bare_model_provider(name: str) -> str | None:
    """The provider a bare model name belongs to by its family prefix, or None."""
    lowered = name.lower()
    for prefix, provider in _BARE_FAMILIES:
        if lowered.startswith(prefix):
            if prefix in ("o1", "o3", "o4") and lowered[2:3] not in ("", "-"):
                continue  # o1, o3-mini, o4-mini; not "o3something"
            return provider
    return None
