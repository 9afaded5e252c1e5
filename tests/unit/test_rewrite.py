"""Upstream rewriting: paths per provider (reference §2 table) and auth per provider style."""

from __future__ import annotations

import pytest

from plano_extproc.catalog import Catalog
from plano_extproc.config import Provider, parse_config
from plano_extproc.errors import GatewayError
from plano_extproc.names import ROUTE_HEADER
from plano_extproc.providers import (
    ANTHROPIC_VERSION,
    AZURE_API_VERSION,
    ClientApi,
    default_prefix_for,
    upstream_path,
)
from plano_extproc.rewrite import (
    CREDENTIAL_HEADERS,
    HeaderPlan,
    auth_headers,
    client_credential,
    upstream_headers,
)

CHAT, MESSAGES, RESPONSES = ClientApi.CHAT, ClientApi.MESSAGES, ClientApi.RESPONSES


def provider(model: str, extra: str = "    access_key: sk-test\n") -> Provider:
    text = (
        "version: v0.4.0\nlisteners:\n  - {name: m, type: model}\n"
        f"model_providers:\n  - model: {model}\n{extra}"
    )
    return parse_config(text, env={}).providers[0]


def path_for(model: str, api: ClientApi, query: str = "", extra: str = "") -> str:
    p = provider(model, "    access_key: k\n" + extra)
    return upstream_path(p.interface, p.path_prefix, api, p.model_id, query)


def as_dict(plan: HeaderPlan) -> dict[str, str]:
    d = dict(plan.set)
    assert len(d) == len(plan.set), f"header set twice: {plan.set}"
    return d


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("model", "api", "path"),
    [
        ("openai/gpt-4o", CHAT, "/v1/chat/completions"),
        ("openai/gpt-4o", RESPONSES, "/v1/responses"),
        ("anthropic/claude-sonnet-4", CHAT, "/v1/chat/completions"),
        ("anthropic/claude-sonnet-4", MESSAGES, "/v1/messages"),
        ("deepseek/deepseek-chat", CHAT, "/v1/chat/completions"),
        ("groq/llama-3.3-70b", CHAT, "/openai/v1/chat/completions"),
        ("mistral/mistral-large", CHAT, "/v1/chat/completions"),
        ("gemini/gemini-2.0-flash", CHAT, "/v1beta/openai/chat/completions"),
        ("google/gemini-2.0-flash", CHAT, "/v1beta/openai/chat/completions"),
        ("xai/grok-4", CHAT, "/v1/chat/completions"),
        ("xai/grok-4", RESPONSES, "/v1/responses"),
        ("together_ai/llama", CHAT, "/v1/chat/completions"),
        ("moonshotai/kimi", CHAT, "/v1/chat/completions"),
        ("zhipu/glm-4.6", CHAT, "/api/paas/v4/chat/completions"),
        ("xiaomi/mimo", CHAT, "/v1/chat/completions"),
        ("digitalocean/llama", CHAT, "/v1/chat/completions"),
        ("plano/Plano-Orchestrator", CHAT, "/v1/chat/completions"),
        ("openrouter/anthropic/claude", CHAT, "/api/v1/chat/completions"),
        ("edenai/x", CHAT, "/v3/chat/completions"),
        ("vercel/openai/gpt-4o", MESSAGES, "/v1/messages"),
        ("chatgpt/gpt-5", RESPONSES, "/backend-api/codex/responses"),
    ],
)
def test_paths_per_provider(model: str, api: ClientApi, path: str) -> None:
    assert path_for(model, api) == path


