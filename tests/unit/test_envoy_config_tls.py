"""Provider TLS in the rendered bootstrap: always a CA bundle, always a name check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plano_extproc.cli import main
from plano_extproc.config import parse_config
from plano_extproc.envoy_config import BootstrapError, ca_bundle, render_bootstrap
from plano_extproc.names import failover_cluster, first_cluster

BASE = """
version: v0.4.0
listeners: [{name: m, type: model, port: 12000}]
routing: {router: {type: none}}
model_providers:
  - {model: openai/gpt-4o, access_key: k, default: true}
  - {model: ollama/llama3, base_url: "https://10.0.0.7:11434"}
  - {model: openai/gpt-4o-mini, access_key: k, base_url: "https://10.0.0.8/v1", http_host: gw.corp}
"""


def tls_of(text: str, model: str) -> dict[str, Any]:
    """The TLS of ``model``'s cluster, after checking that its failover variants (the
    ``first`` and ``failover`` clusters, same endpoint) carry the very same TLS."""
    config = parse_config(text)
    [name] = {p.cluster for p in config.providers if p.name == model}
    boot = render_bootstrap(config, extproc=[("127.0.0.1", 9091)])
    by_name = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    own = by_name[name]["transport_socket"]
    for variant in (first_cluster(name), failover_cluster(name)):
        assert by_name[variant]["transport_socket"] == own
    return dict(own["typed_config"])


def test_names_and_ips_are_checked_against_the_sni() -> None:
    dns = tls_of(BASE, "openai/gpt-4o")["common_tls_context"]["validation_context"]
    assert dns["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}
    ]
    ip = tls_of(BASE, "ollama/llama3")
    assert ip["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.7"}}
    ]
    vhost = tls_of(BASE, "openai/gpt-4o-mini")
    assert vhost["sni"] == "gw.corp"
    san = vhost["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert san == [{"san_type": "DNS", "matcher": {"exact": "gw.corp"}}]


def test_configured_ca_bundle_is_used(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    text = BASE + f"overrides: {{upstream_tls_ca_path: {ca}}}\n"
    vc = tls_of(text, "openai/gpt-4o")["common_tls_context"]["validation_context"]
    assert vc["trusted_ca"] == {"filename": str(ca)}


def test_missing_configured_ca_bundle_is_an_error_not_silent_trust(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE + f"overrides: {{upstream_tls_ca_path: {tmp_path / 'nope.pem'}}}\n"
    with pytest.raises(BootstrapError, match=r"overrides\.upstream_tls_ca_path: .*nope\.pem"):
        ca_bundle(parse_config(text))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["envoy-config", str(path)]) == 1
    assert "overrides.upstream_tls_ca_path" in capsys.readouterr().err


def test_system_bundle_is_found_when_none_is_configured() -> None:
    assert Path(ca_bundle(parse_config(BASE))).is_file()


async def test_orchestrator_router_trusts_the_configured_ca(tmp_path: Path) -> None:
    """The router LLM behind a private CA works when the config names that CA."""
    from plano_extproc.routing.base import ChatMessage, RoutePreference
    from plano_extproc.server.app import build_router
    from tests.fakes import FakeOrchestrator
    from tests.tls_certs import CertificateAuthority

    ca = CertificateAuthority.create(tmp_path)
    orch = FakeOrchestrator(decide=lambda _prompt: "code")
    orch.ssl_context = ca.server_context(tmp_path, "localhost")
    orch.start()
    prefs = [RoutePreference(name="code", description="writing code", models=("openai/gpt-4o",))]
    try:
        for ca_line, expect_error in ((f"upstream_tls_ca_path: {ca.pem_path}", False), ("", True)):
            cfg = parse_config(f"""
version: v0.4.0
listeners: [{{name: m, type: model, port: 12000}}]
model_providers:
  - {{model: openai/gpt-4o, access_key: k, default: true}}
  - {{model: ollama/Plano-Orchestrator, base_url: "https://localhost:{orch.port}/v1"}}
routing:
  router: {{type: orchestrator, model: ollama/Plano-Orchestrator, timeout_ms: 2000}}
overrides: {{{ca_line}}}
""")
            router = build_router(cfg)
            await router.start()
            try:
                result = await router.route([ChatMessage("user", "hi")], prefs, request_id="t")
            finally:
                await router.close()
            if expect_error:  # the system store does not know our throwaway CA
                assert result.route is None and result.error
            else:
                assert (result.route, result.error) == ("code", None)
    finally:
        orch.stop()
