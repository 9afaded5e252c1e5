"""Plano v0.4 configuration: YAML → validated, normalised, immutable ``Config``.

Structure is checked by pydantic models (unknown keys rejected, as Plano's schema does);
cross-field rules (reference §1) run afterwards and every problem is reported with its YAML
path and what to do, all at once, so a user fixes a config in one pass.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from plano_extproc.names import MAX_SLOTS
from plano_extproc.providers import (
    PROVIDER_INTERFACES,
    PROVIDERS,
    canonical_provider,
    default_prefix_for,
)
from plano_extproc.routing.base import RoutePreference

log = logging.getLogger("plano_extproc.config")

SUPPORTED_VERSIONS = ("v0.1", "v0.1.0", "0.1-beta", "0.2.0", "v0.3.0", "v0.4.0")
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_REQUEST_HEADERS_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_CONCURRENT_REQUESTS = 4096
DEFAULT_MAX_CONCURRENT_STREAMS = 128
DEFAULT_MAX_REQUEST_HEADERS_KB = 60
DEFAULT_MAX_HEAP_BYTES = 1 << 30
# Envoy holds a request body a few times over (buffer, ext_proc message, mutated body).
HEAP_PER_REQUEST_BODY = 4


class ConfigError(Exception):
    """All problems found in one config, each as ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------- raw schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RawListener(_Strict):
    name: str
    type: Literal["model", "prompt", "agent"]
    port: int | None = Field(default=None, ge=1, le=65535)
    address: str | None = None
    timeout: str | None = None
    router: Literal["plano_orchestrator_v1"] | None = None
    max_retries: int | None = Field(default=None, ge=0, le=10)
    agents: list[Any] | None = None
    input_filters: list[Any] | None = None
    output_filters: list[Any] | None = None
    # plano-extproc extension: largest request body accepted (a larger one gets a JSON 413).
    max_request_bytes: int | None = Field(default=None, ge=1024, le=1 << 30)
    # plano-extproc extensions: Envoy's limits (defaults in ListenerConfig).
    request_headers_timeout: str | None = None
    request_timeout: str | None = None
    max_stream_duration: str | None = None
    max_connections: int | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent_streams: int | None = Field(default=None, ge=1, le=65_536)
    max_request_headers_kb: int | None = Field(default=None, ge=1, le=8192)
    max_heap_bytes: int | None = Field(default=None, ge=64 << 20, le=1 << 40)


