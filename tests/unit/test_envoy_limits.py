"""The listener's limits (config) and how the bootstrap renders them (issue 11: 6, 9, 10, 14).

Pure: config text in, the rendered bootstrap dict out. What Envoy does with it is tested
through the real gateway in tests/integration/test_limits_envoy.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from plano_extproc.config import ConfigError, ListenerConfig, parse_config
from plano_extproc.envoy_config import HEAP_MONITOR, local_replies, render_bootstrap

PROVIDERS = """
model_providers:
  - model: openai/gpt-4o-mini
    base_url: http://127.0.0.1:9/v1
    access_key: k
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    base_url: http://127.0.0.1:10/v1
    access_key: k
"""


def config(listener: str = "") -> str:
    return f"""
version: v0.4.0
listeners:
  - name: model_listener
    type: model
    timeout: 30s
{listener}
{PROVIDERS}
"""


def render(listener: str = "") -> dict[str, Any]:
    return render_bootstrap(parse_config(config(listener)), extproc=[("127.0.0.1", 9091)])


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def problems(listener: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(config(listener))
    return e.value.problems


def test_a_plano_config_without_the_knobs_gets_the_documented_defaults() -> None:
    lc = parse_config(config()).listener
    assert lc == ListenerConfig(timeout_seconds=30.0)
    assert (lc.request_headers_timeout_seconds, lc.request_timeout_seconds) == (10.0, 60.0)
    assert lc.max_stream_duration_seconds is None
    assert (lc.max_connections, lc.max_concurrent_requests) == (10_000, 4096)
    assert (lc.max_concurrent_streams, lc.max_request_headers_kb) == (128, 60)
    assert lc.max_heap_bytes == 1 << 30


def test_the_knobs_are_read() -> None:
    lc = parse_config(
        config(
            "    request_headers_timeout: 2s\n    request_timeout: 5m\n"
            "    max_stream_duration: 1h\n    max_connections: 500\n"
            "    max_concurrent_requests: 64\n    max_concurrent_streams: 16\n"
            "    max_request_headers_kb: 32\n    max_heap_bytes: 536870912\n"
        )
    ).listener
    assert (lc.request_headers_timeout_seconds, lc.request_timeout_seconds) == (2.0, 300.0)
    assert lc.max_stream_duration_seconds == 3600.0
    assert (lc.max_connections, lc.max_concurrent_requests) == (500, 64)
    assert (lc.max_concurrent_streams, lc.max_request_headers_kb) == (16, 32)
    assert lc.max_heap_bytes == 512 << 20


def test_the_default_heap_bound_leaves_room_for_the_largest_request() -> None:
    lc = parse_config(config(f"    max_request_bytes: {512 << 20}")).listener
    assert lc.max_heap_bytes == 4 * (512 << 20)


@pytest.mark.parametrize(
    ("listener", "needle"),
    [
        ("    request_headers_timeout: 0s", "request_headers_timeout: must be above 0"),
        ("    request_timeout: soon", "request_timeout: 'soon' is not a duration"),
        ("    max_stream_duration: forever", "max_stream_duration: 'forever' is not"),
        ("    max_concurrent_requests: 0", "max_concurrent_requests"),
        ("    max_connections: -1", "max_connections"),
        ("    max_heap_bytes: 1024", "max_heap_bytes"),
        (
            f"    max_request_bytes: {64 << 20}\n    max_heap_bytes: {128 << 20}",
            "below 4 x max_request_bytes",
        ),
    ],
)
def test_bad_knobs_are_named(listener: str, needle: str) -> None:
    found = problems(listener)
    assert any(needle in p and p.startswith("listeners") for p in found), found


def test_a_legacy_listener_gets_the_defaults() -> None:
    text = f"""
