"""Render the Envoy bootstrap for a config: listener, ext_proc filter, routes and clusters.

Design points (measured in the reference notes, B1):
- the upstream is chosen by a header the ext_proc sets (``x-plano-upstream``) with
  ``clear_route_cache``; a header_mutation filter in front strips any client copy, so when
  the ext_proc did not run, no provider route can match and no client credential leaves;
- ``message_timeout`` is far above Envoy's 200 ms default and above the router timeout (the
  routing filter's full-duplex body has no per-message timer; the listener's timeouts bound it);
- the routing filter's body is FULL_DUPLEX_STREAMED (ROUTING_PROCESSING_MODE): the worker
  bounds it (413) and restores content-length through metadata (_content_length_filter);
- host rewrite is done per route (``host_rewrite_literal``), TLS clusters set SNI;
- the ext_proc cluster speaks HTTP/2 with keepalive pings the server is configured to accept.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import Any

import yaml

from plano_extproc.config import Config, Provider, TracingConfig
from plano_extproc.errors import body_limit_message
from plano_extproc.names import (
    API_KEY,
    ATTEMPT_COUNT_HEADER,
    ATTEMPT_FILTER,
    ATTEMPTS_HEADER,
    CACHE_READ,
    CACHE_WRITE,
    CACHED_TOKENS,
    COMPLETION_TOKENS,
    CONTENT_LENGTH_FILTER,
    DECISION_METADATA,
    EXTPROC_CLUSTER,
    HIDE_USAGE_FILTER,
    HIDE_USAGE_KEY,
    INPUT_CACHED,
    INPUT_TOKENS,
    LENGTH_KEY,
    LOG_ATTEMPTS,
    LOG_BODY_US,
    LOG_CONTENT_TYPE,
    LOG_DURATION_MS,
    LOG_DURATION_US,
    LOG_FIELDS,
    LOG_REQUEST_ID,
    LOG_STATUS,
    LOG_TRACEPARENT,
    LOG_USAGE,
    MAX_RETRIES_HEADER,
    MAX_SLOTS,
    MODEL_HEADER,
    MODEL_KEY,
    OUTPUT_TOKENS,
    PINNED_KEY,
    PROMPT_TOKENS,
    RATELIMIT_KEY,
    REQUESTED_KEY,
    RESPONSE_FILTER,
    ROUTE_HEADER,
    ROUTE_KEY,
    ROUTE_RESPONSE_HEADER,
    ROUTING_REQUEST_HEADERS,
    TRANSLATE_HEADER,
    TX_KEY,
    USAGE_KEY,
    USAGE_LOG_NAME,
    USAGE_METADATA,
    failover_cluster,
    failure_key,
    first_cluster,
    retry_after_key,
    slot_header,
)

_T = "type.googleapis.com/envoy."


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class BootstrapError(ValueError):
    """The config cannot be turned into a working Envoy bootstrap on this machine."""


# Where distributions keep the system CA bundle (used when the configured path is the default).
_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine (ca-certificates)
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL, CentOS
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, Alpine, BSDs
)


def ca_bundle(config: Config) -> str:
    """The CA file Envoy verifies provider certificates with; never silently none."""
    if config.tls_ca_path is not None:
        if not os.path.isfile(config.tls_ca_path):
            raise BootstrapError(
                f"overrides.upstream_tls_ca_path: {config.tls_ca_path} is not a file; Envoy "
                "needs a PEM CA bundle to verify the providers' TLS certificates"
            )
        return config.tls_ca_path
    defaults = ssl.get_default_verify_paths()
    for path in (*_CA_BUNDLES, defaults.cafile, defaults.openssl_cafile):
        if path and os.path.isfile(path):
            return path
    raise BootstrapError(
        "no system CA bundle found (looked in " + ", ".join(_CA_BUNDLES) + "); install "
        "ca-certificates or set overrides.upstream_tls_ca_path to a PEM CA bundle"
    )


def _one_per_cluster(config: Config) -> list[Provider]:
    """The first provider of each upstream endpoint: providers sharing one get one cluster."""
    first: dict[str, Provider] = {}
    for p in config.providers:
        first.setdefault(p.cluster, p)
    return list(first.values())


def _load_assignment(name: str, endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    hosts = [{"endpoint": {"address": _address(h, port)}} for h, port in endpoints]
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": hosts}]}


def _discovery(host: str, dns_type: str) -> dict[str, Any]:
    """A literal IP needs no resolver; a name is resolved (IPv4 first)."""
    if _is_ip(host):
        return {"type": "STATIC"}
    return {"type": dns_type, "dns_lookup_family": "V4_PREFERRED"}


def _http2(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": options},
        }
    }


def circuit_breakers(max_requests: int) -> dict[str, Any]:
    """Caps for one cluster, sized from ``max_concurrent_requests`` instead of Envoy's
    defaults (1,024 requests, then a silent pending queue): ``max_requests`` active; pending
    ones (waiting for a connection) as many again, and room for as many connections as both
    together, so a pending request only waits for its own connect and never for a free slot:
    beyond the cap the client gets an immediate 503. Retries get the same cap: Envoy's default
    of 3 concurrent retries per cluster silently skips the rest under load (measured: 16
    failing requests at once, 3 retried), handing those clients the first failure."""
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_requests": max_requests,
                "max_pending_requests": max_requests,
                "max_connections": 2 * max_requests,
                "max_retries": max_requests,
                "track_remaining": True,
            }
        ]
    }


def _provider_cluster(p: Provider, config: Config) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": p.cluster,
        **_discovery(p.host, "LOGICAL_DNS"),
        "connect_timeout": _duration(config.connect_timeout_seconds),
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": circuit_breakers(config.listener.max_concurrent_requests),
        "load_assignment": _load_assignment(p.cluster, [(p.host, p.port)]),
    }
    if p.tls:
        sni = p.http_host or p.host
        tls: dict[str, Any] = {
            "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                # Chain AND name: a certificate from any public CA for another host must not do.
                "validation_context": {
                    "trusted_ca": {"filename": ca_bundle(config)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS" if _is_ip(sni) else "DNS",
                         "matcher": {"exact": sni}}
                    ],
                },
            },
        }  # fmt: skip
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": tls,
        }
    return cluster


def _extproc_cluster(endpoints: list[tuple[str, int]], max_requests: int) -> dict[str, Any]:
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": _http2(
            {
                "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                "max_concurrent_streams": 1024,
            }
        ),
        "load_assignment": _load_assignment(EXTPROC_CLUSTER, endpoints),
        # A dead or hung worker stops getting requests (issue 11, item 8). Active gRPC
        # health checks catch a hung (SIGSTOPped) worker within ~2-3 s even when idle;
        # outlier detection ejects a worker at the first refused connection (a dead one)
        # before the next check. Envoy's start-up waits for the first round of checks.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        # The ejection outlasts the ~3 s the checks take to fail a dead worker: un-ejected
        # sooner, requests queued on its refused connection fail together (measured: ~190).
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_time": "30s",
            "max_ejection_percent": 100,
        },
        # Every request (but /healthz) holds one ext_proc stream while it is received and
        # routed: this cap is the gateway's admission limit (beyond it: an immediate JSON 503).
        "circuit_breakers": circuit_breakers(max_requests),
    }


OTEL_CLUSTER = "plano_otel_collector"


def _otel_cluster(tracing: TracingConfig) -> dict[str, Any]:
    return {
        "name": OTEL_CLUSTER,
        **_discovery(tracing.host, "STRICT_DNS"),
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2({}),
        "load_assignment": _load_assignment(OTEL_CLUSTER, [(tracing.host, tracing.port)]),
    }


def _tracing(tracing: TracingConfig) -> dict[str, Any]:
    def from_metadata(tag: str, key: str) -> dict[str, Any]:
        return {
            "tag": tag,
            "metadata": {
                "kind": {"request": {}},
                "metadata_key": {"key": DECISION_METADATA, "path": [{"key": key}]},
            },
        }

    tags = [{"tag": k, "literal": {"value": v}} for k, v in tracing.static_tags.items()]
    tags += [
        from_metadata("plano.route.name", ROUTE_KEY),
        from_metadata("llm.model", MODEL_KEY),
        # OpenTelemetry GenAI attribute names for the same facts.
        from_metadata("gen_ai.request.model", REQUESTED_KEY),
        from_metadata("gen_ai.response.model", MODEL_KEY),
    ]
    return {
        "random_sampling": {"value": float(tracing.sampling_percent)},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": _T + "config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "2s"},
                "service_name": "plano-extproc",
            },
        },
        "custom_tags": tags,
    }


# Local replies (issue 11, item 14): every reply Envoy itself produces gets the JSON error
# envelope of the client's API. Replies the ext_proc produced (details "plano_*", bodies
# already JSON), direct responses (/healthz, unrouted) and upstream responses are untouched.
_CEL = _T + "extensions.access_loggers.filters.cel.v3.ExpressionFilter"
_THEIRS = "response.code_details.startsWith('plano_') || response.code_details == 'direct_response'"
ANTHROPIC_PATH = "/v1/messages"  # these clients get Anthropic's error shape


@dataclass(frozen=True, slots=True)
class LocalReply:
    """One kind of Envoy-generated reply: which ones (CEL on the reply), what the client reads."""

    when: str  # CEL condition on an Envoy error reply
    openai_type: str
    anthropic_type: str
    message: str  # may use Envoy formatter commands, e.g. %LOCAL_REPLY_BODY%
    status: int | None = None  # rewrite Envoy's status


def local_replies(config: Config) -> list[LocalReply]:
    """The Envoy local replies clients can meet, most specific first; the last ones catch
    every remaining status (message: Envoy's own text, never an upstream body)."""
    lc = config.listener
    details = "response.code_details"
    return [
        LocalReply(
            "response.code == 413",
            "request_too_large",
            "request_too_large",
            body_limit_message(lc.max_request_bytes),
        ),
        LocalReply(
            f"{details} == 'request_header_timeout'",
            "request_timeout",
            "timeout_error",
            "request headers not received within "
            f"{lc.request_headers_timeout_seconds:g}s (listener request_headers_timeout)",
        ),
        LocalReply(
            f"{details} == 'request_overall_timeout'",
            "request_timeout",
            "timeout_error",
            f"request not received within {lc.request_timeout_seconds:g}s "
            "(listener request_timeout)",
        ),
        LocalReply(
            f"{details} == 'stream_idle_timeout'",
            "timeout",
            "timeout_error",
            f"nothing sent or received for {lc.timeout_seconds:g}s (listener timeout)",
        ),
        LocalReply(
            f"{details} == 'max_duration_timeout'",
            "timeout",
            "timeout_error",
            "stream exceeded the listener max_stream_duration of "
            f"{lc.max_stream_duration_seconds or 0:g}s",
        ),
        LocalReply(
            f"{details}.contains('overflow')",
            "overloaded",
            "overloaded_error",
            "too many concurrent requests (listener max_concurrent_requests = "
            f"{lc.max_concurrent_requests}); retry later",
            status=503,
        ),
        LocalReply(
            f"{details} == 'overload'",
            "overloaded",
            "overloaded_error",
            "the gateway is overloaded (memory near listener max_heap_bytes); retry later",
            status=503,
        ),
        LocalReply(
            # The ext_proc stream failed to open (its circuit breaker is full, no worker)
            # or broke: the request cannot be routed. gRPC status 14: UNAVAILABLE.
            f"{details}.startsWith('ext_proc_error_gRPC_error_14')",
            "overloaded",
            "overloaded_error",
            "the routing service is unavailable or at listener max_concurrent_requests "
            f"(= {lc.max_concurrent_requests}); retry later",
            status=503,
        ),
        LocalReply(
            f"{details}.startsWith('ext_proc')",
            "server_error",
            "api_error",
            "the routing service failed: %RESPONSE_CODE_DETAILS%",
        ),
        LocalReply(
            f"{details}.contains('connection_failure') || {details}.contains('connect')",
            "upstream_connect_error",
            "api_error",
            "upstream connect error: the provider could not be reached",
        ),
        LocalReply(
            f"{details}.startsWith('upstream_response_timeout') "
            f"|| {details}.startsWith('upstream_per_try')",
            "timeout",
            "timeout_error",
            "upstream request timeout: the provider did not answer in time",
        ),
        LocalReply(
            f"{details}.startsWith('upstream_reset')",
            "upstream_error",
            "api_error",
            "the provider connection was reset: %LOCAL_REPLY_BODY%",
        ),
        LocalReply("response.code == 408", "request_timeout", "timeout_error", _ENVOY_TEXT),
        LocalReply("response.code == 431", "request_too_large", "request_too_large", _ENVOY_TEXT),
        LocalReply("response.code < 500", "invalid_request_error", "invalid_request_error",
                   _ENVOY_TEXT),
        LocalReply("response.code == 503", "overloaded", "overloaded_error", _ENVOY_TEXT),
        LocalReply("response.code == 504", "timeout", "timeout_error", _ENVOY_TEXT),
        LocalReply("true", "server_error", "api_error", _ENVOY_TEXT),
    ]  # fmt: skip


_ENVOY_TEXT = "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)"


def _cel_filter(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": _CEL, "expression": expression},
        }
    }


