"""The Grafana dashboard (``deploy/grafana/plano-gateway.json``) against the real gateway and a
real Prometheus server (Debian's ``prometheus`` package), issue 10.

A two-worker ``plano-extproc up`` routes with the orchestrator router (a fake router LLM picks
routes by keyword) to fake providers with known usage; Prometheus scrapes the gateway's one
``/metrics`` every second while a short load runs through the official SDKs (Chat Completions
and Messages, JSON and streamed, one failover, session pins, the decision endpoint, a 4xx and
a 5xx). Then every panel query must

- reference only metric names (and label names) found in a scrape of the gateway's endpoint,
- evaluate through Prometheus' ``/api/v1/query`` with status ``success``, and
- return data (a finite value) - except the few listed in ``MAY_BE_EMPTY``, whose traffic the
  load does not make.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import orchestrated_seed_config
from tests.fakes import FakeOrchestrator, FakeProvider, Script, Usage, keyword_router
from tests.gateway_proc import ROOT, GatewayProcess
from tests.prometheus_server import PrometheusServer, find_prometheus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_prometheus() is None, reason="no prometheus binary (scripts/test.sh)"),
]

DASHBOARD = ROOT / "deploy" / "grafana" / "plano-gateway.json"
RATE_INTERVAL = "30s"  # what $__rate_interval becomes (Grafana: at least 4 scrape intervals)
RULES = {"binary search": "code_generation", "explain": "complex_reasoning"}
CODE = "write a binary search in go"
REASON = "explain the trade-offs of b-trees"
OTHER = "hello there"
USAGE = Usage(prompt=40, completion=12, cached=8)
# Token budgets: every request's tenant is charged; the "tiny" tier refuses what it is sent.
RATELIMITS = """
ratelimits:
  - {model: fast-model, selector: {key: x-tenant, value: "*"}, limit: {tokens: 1000000, unit: hour}}
  - {model: fast-model, selector: {key: x-tier, value: tiny}, limit: {tokens: 1, unit: hour}}
"""
TENANT = {"x-tenant": "dash"}
# Panel titles (or "title/refId") the load run does not feed: they must evaluate, nothing more.
MAY_BE_EMPTY = {"Router errors (share of decisions)"}

# ----------------------------------------------------------------------------- PromQL names

FUNCTIONS_AND_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")

Exported = dict[str, set[str]]  # sample name as scraped -> its label names


def exported(text: str) -> Exported:
    """Every sample name in Prometheus text with the label names it carries."""
    out: Exported = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series = line.rsplit(" ", 1)[0]
        name = series.split("{", 1)[0].strip()
        labels = set(re.findall(r'(\w+)="', series.split("{", 1)[1])) if "{" in series else set()
        out.setdefault(name, set()).update(labels)
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions (followed by
    ``(``), keywords, label names (in ``{}`` and by/on clauses) or durations (in ``[]``)."""
    bare = _STRING.sub('""', expr)
    bare = _CLAUSE.sub(" ", bare)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    return {n for n in _IDENT.findall(bare) if n.lower() not in FUNCTIONS_AND_KEYWORDS}


def problems(expr: str, have: Exported) -> list[str]:
    """What in ``expr`` the gateway does not export: unknown metric names, label names a
    selector matches on that its metric does not carry, grouping labels none of the
    expression's metrics carry."""
    found: list[str] = []
    bare = _STRING.sub('""', expr)
    names = metric_names(expr)
    if not names:
        found.append("reads no metric")
    for name in sorted(names):
        if name not in have:
            found.append(f"metric {name} is not exported")
    for name, body in _SELECTOR.findall(bare):
        for label in _MATCHER.findall(body):
            if name in have and label not in have[name]:
                found.append(f"{name} has no label {label}")
    carried = set().union(*(have.get(n, set()) for n in names)) if names else set()
    for _kind, labels in _CLAUSE.findall(bare):
        for label in filter(None, (s.strip() for s in labels.split(","))):
            if label not in carried:
                found.append(f"no metric of the query carries label {label}")
    return found


def concrete(expr: str) -> str:
    """The query as Grafana sends it: ``$__rate_interval`` a duration, template variables their
    All value (``.*``; the dashboard matches them with ``=~``)."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace(
        "${__rate_interval}", RATE_INTERVAL
    )
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every query panel, rows' nested panels included."""
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for t in p.get("targets", []):
                out.append((p["title"], t["refId"], t["expr"]))
    return out


# ----------------------------------------------------------------------- checks without I/O


