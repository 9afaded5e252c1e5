"""The failover route, each provider's ``first`` and ``failover`` clusters (the Lua filter
that records a first attempt's failure, the attempt filter) and the front filters that keep
clients from steering them, in the rendered bootstrap.

Pure rendering checks, plus ``envoy --mode validate``; what Envoy does with them is measured
in the integration tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from plano_extproc.config import Config, parse_config
from plano_extproc.envoy_config import (
    ATTEMPT_MODES,
    ENVOY_CONTROL_HEADERS,
    NO_UPSTREAM_CLUSTER,
    failover_on,
    render_bootstrap,
    render_yaml,
)
from plano_extproc.names import (
    API_KEY,
    ATTEMPT_COUNT_HEADER,
    ATTEMPT_FILTER,
    DECISION_METADATA,
    EXTPROC_CLUSTER,
    MAX_RETRIES_HEADER,
    MAX_SLOTS,
    ROUTE_HEADER,
    failover_cluster,
    failure_key,
    first_cluster,
    retry_after_key,
    slot_header,
)
from tests.gateway_proc import assert_envoy_accepts


def config(failover: str = "", timeout: str = "300s") -> Config:
    routing = f"routing:\n  failover: {failover}\n" if failover else ""
    return parse_config(f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    timeout: {timeout}
model_providers:
  - model: openai/gpt-4o-mini
    base_url: http://127.0.0.1:9/v1
    access_key: k
    default: true
  - model: openai/gpt-4o
    base_url: http://127.0.0.1:9/v1
    access_key: k
  - model: anthropic/claude-sonnet-4-20250514
    base_url: http://127.0.0.1:10/v1
    access_key: k
  - model: mistral/mistral-large-latest
    base_url: http://127.0.0.1:11/v1
    access_key: k
{routing}""")