@pytest.mark.parametrize(
    ("model", "host"),
    [
        ("openai/m", "api.openai.com"),
        ("anthropic/m", "api.anthropic.com"),
        ("deepseek/m", "api.deepseek.com"),
        ("groq/m", "api.groq.com"),
        ("mistral/m", "api.mistral.ai"),
        ("gemini/m", "generativelanguage.googleapis.com"),
        ("xai/m", "api.x.ai"),
        ("together_ai/m", "api.together.xyz"),
        ("moonshotai/m", "api.moonshot.ai"),
        ("zhipu/m", "open.bigmodel.cn"),
        ("xiaomi/m", "api.xiaomimimo.com"),
        ("digitalocean/m", "inference.do-ai.run"),
        ("plano/m", "archfc.katanemo.dev"),
    ],
)
def test_default_hosts(model: str, host: str) -> None:
    p = provider(model)
    assert (p.host, p.port, p.scheme) == (host, 443, "https")


@pytest.mark.parametrize(
    ("model", "base_url", "path"),
    [
        ("ollama/llama3", "http://localhost:11434", "/v1/chat/completions"),
        ("qwen/qwen-max", "https://dashscope.aliyuncs.com", "/compatible-mode/v1/chat/completions"),
        ("openai/gpt-4o", "https://proxy.example.com/team-a/v1", "/team-a/v1/chat/completions"),
        ("openai/gpt-4o", "https://proxy.example.com/team-a/v1/", "/team-a/v1/chat/completions"),
        ("groq/llama", "https://proxy.example.com/groq", "/groq/chat/completions"),
        ("groq/llama", "https://proxy.example.com", "/openai/v1/chat/completions"),
    ],
)
def test_base_url_paths(model: str, base_url: str, path: str) -> None:
    assert path_for(model, CHAT, extra=f"    base_url: {base_url}\n") == path


def test_base_url_prefix_with_messages() -> None:
    extra = "    base_url: https://gw.example.com/anthropic\n"
    assert path_for("anthropic/claude", MESSAGES, extra=extra) == "/anthropic/messages"


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("", "/v1/chat/completions"),
        ("a=1", "/v1/chat/completions?a=1"),
        ("a=1&b=x%20y", "/v1/chat/completions?a=1&b=x%20y"),
    ],
)
def test_client_query_string_is_kept(query: str, path: str) -> None:
    assert path_for("openai/gpt-4o", CHAT, query) == path


AZURE = "    base_url: https://res.openai.azure.com\n"


@pytest.mark.parametrize(
    ("query", "suffix"),
    [
        ("", f"?api-version={AZURE_API_VERSION}"),
        ("api-version=2024-02-01", f"?api-version={AZURE_API_VERSION}"),
        ("foo=1&api-version=2024-02-01&bar=2", f"?api-version={AZURE_API_VERSION}&foo=1&bar=2"),
        ("foo=1", f"?api-version={AZURE_API_VERSION}&foo=1"),
        ("&&foo=1&", f"?api-version={AZURE_API_VERSION}&foo=1"),
        # the client cannot choose the version by spelling the name differently
        ("API-Version=1&a=b&api%2Dversion=3&Api-Version", f"?api-version={AZURE_API_VERSION}&a=b"),
    ],
)
def test_azure_deployment_path_and_api_version(query: str, suffix: str) -> None:
    assert AZURE_API_VERSION == "2025-01-01-preview"
    path = path_for("azure_openai/gpt-4o", CHAT, query, extra=AZURE)
    assert path == "/openai/deployments/gpt-4o/chat/completions" + suffix


def test_azure_with_base_url_path_prefix() -> None:
    extra = "    base_url: https://apim.example.com/azure\n"
    assert path_for("azure_openai/my-deploy", CHAT, extra=extra) == (
        f"/azure/openai/deployments/my-deploy/chat/completions?api-version={AZURE_API_VERSION}"
    )


def test_default_prefix_for() -> None:
    assert default_prefix_for("openai") == "/v1"
    assert default_prefix_for("groq") == "/openai/v1"
    assert default_prefix_for("gemini") == "/v1beta/openai"
    assert default_prefix_for("zhipu") == "/api/paas/v4"
    assert default_prefix_for("qwen") == "/compatible-mode/v1"
    assert default_prefix_for("ollama") == "/v1"
    assert default_prefix_for("azure_openai") == ""
    assert default_prefix_for("something-else") == "/v1"