SCRAPE_EXAMPLE = """\
# TYPE plano_requests_total counter
plano_requests_total{endpoint="proxy",model="m",route="r",status_class="2xx"} 3.0
# TYPE gen_ai_client_operation_duration_seconds histogram
gen_ai_client_operation_duration_seconds_bucket{route="r",le="+Inf"} 1.0
gen_ai_client_operation_duration_seconds_count{route="r"} 1.0
gen_ai_client_operation_duration_seconds_sum{route="r"} 0.5
"""


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("rate(plano_bogus_total[$__rate_interval])", "plano_bogus_total is not exported"),
        ("sum(rate(plano_requests[5m]))", "plano_requests is not exported"),  # family name
        (
            "histogram_quantile(0.5, sum by (le) (rate(gen_ai_client_operation_duration_seconds"
            "[5m])))",
            "gen_ai_client_operation_duration_seconds is not exported",  # no _bucket
        ),
        ('sum(plano_requests_total{modell=~"$model"})', "has no label modell"),
        ("sum by (tenant) (plano_requests_total)", "carries label tenant"),
        ("plano_requests_total / on(route) plano_failovers_total", "plano_failovers_total"),
        ("vector(1)", "reads no metric"),
    ],
)
def test_the_check_rejects_what_the_gateway_does_not_export(expr: str, complaint: str) -> None:
    found = problems(expr, exported(SCRAPE_EXAMPLE))
    assert any(complaint in p for p in found), found


def test_the_check_accepts_exported_names() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(gen_ai_client_operation_duration_"
        'seconds_bucket{route=~"$route"}[$__rate_interval]))) or sum by (model) '
        '(rate(plano_requests_total{status_class=~"4xx|5xx", model=~"a{b}"}[1m]))'
    )
    assert problems(expr, exported(SCRAPE_EXAMPLE)) == []
    assert metric_names(expr) == {
        "gen_ai_client_operation_duration_seconds_bucket",
        "plano_requests_total",
    }


def test_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "route"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            expr = t["expr"]
            if "rate(" in expr:
                assert "$__rate_interval" in expr and not re.search(r"\[\d", expr), expr
            for var in re.findall(r"(\w+)\s*=\s*\"\$", expr):  # a variable needs a regex match
                pytest.fail(f"{panel['title']}: {var}= with a template variable (use =~)")
    names = set().union(*(metric_names(e) for _, _, e in targets(dash)))
    for must in (
        "gen_ai_client_token_usage_sum",
        "plano_requests_total",
        "gen_ai_client_operation_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "plano_failovers_total",
        "plano_routing_decisions_total",
        "plano_router_duration_seconds_bucket",
        "plano_session_cache_requests_total",
        "plano_session_cache_healthy",
        "plano_ratelimit_rejections_total",
        "plano_ratelimit_tokens_total",
        "plano_ratelimit_store_healthy",
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_upstream_rq_time_bucket",
    ):
        assert must in names


# ---------------------------------------------------------------- the gateway and Prometheus


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    made: dict[str, Any] = {
        "openai": FakeProvider("openai").start(),
        "anthropic": FakeProvider("anthropic").start(),
        "orch": FakeOrchestrator(decide=keyword_router(RULES)).start(),
    }
    for name in ("openai", "anthropic"):
        made[name].script = Script(text=["Hello", " there", " friend"], usage=USAGE)
    yield made
    for f in made.values():
        f.stop()


