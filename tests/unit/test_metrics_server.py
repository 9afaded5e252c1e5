"""The gateway's one /metrics (``up``): Envoy's text filtered to provider clusters, the
workers' multiprocess files summed, the HTTP thread, and the supervisor's part."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plano_extproc.config import load_config
from plano_extproc.metrics_server import (
    MULTIPROC_ENV,
    MetricsServer,
    envoy_stats_filter,
    filter_envoy_text,
    provider_clusters,
    render,
)
from plano_extproc.names import EXTPROC_CLUSTER
from plano_extproc.supervisor import Child, Supervisor
from tests.conftest import seed_config

OA = "openai_127_0_0_1_1000"
AN = "anthropic_127_0_0_1_2000"
EP = EXTPROC_CLUSTER
CLUSTERS = [OA, OA + "__first", OA + "__failover", AN, AN + "__first", AN + "__failover"]
BUCKETS = ["0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "+Inf"]


def _hist(cluster: str, count: int) -> str:
    lines = [
        f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{cluster}",le="{le}"}} '
        f"{count if le in ('250', '500', '1000', '+Inf') else 0}"
        for le in BUCKETS
    ]
    lines.append(f'envoy_cluster_upstream_rq_time_sum{{envoy_cluster_name="{cluster}"}} 301.5')
    lines.append(f'envoy_cluster_upstream_rq_time_count{{envoy_cluster_name="{cluster}"}} {count}')
    return "\n".join(lines)


# Shaped like Envoy 1.40's /stats/prometheus (as measured), with a few extra traps.
ENVOY_TEXT = f"""# TYPE envoy_cluster_upstream_cx_connect_fail counter
envoy_cluster_upstream_cx_connect_fail{{envoy_cluster_name="{AN}"}} 2
envoy_cluster_upstream_cx_connect_fail{{envoy_cluster_name="{EXTPROC_CLUSTER}"}} 0
envoy_cluster_upstream_cx_connect_fail{{envoy_cluster_name="plano_otel_collector"}} 4
# TYPE envoy_cluster_upstream_cx_total counter
envoy_cluster_upstream_cx_total{{envoy_cluster_name="{OA}"}} 3
# TYPE envoy_cluster_upstream_rq counter
envoy_cluster_upstream_rq{{envoy_response_code="200",envoy_cluster_name="{OA}"}} 3
# TYPE envoy_cluster_upstream_rq_retry counter
envoy_cluster_upstream_rq_retry{{envoy_cluster_name="{OA}__failover"}} 1
# TYPE envoy_cluster_upstream_rq_timeout counter
envoy_cluster_upstream_rq_timeout{{envoy_cluster_name="{OA}"}} 0
# TYPE envoy_cluster_upstream_rq_total counter
envoy_cluster_upstream_rq_total{{envoy_cluster_name="{AN}__failover"}} 1
envoy_cluster_upstream_rq_total{{envoy_cluster_name="{OA}"}} 3
envoy_cluster_upstream_rq_total{{envoy_cluster_name="{OA}_x"}} 7
envoy_cluster_upstream_rq_total{{envoy_cluster_name="{EXTPROC_CLUSTER}"}} 5
envoy_cluster_upstream_rq_total{{envoy_cluster_name="plano_no_upstream"}} 0
envoy_cluster_upstream_rq_total{{evil="x\\",envoy_cluster_name=\\"{OA}",envoy_cluster_name="z"}} 9
envoy_cluster_upstream_rq_total{{envoy_cluster_name="{OA}"}} not-a-number
envoy_cluster_upstream_rq_total{{envoy_cluster_name="{OA}" 1
# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="{AN}__failover"}} 1
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="{OA}"}} 3
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="{EP}"}} 5
# TYPE envoy_cluster_upstream_rq_time histogram
{_hist(OA, 3)}
{_hist(EXTPROC_CLUSTER, 5)}
# TYPE envoy_cluster_external_upstream_rq_time histogram
envoy_cluster_external_upstream_rq_time_bucket{{envoy_cluster_name="{OA}",le="+Inf"}} 3
# TYPE envoy_server_live gauge
envoy_server_live{{}} 1
"""


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by their names as written (prometheus_client's parser would add ``_total`` to
    Envoy's counters that lack it); all also checked to parse as Prometheus text."""
    list(text_string_to_metric_families(text))
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{")[0]
        out[(name, tuple(sorted(re.findall(r'(\w+)="([^"]*)"', series))))] = float(value)
    return out


def test_filter_keeps_the_contract_series_of_provider_clusters_only() -> None:
    out = filter_envoy_text(ENVOY_TEXT, CLUSTERS)
    kept = out.splitlines()
    # Every kept sample line is Envoy's line, unchanged.
    source = set(ENVOY_TEXT.splitlines())
    assert all(line in source for line in kept)
    clusters = {m for m in re.findall(r'envoy_cluster_name="([^"]*)"', out)}
    assert clusters == {OA, AN, AN + "__failover", OA + "__failover"}
    names = {line.split("{")[0] for line in kept if not line.startswith("#")}
    assert names == {
        "envoy_cluster_upstream_cx_connect_fail",
        "envoy_cluster_upstream_rq_retry",
        "envoy_cluster_upstream_rq_timeout",
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_cluster_upstream_rq_time_sum",
        "envoy_cluster_upstream_rq_time_count",
    }
    s = _samples(out)
    assert s[("envoy_cluster_upstream_rq_total", (("envoy_cluster_name", OA),))] == 3
    assert s[("envoy_cluster_upstream_rq_total", (("envoy_cluster_name", AN + "__failover"),))] == 1
    xx = (("envoy_cluster_name", OA), ("envoy_response_code_class", "2"))
    assert s[("envoy_cluster_upstream_rq_xx", xx)] == 3
    assert s[("envoy_cluster_upstream_cx_connect_fail", (("envoy_cluster_name", AN),))] == 2
    # All of the histogram's buckets, its sum and count.
    buckets = [line for line in kept if line.startswith("envoy_cluster_upstream_rq_time_bucket")]
    assert len(buckets) == len(BUCKETS)
    assert s[("envoy_cluster_upstream_rq_time_count", (("envoy_cluster_name", OA),))] == 3
    assert s[("envoy_cluster_upstream_rq_time_sum", (("envoy_cluster_name", OA),))] == 301.5


def test_filter_type_lines_once_per_family_and_only_with_samples() -> None:
    out = filter_envoy_text(ENVOY_TEXT, CLUSTERS)
    types = [line for line in out.splitlines() if line.startswith("#")]
    assert len(types) == len(set(types)) == 6
    assert "# TYPE envoy_cluster_upstream_rq_time histogram" in types
    # A family none of whose samples is kept leaves no TYPE line behind.
    assert filter_envoy_text(ENVOY_TEXT, ["nobody"]) == ""
    only_an = filter_envoy_text(ENVOY_TEXT, [AN])
    assert only_an.splitlines() == [
        "# TYPE envoy_cluster_upstream_cx_connect_fail counter",
        f'envoy_cluster_upstream_cx_connect_fail{{envoy_cluster_name="{AN}"}} 2',
    ]


def test_filter_drops_forged_and_malformed_lines() -> None:
    out = filter_envoy_text(ENVOY_TEXT, CLUSTERS)
    assert "evil" not in out and "not-a-number" not in out
    assert f'"{OA}" 1' not in out  # the unterminated label set
    assert f'"{OA}_x"' not in out  # a name that merely starts like a provider cluster


def test_stats_filter_regex_selects_the_same_stats_envoy_names() -> None:
    rx = re.compile(envoy_stats_filter(CLUSTERS))
    for stat in (
        "upstream_rq_total",
        "upstream_rq_2xx",
        "upstream_rq_5xx",
        "upstream_rq_time",
        "upstream_cx_connect_fail",
        "upstream_rq_retry",
        "upstream_rq_timeout",
    ):
        assert rx.search(f"cluster.{OA}.{stat}"), stat
        assert rx.search(f"cluster.{AN}__failover.{stat}"), stat
        assert not rx.search(f"cluster.{EXTPROC_CLUSTER}.{stat}"), stat
        assert not rx.search(f"cluster.{OA}_x.{stat}"), stat
    for stat in ("upstream_rq_200", "upstream_rq_total_x", "upstream_cx_total", "upstream_rq"):
        assert not rx.search(f"cluster.{OA}.{stat}"), stat
    assert not rx.search(f"listener.{OA}.upstream_rq_total")
    assert not re.compile(envoy_stats_filter([])).search(f"cluster.{OA}.upstream_rq_total")


def test_provider_clusters_are_the_providers_and_their_failover_variants() -> None:
    cfg = load_config_text(seed_config("http://127.0.0.1:1000", "http://127.0.0.1:2000"))
    assert provider_clusters(cfg) == sorted(CLUSTERS)
    assert EXTPROC_CLUSTER not in provider_clusters(cfg)


def load_config_text(text: str):  # type: ignore[no-untyped-def]
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


# ------------------------------------------------------------------ workers' files summed

WRITER = """
import os, sys
from prometheus_client import CollectorRegistry, Counter, Gauge
r = CollectorRegistry()
c = Counter("plano_requests_total", "requests", ["endpoint"], registry=r)
c.labels("proxy").inc(int(sys.argv[1]))
g = Gauge("plano_session_cache_healthy", "h", registry=r, multiprocess_mode="livemin")
g.set(1)
print(os.getpid())
"""


def _worker_writes(multiproc_dir: Path, n: int) -> int:
    """A separate process (its own pid, as a worker) adds ``n`` requests; returns its pid."""
    env = {**os.environ, MULTIPROC_ENV: str(multiproc_dir)}
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(n)], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def _value(text: str, name: str, **labels: str) -> float | None:
    for (n, have), value in _samples(text).items():
        if n == name and all(dict(have).get(k) == v for k, v in labels.items()):
            return value
    return None


