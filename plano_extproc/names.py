"""The names the Envoy bootstrap and the ext_proc share: headers, metadata keys, filters.

Both sides import them from here, so a rename cannot leave the two disagreeing.
"""

from __future__ import annotations

# ---------------------------------------------------------------- request headers
# Set by the routing ext_proc to pick a provider route (single attempt). A header_mutation
# filter in front strips every client copy of these, so only the ext_proc can set them.
ROUTE_HEADER = "x-plano-upstream"
# Set on translated single-attempt requests: selects the provider route that turns on the
# response-translation filter. Never sent upstream.
TRANSLATE_HEADER = "x-plano-translate"
# Failover: slot k names the provider cluster of attempt k+1 (opaque cluster ids only).
SLOT_HEADER_PREFIX = "x-plano-try-"
MAX_SLOTS = 8  # most attempts one request can make (routing.failover.max_attempts <= this)
# Envoy's own: the attempt number (1-based; the routing ext_proc sets "0" so the first route
# resolution reads slot 0) and the per-request retry cap.
ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"
MAX_RETRIES_HEADER = "x-envoy-max-retries"


def slot_header(k: int) -> str:
    return f"{SLOT_HEADER_PREFIX}{k}"


# ---------------------------------------------------------------- response headers
MODEL_HEADER = "x-plano-model"  # the model that served
ROUTE_RESPONSE_HEADER = "x-plano-route"
ATTEMPTS_HEADER = "x-plano-attempts"  # how many upstream attempts Envoy made

# The request headers the routing stream reads. Envoy forwards only these to it, and the ones a
# config names (tenant header, providers' `headers`, ratelimit selectors: envoy_config
# routing_headers): other client headers (cookies, SDK telemetry) cost neither process any
# encoding or parsing and never reach a worker.
ROUTING_REQUEST_HEADERS = (
    ":method",
    ":path",
    ":authority",
    ":scheme",
    "x-request-id",
    "traceparent",
    "x-model-affinity",  # affinity.keys.AFFINITY_HEADER
    "authorization",  # rewrite.CREDENTIAL_HEADERS: passthrough_auth forwards the client's
    "x-api-key",
    "api-key",
    "anthropic-version",  # kept for an Anthropic provider when the client sent one
)

# ---------------------------------------------------------------- dynamic metadata
DECISION_METADATA = "plano"  # the namespace; keys below
MODEL_KEY = "model"
ROUTE_KEY = "route"
TX_KEY = "tx"  # single-attempt translation context (read by the response filter)
FAILOVER_KEY = "fo"  # the failover plan (read by each attempt's stream)
API_KEY = "api"  # the client's API: Envoy's own error replies take its error format
STARTED_KEY = "t0"  # when the routing stream saw the request (epoch seconds, for durations)
REQUESTED_KEY = "rq"  # the model the client asked for (the metrics' gen_ai_request_model)
PINNED_KEY = "pn"  # true/false when the request had a session pin (absent: no session)
REQUEST_ID_KEY = "id"  # the request id, for the access log (set only when it is on)
# The upstream request body's length: Envoy drops content-length from a FULL_DUPLEX_STREAMED
# request and ignores the ext_proc's; CONTENT_LENGTH_FILTER puts it back from this.
LENGTH_KEY = "cl"
CONTENT_LENGTH_FILTER = "plano.content_length"
# Usage the client's stream does not show ("input,output,cached_input"), set by the stream
# that hid it, read by Envoy's usage record at the request's end.
USAGE_KEY = "u"
# The token budgets an admitted request was charged (ratelimit.limiter), settled by the worker
# that receives the request's usage record.
RATELIMIT_KEY = "rl"
# true: the gateway asked a Chat provider for usage the client did not ask for; Envoy's Lua
# filter HIDE_USAGE_FILTER takes it out of the client's stream again.
HIDE_USAGE_KEY = "hu"
HIDE_USAGE_FILTER = "plano.hide_usage"
FAILURE_PREFIX = "failed_"
RETRY_AFTER_PREFIX = "retry_after_"
FAILURE_PREFIXES = (FAILURE_PREFIX, RETRY_AFTER_PREFIX)