@pytest.fixture(scope="module")
def gw(fakes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    cfg = orchestrated_seed_config(
        fakes["openai"].base_url, fakes["anthropic"].base_url, fakes["orch"].base_url
    )
    with GatewayProcess(cfg + RATELIMITS, tmp_path_factory.mktemp("dash"), workers=2) as g:
        yield g


def oai(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key="client-key",
        max_retries=0,
        timeout=30,
        default_headers=TENANT,
    )


def ant(gw: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.url, api_key="client-key", max_retries=0, timeout=30, default_headers=TENANT
    )


def one(gw: GatewayProcess, api: str, stream: bool, prompt: str, session: str | None) -> None:
    headers = {"x-model-affinity": session} if session else {}
    msgs: Any = [{"role": "user", "content": prompt}]
    if api == "chat":
        if stream:
            s = oai(gw).chat.completions.create(
                model="fast-model", messages=msgs, stream=True, extra_headers=headers
            )
            assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        else:
            r = oai(gw).chat.completions.create(
                model="fast-model", messages=msgs, extra_headers=headers
            )
            assert r.choices[0].message.content
        return
    if stream:
        with ant(gw).messages.stream(
            model="fast-model", max_tokens=32, messages=msgs, extra_headers=headers
        ) as st:
            assert st.get_final_message().content
    else:
        m = ant(gw).messages.create(
            model="fast-model", max_tokens=32, messages=msgs, extra_headers=headers
        )
        assert m.content


def run_load(gw: GatewayProcess, fakes: dict[str, Any], half: int) -> int:
    """Half of the load run (20 requests); returns how many it sent. Half 0 starts with a
    failover (the code route's first model answers 429) and has a 4xx, half 1 a 5xx."""
    if half == 0:
        fakes["anthropic"].queue(Script(status=429, retry_after="1"))
    prompts = [CODE, REASON, OTHER]
    kinds = [("chat", False), ("chat", True), ("messages", False), ("messages", True)]
    sent = 0
    for i in range(17):
        api, stream = kinds[i % len(kinds)]
        session = f"dash-session-{i % 2}" if i % 4 == 0 else None
        one(gw, api, stream, prompts[i % len(prompts)], session)
        sent += 1
    status, error = [(400, openai.BadRequestError), (503, openai.InternalServerError)][half]
    fakes["openai"].queue(Script(status=status))  # OTHER goes to fast-model (openai)
    with pytest.raises(error):
        one(gw, "chat", False, OTHER, None)
    sent += 1
    with pytest.raises(openai.RateLimitError):  # the tiny tier's budget refuses it
        oai(gw).chat.completions.create(
            model="fast-model",
            messages=[{"role": "user", "content": OTHER}],
            extra_headers={"x-tier": "tiny"},
        )
    sent += 1
    for prompt in (CODE, OTHER):
        resp = httpx.post(
            gw.url + "/routing/v1/chat/completions",
            json={"model": "fast-model", "messages": [{"role": "user", "content": prompt}]},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        sent += 1
    return sent


def scrape(gw: GatewayProcess) -> str:
    resp = httpx.get(gw.metrics_url, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.text


def total(text: str, name: str) -> float:
    """The sum of a series' samples in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def wait_until(ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def first_value(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def test_every_panel_query_evaluates_against_prometheus_scraping_the_gateway(
    gw: GatewayProcess, fakes: dict[str, Any]
) -> None:
    dash = load_dashboard()
    target = f"127.0.0.1:{gw.metrics_port}"
    with PrometheusServer([target]) as prom:

        def scrapes() -> float:
            got = first_value(prom.vector(f'count_over_time(up{{instance="{target}"}}[5m])'))
            return got[0] if got else 0.0

        def gateway_has(sent: int, upstream: float) -> bool:
            """The endpoint shows the load: the workers count a request as its response
            ends, Envoy flushes its histograms every 5 s."""
            text = scrape(gw)
            return (
                total(text, "plano_requests_total") >= sent
                and total(text, "envoy_cluster_upstream_rq_time_count") > upstream
            )

        # Two halves with scrapes in between: every series exists before the second half
        # moves it, so rates over the run are not zero and quantiles not NaN.
        wait_until(lambda: scrapes() >= 1, "Prometheus never scraped the gateway")
        sent = run_load(gw, fakes, 0)
        wait_until(lambda: gateway_has(sent, 0), "the first half never showed on /metrics")
        upstream = total(scrape(gw), "envoy_cluster_upstream_rq_time_count")
        done = scrapes()
        wait_until(lambda: scrapes() >= done + 2, "Prometheus stopped scraping")
        sent += run_load(gw, fakes, 1)
        wait_until(lambda: gateway_has(sent, upstream), "the second half never showed")
        final = total(scrape(gw), "envoy_cluster_upstream_rq_time_count")

        def stored() -> bool:
            got = first_value(prom.vector("sum(plano_requests_total)"))
            env = first_value(prom.vector("sum(envoy_cluster_upstream_rq_time_count)"))
            up = first_value(prom.vector(f'up{{instance="{target}"}}'))
            return bool(got and got[0] >= sent and env and env[0] >= final and up == [1.0])

        wait_until(stored, "Prometheus never stored the load's counts")
        assert scrapes() >= 3

        # (a) names: every panel reads only what the gateway's endpoint exports
        have = exported(scrape(gw))
        bad = {
            f"{title}/{ref}": found
            for title, ref, expr in targets(dash)
            if (found := problems(expr, have))
        }
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
                assert m, var["definition"]
                if found := problems(f"count by ({m[2]}) ({m[1]})", have):
                    bad[f"${var['name']}"] = found
        assert not bad, json.dumps(bad, indent=1)

        # (b) every query evaluates, (c) with a finite value somewhere (the load is within the
        # rate window: it ended a few seconds ago)
        empty: dict[str, str] = {}
        for title, ref, expr in targets(dash):
            result = prom.vector(concrete(expr))  # raises unless status is success
            finite = [v for v in first_value(result) if math.isfinite(v)]
            if not finite and title not in MAY_BE_EMPTY:
                empty[f"{title}/{ref}"] = concrete(expr)
        assert not empty, json.dumps(empty, indent=1)

        # the load's failover shows, by from/to/reason
        failovers = prom.vector("sum by (from_model, to_model, reason) (plano_failovers_total)")
        assert {r["metric"]["from_model"] for r in failovers} == {
            "anthropic/claude-sonnet-4-20250514"
        }
        for var in ("model", "route"):
            m = re.fullmatch(
                r"label_values\((\w+),\s*(\w+)\)",
                next(v for v in dash["templating"]["list"] if v["name"] == var)["definition"],
            )
            assert m and prom.vector(f"count by ({m[2]}) ({m[1]})")