def test_render_sums_every_worker_and_says_envoy_is_down(tmp_path: Path) -> None:
    _worker_writes(tmp_path, 3)
    _worker_writes(tmp_path, 4)
    text = render(str(tmp_path), f"http://127.0.0.1:{_closed_port()}", CLUSTERS).decode()
    assert _value(text, "plano_requests_total", endpoint="proxy") == 7
    assert _value(text, "plano_envoy_stats_up") == 0
    assert "envoy_cluster" not in text


def test_dead_workers_live_gauges_go_but_counters_stay(tmp_path: Path) -> None:
    pid_a = _worker_writes(tmp_path, 3)
    pid_b = _worker_writes(tmp_path, 4)
    sup = Supervisor()
    sup.metrics_dir = str(tmp_path)
    for pid in (pid_a, pid_b):
        done = subprocess.Popen(["true"])
        done.wait()
        child = Child("w", done, ["true"], restart=True)
        child.proc.pid = pid  # the worker that wrote the files died
        assert sup._died(child, -9, 0.0)
    text = render(str(tmp_path), None, CLUSTERS).decode()
    assert _value(text, "plano_requests_total", endpoint="proxy") == 7
    assert _value(text, "plano_session_cache_healthy") is None
    sup._probes.shutdown()


def test_supervisor_gives_the_env_to_the_child_only(tmp_path: Path) -> None:
    sup = Supervisor()
    before = os.environ.get(MULTIPROC_ENV)
    argv = [sys.executable, "-c", f"import os; print(os.environ.get({MULTIPROC_ENV!r}))"]
    child = sup.spawn("w", argv, capture=True, env={MULTIPROC_ENV: str(tmp_path)})
    out, _ = child.proc.communicate(timeout=60)
    assert out.decode().strip() == str(tmp_path)
    assert os.environ.get(MULTIPROC_ENV) == before
    # A restart spawns it with the same env.
    assert child.env == {MULTIPROC_ENV: str(tmp_path)}
    again = sup._popen(child.argv, True, child.env)
    out, _ = again.communicate(timeout=60)
    assert out.decode().strip() == str(tmp_path)
    sup._probes.shutdown()