def _mapper(reply: LocalReply, anthropic: bool) -> dict[str, Any]:
    cel = _cel_filter(reply.when)
    if anthropic:
        # The client's API as the routing ext_proc reported it (an attempt may have set
        # :path to another API's); the path when the ext_proc has not answered yet.
        def api(value: dict[str, Any], absent: bool, invert: bool = False) -> dict[str, Any]:
            matcher: dict[str, Any] = {
                "filter": DECISION_METADATA,
                "path": [{"key": API_KEY}],
                "value": value,
            }
            if invert:
                matcher["invert"] = True
            # Envoy's default matches a missing key: say what a missing key means.
            return {"metadata_filter": {"matcher": matcher, "match_if_key_not_found": absent}}

        said = api({"string_match": {"exact": "messages"}}, absent=False)
        unsaid = api({"present_match": True}, absent=True, invert=True)
        path = {
            "header_filter": {
                "header": {"name": ":path", "string_match": {"prefix": ANTHROPIC_PATH}}
            }
        }
        client = {"or_filter": {"filters": [said, {"and_filter": {"filters": [unsaid, path]}}]}}
        filter_: dict[str, Any] = {"and_filter": {"filters": [client, cel]}}
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": reply.anthropic_type, "message": reply.message},
        }
    else:
        filter_ = cel
        body = {
            "error": {
                "type": reply.openai_type,
                "message": reply.message,
                "code": "%RESPONSE_CODE_DETAILS%",
            }
        }
    mapper: dict[str, Any] = {
        "filter": filter_,
        "body_format_override": {"json_format": body, "content_type": "application/json"},
    }
    if reply.status is not None:
        mapper["status_code"] = reply.status
    return mapper


