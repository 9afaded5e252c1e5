"""The one Prometheus endpoint of ``plano-extproc up`` (issue 10), with the real gateway:
two ext_proc workers and Envoy, the official SDKs and recording fake providers.

- Envoy's provider-cluster series (``envoy_cluster_upstream_rq_*``) count the requests sent,
  and no other cluster's series show;
- ``plano_requests_total`` is the sum of both workers (each worker's own ``/metrics`` holds
  its part);
- a worker SIGKILLed and restarted by the supervisor does not make counters go down;
- Envoy not answering its admin: the workers' series are still served, with
  ``plano_envoy_stats_up 0``;
- a taken ``--metrics-port`` fails the start with a message naming the flag.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from bench.overhead import children
from plano_extproc.config import load_config
from plano_extproc.metrics_server import MULTIPROC_ENV
from plano_extproc.names import EXTPROC_CLUSTER
from tests.conftest import seed_config
from tests.fakes import FakeProvider, free_port
from tests.gateway_proc import ROOT, GatewayProcess

pytestmark = pytest.mark.integration

MINI = "openai/gpt-4o-mini"
CLAUDE = "anthropic/claude-sonnet-4-20250514"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _config(openai_fake: FakeProvider, anthropic_fake: FakeProvider) -> str:
    return seed_config(
        openai_fake.base_url, anthropic_fake.base_url, router="  router: {type: none}"
    )


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("metrics")
    with GatewayProcess(_config(openai_fake, anthropic_fake), tmp, workers=2) as g:
        yield g


def _cluster(gw: GatewayProcess, model: str) -> str:
    cfg = load_config(gw.config_path)
    return next(p.cluster for p in cfg.providers if p.name == model)


def parse(text: str) -> Samples:
    """Every sample by its name as written (Envoy's counters keep their names; a parser that
    appends ``_total`` is not what a Prometheus server does) and its label set."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', series)))
        key = (name, labels)
        assert key not in out, f"duplicate series {line!r}"
        out[key] = float(value)
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, have), v in samples.items()
        if n == name and all(dict(have).get(k) == want for k, want in labels.items())
    )