def failure_key(attempt: int) -> str:
    """Why attempt ``attempt`` failed (its status), written by its stream or by the Lua
    filter of a ``__first`` cluster, read by the next attempt's stream."""
    return f"{FAILURE_PREFIX}{attempt}"


# ---------------------------------------------------------------- filters and clusters
EXTPROC_CLUSTER = "plano_extproc"
# The second ext_proc filter: inert except on translated single-attempt routes.
RESPONSE_FILTER = "plano.response_translation"
# Token usage is read by Envoy itself: json_to_metadata (JSON answers) and sse_to_metadata
# (streams) write the provider's counters, as the client receives them (after translation),
# into this namespace; Envoy's OpenTelemetry access logger then sends one record per proxied
# request, batched, to the ext_proc workers (OTLP LogsService), which keep the metrics.
USAGE_METADATA = "plano.usage"
USAGE_LOG_NAME = "plano_usage"
# The counters, as the providers name them (the ext_proc interprets them per client API).
PROMPT_TOKENS = "prompt_tokens"  # Chat: usage.prompt_tokens (cached included)
COMPLETION_TOKENS = "completion_tokens"  # Chat
CACHED_TOKENS = "cached_tokens"  # Chat: usage.prompt_tokens_details.cached_tokens
INPUT_TOKENS = "input_tokens"  # Messages (cache excluded) and Responses (cache included)
OUTPUT_TOKENS = "output_tokens"  # Messages, Responses
CACHE_READ = "cache_read"  # Messages: cache_read_input_tokens
CACHE_WRITE = "cache_write"  # Messages: cache_creation_input_tokens
INPUT_CACHED = "input_cached"  # Responses: usage.input_tokens_details.cached_tokens
USAGE_KEYS = (
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    CACHED_TOKENS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    CACHE_READ,
    CACHE_WRITE,
    INPUT_CACHED,
)
# The usage record's fields beyond those: what Envoy knows when the request ends.
LOG_USAGE = "usage"  # the USAGE_METADATA namespace as JSON ({"prompt_tokens": 37, ...})
LOG_STATUS = "status"
LOG_ATTEMPTS = "attempts"
LOG_DURATION_US = "duration_us"  # first request byte to last response byte
LOG_DURATION_MS = "duration_ms"  # Envoy's %DURATION%: when the last byte's time is unknown
LOG_BODY_US = "body_us"  # first request byte to the provider's first body byte
LOG_CONTENT_TYPE = "content_type"
LOG_REQUEST_ID = "request_id"
# The request's traceparent as Envoy forwarded it (its own span and sampling decision when
# tracing is on): the parent of the worker's GenAI span.
LOG_TRACEPARENT = "traceparent"
# The usage record's body: these fields' values in this order, one per line. No value can hold
# a line break: header values cannot, the ``plano`` strings are ASCII or header-safe by the time
# the worker writes them, and JSON escapes its own.
LOG_FIELDS = (
    API_KEY,
    MODEL_KEY,
    ROUTE_KEY,
    REQUESTED_KEY,
    PINNED_KEY,
    USAGE_KEY,
    RATELIMIT_KEY,
    LOG_USAGE,
    LOG_STATUS,
    LOG_ATTEMPTS,
    LOG_DURATION_US,
    LOG_DURATION_MS,
    LOG_BODY_US,
    LOG_CONTENT_TYPE,
    LOG_REQUEST_ID,
    LOG_TRACEPARENT,
)
# The upstream ext_proc in each provider's failover cluster: one stream per attempt.
ATTEMPT_FILTER = "plano.attempt"
# Failover reaches a provider through two more clusters than its own (same endpoint, TLS and
# limits): "first" (attempt 1 when the routing stream built that request itself; a Lua filter
# records a failing status for the next attempt) and "failover" (with the attempt filter).
FIRST_SUFFIX = "__first"
FAILOVER_SUFFIX = "__failover"


def first_cluster(cluster: str) -> str:
    return cluster + FIRST_SUFFIX


def failover_cluster(cluster: str) -> str:
    return cluster + FAILOVER_SUFFIX


def retry_after_key(attempt: int) -> str:
    """The Retry-After of the response that failed attempt ``attempt``."""
    return f"{RETRY_AFTER_PREFIX}{attempt}"