def _pass_through() -> dict[str, Any]:
    """The first mapper: it matches (and so ends the search, leaving the reply as it is)
    successes, the ext_proc's own replies and direct responses. The cheap status check
    comes first, so a 200 from the ext_proc costs one comparison, not a walk of every
    mapper's CEL expression."""
    success = {
        "status_code_filter": {
            "comparison": {
                "op": "LE",
                "value": {"default_value": 399, "runtime_key": "plano.local_reply_ok_max"},
            }
        }
    }
    return {"filter": {"or_filter": {"filters": [success, _cel_filter(_THEIRS)]}}}


def _local_reply_config(config: Config) -> dict[str, Any]:
    replies = local_replies(config)
    # Anthropic first: their filter also checks the path; the rest is OpenAI's shape.
    mappers = [_pass_through()]
    mappers += [_mapper(r, anthropic=True) for r in replies]
    mappers += [_mapper(r, anthropic=False) for r in replies]
    return {"mappers": mappers}


def _routes(config: Config, timeout: str) -> list[dict[str, Any]]:
    disabled = {
        "envoy.filters.http.ext_proc": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "disabled": True,
        }
    }
    routes: list[dict[str, Any]] = [
        {
            "name": "healthz",
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            "typed_per_filter_config": disabled,
        }
    ]
    if failover_on(config):
        routes.append(_failover_route(config, timeout))
    for p in _one_per_cluster(config):
        routes.extend(_provider_routes(p, config, timeout))
    routes.append(
        {
            "name": "unrouted",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 503,
                "body": {
                    "inline_string": '{"error": {"type": "unrouted", "message": '
                    '"the routing service did not select an upstream"}}'
                },
            },
        }
    )
    return routes