def render(cfg: Config | None = None) -> dict[str, Any]:
    return render_bootstrap(cfg or config(), extproc=[("127.0.0.1", 9091)])


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def vhost(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return dict(hcm(bootstrap)["route_config"]["virtual_hosts"][0])


def routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    return list(vhost(bootstrap)["routes"])


def failover_route(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [route] = [r for r in routes(bootstrap) if r["name"] == "failover"]
    return route


def clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def provider_clusters(cfg: Config) -> list[str]:
    return sorted({p.cluster for p in cfg.providers})


def variant_clusters(cfg: Config) -> list[str]:
    """Both failover variants of every provider cluster."""
    return sorted(f(c) for c in provider_clusters(cfg) for f in (first_cluster, failover_cluster))


def upstream_filters(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    options = cluster.get("typed_extension_protocol_options", {})
    return [f for http in options.values() for f in http.get("http_filters", [])]


def seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])


def action_cluster(on_match: dict[str, Any]) -> str:
    return str(on_match["action"]["typed_config"]["cluster"])


# ---------------------------------------------------------------- the route


def test_the_failover_route_comes_before_the_provider_routes() -> None:
    rs = routes(render())
    names = [r["name"] for r in rs]
    assert names[0] == "healthz" and names[1] == "failover"
    providers = [i for i, r in enumerate(rs) if "cluster" in r.get("route", {})]
    assert providers and min(providers) > names.index("failover")
    # Only requests that carry slot 0 take it (the routing ext_proc sets it).
    assert rs[1]["match"] == {
        "prefix": "/",
        "headers": [{"name": slot_header(0), "present_match": True}],
    }


@pytest.mark.parametrize("attempts", [2, 3, 8])
def test_the_matcher_maps_count_and_slot_to_a_cluster(attempts: int) -> None:
    cfg = config(f"{{max_attempts: {attempts}}}")
    route = failover_route(render(cfg))["route"]
    plugin = route["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    outer = plugin["cluster_matcher"]
    assert outer["matcher_tree"]["input"]["typed_config"]["header_name"] == ATTEMPT_COUNT_HEADER
    assert action_cluster(outer["on_no_match"]) == NO_UPSTREAM_CLUSTER
    by_count = outer["matcher_tree"]["exact_match_map"]["map"]
    assert sorted(by_count, key=int) == [str(k) for k in range(attempts)]
    for k in range(attempts):
        inner = by_count[str(k)]["matcher"]
        tree = inner["matcher_tree"]
        assert tree["input"]["typed_config"]["header_name"] == slot_header(k)
        mapped = tree["exact_match_map"]["map"]
        # Slots name a provider's first or failover cluster, never its own (no upstream
        # filter there: an attempt through it would be neither recorded nor rebuilt).
        assert sorted(mapped) == variant_clusters(cfg)
        assert not set(mapped) & set(provider_clusters(cfg))
        assert all(action_cluster(v) == c for c, v in mapped.items())
        assert set(mapped) <= set(clusters(render(cfg)))
        # A slot that names no provider cluster goes nowhere.
        assert action_cluster(inner["on_no_match"]) == NO_UPSTREAM_CLUSTER
    assert clusters(render(cfg))[NO_UPSTREAM_CLUSTER]["load_assignment"]["endpoints"] == []


def test_default_retry_policy() -> None:
    route = failover_route(render())["route"]
    retry = route["retry_policy"]
    on = retry["retry_on"].split(",")
    assert {"5xx", "retriable-status-codes", "reset", "connect-failure"} <= set(on)
    assert retry["retriable_status_codes"] == [429]
    assert retry["num_retries"] == 2
    assert retry["refresh_cluster_on_retry"] is True
    assert seconds(retry["per_try_idle_timeout"]) == 60.0
    assert "per_try_timeout" not in retry  # a long stream is never cut
    assert seconds(route["timeout"]) == 0.0 and seconds(route["idle_timeout"]) == 300.0


def test_retry_policy_follows_the_config() -> None:
    cfg = config("{max_attempts: 4, on_status: [503, 429], attempt_timeout: 15s}")
    retry = failover_route(render(cfg))["route"]["retry_policy"]
    on = retry["retry_on"].split(",")
    assert "5xx" not in on and "retriable-status-codes" in on and "reset" in on
    assert retry["retriable_status_codes"] == [429, 503]
    assert retry["num_retries"] == 3
    assert seconds(retry["per_try_idle_timeout"]) == 15.0


def test_no_attempt_timer_when_it_is_off() -> None:
    for cfg in (config("{attempt_timeout: 0s}"), config(timeout="30s")):
        assert cfg.failover.attempt_timeout_seconds == 0.0
        assert "per_try_idle_timeout" not in failover_route(render(cfg))["route"]["retry_policy"]


def test_the_failover_route_overrides_no_filter() -> None:
    """The failover clusters' attempt filter is on by itself; a route override would also
    reach the first clusters' attempts, which must open no stream."""
    assert "typed_per_filter_config" not in failover_route(render())


@pytest.mark.parametrize("failover", ["{enabled: false}", "{max_attempts: 1}"])
def test_no_failover_route_when_off(failover: str) -> None:
    assert "failover" not in [r["name"] for r in routes(render(config(failover)))]


# ---------------------------------------------------------------- the clusters


def test_provider_clusters_have_no_upstream_filter() -> None:
    """Single-model routes go to the provider's own cluster: nothing between the router and
    the codec (the cost of a request with one model stays that of a plain proxy)."""
    for cfg in (config(), config("{enabled: false}")):
        cs = clusters(render(cfg))
        for name in provider_clusters(cfg):
            assert "typed_extension_protocol_options" not in cs[name]
            assert upstream_filters(cs[name]) == []


def test_each_provider_has_a_first_and_a_failover_cluster() -> None:
    cfg = config()
    cs = clusters(render(cfg))
    names = set(provider_clusters(cfg)) | set(variant_clusters(cfg))
    assert set(cs) == names | {EXTPROC_CLUSTER, NO_UPSTREAM_CLUSTER}
    for base in provider_clusters(cfg):
        own = cs[base]
        for name in (first_cluster(base), failover_cluster(base)):
            variant = cs[name]
            assert variant["load_assignment"]["cluster_name"] == name
            # The provider's endpoint, limits and discovery: only the name and the upstream
            # filters differ.
            same = {k: v for k, v in variant.items() if k != "typed_extension_protocol_options"}
            assert same == {
                **own,
                "name": name,
                "load_assignment": {**own["load_assignment"], "cluster_name": name},
            }
        # Copies, not shared objects (shared ones would render as YAML anchors).
        assert cs[first_cluster(base)]["circuit_breakers"] is not own["circuit_breakers"]


def test_a_first_cluster_records_a_failing_status_with_lua_before_the_codec() -> None:
    cfg = config()
    cs = clusters(render(cfg))
    for base in provider_clusters(cfg):
        filters = upstream_filters(cs[first_cluster(base)])
        assert [f["name"] for f in filters] == [
            "envoy.filters.http.lua",
            "envoy.filters.http.upstream_codec",
        ]
        assert ATTEMPT_FILTER not in json.dumps(filters)  # attempt 1 opens no stream
        # Skipped by an attempt whose status is neither 4xx nor 5xx.
        wrapped = filters[0]["typed_config"]
        (skip,) = wrapped["xds_matcher"]["matcher_list"]["matchers"]
        classes = skip["predicate"]["not_matcher"]["or_matcher"]["predicate"]
        assert [p["single_predicate"]["value_match"] for p in classes] == [
            {"exact": "4xx"},
            {"exact": "5xx"},
        ]
        assert skip["on_match"]["action"]["typed_config"]["@type"].endswith(".SkipFilter")
        lua = wrapped["extension_config"]["typed_config"]
        source = lua["default_source_code"]["inline_string"]
        assert "envoy_on_response" in source and ">= 400" in source
        # The keys the next attempt's stream reads (plano.failed_1, plano.retry_after_1).
        assert f'"{DECISION_METADATA}", "{failure_key(1)}"' in source
        assert f'"{DECISION_METADATA}", "{retry_after_key(1)}"' in source
        assert (failure_key(1), retry_after_key(1)) == ("failed_1", "retry_after_1")
        assert '"retry-after"' in source


def test_a_failover_cluster_has_the_attempt_filter_before_the_codec() -> None:
    cfg = config()
    cs = clusters(render(cfg))
    for base in provider_clusters(cfg):
        filters = upstream_filters(cs[failover_cluster(base)])
        assert [f["name"] for f in filters] == [
            ATTEMPT_FILTER,
            "envoy.filters.http.upstream_codec",
        ]
        tc = filters[0]["typed_config"]
        assert tc["grpc_service"] == {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}}
        assert tc["failure_mode_allow"] is False
        assert tc["mutation_rules"]["allow_all_routing"] is True  # it sets :authority
        # On by itself: one stream per attempt, no route needs to turn it on.
        modes = tc["processing_mode"]
        assert modes == ATTEMPT_MODES
        assert modes["request_header_mode"] == "SEND"
        assert modes["request_body_mode"] == "BUFFERED"
        assert modes["response_header_mode"] == "SEND"
        assert modes["request_trailer_mode"] == modes["response_trailer_mode"] == "SKIP"
        md = tc["metadata_options"]
        assert md["forwarding_namespaces"] == {"untyped": [DECISION_METADATA]}
        assert md["receiving_namespaces"] == {"untyped": [DECISION_METADATA]}
    # Nowhere else: not in the provider clusters, not in the first clusters.
    with_attempt = [n for n, c in cs.items() if ATTEMPT_FILTER in json.dumps(upstream_filters(c))]
    assert sorted(with_attempt) == sorted(failover_cluster(c) for c in provider_clusters(cfg))


@pytest.mark.parametrize("failover", ["{enabled: false}", "{max_attempts: 1}"])
def test_no_variant_clusters_when_failover_is_off(failover: str) -> None:
    on, off = config(), config(failover)
    assert failover_on(on) and not failover_on(off)
    cs_on, cs_off = clusters(render(on)), clusters(render(off))
    assert set(cs_off) == set(provider_clusters(off)) | {EXTPROC_CLUSTER, NO_UPSTREAM_CLUSTER}
    assert not any(n.endswith(("__first", "__failover")) for n in cs_off)
    # The provider clusters themselves do not depend on the switch.
    for name in provider_clusters(on):
        assert cs_on[name] == cs_off[name]


# ---------------------------------------------------------------- the front of the chain


def test_clients_cannot_send_slots_or_envoy_control_headers() -> None:
    front = hcm(render())["http_filters"][0]
    assert front["name"] == "envoy.filters.http.header_mutation"
    removed = {m["remove"] for m in front["typed_config"]["mutations"]["request_mutations"]}
    assert {slot_header(k) for k in range(MAX_SLOTS)} <= removed
    assert set(ENVOY_CONTROL_HEADERS) <= removed
    assert ROUTE_HEADER in removed
    assert {ATTEMPT_COUNT_HEADER, MAX_RETRIES_HEADER, "x-envoy-retry-on"} <= set(
        ENVOY_CONTROL_HEADERS
    )


def test_the_routing_ext_proc_may_set_envoy_headers() -> None:
    filters = hcm(render())["http_filters"]
    [routing] = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
    rules = routing["typed_config"]["mutation_rules"]
    # Envoy's attempt count and retry cap; :authority of a first model it builds itself.
    assert rules == {"allow_envoy": True, "allow_all_routing": True}


def test_each_attempt_carries_its_count() -> None:
    assert vhost(render())["include_request_attempt_count"] is True


def metadata_filters(node: Any) -> list[dict[str, Any]]:
    """Every metadata_filter in a local reply filter tree."""
    if isinstance(node, dict):
        found = [node["metadata_filter"]] if "metadata_filter" in node else []
        return found + [m for v in node.values() for m in metadata_filters(v)]
    if isinstance(node, list):
        return [m for v in node for m in metadata_filters(v)]
    return []


def test_anthropic_error_replies_follow_the_clients_api_from_metadata() -> None:
    """An attempt may set :path to another API's, so the client's API comes from plano.api."""
    mappers = hcm(render())["local_reply_config"]["mappers"]
    anthropic = [
        m
        for m in mappers
        if m.get("body_format_override", {}).get("json_format", {}).get("type") == "error"
    ]
    assert anthropic
    for m in anthropic:
        said = [
            f
            for f in metadata_filters(m["filter"])
            if f["matcher"]["filter"] == DECISION_METADATA
            and f["matcher"]["path"] == [{"key": API_KEY}]
            and f["matcher"]["value"] == {"string_match": {"exact": "messages"}}
            and not f["matcher"].get("invert")
        ]
        assert len(said) == 1
        # Envoy's default would match a missing key: a request the ext_proc never described
        # is not thereby an Anthropic one.
        assert said[0]["match_if_key_not_found"] is False
    # The OpenAI-shaped replies do not look at it.
    others = [m for m in mappers[1:] if m not in anthropic]
    assert others and not any(metadata_filters(m["filter"]) for m in others)


# ---------------------------------------------------------------- Envoy accepts it


@pytest.mark.parametrize(
    "failover",
    ["", "{enabled: false}", "{max_attempts: 8, on_status: [429, 503], attempt_timeout: 0s}"],
)
def test_envoy_accepts_the_bootstrap(failover: str, tmp_path: Path) -> None:
    assert_envoy_accepts(render(config(failover)), tmp_path)


@pytest.mark.parametrize("failover", ["", "{enabled: false}"])
def test_the_yaml_has_no_anchors(failover: str) -> None:
    text = render_yaml(render(config(failover)))
    anchored = [e for e in yaml.parse(text) if getattr(e, "anchor", None) is not None]
    assert anchored == []
    assert isinstance(yaml.safe_load(text), dict)
