"""Upstream request rewriting for a chosen provider: path, host, auth, provider headers.

This is the one place that decides which credential header each provider gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from plano_extproc.config import Provider
from plano_extproc.errors import GatewayError
from plano_extproc.names import ROUTE_HEADER
from plano_extproc.providers import (
    ANTHROPIC_VERSION,
    PROVIDERS,
    AuthStyle,
    ClientApi,
    upstream_path,
)

# Credential headers a client may send; never forwarded unless the provider uses passthrough_auth.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


@dataclass(slots=True)
class HeaderPlan:
    set: list[tuple[str, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)


def client_credential(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        return auth[7:].strip() if auth[:7].lower() == "bearer " else auth.strip()
    key = headers.get("x-api-key") or headers.get("api-key")
    return key.strip() if key else None


def auth_headers(provider: Provider, api: ClientApi, headers: Mapping[str, str]) -> HeaderPlan:
    """Remove the client's credentials and set the provider's, in the provider's style."""
    plan = HeaderPlan(remove=list(CREDENTIAL_HEADERS))
    key = client_credential(headers) if provider.passthrough_auth else provider.access_key
    spec = PROVIDERS.get(provider.interface)
    style = spec.auth_style(api) if spec else AuthStyle.BEARER
    if style is AuthStyle.ANTHROPIC and "anthropic-version" not in headers:
        plan.set.append(("anthropic-version", ANTHROPIC_VERSION))
    if not key:
        if provider.passthrough_auth or provider.custom_endpoint or provider.interface == "plano":
            return plan  # keyless endpoints (Ollama, vLLM) and passthrough without client creds
        raise GatewayError(
            400,
            "invalid_request_error",
            f'No access key configured for selected LLM Provider "{provider.name}"; '
            f"{provider.access_key_hint}",
        )
    if style is AuthStyle.ANTHROPIC:
        plan.set.append(("x-api-key", key))
    elif style is AuthStyle.AZURE:
        plan.set.append(("api-key", key))
    else:
        plan.set.append(("authorization", f"Bearer {key}"))
    plan.remove = [h for h in plan.remove if h not in {k for k, _ in plan.set}]
    return plan


def upstream_headers(
    provider: Provider, api: ClientApi, query: str, headers: Mapping[str, str]
) -> HeaderPlan:
    """Everything that changes in the request headers when dispatching to ``provider``."""
    plan = auth_headers(provider, api, headers)
    plan.set.append(
        (
            ":path",
            upstream_path(provider.interface, provider.path_prefix, api, provider.model_id, query),
        )
    )
    plan.set.append((ROUTE_HEADER, provider.cluster))
    if provider.headers:
        # Provider headers win over computed ones (e.g. a configured Authorization), once each.
        overridden = {k for k, _ in provider.headers}
        plan.set = [h for h in plan.set if h[0] not in overridden or h[0] == ROUTE_HEADER]
        plan.set.extend(h for h in provider.headers if h[0] not in (":path", ROUTE_HEADER))
        plan.remove = [h for h in plan.remove if h not in overridden]
    return plan