# The response filter's static modes: nothing is sent, so no gRPC stream is opened.
_INERT_MODES = {
    "request_header_mode": "SKIP",
    "request_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}
# The response modes of a translated request: headers first (the servicer then picks the body
# mode by status and content-type with mode_override); the request side is over by then.
TRANSLATED_MODES = {**_INERT_MODES, "response_header_mode": "SEND"}


def _decision_headers() -> list[dict[str, Any]]:
    """The model and route, copied from the ``plano`` metadata (each absent when its key is),
    and the number of upstream attempts Envoy made (connection failures included)."""
    values = [
        (MODEL_HEADER, f"%DYNAMIC_METADATA({DECISION_METADATA}:{MODEL_KEY})%"),
        (ROUTE_RESPONSE_HEADER, f"%DYNAMIC_METADATA({DECISION_METADATA}:{ROUTE_KEY})%"),
        (ATTEMPTS_HEADER, "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"),
    ]
    return [
        {
            "header": {"key": name, "value": value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "keep_empty_value": False,
        }
        for name, value in values
    ]


# Headers a client could use to steer Envoy's retries or the failover slots: stripped at the
# front (the routing ext_proc sets its own).
ENVOY_CONTROL_HEADERS = (
    ATTEMPT_COUNT_HEADER,
    MAX_RETRIES_HEADER,
    "x-envoy-retry-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
)
NO_UPSTREAM_CLUSTER = "plano_no_upstream"  # no endpoints: a slot that names nothing fails


def _cluster_action(cluster: str) -> dict[str, Any]:
    return {
        "action": {
            "name": "cluster",
            "typed_config": {
                "@type": _T + "extensions.router.cluster_specifiers.matcher.v3.ClusterAction",
                "cluster": cluster,
            },
        }
    }


def _header_input(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": _T + "type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": name,
        },
    }


# The attempt filter's modes.
ATTEMPT_MODES = {
    "request_header_mode": "SEND",
    "request_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SEND",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}


def _failover_route(config: Config, timeout: str) -> dict[str, Any]:
    """One route for every request with several models to try (the routing ext_proc set
    slot 0). Envoy reads the cluster of each attempt from the slot named by the attempt
    count (``refresh_cluster_on_retry``): the matcher maps (count k, slot k's cluster id) to
    the cluster; anything else goes to a cluster with no endpoints. Retries need no
    back-off worth the name: the next attempt goes to another provider."""
    fo = config.failover
    clusters = [p.cluster for p in _one_per_cluster(config)]
    clusters = [f(c) for c in clusters for f in (first_cluster, failover_cluster)]
    by_count = {
        str(k): {
            "matcher": {
                "matcher_tree": {
                    "input": _header_input(slot_header(k)),
                    "exact_match_map": {"map": {c: _cluster_action(c) for c in clusters}},
                },
                "on_no_match": _cluster_action(NO_UPSTREAM_CLUSTER),
            }
        }
        for k in range(fo.max_attempts)
    }
    specifier = {
        "extension": {
            "name": "envoy.router.cluster_specifier_plugin.matcher",
            "typed_config": {
                "@type": _T + "extensions.router.cluster_specifiers.matcher.v3."
                "MatcherClusterSpecifier",
                "cluster_matcher": {
                    "matcher_tree": {
                        "input": _header_input(ATTEMPT_COUNT_HEADER),
                        "exact_match_map": {"map": by_count},
                    },
                    "on_no_match": _cluster_action(NO_UPSTREAM_CLUSTER),
                },
            },
        }
    }
    if fo.on_status is None:
        retry_on, codes = "5xx,reset,connect-failure,refused-stream,retriable-status-codes", [429]
    else:
        retry_on, codes = (
            "reset,connect-failure,refused-stream,retriable-status-codes",
            list(fo.on_status),
        )
    retry: dict[str, Any] = {
        "retry_on": retry_on,
        "retriable_status_codes": codes,
        "num_retries": fo.max_attempts - 1,
        # Each retry resolves the cluster again, from the next slot (Envoy >= 1.39).
        "refresh_cluster_on_retry": True,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"},
    }
    if fo.attempt_timeout_seconds > 0:
        # An idle timer, re-armed by every byte the provider sends: a slow start moves on,
        # a long answer that keeps streaming is neither cut nor sent again.
        retry["per_try_idle_timeout"] = _duration(fo.attempt_timeout_seconds)
    return {
        "name": "failover",
        "match": {"prefix": "/", "headers": [{"name": slot_header(0), "present_match": True}]},
        "route": {
            "inline_cluster_specifier_plugin": specifier,
            "timeout": "0s",
            "idle_timeout": timeout,
            "retry_policy": retry,
        },
        "response_headers_to_add": _decision_headers(),
    }


def failover_on(config: Config) -> bool:
    return config.failover.enabled and config.failover.max_attempts > 1


_CODEC = {
    "name": "envoy.filters.http.upstream_codec",
    "typed_config": {"@type": _T + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
}
# Attempt 1 of a request whose first model the routing stream served itself: no ext_proc
# stream; a failing status and its Retry-After go to the next attempt's stream as metadata.
_RECORD_FAILURE = f"""
function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status")
  local code = tonumber(status)
  if code ~= nil and code >= 400 then
    local meta = handle:streamInfo():dynamicMetadata()
    meta:set("{DECISION_METADATA}", "{failure_key(1)}", status)
    local wait = headers:get("retry-after")
    local ms = tonumber(headers:get("retry-after-ms") or "")
    if ms ~= nil and ms >= 0 then
      wait = tostring(ms / 1000)
    end
    if wait ~= nil then
      meta:set("{DECISION_METADATA}", "{retry_after_key(1)}", wait)
    end
  end
end
"""


def _skipped_unless(name: str, config: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """HTTP filter ``name`` (``config``) wrapped so that a request or attempt for which the
    matcher predicate ``wanted`` does not hold skips it (Envoy's ExtensionWithMatcher, evaluated
    as the data it reads arrives)."""
    skip = {
        "name": "skip",
        "typed_config": {"@type": _T + "extensions.filters.common.matcher.action.v3.SkipFilter"},
    }
    return {
        "name": name,
        "typed_config": {
            "@type": _T + "extensions.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [
                        {"predicate": {"not_matcher": wanted}, "on_match": {"action": skip}}
                    ]
                }
            },
            "extension_config": {"name": name, "typed_config": config},
        },
    }


