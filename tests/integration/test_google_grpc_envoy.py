"""Envoy's ``google_grpc`` client (what some meshes configure) against the default transport.

The rendered bootstrap uses ``envoy_grpc``; an existing Envoy or Istio may point its ext_proc
filter at us with ``google_grpc`` instead, a different HTTP/2 client inside Envoy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from plano_extproc.config import parse_config
from plano_extproc.envoy_config import render_bootstrap, render_yaml
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.names import EXTPROC_CLUSTER
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.h2 import H2Server
from plano_extproc.server.servicer import ExtProcStream
from plano_extproc.supervisor import envoy_binary, free_port
from tests.conftest import seed_config
from tests.fakes import FakeProvider

pytestmark = pytest.mark.integration


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):  # bounded: 30 s
            assert proc.returncode is None, "Envoy exited during start-up"
            try:
                if (await client.get(url, timeout=0.5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("Envoy was not ready after 30 s")


async def test_google_grpc_client_proxy_and_decision(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    cfg = parse_config(
        seed_config(openai_fake.base_url, anthropic_fake.base_url, router="  router: {type: none}")
    )
    metrics = Metrics()
    gateway = Gateway(cfg, NullRouter(), None)
    server = H2Server(lambda: ExtProcStream(gateway, metrics))
    grpc_port = await server.start("127.0.0.1", 0)
    port, admin = free_port(), free_port()
    boot = render_bootstrap(
        cfg, extproc=[("127.0.0.1", grpc_port)], admin_port=admin, listen_port=port,
        listen_address="127.0.0.1",
    )  # fmt: skip
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_proc = next(
        f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"
    )
    ext_proc["typed_config"]["grpc_service"] = {
        "google_grpc": {"target_uri": f"127.0.0.1:{grpc_port}", "stat_prefix": "plano_extproc"},
        "timeout": "60s",
    }
    # No ext_proc cluster: only the google_grpc client can reach the server.
    clusters = boot["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != EXTPROC_CLUSTER]
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(boot))
    proc = await asyncio.create_subprocess_exec(
        envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/ready", proc)
        openai_fake.clear()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            body = {"model": "fast-model", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(3):  # several streams on the same gRPC connection
                resp = await client.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
            assert openai_fake.last().json["model"] == "gpt-4o-mini"
            assert openai_fake.last().headers["authorization"] == "Bearer sk-openai-test"
            resp = await client.post("/routing/v1/chat/completions", json=body)
            assert resp.status_code == 200
            assert resp.json()["models"] == ["none"]
            resp = await client.get("/v1/models")
            assert "openai/gpt-4o-mini" in [m["id"] for m in resp.json()["data"]]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        await server.stop(1)