# ------------------------------------------------------------------ Envoy's admin, faked


class _FakeEnvoyAdmin:
    def __init__(self, body: str) -> None:
        self.body = body
        self.queries: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.queries.append(self.path)
                data = fake.body.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def envoy_admin() -> Iterator[_FakeEnvoyAdmin]:
    fake = _FakeEnvoyAdmin(ENVOY_TEXT)
    yield fake
    fake.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_render_appends_envoy_series_filtered(tmp_path: Path, envoy_admin: _FakeEnvoyAdmin) -> None:
    _worker_writes(tmp_path, 2)
    text = render(str(tmp_path), envoy_admin.url, CLUSTERS).decode()
    assert _value(text, "plano_envoy_stats_up") == 1
    assert _value(text, "plano_requests_total", endpoint="proxy") == 2
    assert text.endswith(filter_envoy_text(ENVOY_TEXT, CLUSTERS))
    assert EXTPROC_CLUSTER not in text
    path, _, query = envoy_admin.queries[-1].partition("?")
    assert path == "/stats/prometheus"
    assert urllib.parse.parse_qs(query)["filter"] == [envoy_stats_filter(CLUSTERS)]


def test_server_serves_metrics_404s_the_rest_and_stops(
    tmp_path: Path, envoy_admin: _FakeEnvoyAdmin
) -> None:
    _worker_writes(tmp_path, 5)
    server = MetricsServer(
        "127.0.0.1", 0, str(tmp_path), envoy_admin=envoy_admin.url, clusters=CLUSTERS
    ).start()
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=30) as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = resp.read().decode()
        assert _value(text, "plano_requests_total", endpoint="proxy") == 5
        assert _value(text, "envoy_cluster_upstream_rq_total", envoy_cluster_name=OA) == 3
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url.removesuffix("metrics") + "x", timeout=30)
        assert e.value.code == 404
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=30)