def _only_on_error_status(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Upstream filter ``name`` skipped by attempts whose response status is not 4xx or 5xx:
    a first attempt that succeeds (the usual case) does not run the Lua that records a
    failure (measured: that Lua cost a routed request about as much as the rest of failover,
    docs/benchmarks.md)."""

    def status_class(value: str) -> dict[str, Any]:
        return {
            "single_predicate": {
                "input": {
                    "name": "status_class",
                    "typed_config": {
                        "@type": _T + "type.matcher.v3.HttpResponseStatusCodeClassMatchInput"
                    },
                },
                "value_match": {"exact": value},
            }
        }

    failing = {"or_matcher": {"predicate": [status_class("4xx"), status_class("5xx")]}}
    return _skipped_unless(name, config, failing)


def _failover_clusters(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The provider's ``first`` and ``failover`` clusters: its own cluster's endpoint, TLS
    and limits, with the upstream filters of their attempt (copies: no YAML anchors)."""
    record_failure = _only_on_error_status(
        "envoy.filters.http.lua",
        {
            "@type": _T + "extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": _RECORD_FAILURE},
        },
    )
    out = []
    for name, upstream_filter in (
        (first_cluster(base["name"]), record_failure),
        (failover_cluster(base["name"]), _attempt_filter()),
    ):
        cluster = copy.deepcopy(base)
        cluster["name"] = name
        cluster["load_assignment"]["cluster_name"] = name
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [upstream_filter, copy.deepcopy(_CODEC)],
            }
        }
        out.append(cluster)
    return out


def _attempt_filter() -> dict[str, Any]:
    """The ext_proc in each failover cluster's upstream chain: one stream per attempt (the
    request's headers and body: it builds its model's request; the response headers: the
    outcome, and the body mode when the answer is translated). No gRPC timeout: the stream
    lives as long as the attempt's answer. ``allow_all_routing``: it sets ``:authority``."""
    return {
        "name": ATTEMPT_FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "stat_prefix": "attempt",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
            "failure_mode_allow": False,
            "allow_mode_override": True,
            "mutation_rules": {"allow_all_routing": True},
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [DECISION_METADATA]},
                "receiving_namespaces": {"untyped": [DECISION_METADATA]},
            },
            "message_timeout": "10s",
            "processing_mode": dict(ATTEMPT_MODES),
        },
    }


def _provider_routes(p: Provider, config: Config, timeout: str) -> list[dict[str, Any]]:
    """Two routes per provider cluster: the translated one (ext_proc set TRANSLATE_HEADER),
    which enables the response-translation filter, then the native one, which does not.

    Route-level typed_per_filter_config works here because the response filter's
    decodeHeaders (where Envoy merges it) runs only after the first ext_proc's body reply
    cleared the route cache: the first filter holds the headers while the body is BUFFERED."""
    action: dict[str, Any] = {
        "cluster": p.cluster,
        # A stream is limited by idle time, not total time (item 10): the route's total
        # timeout is off, its idle timeout is the listener timeout.
        "timeout": "0s",
        "idle_timeout": timeout,
        "host_rewrite_literal": p.authority,
    }
    if config.listener.max_retries:
        action["retry_policy"] = {
            "retry_on": "5xx,connect-failure,refused-stream,reset,retriable-status-codes",
            "retriable_status_codes": [429, 500, 502, 503, 504],
            "num_retries": config.listener.max_retries,
            # Until the response starts (Envoy disarms it then): the listener's timeout, so
            # a slow non-streaming model is not retried sooner than it would be cut.
            "per_try_timeout": timeout,
            "retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"},
        }
    decision_headers = _decision_headers()
    upstream = {"name": ROUTE_HEADER, "string_match": {"exact": p.cluster}}
    translated = {
        "name": f"to_{p.cluster}_translated",
        "match": {
            "prefix": "/",
            "headers": [upstream, {"name": TRANSLATE_HEADER, "present_match": True}],
        },
        "route": action,
        "request_headers_to_remove": [ROUTE_HEADER, TRANSLATE_HEADER],
        "response_headers_to_add": decision_headers,
        "typed_per_filter_config": {
            RESPONSE_FILTER: {
                "@type": _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "overrides": {"processing_mode": dict(TRANSLATED_MODES)},
            },
        },
    }
    native = {  # copies: a shared dict would be written as a YAML anchor
        "name": f"to_{p.cluster}",
        "match": {"prefix": "/", "headers": [copy.deepcopy(upstream)]},
        "route": copy.deepcopy(action),
        "request_headers_to_remove": [ROUTE_HEADER],
        "response_headers_to_add": copy.deepcopy(decision_headers),
    }
    return [translated, native]


_MONITORS = _T + "extensions.resource_monitors."
HEAP_MONITOR = "envoy.resource_monitors.fixed_heap"


def _on_heap(action: str, value: float) -> dict[str, Any]:
    return {"name": action, "triggers": [{"name": HEAP_MONITOR, "threshold": {"value": value}}]}


def _scaled_on_heap() -> list[dict[str, Any]]:
    """Scaled actions grow from 80% of the heap bound to full effect at 95% (a new list each
    time: a shared one would be written as a YAML anchor)."""
    return [
        {"name": HEAP_MONITOR, "scaled": {"scaling_threshold": 0.80, "saturation_threshold": 0.95}}
    ]


