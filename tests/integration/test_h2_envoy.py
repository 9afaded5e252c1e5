"""The built-in HTTP/2 transport's receive windows behind a real Envoy.

The h2 server now advertises bounded windows and grants the rest of a large message from a
per-connection budget (``GRANT_BUDGET``, 64 MiB), so these check that what Envoy really sends
still passes: a body at the 32 MiB listener limit (one ext_proc message), and three of them
at once with small requests in between, which needs more than one grant budget on the single
Envoy -> ext_proc connection and so exercises the wait for a grant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import seed_config
from tests.fakes import FakeProvider
from tests.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration

LIMIT = 32 << 20  # the listener's default max_request_bytes


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
) -> Iterator[GatewayProcess]:
    cfg = seed_config(
        openai_fake.base_url, anthropic_fake.base_url, router="  router: {type: none}"
    )
    with GatewayProcess(cfg, tmp_path_factory.mktemp("gw"), extra_args=["--transport", "h2"]) as g:
        yield g


def body_of(size: int, tag: str) -> bytes:
    """A chat body of exactly ``size`` bytes whose content starts with ``tag``."""
    empty = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ""}]})
    content = tag + "x" * (size - len(empty) - len(tag))
    out = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    ).encode()
    assert len(out) == size
    return out


def post(gw: GatewayProcess, body: bytes) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=120,
    )


def test_body_at_the_listener_limit_passes(gw: GatewayProcess, openai_fake: FakeProvider) -> None:
    openai_fake.clear()
    body = body_of(LIMIT, "limit")
    resp = post(gw, body)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["x-plano-model"] == "openai/gpt-4o-mini"
    assert openai_fake.last().body == body


def test_concurrent_large_bodies_wait_for_grants_and_all_pass(
    gw: GatewayProcess, openai_fake: FakeProvider
) -> None:
    openai_fake.clear()
    bodies = [body_of(LIMIT - 1024 * i, f"big{i}") for i in range(3)]
    small = [body_of(200, f"small{i}") for i in range(6)]
    with ThreadPoolExecutor(len(bodies) + len(small)) as pool:
        results = list(pool.map(lambda b: post(gw, b), bodies + small))
    assert [r.status_code for r in results] == [200] * len(results)
    got = sorted(len(r.body) for r in openai_fake.requests)
    assert got == sorted(len(b) for b in bodies + small)
