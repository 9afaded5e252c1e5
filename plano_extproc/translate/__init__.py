"""API translation: which API a provider is called with, and the translator for each pair.

One module per (client API, provider API) pair, named ``<client>_<provider>``; a native pair
has no translator (the identity: the body is edited in place and the response is untouched).
"""

from __future__ import annotations

import importlib
from typing import cast

from plano_extproc.providers import PROVIDERS, ClientApi
from plano_extproc.translate.base import PairTranslator

_MODULES: dict[tuple[ClientApi, ClientApi], str] = {
    (ClientApi.MESSAGES, ClientApi.CHAT): "messages_chat",
    (ClientApi.CHAT, ClientApi.MESSAGES): "chat_messages",
    (ClientApi.RESPONSES, ClientApi.CHAT): "responses_chat",
    (ClientApi.RESPONSES, ClientApi.MESSAGES): "responses_messages",
}
_loaded: dict[tuple[ClientApi, ClientApi], PairTranslator] = {}


def provider_api(interface: str, client: ClientApi) -> ClientApi | None:
    """The API ``interface`` is called with for a ``client`` request, or None if none can be.

    The client's own API when the provider speaks it; otherwise Anthropic's Messages for
    providers that speak it, else Chat Completions; each only when a translator exists.
    """
    spec = PROVIDERS.get(interface)
    if spec is None:
        return None
    if client in spec.native:
        return client
    for target in (ClientApi.MESSAGES, ClientApi.CHAT):
        if target in spec.native and (client, target) in _MODULES:
            return target
    return None


def translator(client: ClientApi, provider: ClientApi) -> PairTranslator | None:
    """The translator for a non-native pair (None for a native one).

    Raises KeyError for a pair no module translates (``provider_api`` never picks one)."""
    if client is provider:
        return None
    key = (client, provider)
    found = _loaded.get(key)
    if found is None:
        module = importlib.import_module(f"{__name__}.{_MODULES[key]}")
        found = _loaded[key] = cast(PairTranslator, module)
    return found


def pair_name(client: ClientApi, provider: ClientApi) -> str:
    """A pair as the response context carries it: "messages>chat_completions"."""
    return f"{client.value}>{provider.value}"


def parse_pair(name: str) -> tuple[ClientApi, ClientApi] | None:
    client, sep, provider = name.partition(">")
    try:
        pair = (ClientApi(client), ClientApi(provider))
    except ValueError:
        return None
    return pair if sep and pair in _MODULES else None
