"""What one provider gets for one client request: its API, headers and body.

Shared by the routing stream (a request's single attempt) and by each failover attempt's
stream, so both build exactly the same upstream request for the same model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from plano_extproc.body import JsonBody
from plano_extproc.config import Provider
from plano_extproc.errors import GatewayError, bad_request
from plano_extproc.names import TRANSLATE_HEADER
from plano_extproc.providers import PROVIDERS, ClientApi
from plano_extproc.rewrite import HeaderPlan, upstream_headers
from plano_extproc.routing.preferences import INLINE_KEYS
from plano_extproc.translate import pair_name, provider_api, translator
from plano_extproc.translate.base import PairTranslator

log = logging.getLogger("plano_extproc.gateway")

# The response context travels in Envoy dynamic metadata to another ext_proc stream: bounded.
MAX_CONTEXT_BYTES = 4096
compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Translation:
    """What the response phase needs: the pair ("messages>chat_completions") and ``metadata``,
    the JSON sent as ``plano.tx`` ({"pair", "ctx": the translator's context}), built once."""

    pair: str
    metadata: str

    @classmethod
    def build(cls, pair: str, context: dict[str, Any]) -> Translation:
        return cls(pair, compact_json({"pair": pair, "ctx": context}))


def _speaks(interface: str) -> str:
    spec = PROVIDERS.get(interface)
    if interface == "amazon_bedrock":
        return "Bedrock Converse"
    if spec is None or not spec.native:
        return "its own API"
    return " / ".join(sorted(api.label for api in spec.native))


def dispatch_api(provider: Provider, client: ClientApi) -> tuple[ClientApi, PairTranslator | None]:
    """The API ``provider`` is called with for a ``client`` request, and the translator (None
    for a native pair); a 400 when no translation between the two exists."""
    target = provider_api(provider.interface, client)  # only pairs that have a translator
    if target is None:
        raise bad_request(
            f"model {provider.name} (provider '{provider.interface}') cannot serve "
            f"{client.label} requests: translation between {client.label} and "
            f"{_speaks(provider.interface)} is not available"
        )
    return target, translator(client, target)


def hides_usage(client: ClientApi, values: Mapping[str, Any]) -> bool:
    """A streamed Chat request whose client did not ask for usage: the provider is asked
    anyway (every stream is counted) and Envoy takes it out of the client's stream again
    (``envoy_config._HIDE_USAGE``)."""
    if client is not ClientApi.CHAT or values.get("stream") is not True:
        return False
    options = values.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is not True


def usage_asked(values: Mapping[str, Any]) -> dict[str, Any]:
    """The member edit that asks for usage, keeping the client's other stream options."""
    options = values.get("stream_options")
    return {
        "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}
    }


def pair_for(provider: Provider, client: ClientApi) -> tuple[bool, PairTranslator | None]:
    """(whether ``provider`` can serve ``client`` requests, the translator: None if native)."""
    target = provider_api(provider.interface, client)
    if target is None:
        return False, None
    return True, translator(client, target)


def refuses(pair: PairTranslator | None, values: Mapping[str, Any], model_id: str) -> bool:
    """Whether a translated pair's translator refuses this body (e.g. a field the provider's
    API lacks; a native pair never does). Failover leaves such a model out: an attempt's own
    refusal cannot hand over to the next model (Envoy does not retry a reply an upstream
    filter makes itself)."""
    if pair is None:
        return False
    try:
        pair.request({k: v for k, v in values.items() if k not in INLINE_KEYS}, model_id)
    except GatewayError:
        return True
    except Exception:  # a translator bug: the attempt reports it as a 500
        return False
    return False


async def native_request(
    client: ClientApi,
    query: str,
    headers: Mapping[str, str],
    body: JsonBody,
    provider: Provider,
    *,
    unchanged_size: int | None = None,
    ask_usage: bool = False,
) -> tuple[HeaderPlan, bytes | None]:
    """A native pair: the client's bytes, edited only where a member must change (None:
    unchanged; then content-length is set to ``unchanged_size`` when given). ``ask_usage``:
    set ``stream_options.include_usage`` (see ``hides_usage``), and ask for an uncompressed
    answer (Envoy's Lua filter reads it)."""
    plan = upstream_headers(provider, client, query, headers)
    remove = tuple(k for k in INLINE_KEYS if k in body.values)
    set_values: dict[str, Any] = {}
    if body.values.get("model") != provider.model_id:
        set_values["model"] = provider.model_id
    if ask_usage:
        set_values.update(usage_asked(body.values))
        plan.set.append(("accept-encoding", "identity"))
    new_body: bytes | None = None
    if remove or set_values:
        new_body = body.edited(remove=remove, set_values=set_values)
        plan.set.append(("content-length", str(len(new_body))))
    elif unchanged_size is not None:
        plan.set.append(("content-length", str(unchanged_size)))
    await body.release()  # large bodies: freed a slice per loop turn, not all at once
    return plan, new_body


async def translated_request(
    client: ClientApi,
    query: str,
    headers: Mapping[str, str],
    body: JsonBody,
    provider: Provider,
    target: ClientApi,
    pair: PairTranslator,
    request_id: str,
) -> tuple[HeaderPlan, bytes, Translation]:
    """A non-native pair: the provider gets the translator's body (re-serialised) with
    headers planned for ``target``; the response phase gets the context."""
    values = {k: v for k, v in body.values.items() if k not in INLINE_KEYS}
    try:
        translated, context = pair.request(values, provider.model_id)
    except GatewayError:
        raise
    except Exception:  # a translator bug must not look like a transport failure
        log.exception("request_id=%s %s translation failed", request_id, client)
        raise GatewayError(
            500, "server_error", f"translating the request for model {provider.name} failed"
        ) from None
    new_body = compact_json(translated).encode("utf-8")
    await body.release()
    translation = Translation.build(pair_name(client, target), context)
    if len(translation.metadata.encode()) > MAX_CONTEXT_BYTES:
        raise GatewayError(
            500, "server_error", f"the {translation.pair} translation context is too large"
        )
    plan = upstream_headers(provider, target, query, headers)
    plan.set.append(("content-length", str(len(new_body))))
    # The response is read and rewritten: it must arrive uncompressed.
    plan.set.append(("accept-encoding", "identity"))
    plan.set.append((TRANSLATE_HEADER, "1"))
    return plan, new_body, translation