def test_upstream_headers_set_path_route_and_provider_headers() -> None:
    extra = "    access_key: sk-x\n    headers:\n      OpenAI-Organization: org-1\n"
    extra += "      X-Extra: 'yes'\n"
    p = provider("openai/gpt-4o", extra)
    plan = upstream_headers(p, CHAT, "a=1", {"authorization": "Bearer client"})
    d = as_dict(plan)
    assert d[":path"] == "/v1/chat/completions?a=1"
    assert d[ROUTE_HEADER] == p.cluster
    assert d["authorization"] == "Bearer sk-x"
    assert d["openai-organization"] == "org-1"
    assert d["x-extra"] == "yes"
    assert plan.set[-2:] == [("openai-organization", "org-1"), ("x-extra", "yes")]


def test_upstream_headers_for_wildcard_use_the_requested_model() -> None:
    text = (
        "version: v0.4.0\nlisteners:\n  - {name: m, type: model}\n"
        "model_providers:\n  - model: azure_openai/*\n    access_key: k\n" + AZURE
    )
    p = Catalog(parse_config(text, env={})).resolve("azure_openai/gpt-4.1")
    d = as_dict(upstream_headers(p, CHAT, "", {}))
    assert d[":path"].startswith("/openai/deployments/gpt-4.1/chat/completions?")


@pytest.mark.parametrize(
    ("model_id", "segment"),
    [
        ("../../../other?x=1#", "..%2F..%2F..%2Fother%3Fx%3D1%23"),
        ("a/b", "a%2Fb"),
        ("dep&api-version=1", "dep%26api-version%3D1"),
        ("%41", "%2541"),
    ],
)
def test_azure_wildcard_ids_are_one_escaped_path_segment(model_id: str, segment: str) -> None:
    text = (
        "version: v0.4.0\nlisteners:\n  - {name: m, type: model}\n"
        "model_providers:\n  - model: azure_openai/*\n    access_key: k\n" + AZURE
    )
    p = Catalog(parse_config(text, env={})).resolve(f"azure_openai/{model_id}")
    path = as_dict(upstream_headers(p, CHAT, "", {}))[":path"]
    assert path == (
        f"/openai/deployments/{segment}/chat/completions?api-version={AZURE_API_VERSION}"
    )


@pytest.mark.parametrize("model_id", ["..", ".", "%2e%2E"])
def test_azure_dot_segment_ids_are_refused(model_id: str) -> None:
    text = (
        "version: v0.4.0\nlisteners:\n  - {name: m, type: model}\n"
        "model_providers:\n  - model: azure_openai/*\n    access_key: k\n" + AZURE
    )
    p = Catalog(parse_config(text, env={})).resolve(f"azure_openai/{model_id}")
    with pytest.raises(GatewayError) as ei:
        upstream_headers(p, CHAT, "", {})
    assert ei.value.status == 400


# --------------------------------------------------------------------------- auth


def test_client_credential() -> None:
    assert client_credential({"authorization": "Bearer abc"}) == "abc"
    assert client_credential({"authorization": "bearer  abc "}) == "abc"
    assert client_credential({"authorization": "raw-token"}) == "raw-token"
    assert client_credential({"x-api-key": " k1 "}) == "k1"
    assert client_credential({"api-key": "k2"}) == "k2"
    assert client_credential({"authorization": "Bearer a", "x-api-key": "b"}) == "a"
    assert client_credential({}) is None
    assert client_credential({"authorization": ""}) is None


def test_credential_headers_list() -> None:
    assert set(CREDENTIAL_HEADERS) == {"authorization", "x-api-key", "api-key"}


