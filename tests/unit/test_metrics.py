"""The gateway's series: hostile label values escaped and bounded, exchanges counted exactly."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from plano_extproc.metrics import MAX_WILDCARD_MODELS, Exchange, Metrics
from plano_extproc.usage import Usage

HOSTILE = 'x"} 1\nfake_total 1\n#'


def exchange(model: str, route: str | None = None, **kw: object) -> Exchange:
    base: dict[str, object] = {
        "client_api": "chat_completions",
        "request_model": model,
        "model": model,
        "route": route,
        "status": 200,
    }
    base.update(kw)
    return Exchange(**base)  # type: ignore[arg-type]


def samples(m: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` after a round trip through the text format's parser: what a
    Prometheus server would read."""
    text = m.render().decode()
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


def test_hostile_names_cannot_forge_series() -> None:
    m = Metrics(routes=['code "gen"'], models=["openai/gpt-4o"])
    m.record(exchange("openai/gpt-4o", route=HOSTILE))  # an inline route: folded
    m.record(exchange('openai/a"}\\', route='code "gen"'))  # a wildcard id: escaped
    m.count_decision("decision", HOSTILE, "matched", 0.001)
    got = samples(m, "plano_requests_total")
    assert ({"endpoint": "proxy", "client_api": "chat_completions", "model": "openai/gpt-4o",
             "route": "inline", "status_class": "2xx"}, 1.0) in got  # fmt: skip
    assert any(lb["model"] == 'openai/a"}\\' and lb["route"] == 'code "gen"' for lb, _ in got)
    text = m.render().decode()
    assert not any(line.startswith("fake_total") for line in text.splitlines())
    assert samples(m, "plano_routing_decisions_total")[0][0]["route"] == "inline"


def test_model_ids_outside_the_config_are_bounded() -> None:
    m = Metrics(routes=[], models=["openai/gpt-4o"])
    for i in range(MAX_WILDCARD_MODELS + 50):
        m.record(exchange(f"openai/m-{i}"))
    m.record(exchange("openai/gpt-4o"))  # configured models always keep their own series
    m.record(exchange("openai/m-0"))  # and so do the first unknown ids seen
    by_model = {lb["model"]: v for lb, v in samples(m, "plano_requests_total")}
    assert len(by_model) == MAX_WILDCARD_MODELS + 2
    assert by_model["other"] == 50
    assert by_model["openai/m-0"] == 2
    assert by_model["openai/gpt-4o"] == 1
    # The client's requested model shares the same bound.
    requested = {
        lb["gen_ai_request_model"] for lb, _ in samples(m, "gen_ai_client_token_usage_count")
    }
    assert requested == set()  # no usage recorded: no token series at all
    durations = samples(m, "gen_ai_client_operation_duration_seconds_count")
    assert durations == []  # no duration known (no start time): nothing observed


def test_an_exchange_counts_its_tokens_and_times_exactly() -> None:
    m = Metrics(routes=["code"], models=["anthropic/claude", "openai/gpt-4o"])
    usage = Usage(input=120, output=30, cached_input=100)
    ex = exchange("anthropic/claude", route="code", request_model="openai/gpt-4o",
                  client_api="messages", seconds=1.5, usage=usage, ttft=0.2, tpot=0.01)  # fmt: skip
    m.record(ex)
    m.record(exchange("anthropic/claude", route="code", status=503, client_api="messages"))
    tokens = {
        lb["gen_ai_token_type"]: (lb, v) for lb, v in samples(m, "gen_ai_client_token_usage_sum")
    }
    assert {k: v for k, (_, v) in tokens.items()} == {
        "input": 120,
        "output": 30,
        "cached_input": 100,
    }
    labels = tokens["input"][0]
    assert labels["gen_ai_request_model"] == "openai/gpt-4o"
    assert labels["gen_ai_response_model"] == "anthropic/claude"
    assert labels["gen_ai_provider_name"] == "anthropic"
    assert (labels["route"], labels["client_api"]) == ("code", "messages")
    assert samples(m, "gen_ai_client_operation_duration_seconds_sum")[0][1] == 1.5
    assert samples(m, "gen_ai_server_time_to_first_token_seconds_sum")[0][1] == 0.2
    assert samples(m, "gen_ai_server_time_per_output_token_seconds_sum")[0][1] == 0.01
    classes = {lb["status_class"]: v for lb, v in samples(m, "plano_requests_total")}
    assert classes == {"2xx": 1, "5xx": 1}


