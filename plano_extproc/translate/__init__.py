"""API translation: which API a provider is called with, and the translator for each pair.

One module per (client API, provider API) pair, named ``<client>_<provider>``; a native pair
has no translator (the identity: the body is edited in place and the response is untouched).
"""

from __future__ import annotations

from plano_extproc.providers import PROVIDERS, ClientApi
from plano_extproc.translate import chat_messages, messages_chat, responses_chat, responses_messages
from plano_extproc.translate.base import PairTranslator

_PAIRS: dict[tuple[ClientApi, ClientApi], PairTranslator] = {
    (m.client, m.provider): m
    for m in (messages_chat, chat_messages, responses_chat, responses_messages)
}


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
        if target in spec.native and (client, target) in _PAIRS:
            return target
    return None


def translator(client: ClientApi, provider: ClientApi) -> PairTranslator | None:
    """The translator for a non-native pair (None for a native one).

    Raises KeyError for a pair no module translates (``provider_api`` never picks one)."""
    if client is provider:
        return None
    return _PAIRS[(client, provider)]


def pair_name(client: ClientApi, provider: ClientApi) -> str:
    """A pair as the response context carries it: "messages>chat_completions"."""
    return f"{client.value}>{provider.value}"


def parse_pair(name: str) -> tuple[ClientApi, ClientApi] | None:
    client, sep, provider = name.partition(">")
    try:
        pair = (ClientApi(client), ClientApi(provider))
    except ValueError:
        return None
    return pair if sep and pair in _PAIRS else None
