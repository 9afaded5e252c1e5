"""Model affinity through real Envoy: memory and Redis backends, replicas, Redis faults."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeOrchestrator, FakeProvider
from tests.gateway_proc import GatewayProcess
from tests.redis_server import RedisServer, find_redis_server, free_port

pytestmark = pytest.mark.integration

CODE = "Write a Python function that implements binary search"
REASONING = "Explain the trade-offs between microservices and monolithic architectures"
CLAUDE = "anthropic/claude-sonnet-4-20250514"


def _config(
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orch: FakeOrchestrator,
    routing_extra: str = "",
) -> str:
    return orchestrated_seed_config(
        openai_fake.base_url, anthropic_fake.base_url, orch.base_url, routing_extra=routing_extra
    )


def decide(gw: GatewayProcess, prompt: str, session: str | None = None, **headers: str) -> dict:
    if session is not None:
        headers["x-model-affinity"] = session
    resp = httpx.post(
        gw.url + "/routing/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
        headers=headers,
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def chat(
    gw: GatewayProcess, prompt: str, session: str | None = None, **headers: str
) -> httpx.Response:
    if session is not None:
        headers["x-model-affinity"] = session
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
        headers=headers,
        timeout=30,
    )


@pytest.fixture(autouse=True)
def _reset(
    openai_fake: FakeProvider, anthropic_fake: FakeProvider, orchestrator_fake: FakeOrchestrator
) -> None:
    for f in (openai_fake, anthropic_fake, orchestrator_fake):
        f.clear()
    orchestrator_fake.mode = "ok"


# --------------------------------------------------------------------------- memory backend


@pytest.fixture(scope="module")
def mem_gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> Iterator[GatewayProcess]:
    extra = "  session_max_entries: 2\n  session_cache:\n    tenant_header: x-tenant-id\n"
    cfg = _config(openai_fake, anthropic_fake, orchestrator_fake, extra)
    with GatewayProcess(cfg, tmp_path_factory.mktemp("aff")) as g:
        yield g


def test_decision_path_pins_session(
    mem_gw: GatewayProcess, orchestrator_fake: FakeOrchestrator
) -> None:
    first = decide(mem_gw, CODE, "demo-session-001")
    assert first["models"] == [CLAUDE, "openai/gpt-4o"]
    assert first["route"] == "code_generation"
    assert first["session_id"] == "demo-session-001" and first["pinned"] is False
    calls = len(orchestrator_fake.requests)
    second = decide(mem_gw, REASONING, "demo-session-001")
    assert second["models"] == [CLAUDE] and second["route"] == "code_generation"
    assert second["pinned"] is True and second["session_id"] == "demo-session-001"
    assert len(orchestrator_fake.requests) == calls  # router skipped on a hit
    fresh = decide(mem_gw, REASONING, "demo-session-002")
    assert fresh["route"] == "complex_reasoning" and fresh["pinned"] is False
    plain = decide(mem_gw, REASONING)
    assert "session_id" not in plain and "pinned" not in plain


def test_proxy_path_pins_model(
    mem_gw: GatewayProcess,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> None:
    assert chat(mem_gw, CODE, "agent-1").status_code == 200
    assert anthropic_fake.last().json["model"] == "claude-sonnet-4-20250514"
    calls = len(orchestrator_fake.requests)
    for _ in range(3):  # later turns look like reasoning, but the session stays pinned
        assert chat(mem_gw, REASONING, "agent-1").status_code == 200
    assert len(anthropic_fake.requests) == 4 and not openai_fake.requests
    assert len(orchestrator_fake.requests) == calls
    # The affinity header is ours: it reaches the provider unchanged (clients may log it).
    assert anthropic_fake.last().headers["x-model-affinity"] == "agent-1"
    # The decision endpoint sees the same pin.
    assert decide(mem_gw, "anything", "agent-1")["models"] == [CLAUDE]


def test_unrouted_request_pins_requested_model(
    mem_gw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    assert chat(mem_gw, "hello there", "agent-plain").status_code == 200
    assert chat(mem_gw, CODE, "agent-plain").status_code == 200
    assert [r.json["model"] for r in openai_fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert not anthropic_fake.requests


def test_lru_eviction_at_capacity(mem_gw: GatewayProcess) -> None:
    assert decide(mem_gw, CODE, "lru-a")["pinned"] is False
    assert decide(mem_gw, CODE, "lru-b")["pinned"] is False
    assert decide(mem_gw, CODE, "lru-c")["pinned"] is False  # capacity 2: evicts lru-a
    assert decide(mem_gw, REASONING, "lru-c")["pinned"] is True
    again = decide(mem_gw, REASONING, "lru-a")
    assert again["pinned"] is False and again["route"] == "complex_reasoning"


def test_tenant_scoping(mem_gw: GatewayProcess) -> None:
    a = decide(mem_gw, CODE, "shared-id", **{"x-tenant-id": "tenant-a"})
    b = decide(mem_gw, REASONING, "shared-id", **{"x-tenant-id": "tenant-b"})
    assert a["pinned"] is False and b["pinned"] is False
    assert a["route"] == "code_generation" and b["route"] == "complex_reasoning"
    assert decide(mem_gw, REASONING, "shared-id", **{"x-tenant-id": "tenant-a"})["models"] == [
        CLAUDE
    ]


def _raw_request(port: int, header_value: bytes) -> tuple[int, bytes]:
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    req = (
        b"POST /routing/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nX-Model-Affinity: " + header_value + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def test_bad_affinity_ids(mem_gw: GatewayProcess) -> None:
    status, payload = _raw_request(mem_gw.port, b"a" * 257)
    assert status == 400 and b"256 bytes" in payload
    status, payload = _raw_request(mem_gw.port, b"a\tb")
    assert status == 400 and b"control" in payload
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"


def test_ttl_expiry(
    tmp_path: Path,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> None:
    cfg = _config(openai_fake, anthropic_fake, orchestrator_fake).replace(
        "session_ttl_seconds: 600", "session_ttl_seconds: 1"
    )
    with GatewayProcess(cfg, tmp_path) as g:
        assert decide(g, CODE, "ttl-1")["pinned"] is False
        assert decide(g, REASONING, "ttl-1")["pinned"] is True
        time.sleep(1.3)
        after = decide(g, REASONING, "ttl-1")
        assert after["pinned"] is False and after["route"] == "complex_reasoning"


# --------------------------------------------------------------------------- redis backend


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    server = RedisServer(binary=find_redis_server())
    server.start()
    yield server
    server.stop()


def _redis_config(
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orch: FakeOrchestrator,
    url: str,
) -> str:
    extra = f"  session_cache:\n    type: redis\n    url: {url}\n"
    return _config(openai_fake, anthropic_fake, orch, extra)


def pins_again(gw: GatewayProcess, session: str, within: float = 15.0) -> bool:
    """True once a session pins again (Redis back and the cache's breaker closed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        decide(gw, CODE, session)
        if decide(gw, CODE, session)["pinned"] is True:
            return True
        time.sleep(0.3)
    return False


def test_two_replicas_share_redis_first_writer_wins(
    tmp_path: Path,
    redis_srv: RedisServer,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> None:
    cfg = _redis_config(openai_fake, anthropic_fake, orchestrator_fake, redis_srv.url)
    with GatewayProcess(cfg, tmp_path) as g1, GatewayProcess(cfg, tmp_path) as g2:
        sessions = [f"race-{i}" for i in range(20)]

        def race(session: str) -> tuple[str, str]:
            barrier = threading.Barrier(2)

            def one(gw: GatewayProcess, prompt: str) -> str:
                barrier.wait(5)
                return str(decide(gw, prompt, session)["models"][0])

            with ThreadPoolExecutor(2) as pool:
                a = pool.submit(one, g1, CODE)
                b = pool.submit(one, g2, REASONING)
                return a.result(), b.result()

        admin = redis.Redis.from_url(redis_srv.url)
        for session in sessions:
            a, b = race(session)
            assert a == b, session
            stored = json.loads(admin.get(f"plano:affinity:{session}") or b"null")
            assert stored["model_name"] == a
            assert 0 < int(admin.ttl(f"plano:affinity:{session}")) <= 600
        # A pin made through one replica is honoured by the other, on the proxy path too.
        decide(g1, CODE, "cross-replica")
        anthropic_fake.clear()
        assert chat(g2, REASONING, "cross-replica").status_code == 200
        assert anthropic_fake.last().json["model"] == "claude-sonnet-4-20250514"
        admin.close()


def test_redis_outage_and_recovery(
    tmp_path: Path,
    redis_srv: RedisServer,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> None:
    cfg = _redis_config(openai_fake, anthropic_fake, orchestrator_fake, redis_srv.url)
    with GatewayProcess(cfg, tmp_path) as g:
        assert decide(g, CODE, "out-1")["pinned"] is False
        assert decide(g, CODE, "out-1")["pinned"] is True
        redis_srv.kill()
        statuses = [chat(g, CODE, f"during-{i}").status_code for i in range(20)]
        assert statuses == [200] * 20  # no failed request while Redis is down
        ready = httpx.get(g.worker_admin[0] + "/ready").json()
        assert ready["session_cache"]["healthy"] is False
        assert ready["session_cache"]["errors"] >= 1
        metrics = httpx.get(g.worker_admin[0] + "/metrics").text
        assert "plano_session_cache_healthy 0.0" in metrics
        assert 'plano_session_cache_requests_total{result="error"}' in metrics
        redis_srv.restart()
        assert pins_again(g, "after-restart")  # heals without a gateway restart
        assert httpx.get(g.worker_admin[0] + "/ready").json()["session_cache"]["healthy"]


def test_redis_down_at_start(
    tmp_path: Path,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
    orchestrator_fake: FakeOrchestrator,
) -> None:
    server = RedisServer(binary=find_redis_server(), port=free_port())
    cfg = _redis_config(openai_fake, anthropic_fake, orchestrator_fake, server.url)
    with GatewayProcess(cfg, tmp_path) as g:  # starts although Redis is not there
        first = decide(g, CODE, "late-redis")
        assert first["pinned"] is False
        assert chat(g, CODE, "late-redis").status_code == 200
        server.start()
        try:
            assert pins_again(g, "late-redis-2")
        finally:
            server.stop()