def test_no_cached_tokens_means_no_cached_series() -> None:
    m = Metrics(models=["openai/gpt-4o"])
    m.record(exchange("openai/gpt-4o", usage=Usage(input=5, output=2)))
    types = {lb["gen_ai_token_type"] for lb, _ in samples(m, "gen_ai_client_token_usage_sum")}
    assert types == {"input", "output"}


def test_decisions_router_latency_cache_and_failovers() -> None:
    m = Metrics(routes=["code"], models=["a/x", "b/y"], router="embedded")
    m.count_decision("proxy", "code", "matched", 0.004)
    m.count_decision("decision", None, "no_match", 0.002)
    m.count_decision("proxy", "code", "pinned", None)
    decisions = {(lb["endpoint"], lb["outcome"]): v
                 for lb, v in samples(m, "plano_routing_decisions_total")}  # fmt: skip
    assert decisions == {
        ("proxy", "matched"): 1,
        ("decision", "no_match"): 1,
        ("proxy", "pinned"): 1,
    }
    assert samples(m, "plano_router_duration_seconds_count") == [({"router": "embedded"}, 2.0)]
    m.count_cache("hit", True)
    m.count_cache("error", False)
    m.count_cache("error", False)
    cache = {lb["result"]: v for lb, v in samples(m, "plano_session_cache_requests_total")}
    assert cache == {"hit": 1, "error": 2}
    assert samples(m, "plano_session_cache_healthy") == [({}, 0.0)]
    m.count_failover("a/x", "b/y", "429")
    assert samples(m, "plano_failovers_total") == [
        ({"from_model": "a/x", "to_model": "b/y", "reason": "429"}, 1.0)
    ]


def test_immediate_replies_are_counted_by_endpoint_and_status() -> None:
    m = Metrics()
    m.count_immediate(200, "decision", "messages")
    m.count_immediate(404)
    got = {(lb["endpoint"], lb["client_api"], lb["status_class"]): v
           for lb, v in samples(m, "plano_requests_total")}  # fmt: skip
    assert got == {("decision", "messages", "2xx"): 1, ("other", "other", "4xx"): 1}


def test_observe_all_writes_what_observe_writes() -> None:
    """``observe_all`` uses the histogram child's private value objects: if a prometheus_client
    release changes them, this fails instead of the batch path drifting from ``observe``."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from plano_extproc.metrics import TOKEN_BUCKETS, observe_all

    # Bucket edges, between them, beyond the last, zero, infinity and NaN (no bucket, as
    # observe() does); all exactly representable, so the sums match to the last bit.
    values = [1, 1, 4, 3, 0, 64, 65, 1048576, 5000000, 0.5, float("inf"), float("nan"), 16]
    texts = []
    for batched in (False, True):
        reg = CollectorRegistry()
        h = Histogram("t", "t", ["k"], buckets=TOKEN_BUCKETS, registry=reg)
        child = h.labels("a")
        if batched:
            observe_all(child, values)
            observe_all(child, [7])  # one value: observe() itself
        else:
            for v in [*values, 7]:
                child.observe(v)
        texts.append(generate_latest(reg).decode())
    assert texts[0] == texts[1]
    assert 't_bucket{k="a",le="1.0"} 4.0' in texts[1]  # 0, 0.5, 1, 1


def test_a_batch_records_what_the_same_exchanges_record_one_by_one() -> None:
    usage = Usage(input=120, output=30, cached_input=100)
    batch = [
        exchange("openai/gpt-4o", route="code", seconds=1.5, usage=usage, ttft=0.25, tpot=0.5),
        exchange("openai/gpt-4o", route="code", seconds=0.5, usage=Usage(input=3, output=1)),
        exchange("openai/gpt-4o", route="code", status=429),
        exchange("x/wild", client_api="messages", seconds=2.0, usage=usage),
        exchange("openai/gpt-4o", route=HOSTILE, seconds=0.25),
    ]
    one = Metrics(routes=["code"], models=["openai/gpt-4o"])
    for ex in batch:
        one.record(ex)
    many = Metrics(routes=["code"], models=["openai/gpt-4o"])
    many.record_all(batch)
    assert many.render() == one.render()
    assert samples(many, "gen_ai_client_token_usage_count")
