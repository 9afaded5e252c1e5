"""The one Prometheus endpoint of ``plano-extproc up``: every worker's series plus Envoy's.

Workers write their metrics to prometheus_client's multiprocess files in a directory the
supervisor creates (env ``PROMETHEUS_MULTIPROC_DIR``, set for the workers only); a scrape
sums them with ``MultiProcessCollector``, so a restarted worker's counters add to the dead
one's instead of starting again from zero. prometheus_client renders all our own series.

Envoy's provider-cluster series are fetched from its admin ``/stats/prometheus`` (a ``filter``
regex keeps the transfer small) and passed through line by line, exactly as Envoy formats
them, after a second filter here (series names and provider clusters only: never the
ext_proc or tracing clusters). Re-exposing them through prometheus_client's parser was
measured and rejected: the parser renames the counters that lack a ``_total`` suffix
(``envoy_cluster_upstream_cx_connect_fail`` came out as ``..._fail_total``, likewise
``_rq_retry``, ``_rq_timeout`` and ``_rq_xx``), so the names would no longer be Envoy's.
For the same reason the endpoint answers in the Prometheus text format 0.0.4 only: those
counters cannot be written in OpenMetrics without that rename.
"""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from plano_extproc.config import Config
from plano_extproc.names import failover_cluster, first_cluster

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_METRICS_PORT = 9092
ENVOY_TIMEOUT = 1.0  # seconds a scrape waits for Envoy's admin before reporting it down

# Envoy's stat names (``cluster.<name>.<stat>``) and the Prometheus families it makes of them.
_ENVOY_STATS = (
    "upstream_rq_total",
    "upstream_rq_[1-5]xx",
    "upstream_rq_time",
    "upstream_cx_connect_fail",
    "upstream_rq_retry",
    "upstream_rq_timeout",
)
ENVOY_FAMILIES = frozenset(
    {
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time",
        "envoy_cluster_upstream_cx_connect_fail",
        "envoy_cluster_upstream_rq_retry",
        "envoy_cluster_upstream_rq_timeout",
    }
)
_HISTOGRAMS = frozenset({"envoy_cluster_upstream_rq_time"})
_SAMPLE_FAMILY = {f: f for f in ENVOY_FAMILIES - _HISTOGRAMS} | {
    h + suffix: h for h in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*,?')
CLUSTER_LABEL = "envoy_cluster_name"


def provider_clusters(config: Config) -> list[str]:
    """The Envoy clusters that reach model providers: each provider's own cluster and its
    failover variants (the ext_proc, tracing and no-upstream clusters are not among them)."""
    names: dict[str, None] = {}
    for p in config.providers:
        for name in (p.cluster, first_cluster(p.cluster), failover_cluster(p.cluster)):
            names[name] = None
    return sorted(names)


def envoy_stats_filter(clusters: Iterable[str]) -> str:
    """The regex for Envoy's ``/stats/prometheus?filter=``: matched against Envoy's own stat
    names, e.g. ``cluster.openai_api_openai_com_443.upstream_rq_total``."""
    alternatives = "|".join(re.escape(c) for c in sorted(set(clusters))) or "(?!)"
    return rf"^cluster\.(?:{alternatives})\.(?:{'|'.join(_ENVOY_STATS)})$"


def _labels(text: str) -> dict[str, str] | None:
    """A sample's label set, or None when it is not well formed."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None or m.end() == pos:
            return None
        out[m.group(1)] = m.group(2)
        pos = m.end()
    return out


def filter_envoy_text(text: str, clusters: Iterable[str]) -> str:
    """Envoy's Prometheus text reduced to the contract's series of ``clusters``, line for line
    as Envoy wrote them. Comments other than a kept family's ``# TYPE`` line, other series,
    other clusters and malformed lines are dropped; a family's ``# TYPE`` line is kept only
    when one of its samples is, and only once."""
    wanted = set(clusters)
    types: dict[str, str] = {}  # family -> its TYPE line, until a sample of it is kept
    typed: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) == 4 and parts[1] == "TYPE" and parts[2] in ENVOY_FAMILIES:
                types.setdefault(parts[2], line)
            continue
        m = _SAMPLE.fullmatch(line)
        if m is None:
            continue
        family = _SAMPLE_FAMILY.get(m.group(1))
        if family is None:
            continue
        labels = _labels(m.group(2) or "")
        if labels is None or labels.get(CLUSTER_LABEL) not in wanted:
            continue
        try:
            float(m.group(3))
        except ValueError:
            continue
        if family not in typed:
            typed.add(family)
            if family in types:
                out.append(types[family])
        out.append(line)
    return "".join(ln + "\n" for ln in out)


def fetch_envoy_stats(admin_url: str, clusters: Iterable[str], timeout: float) -> str | None:
    """Envoy's provider-cluster series (filtered), or None when its admin does not answer."""
    query = urllib.parse.urlencode({"filter": envoy_stats_filter(clusters)})
    try:
        with urllib.request.urlopen(
            f"{admin_url}/stats/prometheus?{query}", timeout=timeout
        ) as resp:
            if resp.status != 200:
                return None
            body: bytes = resp.read()
    except (OSError, ValueError):
        return None
    return filter_envoy_text(body.decode("utf-8", errors="replace"), clusters)


class _EnvoyUp:
    """``plano_envoy_stats_up``: whether this scrape got Envoy's figures."""

    def __init__(self, up: bool) -> None:
        self.up = up

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "plano_envoy_stats_up",
            "1 when this scrape read Envoy's admin /stats/prometheus, 0 when Envoy did not answer",
            value=1.0 if self.up else 0.0,
        )


def render(multiproc_dir: str, envoy_admin: str | None, clusters: Iterable[str]) -> bytes:
    """One scrape: the workers' series summed, ``plano_envoy_stats_up`` and Envoy's series."""
    envoy = (
        fetch_envoy_stats(envoy_admin, clusters, ENVOY_TIMEOUT) if envoy_admin is not None else None
    )
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=multiproc_dir)
    registry.register(_EnvoyUp(envoy is not None))
    return generate_latest(registry) + (envoy or "").encode()


class MetricsServer:
    """``GET /metrics`` served from a daemon thread; binding happens in the constructor (an
    ``OSError`` when the port is taken), ``start`` serves, ``stop`` stops and closes."""

    def __init__(
        self,
        host: str,
        port: int,
        multiproc_dir: str,
        *,
        envoy_admin: str | None,
        clusters: Iterable[str],
    ) -> None:
        self.multiproc_dir = multiproc_dir
        self.envoy_admin = envoy_admin
        self.clusters = tuple(clusters)
        self.host = host
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def render(self) -> bytes:
        return render(self.multiproc_dir, self.envoy_admin, self.clusters)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if urllib.parse.urlsplit(self.path).path != "/metrics":
                    self._reply(404, b"not found: the metrics are at /metrics\n", "text/plain")
                    return
                try:
                    body = server.render()
                except Exception as e:  # a scrape error must not end the thread
                    self._reply(500, f"metrics unavailable: {e}\n".encode(), "text/plain")
                    return
                self._reply(200, body, CONTENT_TYPE_PLAIN_0_0_4)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()