version: v0.1
listeners:
  egress_traffic: {{address: 0.0.0.0, port: 12000, timeout: 30s}}
{PROVIDERS}
"""
    assert parse_config(text).listener == ListenerConfig(timeout_seconds=30.0)


def test_timeout_is_an_idle_limit_and_the_total_limit_is_opt_in() -> None:
    h = hcm(render())
    assert h["stream_idle_timeout"] == "30.000s"
    assert (h["request_headers_timeout"], h["request_timeout"]) == ("10.000s", "60.000s")
    assert "max_stream_duration" not in h["common_http_protocol_options"]
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    proxied = [r["route"] for r in routes if "route" in r]
    assert len(proxied) == 5  # the failover route; a translated and a native one per provider
    for action in proxied:
        assert (action["timeout"], action["idle_timeout"]) == ("0s", "30.000s")
    h = hcm(render("    max_stream_duration: 10m"))
    assert h["common_http_protocol_options"]["max_stream_duration"] == "600.000s"


def test_every_cluster_caps_requests_and_pending_ones() -> None:
    by_name = clusters(render("    max_concurrent_requests: 100"))
    # Each provider's own cluster and its two failover variants (failover is on by default).
    providers = {p.cluster for p in parse_config(config()).providers}
    variants = {f"{c}{suffix}" for c in providers for suffix in ("__first", "__failover")}
    assert len(providers) == 2
    assert set(by_name) == {"plano_extproc", "plano_no_upstream"} | providers | variants
    for cluster in by_name.values():
        [t] = cluster["circuit_breakers"]["thresholds"]
        assert (t["max_requests"], t["max_pending_requests"]) == (100, 100)
        assert t["max_retries"] == 100  # not Envoy's default 3 concurrent retries
        # Room for every pending request's own connection: none waits for a free slot.
        assert t["max_connections"] >= t["max_requests"] + t["max_pending_requests"]


def test_downstream_protocol_limits() -> None:
    h = hcm(render("    max_concurrent_streams: 32\n    max_request_headers_kb: 24"))
    assert h["http2_protocol_options"]["max_concurrent_streams"] == 32
    assert h["http2_protocol_options"]["initial_stream_window_size"] == 1 << 20
    assert h["max_request_headers_kb"] == 24
    assert h["common_http_protocol_options"]["max_headers_count"] == 100


def test_overload_manager_bounds_memory_and_connections() -> None:
    om = render("    max_connections: 777\n    max_heap_bytes: 134217728")["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in om["resource_monitors"]}
    assert monitors[HEAP_MONITOR]["max_heap_size_bytes"] == 128 << 20
    conns = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert conns["max_active_downstream_connections"] == 777
    actions = {a["name"].rsplit(".", 1)[1]: a for a in om["actions"]}
    assert set(actions) == {
        "reset_high_memory_stream",
        "reduce_timeouts",
        "shrink_heap",
        "disable_http_keepalive",
        "stop_accepting_requests",
    }
    for action in actions.values():
        assert [t["name"] for t in action["triggers"]] == [HEAP_MONITOR]
    stop = actions["stop_accepting_requests"]["triggers"][0]["threshold"]["value"]
    reset = actions["reset_high_memory_stream"]["triggers"][0]["scaled"]
    assert reset["scaling_threshold"] < stop <= reset["saturation_threshold"]
    # The reset action only sees streams whose buffers are tracked.
    assert om["buffer_factory_config"]["minimum_account_to_track_power_of_two"] == 20


def _expressions(mapper: dict[str, Any]) -> tuple[bool, str]:
    """(has the Anthropic path filter, the CEL expression) of one local-reply mapper."""
    f = mapper["filter"]
    if "and_filter" in f:
        client, cel = f["and_filter"]["filters"]
        # The client's API reported by the routing ext_proc (an attempt may have rewritten
        # :path); the path only while the ext_proc has not answered.
        said, fallback = client["or_filter"]["filters"]
        api = {"filter": "plano", "path": [{"key": "api"}]}
        assert said["metadata_filter"]["matcher"] == {
            **api,
            "value": {"string_match": {"exact": "messages"}},
        }
        assert said["metadata_filter"]["match_if_key_not_found"] is False
        unsaid, path = fallback["and_filter"]["filters"]
        assert unsaid["metadata_filter"]["matcher"] == {
            **api,
            "value": {"present_match": True},
            "invert": True,
        }
        assert unsaid["metadata_filter"]["match_if_key_not_found"] is True
        assert path["header_filter"]["header"] == {
            "name": ":path",
            "string_match": {"prefix": "/v1/messages"},
        }
        return True, str(cel["extension_filter"]["typed_config"]["expression"])
    return False, str(f["extension_filter"]["typed_config"]["expression"])


def test_every_envoy_local_reply_is_json_in_the_clients_format() -> None:
    mappers = hcm(render())["local_reply_config"]["mappers"]
    replies = local_replies(parse_config(config()))
    assert len(mappers) == 1 + 2 * len(replies)
    # First: successes, the ext_proc's own replies (details plano_*), /healthz and the
    # unrouted reply match a mapper that changes nothing, so no later mapper sees them.
    first = mappers[0]
    assert set(first) == {"filter"}
    success, theirs = first["filter"]["or_filter"]["filters"]
    assert success["status_code_filter"]["comparison"]["op"] == "LE"
    assert success["status_code_filter"]["comparison"]["value"]["default_value"] == 399
    assert theirs["extension_filter"]["typed_config"]["expression"] == (
        "response.code_details.startsWith('plano_') || response.code_details == 'direct_response'"
    )
    anthropic, openai = mappers[1 : 1 + len(replies)], mappers[1 + len(replies) :]
    for m, reply in zip(anthropic, replies, strict=True):
        assert _expressions(m) == (True, reply.when)
        body = m["body_format_override"]["json_format"]
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    for m, reply in zip(openai, replies, strict=True):
        assert _expressions(m) == (False, reply.when)
        assert set(m["body_format_override"]["json_format"]["error"]) == {
            "type",
            "message",
            "code",
        }
    for m in anthropic + openai:
        assert m["body_format_override"]["content_type"] == "application/json"
    # The last mapper of each format catches whatever the others did not.
    assert replies[-1].when == "true"


def test_local_reply_messages_name_the_knob_and_its_value() -> None:
    cfg = parse_config(config("    request_headers_timeout: 3s\n    max_concurrent_requests: 9"))
    by_when = {r.when: r for r in local_replies(cfg)}
    headers = by_when["response.code_details == 'request_header_timeout'"]
    assert "3s (listener request_headers_timeout)" in headers.message
    idle = by_when["response.code_details == 'stream_idle_timeout'"]
    assert "30s (listener timeout)" in idle.message
    overflow = by_when["response.code_details.contains('overflow')"]
    assert "max_concurrent_requests = 9" in overflow.message and overflow.status == 503


def test_retry_attempts_wait_as_long_as_the_listener_timeout() -> None:
    # A slow non-streaming model must not be retried (or cut) sooner than `timeout` allows.
    routes = hcm(render("    max_retries: 2\n"))["route_config"]["virtual_hosts"][0]["routes"]
    policies = [
        r["route"]["retry_policy"]
        for r in routes
        if "retry_policy" in r.get("route", {}) and "cluster" in r["route"]
    ]
    assert policies and all(p["per_try_timeout"] == "30.000s" for p in policies)