class RawLegacyListener(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    address: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    message_format: str | None = None
    timeout: str | None = None


class RawPrefInline(_Strict):
    name: str
    description: str


class RawProvider(_Strict):
    model: str
    name: str | None = None
    # Secrets stay out of repr() by construction (logs, tracebacks, debuggers).
    access_key: str | None = Field(default=None, repr=False)
    default: bool = False
    base_url: str | None = None
    provider_interface: str | None = None
    passthrough_auth: bool = False
    http_host: str | None = None
    headers: dict[str, str] | None = Field(default=None, repr=False)
    routing_preferences: list[RawPrefInline] | None = None


class RawAlias(_Strict):
    target: str


class RawSelectionPolicy(_Strict):
    prefer: Literal["cheapest", "fastest", "none", ""] | None = None


class RawRoutingPreference(_Strict):
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    selection_policy: RawSelectionPolicy | None = None
    # plano-extproc extension: example utterances for the embedded router.
    examples: list[str] | None = None


class RawSessionCache(_Strict):
    type: Literal["memory", "redis"] = "memory"
    url: str | None = Field(default=None, repr=False)  # may carry the Redis password
    tenant_header: str | None = None
    # plano-extproc extension: keep known Redis pins in memory until their expiry (0 = off).
    near_cache_seconds: float = Field(default=30.0, ge=0.0, le=3600.0)


class RawRouter(_Strict):
    """plano-extproc extension: which router classifies intent."""

    type: Literal["embedded", "orchestrator", "none"] | None = None
    model: str | None = None
    prompt: Literal["plano_orchestrator_v1", "arch_router_v1"] | None = None
    timeout_ms: int = Field(default=3000, ge=10, le=120_000)
    threshold: float | None = Field(default=None, ge=-2.0, le=2.0)
    margin: float | None = Field(default=None, ge=-2.0, le=2.0)
    threads: int = Field(default=2, ge=1, le=64)  # embedded: deciding threads per worker


class RawSelector(_Strict):
    key: str = Field(min_length=1)
    value: str | None = None  # "*" or absent: one budget per distinct value of the header


class RawLimit(_Strict):
    tokens: int = Field(ge=1, le=10**12)
    unit: Literal["second", "minute", "hour", "day"]


class RawRateLimit(_Strict):
    model: str = Field(min_length=1)
    selector: RawSelector
    limit: RawLimit


class RawFailover(_Strict):
    """plano-extproc extension: failover across a routed request's models (on by default)."""

    enabled: bool = True
    max_attempts: int = Field(default=3, ge=1, le=MAX_SLOTS)
    on_status: list[int] | None = None  # None: 429 and every 5xx
    attempt_timeout: str | None = None
    cooldown_default: str | None = None
    cooldown_max: str | None = None
    eject_after_failures: int = Field(default=3, ge=1, le=1000)
    eject_for: str | None = None


class RawRouting(_Strict):
    session_ttl_seconds: int = Field(default=600, ge=1)
    session_max_entries: int = Field(default=10000, ge=1)
    session_cache: RawSessionCache | None = None
    routing_budget: dict[str, Any] | None = None
    route_on_user_only: bool = False
    llm_provider: str | None = None
    model: str | None = None
    router: RawRouter | None = None
    failover: RawFailover | None = None


class RawSpanAttributes(_Strict):
    header_prefixes: list[str] | None = None
    static: dict[str, str] | None = None


class RawTracing(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    random_sampling: int = Field(default=0, ge=0, le=100)
    trace_arch_internal: bool | None = None
    opentracing_grpc_endpoint: str | None = None
    span_attributes: RawSpanAttributes | None = None
    exporters: list[Any] | None = None


class RawOverrides(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    llm_routing_model: str | None = None
    agent_orchestration_model: str | None = None
    orchestrator_model_context_length: int = Field(default=8192, ge=256)
    upstream_connect_timeout: str | None = None
    upstream_tls_ca_path: str | None = None


class RawMetricsSource(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["cost", "latency"]
    provider: str
    url: str | None = None
    query: str | None = None
    refresh_interval: int | None = Field(default=None, ge=1)
    model_aliases: dict[str, str] | None = None


class RawConfig(_Strict):
    version: str
    listeners: list[RawListener] | dict[str, RawLegacyListener]
    model_providers: list[RawProvider] | None = None
    llm_providers: list[RawProvider] | None = None
    model_aliases: dict[str, RawAlias] | None = None
    routing_preferences: list[RawRoutingPreference] | None = None
    model_metrics_sources: list[RawMetricsSource] | None = None
    routing: RawRouting | None = None
    overrides: RawOverrides | None = None
    # Accepted for compatibility with Plano configs; not used by this gateway.
    prompt_caching: Any = None
    tracing: RawTracing | None = None
    agents: Any = None
    filters: Any = None
    endpoints: Any = None
    prompt_targets: Any = None
    system_prompt: Any = None
    prompt_guards: Any = None
    ratelimits: list[RawRateLimit] | None = None
    state_storage: Any = None
    mode: Any = None

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v not in SUPPORTED_VERSIONS:
            raise ValueError(f"must be one of {', '.join(SUPPORTED_VERSIONS)} (got {v!r})")
        return v


# --------------------------------------------------------------------------- normalised form


@functools.lru_cache(maxsize=4096)  # read on every routed request (failover slots)
def _cluster_name(interface: str, host: str, port: int, http_host: str | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9]+", "_", host).strip("_")
    name = f"{interface}_{safe}_{port}"
    if http_host:
        name += "_" + re.sub(r"[^A-Za-z0-9]+", "_", http_host).strip("_")
    return name


@dataclass(frozen=True, slots=True)
class Provider:
    """A configured model endpoint. ``name`` is the user-facing ``provider/model`` string."""

    name: str
    model: str  # full "provider/id" as written
    model_id: str  # id sent upstream
    interface: str  # canonical provider prefix / provider_interface
    scheme: str
    host: str
    port: int
    path_prefix: str
    access_key: str | None = field(repr=False)  # never in repr(): logs and tracebacks show it
    passthrough_auth: bool
    headers: tuple[tuple[str, str], ...] = field(repr=False)  # may carry credentials too
    is_default: bool
    wildcard: bool
    http_host: str | None = None  # Host header override (base_url still gives the address)
    custom_endpoint: bool = False  # base_url given: keyless upstreams (Ollama, vLLM) are fine

    access_key_env: str | None = None  # the $VAR its access_key came from, for error hints

    @property
    def access_key_hint(self) -> str:
        if self.access_key_env:
            return f"export {self.access_key_env}=<key> and restart the gateway"
        return f"set access_key for {self.name} in model_providers"

    @property
    def cluster(self) -> str:
        """Envoy cluster name: one per (scheme, host, port) endpoint."""
        return _cluster_name(self.interface, self.host, self.port, self.http_host)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        if self.http_host:
            return self.http_host
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def with_model_id(self, model_id: str) -> Provider:
        from dataclasses import replace

        # The prefix as configured (vllm/*, google/*), so the name resolves back to this wildcard.
        name = f"{self.model.split('/', 1)[0]}/{model_id}"
        return replace(self, model_id=model_id, name=name, model=name, wildcard=False)


@dataclass(frozen=True, slots=True)
class SessionCacheConfig:
    type: Literal["memory", "redis"] = "memory"
    url: str | None = field(default=None, repr=False)  # may carry the Redis password
    tenant_header: str | None = None
    ttl_seconds: int = 600
    max_entries: int = 10000
    near_cache_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """Failover of a routed request across its route's models (``routing.failover``)."""

    enabled: bool = True
    max_attempts: int = 3  # attempts per request, at most one per candidate model
    # Statuses that move on to the next model; None: 429 and every 5xx (Anthropic's 529 too).
    # Connection failures, resets and the per-attempt timeout always do.
    on_status: tuple[int, ...] | None = None
    # No response byte for this long: the attempt is abandoned for the next model. It is an
    # idle timer: a stream that keeps sending is never cut or sent again. 0 = none.
    attempt_timeout_seconds: float = 60.0
    cooldown_default_seconds: float = 5.0  # a 429 without Retry-After
    cooldown_max_seconds: float = 60.0  # a Retry-After is honoured up to this
    # Failures (any reason) within 10 s before an ejection (plano_extproc.cooldown).
    eject_after_failures: int = 3
    eject_seconds: float = 30.0

    def retries_on(self, status: int) -> bool:
        if self.on_status is None:
            return status == 429 or 500 <= status <= 599
        return status in self.on_status


UNIT_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
# A header name (RFC 9110 token), lower-cased; pseudo-headers (":path") are not selectors.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]{1,128}$")


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """One ``ratelimits`` entry: ``tokens`` per ``unit`` for the requests ``models`` serve
    that carry header ``header`` (with ``value``; None: one budget per distinct value)."""

    model: str  # as written
    models: tuple[str, ...]  # the configured model names it applies to (Provider.name)
    header: str  # lower-case
    value: str | None
    tokens: int
    unit: str

    @property
    def window_seconds(self) -> float:
        return UNIT_SECONDS[self.unit]

    @property
    def label(self) -> str:
        """How logs, errors and metrics name the limit (configured text only)."""
        return f"{self.model} {self.header}={'*' if self.value is None else self.value}"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    type: Literal["embedded", "orchestrator", "none"] = "embedded"
    model: str | None = None  # orchestrator: the provider name serving the router LLM
    prompt: Literal["plano_orchestrator_v1", "arch_router_v1"] = "plano_orchestrator_v1"
    timeout_ms: int = 3000
    context_length: int = 8192
    threshold: float | None = None
    margin: float | None = None
    threads: int = 2
    explicit: bool = False  # the user chose the type (vs. the default)
    # The router LLM's endpoint when it is not a declared provider: Plano's hosted one (see
    # HOSTED_ROUTER_URL_ENV). Never listed in /v1/models and never a client-requestable model.
    hosted: Provider | None = None


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """The model listener and the limits Envoy enforces on it (issue 11: abusive clients are
    cut, overflow is a clear 503, memory is bounded; normal traffic keeps being served)."""

    address: str = "0.0.0.0"
    port: int = 12000
    # Idle limit of a stream (nothing sent or received for this long); 0 = none.
    timeout_seconds: float = 300.0
    max_retries: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_headers_timeout_seconds: float = DEFAULT_REQUEST_HEADERS_TIMEOUT
    # Time to receive the whole request (headers and body); 0 = none.
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT
    # Opt-in total limit of a stream, response included; None = none (idle time only).
    max_stream_duration_seconds: float | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Requests in flight to the ext_proc, and to each provider; beyond it a JSON 503.
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS  # per HTTP/2 connection
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB
    max_heap_bytes: int = DEFAULT_MAX_HEAP_BYTES


# selection_policy.prefer -> the model_metrics_sources type it ranks by.
PREFER_METRIC = {"cheapest": "cost", "fastest": "latency"}

COST_SOURCE_URLS = {
    "digitalocean": "https://api.digitalocean.com/v2/gen-ai/models/catalog",
    "models.dev": "https://models.dev/api.json",
}


@dataclass(frozen=True, slots=True)
class MetricsSourceConfig:
    """Where ``selection_policy.prefer`` gets its numbers (Plano's model_metrics_sources)."""

    type: Literal["cost", "latency"]
    provider: str  # cost: digitalocean | models.dev; latency: prometheus
    url: str
    query: str | None = None  # latency: the PromQL instant query
    refresh_seconds: int | None = None  # None: fetched once at start
    aliases: Mapping[str, str] = field(default_factory=dict)  # catalog key -> model name


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Envoy's OpenTelemetry tracer, from Plano's ``tracing`` block (off when sampling is 0)."""

    sampling_percent: int
    host: str  # OTLP/gRPC collector
    port: int
    static_tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    version: str
    listener: ListenerConfig
    providers: tuple[Provider, ...]
    aliases: Mapping[str, str]
    preferences: tuple[RoutePreference, ...]
    router: RouterConfig
    session_cache: SessionCacheConfig
    connect_timeout_seconds: float = 5.0
    tls_ca_path: str | None = None  # None: the system bundle (envoy_config.ca_bundle)
    warnings: tuple[str, ...] = field(default=())
    metrics_sources: tuple[MetricsSourceConfig, ...] = ()
    route_on_user_only: bool = False
    tracing: TracingConfig | None = None
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    ratelimits: tuple[RateLimitConfig, ...] = ()

    @property
    def default_provider(self) -> Provider | None:
        return next((p for p in self.providers if p.is_default), None)


# --------------------------------------------------------------------------- env substitution

_ENV_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


# Free text where "$WORD" is more likely prose (prices, shell snippets) than a variable:
# an unset variable there is left as written instead of failing the config.
_FREE_TEXT_KEYS = ("routing_preferences", "prompt_targets", "system_prompt", "prompt_guards")


def _substitute(value: str, path: str, env: Mapping[str, str], problems: list[str]) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` from the environment; a missing variable
    without a default is an error naming it (outside free text)."""
    free_text = path.startswith(_FREE_TEXT_KEYS)

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name in env:
            return env[name]
        if m.group(2) is not None:
            return m.group(2)
        if free_text:
            return m.group(0)
        problems.append(
            f"{path}: environment variable {name} is not set; export {name}=... before starting "
            f"(or write ${{{name}:-}} to allow it to be empty)"
        )
        return ""

    return _ENV_RE.sub(repl, value)


def _walk_substitute(node: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, str):
        return _substitute(node, path, env, problems) if "$" in node else node
    if isinstance(node, list):
        return [_walk_substitute(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {
            k: _walk_substitute(v, f"{path}.{k}" if path else str(k), env, problems)
            for k, v in node.items()
        }
    return node


# --------------------------------------------------------------------------- loading


_LISTENER_BRANCHES = ("list[RawListener]", "dict[str,RawLegacyListener]")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _LISTENER_BRANCHES:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _parse_duration(value: str | None, path: str, problems: list[str], default: float) -> float:
    if value is None:
        return default
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        problems.append(f"{path}: {value!r} is not a duration like '30s', '500ms' or '5m'")
        return default
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, *, keys_optional: bool = False
) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror or e}"]) from e
    return parse_config(text, env=env, source=str(path), keys_optional=keys_optional)


_UNSET_KEY = re.compile(r"^(?:model_providers|llm_providers)\[\d+\]\.access_key: environment")


def parse_config(
    text: str,
    env: Mapping[str, str] | None = None,
    source: str = "<config>",
    *,
    keys_optional: bool = False,
) -> Config:
    """``keys_optional``: unset access-key variables leave the key empty instead of failing
    (commands that call no provider, such as ``route``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: not valid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the config must be a YAML mapping at the top level"])
    problems: list[str] = []
    key_envs = _access_key_envs(data)
    data = _walk_substitute(data, "", os.environ if env is None else env, problems)
    if keys_optional:
        problems = [p for p in problems if not _UNSET_KEY.match(p)]
    try:
        raw = RawConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # ``listeners`` is a list or the legacy mapping: a problem inside one form makes
        # pydantic also report "not the other form", which is noise; keep one message.
        branch_errs = [r for r in errors if r["loc"] and r["loc"][-1] in _LISTENER_BRANCHES]
        real = [r for r in errors if r not in branch_errs]
        if branch_errs and not any(r["loc"][:1] == ("listeners",) for r in real):
            problems.append(
                "listeners: must be a list of listeners (or the legacy mapping with "
                "ingress_traffic/egress_traffic)"
            )
        for err in real:
            loc = _loc(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not part of the Plano v0.4 schema)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{loc}: {msg}")
        raise ConfigError([*problems]) from None
    cfg = _normalise(raw, problems, key_envs, os.environ if env is None else env)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", v.lstrip("v"))
    nums = [int(p) for p in parts[:3]]
    return tuple(nums + [0] * (3 - len(nums)))


def _listener(raw: RawConfig, problems: list[str]) -> ListenerConfig:
    if isinstance(raw.listeners, dict):
        legacy = raw.listeners.get("egress_traffic")
        return ListenerConfig(
            address=(legacy.address if legacy and legacy.address else "0.0.0.0"),
            port=(legacy.port if legacy and legacy.port else 12000),
            timeout_seconds=_parse_duration(
                legacy.timeout if legacy else None,
                "listeners.egress_traffic.timeout",
                problems,
                300.0,
            ),
        )
    models = [(i, li) for i, li in enumerate(raw.listeners) if li.type == "model"]
    if len(models) > 1:
        problems.append(f"listeners: only one model listener is allowed, found {len(models)}")
    if not models:
        return ListenerConfig()
    i, li = models[0]
    at = f"listeners[{i}]"
    max_request_bytes = li.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES
    heap_floor = HEAP_PER_REQUEST_BODY * max_request_bytes
    if li.max_heap_bytes is not None and li.max_heap_bytes < heap_floor:
        problems.append(
            f"{at}.max_heap_bytes: {li.max_heap_bytes} is below {HEAP_PER_REQUEST_BODY} x "
            f"max_request_bytes ({heap_floor}); Envoy could not hold one largest request"
        )
    max_stream = None
    if li.max_stream_duration is not None:
        max_stream = _parse_duration(
            li.max_stream_duration, f"{at}.max_stream_duration", problems, 0.0
        )
    return ListenerConfig(
        address=li.address or "0.0.0.0",
        port=li.port or 12000,
        timeout_seconds=_parse_duration(li.timeout, f"{at}.timeout", problems, 300.0),
        max_retries=li.max_retries,
        max_request_bytes=max_request_bytes,
        request_headers_timeout_seconds=_positive_duration(
            li.request_headers_timeout,
            f"{at}.request_headers_timeout",
            problems,
            DEFAULT_REQUEST_HEADERS_TIMEOUT,
        ),
        request_timeout_seconds=_parse_duration(
            li.request_timeout, f"{at}.request_timeout", problems, DEFAULT_REQUEST_TIMEOUT
        ),
        max_stream_duration_seconds=max_stream or None,
        max_connections=li.max_connections or DEFAULT_MAX_CONNECTIONS,
        max_concurrent_requests=li.max_concurrent_requests or DEFAULT_MAX_CONCURRENT_REQUESTS,
        max_concurrent_streams=li.max_concurrent_streams or DEFAULT_MAX_CONCURRENT_STREAMS,
        max_request_headers_kb=li.max_request_headers_kb or DEFAULT_MAX_REQUEST_HEADERS_KB,
        max_heap_bytes=li.max_heap_bytes or max(DEFAULT_MAX_HEAP_BYTES, heap_floor),
    )


def _positive_duration(value: str | None, path: str, problems: list[str], default: float) -> float:
    """A duration that cannot be switched off (0 would disable a protection)."""
    seconds = _parse_duration(value, path, problems, default)
    if seconds <= 0:
        problems.append(f"{path}: must be above 0 (e.g. '10s')")
        return default
    return seconds


def _http_endpoint(url: str, where: str, problems: list[str]) -> tuple[str, str, int, str] | None:
    """``(scheme, host, port, path without trailing /)`` of an http(s) URL, or None with the
    problem named at ``where``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: {url!r} must be an http:// or https:// URL with a host")
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        problems.append(f"{where}: {url!r} has an invalid port")
        return None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _provider(
    i: int, key: str, rp: RawProvider, problems: list[str], warnings: list[str]
) -> Provider | None:
    at = f"{key}[{i}]"
    if "/" not in rp.model:
        problems.append(
            f"{at}.model: invalid model name {rp.model!r}; use <provider>/<model_id> "
            "(e.g. openai/gpt-4o) or <provider>/* for wildcards"
        )
        return None
    prefix, model_id = rp.model.split("/", 1)
    if not prefix or not model_id:
        problems.append(f"{at}.model: {rp.model!r} needs both a provider and a model id")
        return None
    wildcard = model_id == "*"
    canonical = canonical_provider(prefix)
    spec = PROVIDERS.get(canonical)
    if spec is not None:
        interface = canonical
        if rp.provider_interface is not None:
            problems.append(
                f"{at}.provider_interface: not allowed for the built-in provider {prefix!r}; "
                "remove it (provider_interface is only for custom provider prefixes)"
            )
        if spec.requires_base_url and not rp.base_url:
            problems.append(
                f"{at}.base_url: provider {prefix!r} requires 'base_url' to be set for "
                f"model {rp.model}"
            )
            return None
    else:
        if not rp.base_url or not rp.provider_interface:
            problems.append(
                f"{at}: unknown provider {prefix!r}; custom providers need both 'base_url' and "
                f"'provider_interface' (one of {', '.join(sorted(PROVIDER_INTERFACES))})"
            )
            return None
        if rp.provider_interface not in PROVIDER_INTERFACES:
            problems.append(
                f"{at}.provider_interface: {rp.provider_interface!r} is not one of "
                f"{', '.join(sorted(PROVIDER_INTERFACES))}"
            )
            return None
        interface = rp.provider_interface
    base = rp.base_url or (spec.default_base_url if spec else None)
    assert base is not None
    endpoint = _http_endpoint(base, f"{at}.base_url", problems)
    if endpoint is None:
        return None
    scheme, host, port, path = endpoint
    # A base_url path replaces the provider's default API prefix; without one the default stays.
    prefix_path = path if path else default_prefix_for(interface)
    if wildcard and rp.default:
        problems.append(f"{at}.default: a wildcard provider ({rp.model}) cannot be the default")
    if wildcard and rp.routing_preferences:
        problems.append(f"{at}.routing_preferences: a wildcard provider cannot carry preferences")
    key_value = rp.access_key or None
    # ChatGPT's backend takes the user's own ChatGPT sign-in token, never a shared key: Plano
    # forwards the client's credentials for it, and so do we (with Codex's originator header).
    passthrough = rp.passthrough_auth or interface == "chatgpt"
    if passthrough and key_value:
        warnings.append(
            f"{at}: passthrough_auth is set, so access_key is ignored (the client's key is used)"
            if rp.passthrough_auth
            else f"{at}: chatgpt uses each client's own ChatGPT credentials; access_key is ignored"
        )
        key_value = None
    headers = tuple((k.lower(), v) for k, v in (rp.headers or {}).items())
    if interface == "chatgpt" and "originator" not in dict(headers):
        headers += (("originator", "codex_cli_rs"),)
    return Provider(
        name=rp.name or rp.model,
        model=rp.model,
        model_id=model_id,
        interface=interface,
        scheme=scheme,
        host=host,
        port=port,
        path_prefix=prefix_path,
        access_key=key_value,
        passthrough_auth=passthrough,
        headers=headers,
        is_default=rp.default,
        wildcard=wildcard,
        http_host=rp.http_host,
        custom_endpoint=rp.base_url is not None,
    )


def _access_key_envs(data: dict[str, Any]) -> list[str | None]:
    """The environment variable each provider's access_key names (before substitution)."""
    items = data.get("model_providers") or data.get("llm_providers") or []
    out: list[str | None] = []
    for item in items if isinstance(items, list) else []:
        raw = item.get("access_key") if isinstance(item, dict) else None
        m = _ENV_RE.search(raw) if isinstance(raw, str) else None
        out.append((m.group(1) or m.group(3)) if m else None)
    return out


def _normalise(
    raw: RawConfig,
    problems: list[str],
    key_envs: list[str | None] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config | None:
    warnings: list[str] = []
    if raw.model_providers is not None and raw.llm_providers is not None:
        problems.append(
            "llm_providers: Please provide either llm_providers or model_providers, not both "
            "(llm_providers is the legacy name)"
        )
    key = "model_providers" if raw.model_providers is not None else "llm_providers"
    raw_providers = raw.model_providers or raw.llm_providers or []
    if not raw_providers:
        problems.append(
            f"{key}: declare at least one provider (e.g. - model: openai/gpt-4o-mini with "
            "access_key: $OPENAI_API_KEY); a gateway without models cannot serve anything"
        )
    listener = _listener(raw, problems)

    providers: list[Provider] = []
    seen_names: dict[str, int] = {}
    seen_models: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for i, rp in enumerate(raw_providers):
        p = _provider(i, key, rp, problems, warnings)
        if p is None:
            continue
        if key_envs and i < len(key_envs) and key_envs[i]:
            p = replace(p, access_key_env=key_envs[i])
        dup_model = p.model in seen_models
        for table, value, what in (
            (seen_names, p.name, "name"),
            (seen_models, p.model, "model"),
        ):
            if value in table:
                problems.append(
                    f"{key}[{i}].{what}: duplicate {what} {value!r} "
                    f"(already used by {key}[{table[value]}])"
                )
            table[value] = i
        if not p.wildcard:
            if p.model_id in seen_ids and not dup_model:
                problems.append(
                    f"{key}[{i}].model: duplicate model id {p.model_id!r} "
                    f"(already used by {key}[{seen_ids[p.model_id]}])"
                )
            seen_ids.setdefault(p.model_id, i)
        providers.append(p)
    defaults = [p.name for p in providers if p.is_default]
    if len(defaults) > 1:
        problems.append(
            f"{key}: There must be at most one default LLM Provider (found {', '.join(defaults)})"
        )

    lookup = {p.name: p for p in providers} | {p.model: p for p in providers}
    lookup |= {p.model_id: p for p in providers if not p.wildcard}

    aliases: dict[str, str] = {}
    for alias, target in (raw.model_aliases or {}).items():
        if target.target not in lookup:
            problems.append(
                f"model_aliases.{alias}.target: {target.target!r} is not defined as a model. "
                f"Available models: {', '.join(p.name for p in providers) or '(none)'}"
            )
        else:
            aliases[alias] = lookup[target.target].name

    version = _version_tuple(raw.version)
    if raw.routing_preferences and version < (0, 4, 0):
        problems.append(
            "routing_preferences: top-level routing_preferences requires version v0.4.0 or "
            "above. Update the version field or remove routing_preferences."
        )

    prefs = _preferences(raw, key, providers, lookup, problems, warnings)
    metrics_sources = _metrics_sources(raw, problems)
    tracing = _tracing(raw.tracing, env or {}, problems, warnings)

    routing = raw.routing or RawRouting()
    cache_raw = routing.session_cache or RawSessionCache()
    if cache_raw.type == "redis":
        if not cache_raw.url:
            problems.append(
                "routing.session_cache.url: required when type is redis "
                "(e.g. redis://localhost:6379/0)"
            )
        elif urlsplit(cache_raw.url).scheme not in ("redis", "rediss"):
            problems.append(
                "routing.session_cache.url: must start with redis:// or rediss:// (got "
                f"{urlsplit(cache_raw.url).scheme or 'no'} scheme)"
            )
    max_entries = routing.session_max_entries
    if max_entries > 10000:
        warnings.append(f"routing.session_max_entries: {max_entries} clamped to 10000")
        max_entries = 10000
    session = SessionCacheConfig(
        type=cache_raw.type,
        url=cache_raw.url,
        tenant_header=cache_raw.tenant_header.lower() if cache_raw.tenant_header else None,
        ttl_seconds=routing.session_ttl_seconds,
        max_entries=max_entries,
        near_cache_seconds=cache_raw.near_cache_seconds,
    )
    if routing.routing_budget is not None:
        warnings.append("routing.routing_budget: not supported by plano-extproc yet; ignored")
    # Plano features outside routing: accepted so a Plano config loads unchanged, but say so,
    # since a user may rely on them (rate limits, guards) and nothing here enforces them.
    for key in _IGNORED_FEATURES:
        if getattr(raw, key) not in (None, [], {}):
            warnings.append(f"{key}: not supported by plano-extproc; ignored")

    overrides = raw.overrides or RawOverrides()
    router = _router(
        routing.router,
        overrides,
        providers,
        lookup,
        problems,
        warnings,
        os.environ if env is None else env,  # an explicit empty env stays empty
    )
    connect_timeout = _parse_duration(
        overrides.upstream_connect_timeout, "overrides.upstream_connect_timeout", problems, 5.0
    )
    failover = _failover(routing.failover, listener, problems)
    ratelimits = _ratelimits(raw, providers, aliases, problems)
    for w in warnings:
        log.warning("%s", w)
    if problems:
        return None
    return Config(
        version=raw.version,
        listener=listener,
        providers=tuple(providers),
        aliases=aliases,
        preferences=tuple(prefs),
        router=router,
        session_cache=session,
        connect_timeout_seconds=connect_timeout,
        tls_ca_path=overrides.upstream_tls_ca_path or None,
        warnings=tuple(warnings),
        metrics_sources=tuple(metrics_sources),
        route_on_user_only=routing.route_on_user_only,
        tracing=tracing,
        failover=failover,
        ratelimits=ratelimits,
    )


def _ratelimits(
    raw: RawConfig,
    providers: list[Provider],
    aliases: Mapping[str, str],
    problems: list[str],
) -> tuple[RateLimitConfig, ...]:
    """Plano's ``ratelimits``, each tied to the configured models it names: a model name,
    its ``provider/model`` or bare id, an alias, or a name a ``provider/*`` entry serves."""
    out: list[RateLimitConfig] = []
    seen: dict[tuple[tuple[str, ...], str, str | None], int] = {}
    wild = {canonical_provider(p.model.split("/", 1)[0]) for p in providers if p.wildcard}
    for i, rl in enumerate(raw.ratelimits or []):
        at = f"ratelimits[{i}]"
        target = aliases.get(rl.model, rl.model)
        models = tuple(
            dict.fromkeys(
                p.name
                for p in providers
                if not p.wildcard and target in (p.name, p.model, p.model_id)
            )
        )
        if not models and "/" in target:
            prefix, model_id = target.split("/", 1)
            if canonical_provider(prefix) in wild and model_id and model_id != "*":
                models = (target,)
        if not models:
            names = ", ".join(p.name for p in providers) or "none"
            problems.append(
                f"{at}.model: {rl.model!r} is not a configured model (configured: {names})"
            )
            continue
        header = rl.selector.key.strip().lower()
        if not _HEADER_NAME.match(header):
            problems.append(f"{at}.selector.key: {rl.selector.key!r} is not an HTTP header name")
            continue
        value = rl.selector.value
        if value == "*":
            value = None
        elif value is not None and (not value or value != value.strip() or len(value) > 1024):
            problems.append(
                f"{at}.selector.value: give the header's exact value (no surrounding spaces, "
                "at most 1024 characters), or '*' for one budget per distinct value"
            )
            continue
        twin = seen.setdefault((models, header, value), i)
        if twin != i:
            problems.append(
                f"{at}.selector: ratelimits[{twin}] already limits {rl.model!r} on "
                f"{header}={'*' if value is None else value}"
            )
            continue
        out.append(
            RateLimitConfig(
                model=rl.model,
                models=models,
                header=header,
                value=value,
                tokens=rl.limit.tokens,
                unit=rl.limit.unit,
            )
        )
    return tuple(out)


def _failover(
    raw: RawFailover | None, listener: ListenerConfig, problems: list[str]
) -> FailoverConfig:
    raw = raw or RawFailover()
    at = "routing.failover"
    on_status: tuple[int, ...] | None = None
    if raw.on_status is not None:
        bad = [c for c in raw.on_status if not (400 <= c <= 599)]
        if bad or not raw.on_status:
            problems.append(
                f"{at}.on_status: list HTTP statuses from 400 to 599 (got {raw.on_status!r})"
            )
        on_status = tuple(sorted(set(raw.on_status)))
    d = FailoverConfig()
    attempt = _parse_duration(
        raw.attempt_timeout, f"{at}.attempt_timeout", problems, d.attempt_timeout_seconds
    )
    if raw.attempt_timeout is None and 0 < listener.timeout_seconds <= attempt:
        attempt = 0.0  # a short listener timeout would fire first: the default timer yields
    elif attempt > 0 and 0 < listener.timeout_seconds <= attempt:
        problems.append(
            f"{at}.attempt_timeout: must be below the listener timeout "
            f"({listener.timeout_seconds:g}s), which would end the request first; 0 = none"
        )
    default = _positive_duration(
        raw.cooldown_default, f"{at}.cooldown_default", problems, d.cooldown_default_seconds
    )
    cap = _positive_duration(
        raw.cooldown_max, f"{at}.cooldown_max", problems, d.cooldown_max_seconds
    )
    if default > cap:
        problems.append(f"{at}.cooldown_default: must not exceed cooldown_max ({cap:g}s)")
    eject = _positive_duration(raw.eject_for, f"{at}.eject_for", problems, d.eject_seconds)
    return FailoverConfig(
        enabled=raw.enabled,
        max_attempts=raw.max_attempts,
        on_status=on_status,
        attempt_timeout_seconds=attempt,
        cooldown_default_seconds=default,
        cooldown_max_seconds=cap,
        eject_after_failures=raw.eject_after_failures,
        eject_seconds=eject,
    )


DEFAULT_OTLP_ENDPOINT = "http://localhost:4317"


def _tracing(
    raw: RawTracing | None, env: Mapping[str, str], problems: list[str], warnings: list[str]
) -> TracingConfig | None:
    if raw is None or raw.random_sampling == 0:
        return None
    endpoint = (
        raw.opentracing_grpc_endpoint
        or env.get("OTEL_TRACING_GRPC_ENDPOINT")
        or DEFAULT_OTLP_ENDPOINT
    )
    parts = urlsplit(endpoint)
    try:
        port = parts.port or 4317
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or not port:
        problems.append(
            f"tracing.opentracing_grpc_endpoint: {endpoint!r} must be http://host:port with no "
            "path (the OTLP/gRPC collector)"
        )
        return None
    attrs = raw.span_attributes or RawSpanAttributes()
    if attrs.header_prefixes:
        warnings.append(
            "tracing.span_attributes.header_prefixes: not supported by plano-extproc (Envoy "
            "tags exact headers only); ignored"
        )
    if raw.exporters:
        warnings.append("tracing.exporters: not supported by plano-extproc; ignored")
    return TracingConfig(
        sampling_percent=raw.random_sampling,
        host=parts.hostname,
        port=port,
        static_tags=dict(attrs.static or {}),
    )


_IGNORED_FEATURES = (
    "prompt_caching",
    "agents",
    "filters",
    "endpoints",
    "prompt_targets",
    "system_prompt",
    "prompt_guards",
    "state_storage",
)


def _metrics_sources(raw: RawConfig, problems: list[str]) -> list[MetricsSourceConfig]:
    out: list[MetricsSourceConfig] = []
    seen: dict[str, int] = {}
    for i, src in enumerate(raw.model_metrics_sources or []):
        at = f"model_metrics_sources[{i}]"
        if src.type in seen:
            problems.append(
                f"{at}.type: only one {src.type} source is allowed "
                f"(model_metrics_sources[{seen[src.type]}] is one)"
            )
            continue
        seen[src.type] = i
        if src.type == "cost":
            if src.provider not in COST_SOURCE_URLS:
                problems.append(
                    f"{at}.provider: {src.provider!r} is not a cost source; use digitalocean "
                    "or models.dev"
                )
                continue
            url = src.url or COST_SOURCE_URLS[src.provider]
        else:
            if src.provider != "prometheus":
                problems.append(f"{at}.provider: {src.provider!r}: latency sources use prometheus")
                continue
            missing = [k for k in ("url", "query") if not getattr(src, k)]
            if missing:
                problems.append(
                    f"{at}: a prometheus latency source needs {' and '.join(missing)} "
                    "(the Prometheus base URL and an instant query returning one series per "
                    "model, labelled model_name)"
                )
                continue
            assert src.url is not None
            url = src.url
        if urlsplit(url).scheme not in ("http", "https"):
            problems.append(f"{at}.url: {url!r} must be an http:// or https:// URL")
            continue
        out.append(
            MetricsSourceConfig(
                type=src.type,
                provider=src.provider,
                url=url,
                query=src.query,
                refresh_seconds=src.refresh_interval,
                aliases=dict(src.model_aliases or {}),
            )
        )
    return out


def _preferences(
    raw: RawConfig,
    key: str,
    providers: list[Provider],
    lookup: Mapping[str, Provider],
    problems: list[str],
    warnings: list[str],
) -> list[RoutePreference]:
    metric_types = {s.type for s in raw.model_metrics_sources or []}
    out: list[RoutePreference] = []
    names: dict[str, int] = {}
    for i, rp in enumerate(raw.routing_preferences or []):
        at = f"routing_preferences[{i}]"
        if rp.name in names:
            problems.append(f"{at}.name: duplicate route name {rp.name!r}")
            continue
        names[rp.name] = i
        models: list[str] = []
        for j, m in enumerate(rp.models):
            prov = lookup.get(m)
            if prov is None:
                problems.append(
                    f"{at}.models[{j}]: routing_preferences route {rp.name!r} references model "
                    f"{m!r} which is not declared in model_providers"
                )
            else:
                models.append(prov.name)
        prefer = (rp.selection_policy.prefer if rp.selection_policy else None) or "none"
        need = PREFER_METRIC.get(prefer)
        if need and need not in metric_types:
            problems.append(
                f"{at}.selection_policy.prefer: {prefer!r} needs a model_metrics_sources entry "
                f"of type {need}"
            )
        out.append(
            RoutePreference(
                name=rp.name,
                description=rp.description,
                models=tuple(models),
                examples=tuple(rp.examples or ()),
                prefer=prefer,
            )
        )
    # v0.3-style per-provider preferences are lifted to top level, as Plano's CLI does.
    lifted: dict[str, tuple[str, list[str]]] = {}
    for i, p in enumerate(raw.model_providers or raw.llm_providers or []):
        for pref in p.routing_preferences or []:
            prov = lookup.get(p.name or p.model)
            if prov is None:
                continue
            if pref.name in names:
                continue
            if pref.name in lifted:
                if lifted[pref.name][0] != pref.description:
                    warnings.append(
                        f"{key}[{i}].routing_preferences: route {pref.name!r} has another "
                        "description elsewhere; the first one is used"
                    )
                lifted[pref.name][1].append(prov.name)
            else:
                lifted[pref.name] = (pref.description, [prov.name])
    if lifted:
        warnings.append(
            f"{key}[].routing_preferences is deprecated; move routes to top-level "
            "routing_preferences (they were lifted automatically)"
        )
    out.extend(
        RoutePreference(name=n, description=d, models=tuple(ms)) for n, (d, ms) in lifted.items()
    )
    return out


HOSTED_ROUTER_URL = "https://archfc.katanemo.dev/v1"
HOSTED_ROUTER_URL_ENV = "PLANO_EXTPROC_HOSTED_ROUTER_URL"  # a mirror, or a test's fake


def _hosted_router(
    model_id: str, env: Mapping[str, str], problems: list[str], warnings: list[str]
) -> Provider | None:
    url = env.get(HOSTED_ROUTER_URL_ENV) or HOSTED_ROUTER_URL
    endpoint = _http_endpoint(url, HOSTED_ROUTER_URL_ENV, problems)
    if endpoint is None:
        return None
    scheme, host, port, path = endpoint
    warnings.append(
        f"overrides.llm_routing_model: {model_id!r} is not declared in model_providers, so the "
        f"router LLM is Plano's hosted endpoint {url} (as Plano does; set "
        f"{HOSTED_ROUTER_URL_ENV} to use another, or declare the model with its base_url)"
    )
    return Provider(
        name=f"plano/{model_id}",
        model=f"plano/{model_id}",
        model_id=model_id,
        interface="plano",
        scheme=scheme,
        host=host,
        port=port,
        path_prefix=path,
        access_key=None,
        passthrough_auth=False,
        headers=(),
        is_default=False,
        wildcard=False,
        custom_endpoint=True,
    )


def _router(
    raw: RawRouter | None,
    overrides: RawOverrides,
    providers: list[Provider],
    lookup: Mapping[str, Provider],
    problems: list[str],
    warnings: list[str],
    env: Mapping[str, str],
) -> RouterConfig:
    model = (raw.model if raw else None) or overrides.llm_routing_model
    kind = raw.type if raw and raw.type else ("orchestrator" if model else "embedded")
    explicit = bool(raw and raw.type) or bool(model)
    resolved: str | None = None
    hosted: Provider | None = None
    if kind == "orchestrator":
        if not model:
            problems.append(
                "routing.router.model: the orchestrator router needs the provider serving the "
                "router LLM (e.g. model: ollama/Plano-Orchestrator), or set "
                "overrides.llm_routing_model"
            )
        else:
            prov = lookup.get(model) or lookup.get(model.split("/", 1)[-1])
            if prov is not None:
                resolved = prov.name
            elif not (raw and raw.model):
                # Plano adds its hosted router for an undeclared overrides.llm_routing_model.
                hosted = _hosted_router(model.split("/", 1)[-1], env, problems, warnings)
                resolved = hosted.name if hosted is not None else None
            else:
                problems.append(
                    f"routing.router.model: {model!r} must match a model in model_providers "
                    "(declare the router LLM as a provider with its base_url, e.g. "
                    "ollama/Plano-Orchestrator)"
                )
    prompt = raw.prompt if raw and raw.prompt else None
    if prompt is None:
        prompt = (
            "arch_router_v1"
            if model and "arch-router" in model.lower()
            else ("plano_orchestrator_v1")
        )
    return RouterConfig(
        hosted=hosted,
        type=kind,
        model=resolved,
        prompt=prompt,
        timeout_ms=raw.timeout_ms if raw else 3000,
        context_length=overrides.orchestrator_model_context_length,
        threshold=raw.threshold if raw else None,
        margin=raw.margin if raw else None,
        threads=raw.threads if raw else 2,
        explicit=explicit,
    )