@pytest.mark.parametrize(
    "model", ["openai/gpt-4o", "groq/llama", "gemini/g", "mistral/m", "deepseek/d", "xai/grok"]
)
@pytest.mark.parametrize("api", [CHAT, RESPONSES])
def test_openai_compatible_bearer(model: str, api: ClientApi) -> None:
    plan = auth_headers(
        provider(model), api, {"authorization": "Bearer client", "x-api-key": "client"}
    )
    assert plan.set == [("authorization", "Bearer sk-test")]
    assert "x-api-key" in plan.remove
    assert "api-key" in plan.remove
    assert "authorization" not in plan.remove


def test_anthropic_messages_auth() -> None:
    plan = auth_headers(provider("anthropic/claude"), MESSAGES, {"authorization": "Bearer c"})
    assert as_dict(plan) == {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}
    assert ANTHROPIC_VERSION == "2023-06-01"
    assert "authorization" in plan.remove
    assert "api-key" in plan.remove
    assert "x-api-key" not in plan.remove


def test_anthropic_version_from_the_client_is_kept() -> None:
    headers = {"x-api-key": "client", "anthropic-version": "2024-10-22"}
    plan = auth_headers(provider("anthropic/claude"), MESSAGES, headers)
    assert as_dict(plan) == {"x-api-key": "sk-test"}
    assert "anthropic-version" not in plan.remove


def test_anthropic_chat_completions_is_bearer() -> None:
    plan = auth_headers(provider("anthropic/claude"), CHAT, {"x-api-key": "client"})
    assert as_dict(plan) == {"authorization": "Bearer sk-test"}
    assert "x-api-key" in plan.remove


def test_azure_uses_api_key() -> None:
    p = provider("azure_openai/gpt-4o", "    access_key: az-key\n" + AZURE)
    plan = auth_headers(p, CHAT, {"authorization": "Bearer client"})
    assert as_dict(plan) == {"api-key": "az-key"}
    assert "authorization" in plan.remove
    assert "x-api-key" in plan.remove
    assert "api-key" not in plan.remove


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer user-key"}, "user-key"),
        ({"x-api-key": "user-key"}, "user-key"),
        ({"api-key": "user-key"}, "user-key"),
    ],
)
def test_passthrough_auth_openai(headers: dict[str, str], expected: str) -> None:
    p = provider("openai/gpt-4o", "    passthrough_auth: true\n")
    assert as_dict(auth_headers(p, CHAT, headers)) == {"authorization": f"Bearer {expected}"}


@pytest.mark.parametrize(
    "headers", [{"authorization": "Bearer user-key"}, {"x-api-key": "user-key"}]
)
def test_passthrough_auth_anthropic_messages(headers: dict[str, str]) -> None:
    p = provider("anthropic/claude", "    passthrough_auth: true\n")
    plan = auth_headers(p, MESSAGES, headers)
    assert as_dict(plan) == {"anthropic-version": "2023-06-01", "x-api-key": "user-key"}
    assert "authorization" in plan.remove


def test_passthrough_ignores_configured_key() -> None:
    p = provider("openai/gpt-4o", "    access_key: sk-config\n    passthrough_auth: true\n")
    plan = auth_headers(p, CHAT, {"authorization": "Bearer user"})
    assert as_dict(plan) == {"authorization": "Bearer user"}


def test_passthrough_without_client_credentials_forwards_no_auth() -> None:
    p = provider("openai/gpt-4o", "    passthrough_auth: true\n")
    plan = auth_headers(p, CHAT, {})
    assert plan.set == []
    assert set(plan.remove) == set(CREDENTIAL_HEADERS)