def overload_manager(config: Config) -> dict[str, Any]:
    """A global memory bound (item 9) and the connection cap (item 6).

    As Envoy's heap nears ``max_heap_bytes``: from 80% the HTTP/2 streams holding the most
    buffered memory are reset and the idle timeouts shrink (to 5 s at 95%: unfinished
    uploads let go), at 90% freed memory goes back to the OS and keep-alive stops, at 95%
    new requests get a JSON 503; connections beyond ``max_connections`` are refused."""
    lc = config.listener
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _MONITORS + "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": lc.max_connections,
                },
            },
            {
                "name": HEAP_MONITOR,
                "typed_config": {
                    "@type": _MONITORS + "fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": lc.max_heap_bytes,
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.reset_high_memory_stream",
                "triggers": _scaled_on_heap(),
            },
            {
                # HTTP/1 streams are not tracked for the reset above: under pressure, the
                # idle timeout of streams shrinks instead, so unfinished uploads let go.
                "name": "envoy.overload_actions.reduce_timeouts",
                "triggers": _scaled_on_heap(),
                "typed_config": {
                    "@type": _T + "config.overload.v3.ScaleTimersOverloadActionConfig",
                    "timer_scale_factors": [
                        {"timer": "HTTP_DOWNSTREAM_STREAM_IDLE", "min_timeout": "5s"},
                        {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": "5s"},
                    ],
                },
            },
            _on_heap("envoy.overload_actions.shrink_heap", 0.90),
            _on_heap("envoy.overload_actions.disable_http_keepalive", 0.90),
            _on_heap("envoy.overload_actions.stop_accepting_requests", 0.95),
        ],
        # Streams are tracked (for the reset action) once they buffer 1 MiB or more.
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
    }


# Where each counter sits in a JSON answer (all three client APIs: keys that do not occur in
# an API's answers are never written) and, for streams, in the events that carry it.
_JSON_USAGE = {
    PROMPT_TOKENS: ["usage", "prompt_tokens"],
    COMPLETION_TOKENS: ["usage", "completion_tokens"],
    CACHED_TOKENS: ["usage", "prompt_tokens_details", "cached_tokens"],
    INPUT_TOKENS: ["usage", "input_tokens"],
    OUTPUT_TOKENS: ["usage", "output_tokens"],
    CACHE_READ: ["usage", "cache_read_input_tokens"],
    CACHE_WRITE: ["usage", "cache_creation_input_tokens"],
    INPUT_CACHED: ["usage", "input_tokens_details", "cached_tokens"],
}
# Streams: Chat's usage chunk; Anthropic's message_start (message.usage) then message_delta
# (usage, cumulative: the last one wins); Responses' response.completed (response.usage).
_SSE_USAGE = [
    *_JSON_USAGE.items(),
    (INPUT_TOKENS, ["message", "usage", "input_tokens"]),
    (CACHE_READ, ["message", "usage", "cache_read_input_tokens"]),
    (CACHE_WRITE, ["message", "usage", "cache_creation_input_tokens"]),
    (INPUT_TOKENS, ["response", "usage", "input_tokens"]),
    (OUTPUT_TOKENS, ["response", "usage", "output_tokens"]),
    (INPUT_CACHED, ["response", "usage", "input_tokens_details", "cached_tokens"]),
]
# A Responses stream's response.completed repeats the whole answer: events are kept up to this.
MAX_SSE_EVENT_BYTES = 4 << 20


def _usage_rule(key: str, path: list[str]) -> dict[str, Any]:
    return {
        "selectors": [{"key": k} for k in path],
        "on_present": {"metadata_namespace": USAGE_METADATA, "key": key, "type": "NUMBER"},
    }


def _usage_extractors() -> list[dict[str, Any]]:
    """Token usage read by Envoy itself, off every answer as the client receives it (they sit
    before the response-translation filter): JSON answers are parsed whole (json_to_metadata
    holds a JSON answer until its end, which a client of a JSON answer waits for anyway),
    streams event by event as they pass (sse_to_metadata holds nothing back)."""
    return [
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": _T + "extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "response_rules": {
                    "rules": [_usage_rule(k, path) for k, path in _JSON_USAGE.items()],
                    "allow_content_types": ["application/json"],
                },
            },
        },
        {
            "name": "envoy.filters.http.sse_to_metadata",
            "typed_config": {
                "@type": _T + "extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {
                    "content_parser": {
                        "name": "envoy.content_parsers.json",
                        "typed_config": {
                            "@type": _T + "extensions.content_parsers.json.v3.JsonContentParser",
                            "rules": [{"rule": _usage_rule(k, p)} for k, p in _SSE_USAGE],
                        },
                    },
                    "max_event_size": MAX_SSE_EVENT_BYTES,
                },
            },
        },
    ]


# A Chat stream whose usage the gateway asked for and the client did not: drop the usage chunk
# (no choices, a usage object) and the "usage": null member of every other chunk, as the
# events pass (no round trip to a worker). Events are cut at their blank line; an unfinished
# event waits for the next chunk (one the stream ends in without a blank line is dropped, as an
# SSE client drops it). Inside a JSON string quotes are escaped, so the patterns below only
# match a member name. The extractors read the stream before this (they come after it in the
# filter chain, and responses run the chain backwards).
_HIDE_USAGE = f"""
local function strip(event)
  if not string.find(event, '"usage"', 1, true) then
    return event
  end
  if string.find(event, '"usage"%s*:%s*{{') and string.find(event, '"choices"%s*:%s*%[%s*%]') then
    return ""
  end
  local out, n = string.gsub(event, ',%s*"usage"%s*:%s*null', '', 1)
  if n == 0 then
    out = string.gsub(event, '"usage"%s*:%s*null%s*,', '', 1)
  end
  return out
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get("{DECISION_METADATA}")
  if meta == nil or meta["{HIDE_USAGE_KEY}"] ~= true then
    return
  end
  local ctype = handle:headers():get("content-type") or ""
  if not string.find(ctype, "text/event-stream", 1, true) then
    return
  end
  local carry = ""
  for chunk in handle:bodyChunks() do
    local data = carry .. chunk:getBytes(0, chunk:length())
    local parts = {{}}
    local from = 1
    while true do
      local i, j = string.find(data, "\\n\\r?\\n", from)
      if i == nil then
        break
      end
      parts[#parts + 1] = strip(string.sub(data, from, j))
      from = j + 1
    end
    carry = string.sub(data, from)
    chunk:setBytes(table.concat(parts))
  end
end
"""


