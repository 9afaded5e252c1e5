"""The response-translation filter and the translated provider routes in the bootstrap.

Pure rendering checks; what Envoy does with them (native requests open no second stream,
translated ones get their response) is tested in tests/integration/test_translation_wiring_envoy.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plano_extproc.config import parse_config
from plano_extproc.envoy_config import render_bootstrap
from plano_extproc.names import (
    DECISION_METADATA,
    EXTPROC_CLUSTER,
    RESPONSE_FILTER,
    ROUTE_HEADER,
    TRANSLATE_HEADER,
    TX_KEY,
)
from tests.gateway_proc import assert_envoy_accepts

CONFIG = """
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    timeout: 30s
model_providers:
  - model: openai/gpt-4o-mini
    base_url: http://127.0.0.1:9/v1
    access_key: k
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    base_url: http://127.0.0.1:10/v1
    access_key: k
"""


def render() -> dict[str, Any]:
    return render_bootstrap(parse_config(CONFIG), extproc=[("127.0.0.1", 9091)])


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def test_response_filter_follows_the_routing_filter_and_is_inert_by_default() -> None:
    filters = hcm(render())["http_filters"]
    names = [f["name"] for f in filters]
    # The usage extractors sit between them: responses reach them translated.
    assert names[1:] == [
        "envoy.filters.http.ext_proc",
        "plano.content_length",
        "plano.hide_usage",
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.sse_to_metadata",
        RESPONSE_FILTER,
        "envoy.filters.http.router",
    ]
    wrapped = filters[names.index(RESPONSE_FILTER)]["typed_config"]
    # Created only for requests with a translation context (the routing stream's ``tx``).
    (skip,) = wrapped["xds_matcher"]["matcher_list"]["matchers"]
    wanted = skip["predicate"]["not_matcher"]["single_predicate"]
    assert wanted["input"]["typed_config"]["path"] == [{"key": TX_KEY}]
    assert wanted["custom_match"]["typed_config"]["value"] == {"present_match": True}
    assert skip["on_match"]["action"]["typed_config"]["@type"].endswith(".SkipFilter")
    cfg = wrapped["extension_config"]["typed_config"]
    assert cfg["grpc_service"] == {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}}
    # Every mode off: no gRPC stream for a request whose route does not turn it on.
    modes = cfg["processing_mode"]
    assert {v for k, v in modes.items() if k.endswith("header_mode")} == {"SKIP"}
    assert modes["request_body_mode"] == modes["response_body_mode"] == "NONE"
    assert cfg["allow_mode_override"] is True
    assert cfg["failure_mode_allow"] is False
    assert cfg["metadata_options"]["forwarding_namespaces"] == {"untyped": [DECISION_METADATA]}


def test_clients_cannot_send_the_internal_headers() -> None:
    front = hcm(render())["http_filters"][0]
    removed = [m["remove"] for m in front["typed_config"]["mutations"]["request_mutations"]]
    assert ROUTE_HEADER in removed and TRANSLATE_HEADER in removed


def test_each_provider_has_a_translated_route_before_its_native_one() -> None:
    routes = hcm(render())["route_config"]["virtual_hosts"][0]["routes"]
    provider_routes = [r for r in routes if "cluster" in r.get("route", {})]
    assert len(provider_routes) == 4
    for translated, native in zip(provider_routes[::2], provider_routes[1::2], strict=True):
        cluster = native["route"]["cluster"]
        assert translated["route"] == native["route"]
        assert translated["match"]["headers"] == [
            {"name": ROUTE_HEADER, "string_match": {"exact": cluster}},
            {"name": TRANSLATE_HEADER, "present_match": True},
        ]
        assert native["match"]["headers"] == [
            {"name": ROUTE_HEADER, "string_match": {"exact": cluster}}
        ]
        # Neither header reaches the provider.
        assert set(translated["request_headers_to_remove"]) == {ROUTE_HEADER, TRANSLATE_HEADER}
        assert native["request_headers_to_remove"] == [ROUTE_HEADER]
        per_route = translated["typed_per_filter_config"][RESPONSE_FILTER]
        modes = per_route["overrides"]["processing_mode"]
        assert modes["response_header_mode"] == "SEND"
        assert modes["request_header_mode"] == "SKIP" and modes["request_body_mode"] == "NONE"
        assert "typed_per_filter_config" not in native
        # Both still tell the client what served it.
        assert translated["response_headers_to_add"] == native["response_headers_to_add"]


def test_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    assert_envoy_accepts(render(), tmp_path)


def test_the_yaml_has_no_anchors() -> None:
    """Shared sub-dicts would be written as YAML anchors: legal, but unreadable for operators."""
    from plano_extproc.envoy_config import render_yaml

    text = render_yaml(render())
    assert "&id" not in text and "*id" not in text
