"""Render the Envoy bootstrap for a config: listener, ext_proc filter, routes and clusters.

Design points (measured in the reference notes, B1):
- the upstream is chosen by a header the ext_proc sets (``x-plano-upstream``) with
  ``clear_route_cache``; a header_mutation filter in front strips any client copy, so when
  the ext_proc did not run, no provider route can match and no client credential leaves;
- ``message_timeout`` is far above Envoy's 200 ms default and above the router timeout;
- the listener buffer limit bounds BUFFERED bodies; beyond it Envoy answers a JSON 413;
- host rewrite is done per route (``host_rewrite_literal``), TLS clusters set SNI;
- the ext_proc cluster speaks HTTP/2 with keepalive pings the server is configured to accept.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from typing import Any

import yaml

from plano_extproc.config import Config, Provider, TracingConfig
from plano_extproc.rewrite import ROUTE_HEADER

EXTPROC_CLUSTER = "plano_extproc"
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


def _provider_cluster(p: Provider, config: Config) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": p.cluster,
        **_discovery(p.host, "LOGICAL_DNS"),
        "connect_timeout": _duration(config.connect_timeout_seconds),
        "lb_policy": "ROUND_ROBIN",
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


def _extproc_cluster(endpoints: list[tuple[str, int]]) -> dict[str, Any]:
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
    }


OTEL_CLUSTER = "plano_otel_collector"
DECISION_METADATA = "plano"  # dynamic-metadata namespace the ext_proc fills with its decision
MODEL_HEADER = "x-plano-model"  # response headers telling the client what served it
ROUTE_RESPONSE_HEADER = "x-plano-route"


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
    tags += [from_metadata("plano.route.name", "route"), from_metadata("llm.model", "model")]
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


def _json_reply(status: int, type_: str, message: str) -> dict[str, Any]:
    return {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": f"plano.reply_{status}"},
                }
            }
        },
        "body_format_override": {
            "json_format": {"error": {"type": type_, "message": message}},
            "content_type": "application/json",
        },
    }


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
    for p in _one_per_cluster(config):
        action: dict[str, Any] = {
            "cluster": p.cluster,
            "timeout": timeout,
            "host_rewrite_literal": p.authority,
        }
        if config.listener.max_retries:
            action["retry_policy"] = {
                "retry_on": "5xx,connect-failure,refused-stream,reset,retriable-status-codes",
                "retriable_status_codes": [429, 500, 502, 503, 504],
                "num_retries": config.listener.max_retries,
                "per_try_timeout": "30s",
                "retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"},
            }
        routes.append(
            {
                "name": f"to_{p.cluster}",
                "match": {
                    "prefix": "/",
                    "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": p.cluster}}],
                },
                "route": action,
                "request_headers_to_remove": [ROUTE_HEADER],
                "response_headers_to_add": [
                    {
                        "header": {
                            "key": name,
                            "value": f"%DYNAMIC_METADATA({DECISION_METADATA}:{key})%",
                        },
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        "keep_empty_value": False,
                    }
                    for name, key in ((MODEL_HEADER, "model"), (ROUTE_RESPONSE_HEADER, "route"))
                ],
            }
        )
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
    mb = lc.max_request_bytes / (1024 * 1024)
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "plano",
        "codec_type": "AUTO",
        "stream_idle_timeout": timeout,
        "request_timeout": "0s",
        "common_http_protocol_options": {"idle_timeout": "300s"},
        "route_config": {
            "name": "plano_routes",
            "virtual_hosts": [
                {"name": "plano", "domains": ["*"], "routes": _routes(config, timeout)}
            ],
        },
        "local_reply_config": {
            "mappers": [
                _json_reply(
                    413,
                    "request_too_large",
                    f"request body exceeds the gateway limit of {mb:g} MiB",
                ),
            ]
        },
        "http_filters": [
            {
                # Strip a client-sent routing header before anything reads the route.
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"remove": ROUTE_HEADER}]},
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
                    "message_timeout": message_timeout,
                    "processing_mode": {
                        "request_header_mode": "SEND",
                        "request_body_mode": "BUFFERED",
                        "request_trailer_mode": "SKIP",
                        "response_header_mode": "SKIP",
                        "response_body_mode": "NONE",
                        "response_trailer_mode": "SKIP",
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if config.tracing is not None:
        hcm["tracing"] = _tracing(config.tracing)
    if access_log:
        hcm["access_log"] = [
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
    clusters = [_extproc_cluster(extproc)]
    clusters += [_provider_cluster(p, config) for p in _one_per_cluster(config)]
    if config.tracing is not None:
        clusters.append(_otel_cluster(config.tracing))
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _T + "extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
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