def scrape(gw: GatewayProcess) -> Samples:
    resp = httpx.get(gw.metrics_url, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(resp.text)


def wait_for(get: Callable[[], Samples], ok: Callable[[Samples], bool], timeout: float) -> Samples:
    """Scrape until ``ok`` (Envoy flushes histograms every 5 s; a worker counts a request as
    its stream ends); returns the last scrape either way."""
    deadline = time.monotonic() + timeout
    samples = get()
    while not ok(samples) and time.monotonic() < deadline:
        time.sleep(0.25)
        samples = get()
    return samples


def oai(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)


def ant(gw: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="client-key", max_retries=0)


def chat(gw: GatewayProcess, n: int, model: str = MINI) -> None:
    for _ in range(n):
        oai(gw).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_up_prints_the_metrics_url(gw: GatewayProcess) -> None:
    assert f"gateway metrics: {gw.metrics_url}" in gw.lines
    # The per-worker admin URLs are still printed.
    assert len(gw.worker_admin) == 2


def test_envoy_provider_cluster_series_count_the_requests(gw: GatewayProcess) -> None:
    oa, an = _cluster(gw, MINI), _cluster(gw, CLAUDE)
    before = scrape(gw)
    chat(gw, 4)
    for _ in range(2):
        ant(gw).messages.create(
            model=CLAUDE, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )

    def delta(s: Samples, name: str, **labels: str) -> float:
        return total(s, name, **labels) - total(before, name, **labels)

    def done(s: Samples) -> bool:
        return (
            delta(s, "envoy_cluster_upstream_rq_time_count", envoy_cluster_name=oa) >= 4
            and delta(s, "envoy_cluster_upstream_rq_time_count", envoy_cluster_name=an) >= 2
        )

    after = wait_for(lambda: scrape(gw), done, 30)
    for cluster, n in ((oa, 4), (an, 2)):
        assert delta(after, "envoy_cluster_upstream_rq_total", envoy_cluster_name=cluster) == n
        xx = {"envoy_cluster_name": cluster, "envoy_response_code_class": "2"}
        assert delta(after, "envoy_cluster_upstream_rq_xx", **xx) == n
        assert delta(after, "envoy_cluster_upstream_rq_time_count", envoy_cluster_name=cluster) == n
        inf = {"envoy_cluster_name": cluster, "le": "+Inf"}
        assert delta(after, "envoy_cluster_upstream_rq_time_bucket", **inf) == n
        for counter in ("cx_connect_fail", "rq_retry", "rq_timeout"):
            name = f"envoy_cluster_upstream_{counter}"
            assert (name, (("envoy_cluster_name", cluster),)) in after, name
    assert total(after, "plano_envoy_stats_up") == 1
    # Provider clusters only: not the ext_proc cluster, nor anything else Envoy counts.
    clusters = {dict(labels).get("envoy_cluster_name") for _, labels in after}
    assert EXTPROC_CLUSTER not in clusters
    allowed = {c for c in clusters if c is None or c.startswith((oa, an))}
    assert clusters == allowed
    names = {n for n, _ in after if n.startswith("envoy_")}
    assert names <= {
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_cluster_upstream_rq_time_sum",
        "envoy_cluster_upstream_rq_time_count",
        "envoy_cluster_upstream_cx_connect_fail",
        "envoy_cluster_upstream_rq_retry",
        "envoy_cluster_upstream_rq_timeout",
    }


def _worker_requests(admin: str) -> float:
    """One worker's own count, from its per-process /metrics (what ``serve`` serves)."""
    return total(parse(httpx.get(admin + "/metrics", timeout=30).text), "plano_requests_total")


def decide(gw: GatewayProcess, n: int) -> None:
    body = {"model": MINI, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            r = client.post(gw.url + "/routing/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text


def test_worker_series_of_both_workers_are_summed(gw: GatewayProcess) -> None:
    """Decision requests: each is counted by the worker that answered it (Envoy spreads them
    over both); a proxied request is counted by whichever worker its usage record reaches."""
    n = 40
    before = total(scrape(gw), "plano_requests_total")
    own_before = [_worker_requests(a) for a in gw.worker_admin]
    decide(gw, n)
    after = total(
        wait_for(lambda: scrape(gw), lambda s: total(s, "plano_requests_total") >= before + n, 15),
        "plano_requests_total",
    )
    assert after - before == n
    own = [_worker_requests(a) - b for a, b in zip(gw.worker_admin, own_before, strict=True)]
    # Both workers served some of them, and the endpoint is their sum.
    assert all(x > 0 for x in own), own
    assert sum(own) == n


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _workers(gw: GatewayProcess) -> list[int]:
    assert gw.proc is not None
    return [p for p in children(gw.proc.pid) if "plano_extproc serve" in _cmdline(p)]


def _envoy(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    return next(p for p in children(gw.proc.pid) if "envoy" in _cmdline(p).split()[0])


def _multiproc_dir(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    prefix = MULTIPROC_ENV.encode() + b"="
    return next(e[len(prefix) :].decode() for e in env if e.startswith(prefix))


def _extproc_healthy(gw: GatewayProcess, workers: int) -> bool:
    text = httpx.get(f"http://127.0.0.1:{gw.admin_port}/clusters", timeout=10).text
    flags = [
        ln.rsplit("::", 1)[1]
        for ln in text.splitlines()
        if ln.startswith(EXTPROC_CLUSTER + "::") and "::health_flags::" in ln
    ]
    return flags == ["healthy"] * workers


def test_workers_share_a_fresh_multiproc_dir(gw: GatewayProcess) -> None:
    dirs = {_multiproc_dir(p) for p in _workers(gw)}
    assert len(dirs) == 1
    (d,) = dirs
    assert Path(d).is_dir() and Path(d).name.startswith("plano-metrics-")
    assert os.environ.get(MULTIPROC_ENV) != d


def test_killed_and_restarted_worker_does_not_make_counters_go_down(gw: GatewayProcess) -> None:
    """Needs the workers' ``plano_requests_total`` (plano_extproc/metrics.py, issue 10)."""
    oa = _cluster(gw, MINI)
    chat(gw, 6)
    time.sleep(6)  # one Envoy stats flush, so its histograms hold these too
    before = scrape(gw)
    assert total(before, "plano_requests_total") >= 6
    victim = _workers(gw)[0]
    restarts = sum("restarted (pid" in ln for ln in gw.lines)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum("restarted (pid" in ln for ln in gw.lines) > restarts and _extproc_healthy(gw, 2):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the worker was not restarted:\n" + gw.output()[-3000:])
    assert victim not in _workers(gw) and len(_workers(gw)) == 2
    after = scrape(gw)
    for (name, labels), value in before.items():
        if name.endswith(("_total", "_count", "_sum", "_bucket")):
            assert after.get((name, labels), 0) >= value, (name, labels)
    assert total(after, "plano_requests_total") == total(before, "plano_requests_total")
    # And counting goes on from there, the restarted worker included.
    chat(gw, 10)
    want = total(before, "plano_requests_total") + 10
    s = wait_for(lambda: scrape(gw), lambda s: total(s, "plano_requests_total") >= want, 15)
    assert total(s, "plano_requests_total") == want
    assert total(s, "envoy_cluster_upstream_rq_total", envoy_cluster_name=oa) == (
        total(before, "envoy_cluster_upstream_rq_total", envoy_cluster_name=oa) + 10
    )


def test_envoy_not_answering_still_serves_the_workers_series(gw: GatewayProcess) -> None:
    envoy = _envoy(gw)
    os.kill(envoy, signal.SIGSTOP)
    try:
        s = scrape(gw)
    finally:
        os.kill(envoy, signal.SIGCONT)
    assert total(s, "plano_envoy_stats_up") == 0
    assert not [n for n, _ in s if n.startswith("envoy_")]
    assert ("plano_envoy_stats_up", ()) in s
    assert total(scrape(gw), "plano_envoy_stats_up") == 1


def test_metrics_dir_is_removed_at_exit(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path).start()
    try:
        d = _multiproc_dir(_workers(g)[0])
        assert Path(d).is_dir()
        assert httpx.get(g.metrics_url, timeout=30).status_code == 200
    finally:
        assert g.stop() == 0
    assert not Path(d).exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(g.metrics_url, timeout=5)


def test_taken_metrics_port_names_the_flag(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config(openai_fake, anthropic_fake))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "plano_extproc", "up", str(cfg), "--log-level", "warning",
             "--address", "127.0.0.1", "--port", str(free_port()),
             "--envoy-admin-port", "0", "--metrics-port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"port 127.0.0.1:{port} is already in use" in out
    assert "--metrics-port" in out
    assert "plano-extproc up:" not in out


def test_metrics_port_zero_picks_a_free_port_and_prints_it(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path)
    g.metrics_port = 0
    with g:
        line = next(ln for ln in g.lines if ln.startswith("gateway metrics: "))
        url = line.split()[-1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url) and ":0/" not in url
        assert "plano_envoy_stats_up 1.0" in httpx.get(url, timeout=30).text