def test_client_credentials_removed_when_not_passthrough() -> None:
    headers = {"authorization": "Bearer leak", "x-api-key": "leak", "api-key": "leak"}
    plan = auth_headers(provider("openai/gpt-4o"), CHAT, headers)
    assert "leak" not in str(plan.set)
    assert set(plan.remove) == {"x-api-key", "api-key"}
    assert dict(plan.set)["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("ollama/llama3", "    base_url: http://localhost:11434\n"),
        ("openai/gpt-4o", "    base_url: http://vllm.local:8000/v1\n"),
        ("vllm/q", "    base_url: http://vllm.local:8000/v1\n    provider_interface: openai\n"),
        ("plano/Plano-Orchestrator", ""),
    ],
)
def test_keyless_custom_endpoints(model: str, extra: str) -> None:
    p = provider(model, extra)
    plan = auth_headers(p, CHAT, {"authorization": "Bearer client-secret"})
    assert plan.set == []
    assert set(plan.remove) == set(CREDENTIAL_HEADERS)


def test_keyless_anthropic_base_url_still_gets_version() -> None:
    p = provider("anthropic/claude", "    base_url: http://localhost:9000/v1\n")
    plan = auth_headers(p, MESSAGES, {"x-api-key": "client"})
    assert plan.set == [("anthropic-version", "2023-06-01")]
    assert "x-api-key" in plan.remove


@pytest.mark.parametrize(
    ("model", "api"),
    [("openai/gpt-4o", CHAT), ("anthropic/claude", MESSAGES), ("groq/llama", CHAT)],
)
def test_missing_key_on_hosted_provider_is_400(model: str, api: ClientApi) -> None:
    p = provider(model, "    default: false\n")
    with pytest.raises(GatewayError) as ei:
        auth_headers(p, api, {"authorization": "Bearer client"})
    e = ei.value
    assert e.status == 400
    assert e.type == "invalid_request_error"
    assert e.message.startswith(f'No access key configured for selected LLM Provider "{model}"')
    assert "access_key" in e.message


def test_missing_key_via_empty_env_default_is_400() -> None:
    p = provider("openai/gpt-4o", "    access_key: ${OPENAI_API_KEY:-}\n")
    with pytest.raises(GatewayError):
        auth_headers(p, CHAT, {})


def test_upstream_headers_propagates_missing_key_error() -> None:
    p = provider("openai/gpt-4o", "    default: false\n")
    with pytest.raises(GatewayError):
        upstream_headers(p, CHAT, "", {})


def test_provider_headers_can_override_auth() -> None:
    # Provider headers are applied last, so a configured header wins over the computed one.
    extra = "    access_key: k\n    headers:\n      Authorization: Bearer from-config\n"
    plan = upstream_headers(provider("openai/gpt-4o", extra), CHAT, "", {})
    assert plan.set[-1] == ("authorization", "Bearer from-config")


def test_configured_authorization_header_replaces_computed_one_once() -> None:
    from plano_extproc.config import parse_config
    from plano_extproc.providers import ClientApi
    from plano_extproc.rewrite import upstream_headers

    cfg = parse_config(
        "version: v0.4.0\nlisteners: [{name: m, type: model}]\nmodel_providers:\n"
        "  - model: openai/gpt-4o\n    access_key: k\n"
        "    headers: {Authorization: Bearer custom, X-Org: acme}\n"
    )
    plan = upstream_headers(cfg.providers[0], ClientApi.CHAT, "", {})
    keys = [k for k, _ in plan.set]
    assert keys.count("authorization") == 1
    assert dict(plan.set)["authorization"] == "Bearer custom"
    assert dict(plan.set)["x-org"] == "acme"
    assert "authorization" not in plan.remove


def test_any_messages_upstream_gets_x_api_key() -> None:
    from plano_extproc.config import parse_config
    from plano_extproc.providers import ClientApi
    from plano_extproc.rewrite import upstream_headers

    cfg = parse_config(
        "version: v0.4.0\nlisteners: [{name: m, type: model}]\nmodel_providers:\n"
        "  - model: vercel/anthropic/claude\n    access_key: vk\n"
    )
    plan = dict(upstream_headers(cfg.providers[0], ClientApi.MESSAGES, "", {}).set)
    assert plan["x-api-key"] == "vk" and "authorization" not in plan
