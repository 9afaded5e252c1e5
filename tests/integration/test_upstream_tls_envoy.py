"""Provider TLS through real Envoy: chain AND name are verified, SNI follows the host.

Fake providers serve HTTPS on 127.0.0.1 with certificates from a throwaway CA that the config
trusts through ``overrides.upstream_tls_ca_path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import FakeProvider
from tests.gateway_proc import GatewayProcess
from tests.tls_certs import CertificateAuthority

pytestmark = pytest.mark.integration


class Upstreams:
    def __init__(self, tmp: Path) -> None:
        ca = CertificateAuthority.create(tmp)
        rogue = CertificateAuthority.create(tmp, "rogue-ca")
        self.ca_path = ca.pem_path

        def serve(ctx_ca: CertificateAuthority, *sans: str) -> FakeProvider:
            fake = FakeProvider("tls")
            fake.ssl_context = ctx_ca.server_context(tmp, *sans)
            return fake.start()

        self.good = serve(ca, "localhost")  # reached as https://localhost
        self.wildcard = serve(ca, "*.example.test")  # reached by IP, SNI from http_host
        self.wrong_name = serve(ca, "other.example.test")  # reached as https://localhost
        self.wrong_ca = serve(rogue, "localhost")  # right name, untrusted issuer
        self.all = [self.good, self.wildcard, self.wrong_name, self.wrong_ca]


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    u = Upstreams(tmp_path_factory.mktemp("tls"))
    yield u
    for fake in u.all:
        fake.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstreams: Upstreams) -> Iterator[GatewayProcess]:
    u = upstreams
    cfg = f"""
version: v0.4.0
listeners: [{{name: m, type: model, port: 12000}}]
routing: {{router: {{type: none}}}}
overrides:
  upstream_tls_ca_path: {u.ca_path}
model_providers:
  - {{model: openai/good, access_key: k, default: true, base_url: "https://localhost:{u.good.port}/v1"}}
  - model: openai/wildcard
    access_key: k
    base_url: https://127.0.0.1:{u.wildcard.port}/v1
    http_host: api.example.test
  - {{model: openai/wrong-name, access_key: k, base_url: "https://localhost:{u.wrong_name.port}/v1"}}
  - {{model: openai/wrong-ca, access_key: k, base_url: "https://localhost:{u.wrong_ca.port}/v1"}}
"""
    with GatewayProcess(cfg, tmp_path_factory.mktemp("tlsgw")) as g:
        yield g


def chat(gw: GatewayProcess, model: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def test_trusted_certificate_for_the_host_is_accepted(
    gw: GatewayProcess, upstreams: Upstreams
) -> None:
    resp = chat(gw, "openai/good")
    assert resp.status_code == 200, resp.text
    rec = upstreams.good.last()
    assert rec.path == "/v1/chat/completions" and rec.json["model"] == "good"
    assert rec.headers["host"] == f"localhost:{upstreams.good.port}"


def test_wildcard_certificate_matches_the_sni_from_http_host(
    gw: GatewayProcess, upstreams: Upstreams
) -> None:
    resp = chat(gw, "openai/wildcard")
    assert resp.status_code == 200, resp.text
    assert upstreams.wildcard.last().headers["host"] == "api.example.test"


@pytest.mark.parametrize("model", ["openai/wrong-name", "openai/wrong-ca"])
def test_wrong_name_or_untrusted_issuer_is_refused(
    gw: GatewayProcess, upstreams: Upstreams, model: str
) -> None:
    fake = upstreams.wrong_name if model.endswith("name") else upstreams.wrong_ca
    fake.clear()
    resp = chat(gw, model)
    assert resp.status_code == 503, resp.text
    assert not fake.requests  # the request never reached a server Envoy could not verify