def _only_with_metadata(
    name: str, config: dict[str, Any], key: str, value: dict[str, Any]
) -> dict[str, Any]:
    """Filter ``name`` skipped by requests whose ``plano`` metadata has no ``key`` matching
    ``value`` (a ValueMatcher): it is only created for them. Envoy evaluates the match when
    the request reaches the filter, after the routing ext_proc wrote its metadata. Measured:
    each of the Lua and response-translation filters cost a pass-through request about as
    much while inert as the match does (docs/benchmarks.md)."""
    wanted = {
        "single_predicate": {
            "input": {
                "name": "envoy.matching.inputs.dynamic_metadata",
                "typed_config": {
                    "@type": _T
                    + "extensions.matching.common_inputs.network.v3.DynamicMetadataInput",
                    "filter": DECISION_METADATA,
                    "path": [{"key": key}],
                },
            },
            "custom_match": {
                "name": "envoy.matching.matchers.metadata_matcher",
                "typed_config": {
                    "@type": _T + "extensions.matching.input_matchers.metadata.v3.Metadata",
                    "value": value,
                },
            },
        }
    }
    return _skipped_unless(name, config, wanted)


# The routing stream's modes. FULL_DUPLEX_STREAMED: Envoy sends the body as it arrives without
# waiting for the header reply and holds the headers until it comes; the worker answers
# headers and body together once it has the whole body: one round trip and one wake-up of
# each side per request instead of two (measured in docs/benchmarks.md). Envoy neither
# buffers nor bounds the body in this mode (the worker enforces max_request_bytes), has no
# per-message timeout (the listener's timeouts bound a stream), and needs trailers SEND.
ROUTING_PROCESSING_MODE = {
    "request_header_mode": "SEND",
    "request_body_mode": "FULL_DUPLEX_STREAMED",
    "request_trailer_mode": "SEND",
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}


def routing_headers(config: Config) -> list[str]:
    """The request headers Envoy forwards to the routing stream (ext_proc ``forward_rules``)."""
    names = set(ROUTING_REQUEST_HEADERS)
    if config.session_cache.tenant_header:
        names.add(config.session_cache.tenant_header.lower())
    for provider in config.providers:  # the client's copies travel in a failover plan
        names.update(k.lower() for k, _ in provider.headers)
    names.update(limit.header.lower() for limit in config.ratelimits)
    return sorted(names)


def _content_length_filter() -> dict[str, Any]:
    """``content-length`` for the upstream request, from the routing stream's metadata: Envoy
    removes it from a full-duplex request and ignores the ext_proc's, and a provider on
    HTTP/1.1 would otherwise get a chunked body."""
    length = f"%DYNAMIC_METADATA({DECISION_METADATA}:{LENGTH_KEY})%"
    return {
        "name": CONTENT_LENGTH_FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [
                    {
                        "append": {
                            "header": {"key": "content-length", "value": length},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ]
            },
        },
    }


def _hide_usage_filter() -> dict[str, Any]:
    lua = {
        "@type": _T + "extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": _HIDE_USAGE},
    }
    return _only_with_metadata(HIDE_USAGE_FILTER, lua, HIDE_USAGE_KEY, {"bool_match": True})


def _usage_log() -> dict[str, Any]:
    """One record per proxied request (the routing stream named a model), sent by Envoy's
    OpenTelemetry access logger to the ext_proc workers in batches (OTLP LogsService/Export):
    the request's facts (``plano`` metadata), the usage counters and Envoy's own timings. No
    per-request gRPC stream, nothing a request waits for; the worker keeps the metrics."""

    def meta(namespace: str, key: str) -> str:
        return f"%DYNAMIC_METADATA({namespace}:{key})%"

    formats = {
        API_KEY: meta(DECISION_METADATA, API_KEY),
        MODEL_KEY: meta(DECISION_METADATA, MODEL_KEY),
        ROUTE_KEY: meta(DECISION_METADATA, ROUTE_KEY),
        REQUESTED_KEY: meta(DECISION_METADATA, REQUESTED_KEY),
        PINNED_KEY: meta(DECISION_METADATA, PINNED_KEY),
        USAGE_KEY: meta(DECISION_METADATA, USAGE_KEY),
        RATELIMIT_KEY: meta(DECISION_METADATA, RATELIMIT_KEY),
        # The whole namespace as one JSON object: measured 8x cheaper for Envoy to format
        # (and for the worker to read) than one attribute per counter.
        LOG_USAGE: f"%DYNAMIC_METADATA({USAGE_METADATA})%",
        LOG_STATUS: "%RESPONSE_CODE%",
        LOG_ATTEMPTS: "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        LOG_DURATION_US: "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
        # A client that closes a stream once it has [DONE] can leave DS_TX_END unset.
        LOG_DURATION_MS: "%DURATION%",
        LOG_BODY_US: "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:us)%",
        LOG_CONTENT_TYPE: "%RESP(CONTENT-TYPE):64%",
        LOG_REQUEST_ID: "%REQ(X-REQUEST-ID):128%",
        LOG_TRACEPARENT: "%REQ(TRACEPARENT):64%",
    }
    return {
        "name": "envoy.access_loggers.open_telemetry",
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": DECISION_METADATA,
                    "path": [{"key": MODEL_KEY}],
                    "value": {"present_match": True},
                },
                "match_if_key_not_found": False,
            }
        },
        "typed_config": {
            "@type": _T
            + "extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig",
            "log_name": USAGE_LOG_NAME,
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
            "buffer_flush_interval": "0.5s",
            "buffer_size_bytes": 65536,
            "disable_builtin_labels": True,
            # One string, a line per field (names.LOG_FIELDS), instead of an attribute per
            # field: Envoy builds one value instead of 16 key-value messages and the worker
            # splits one string (bench/usage_record.py).
            "body": {"string_value": "\n".join(formats[k] for k in LOG_FIELDS)},
        },
    }


