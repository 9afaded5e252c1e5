"""Which request headers Envoy forwards to the routing stream (ext_proc ``forward_rules``).

Every header the worker reads must be on the list (a missing one silently switches a feature
off): the fixed ones, and those a config names. Through real Envoy, the tenant header, the
ratelimit selectors, passthrough credentials and the providers' headers are exercised by the
integration tests (test_affinity_envoy, test_ratelimit_envoy, test_failover_envoy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from plano_extproc.affinity.keys import AFFINITY_HEADER
from plano_extproc.config import parse_config
from plano_extproc.envoy_config import render_bootstrap, routing_headers
from plano_extproc.names import ROUTING_REQUEST_HEADERS
from plano_extproc.rewrite import CREDENTIAL_HEADERS

ROOT = Path(__file__).resolve().parents[2]

BASE = """
version: v0.4.0
listeners: [{name: m, type: model, port: 12000}]
model_providers:
  - model: openai/gpt-4o-mini
    access_key: k
    default: true
"""

CONFIGURED = (
    BASE
    + """    headers: {X-Org: acme}
  - model: anthropic/claude-sonnet-4-20250514
    access_key: k
ratelimits:
  - model: openai/gpt-4o-mini
    selector: {key: X-Team, value: "*"}
    limit: {tokens: 1000, unit: hour}
routing:
  session_cache:
    tenant_header: X-Tenant-Id
"""
)


def routing_filter(bootstrap: dict[str, Any]) -> dict[str, Any]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    [f] = [
        f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"
    ]
    return dict(f["typed_config"])


def test_the_fixed_list_holds_every_header_the_worker_reads_by_name() -> None:
    assert AFFINITY_HEADER in ROUTING_REQUEST_HEADERS
    assert set(CREDENTIAL_HEADERS) <= set(ROUTING_REQUEST_HEADERS)  # passthrough_auth
    for name in (":path", ":method", "x-request-id", "traceparent", "anthropic-version"):
        assert name in ROUTING_REQUEST_HEADERS
    assert routing_headers(parse_config(BASE)) == sorted(ROUTING_REQUEST_HEADERS)


def test_headers_a_config_names_are_forwarded_lower_case() -> None:
    names = routing_headers(parse_config(CONFIGURED, env={}))
    assert {"x-org", "x-team", "x-tenant-id"} <= set(names)
    assert names == sorted(set(names))
    rules = routing_filter(render_bootstrap(parse_config(CONFIGURED), extproc=[("127.0.0.1", 1)]))
    patterns = rules["forward_rules"]["allowed_headers"]["patterns"]
    assert [p["exact"] for p in patterns] == names


def test_other_client_headers_are_not_forwarded() -> None:
    names = set(routing_headers(parse_config(CONFIGURED)))
    for name in ("cookie", "user-agent", "x-stainless-lang", "content-type", "x-forwarded-for"):
        assert name not in names


def test_the_istio_patch_forwards_the_default_list() -> None:
    docs = list(yaml.safe_load_all((ROOT / "k8s/istio-envoyfilter.yaml").read_text()))
    patches = docs[0]["spec"]["configPatches"]
    [ext_proc] = [
        p["patch"]["value"]
        for p in patches
        if p["applyTo"] == "HTTP_FILTER"
        and p["patch"]["value"]["name"] == "envoy.filters.http.ext_proc"
    ]
    patterns = ext_proc["typed_config"]["forward_rules"]["allowed_headers"]["patterns"]
    assert [p["exact"] for p in patterns] == sorted(ROUTING_REQUEST_HEADERS)