def test_server_on_a_taken_port_fails_at_bind(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(OSError):
            MetricsServer(
                "127.0.0.1", held.getsockname()[1], str(tmp_path), envoy_admin=None, clusters=[]
            )


def test_scrape_error_is_a_500_and_the_server_keeps_serving(tmp_path: Path) -> None:
    server = MetricsServer(
        "127.0.0.1", 0, str(tmp_path / "gone"), envoy_admin=None, clusters=[]
    ).start()
    try:
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(server.url, timeout=30)
            assert e.value.code == 500
        (tmp_path / "gone").mkdir()
        with urllib.request.urlopen(server.url, timeout=30) as resp:
            assert resp.status == 200
    finally:
        server.stop()


def test_up_taken_metrics_port_at_bind_names_the_flag_and_leaves_no_dir() -> None:
    from plano_extproc.supervisor import _start_metrics

    cfg = load_config_text(seed_config("http://127.0.0.1:1000", "http://127.0.0.1:2000"))
    sup = Supervisor()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            _start_metrics(sup, cfg, "127.0.0.1", port, 9901)
    assert f"port 127.0.0.1:{port} is already in use" in str(e.value)
    assert "--metrics-port" in str(e.value)
    assert sup.metrics_dir is None
    sup._probes.shutdown()


def test_up_metrics_server_gets_a_fresh_dir_and_the_provider_clusters() -> None:
    from plano_extproc.supervisor import _start_metrics, _stop_metrics

    cfg = load_config_text(seed_config("http://127.0.0.1:1000", "http://127.0.0.1:2000"))
    sup = Supervisor()
    server = _start_metrics(sup, cfg, "127.0.0.1", 0, 9901)
    try:
        assert sup.metrics_dir is not None and os.listdir(sup.metrics_dir) == []
        assert server.multiproc_dir == sup.metrics_dir
        assert server.envoy_admin == "http://127.0.0.1:9901"
        assert sorted(server.clusters) == sorted(CLUSTERS)
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    finally:
        d = sup.metrics_dir
        _stop_metrics(sup, server)
        sup._probes.shutdown()
    assert not os.path.exists(d)


def test_up_metrics_server_binds_the_address_it_is_given() -> None:
    """``up --metrics-address``: e.g. 0.0.0.0 in a container; "localhost" here (loopback)."""
    from plano_extproc.supervisor import _start_metrics, _stop_metrics

    cfg = load_config_text(seed_config("http://127.0.0.1:1000", "http://127.0.0.1:2000"))
    sup = Supervisor()
    server = _start_metrics(sup, cfg, "localhost", 0, 9901)
    try:
        assert server.url == f"http://localhost:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.status == 200
    finally:
        _stop_metrics(sup, server)
        sup._probes.shutdown()