def _response_filter() -> dict[str, Any]:
    """The response-translation ext_proc: same cluster, inert unless a translated route turns
    its response headers on. No gRPC timeout: its stream lives as long as the answer (a
    grpc-timeout would let the server cancel a long stream). It receives the request's
    translation context (``plano`` metadata, key ``tx``) with the response headers; requests
    without that context skip it."""
    ext_proc = {
        "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
        # Its own counters: http.plano.ext_proc.response_translation.streams_started etc.
        "stat_prefix": "response_translation",
        "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
        "failure_mode_allow": False,
        "allow_mode_override": True,
        # Receives: usage it hid from a Chat client (``u``), for the usage record.
        "metadata_options": {
            "forwarding_namespaces": {"untyped": [DECISION_METADATA]},
            "receiving_namespaces": {"untyped": [DECISION_METADATA]},
        },
        "message_timeout": "10s",
        "processing_mode": dict(_INERT_MODES),
    }
    return _only_with_metadata(RESPONSE_FILTER, ext_proc, TX_KEY, {"present_match": True})


def render_bootstrap(
    config: Config,
    *,
    extproc: list[tuple[str, int]],
    admin_port: int = 9901,
    listen_address: str | None = None,
    listen_port: int | None = None,
    access_log: bool = False,
) -> dict[str, Any]:
    lc = config.listener
    timeout = _duration(lc.timeout_seconds)
    message_timeout = _duration(10.0 + 2 * config.router.timeout_ms / 1000.0)
    common: dict[str, Any] = {"idle_timeout": "300s", "max_headers_count": 100}
    if lc.max_stream_duration_seconds:
        common["max_stream_duration"] = _duration(lc.max_stream_duration_seconds)
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "plano",
        "codec_type": "AUTO",
        # Slow clients are cut (item 6): headers, then the whole request, must arrive in time;
        # a stream that is still moving is never cut by `timeout` (item 10).
        "stream_idle_timeout": timeout,
        "request_headers_timeout": _duration(lc.request_headers_timeout_seconds),
        "request_timeout": _duration(lc.request_timeout_seconds),
        "common_http_protocol_options": common,
        "max_request_headers_kb": lc.max_request_headers_kb,
        "http2_protocol_options": {
            "max_concurrent_streams": lc.max_concurrent_streams,
            # Envoy's 256 MiB defaults let one client park that much per stream.
            "initial_stream_window_size": 1 << 20,
            "initial_connection_window_size": 4 << 20,
        },
        "route_config": {
            "name": "plano_routes",
            "virtual_hosts": [
                {
                    "name": "plano",
                    "domains": ["*"],
                    "routes": _routes(config, timeout),
                    # x-envoy-attempt-count on each attempt: the failover slot it reads.
                    "include_request_attempt_count": True,
                }
            ],
        },
        "local_reply_config": _local_reply_config(config),
        "http_filters": [
            {
                # Strip a client-sent routing header before anything reads the route.
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {
                        "request_mutations": [
                            {"remove": name}
                            for name in (
                                ROUTE_HEADER,
                                TRANSLATE_HEADER,
                                *(slot_header(k) for k in range(MAX_SLOTS)),
                                *ENVOY_CONTROL_HEADERS,
                            )
                        ]
                    },
                },
            },
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
                        "timeout": "60s",
                    },
                    "failure_mode_allow": False,
                    "allow_mode_override": True,
                    # The decision the ext_proc reports (response headers, span tags).
                    "metadata_options": {"receiving_namespaces": {"untyped": [DECISION_METADATA]}},
                    # The failover plan sets Envoy's attempt count and retry cap.
                    "mutation_rules": {"allow_envoy": True, "allow_all_routing": True},
                    "message_timeout": message_timeout,
                    "processing_mode": dict(ROUTING_PROCESSING_MODE),
                    "forward_rules": {
                        "allowed_headers": {
                            "patterns": [{"exact": h} for h in routing_headers(config)]
                        }
                    },
                },
            },
            _content_length_filter(),
            _hide_usage_filter(),
            *_usage_extractors(),
            _response_filter(),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if config.tracing is not None:
        hcm["tracing"] = _tracing(config.tracing)
    hcm["access_log"] = [_usage_log()]
    if access_log:
        hcm["access_log"] += [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": _T + "extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "[%START_TIME%] %REQ(:METHOD)% "
                            "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% "
                            "%RESPONSE_CODE_DETAILS% upstream=%UPSTREAM_CLUSTER% "
                            "%DURATION%ms request_id=%REQ(X-REQUEST-ID)%\n"
                        }
                    },
                },
            }
        ]
    clusters = [_extproc_cluster(extproc, lc.max_concurrent_requests)]
    for p in _one_per_cluster(config):
        clusters.append(_provider_cluster(p, config))
        if failover_on(config):
            clusters += _failover_clusters(clusters[-1])
    clusters.append(
        {
            "name": NO_UPSTREAM_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": NO_UPSTREAM_CLUSTER, "endpoints": []},
            "circuit_breakers": circuit_breakers(lc.max_concurrent_requests),
        }
    )
    if config.tracing is not None:
        clusters.append(_otel_cluster(config.tracing))
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "overload_manager": overload_manager(config),
        "static_resources": {
            "listeners": [
                {
                    "name": "model_listener",
                    "address": _address(
                        listen_address or lc.address, listen_port if listen_port else lc.port
                    ),
                    "per_connection_buffer_limit_bytes": lc.max_request_bytes,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def render_yaml(bootstrap: dict[str, Any]) -> str:
    return yaml.safe_dump(bootstrap, sort_keys=False, width=100)
