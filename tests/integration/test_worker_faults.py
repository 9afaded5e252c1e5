"""Worker faults through the real gateway (issue 11, item 8): a killed worker is restarted and
Envoy keeps traffic on the others; a hung worker is taken out by Envoy's health checks; a
worker that keeps dying stops ``up`` with a message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest

from plano_extproc.config import load_config
from plano_extproc.server.app import start, stop
from tests.conftest import seed_config
from tests.fakes import FakeProvider, free_port_run
from tests.gateway_proc import ROOT, GatewayProcess, decisions_answered
from tests.integration.test_lifecycle import _children, _cmdline, _wait_dead

pytestmark = pytest.mark.integration

BODY = {"messages": [{"role": "user", "content": "hi"}]}
DECISION = "/routing/v1/chat/completions"
CONCURRENCY = 8


def _config(openai_fake: FakeProvider, anthropic_fake: FakeProvider) -> str:
    return seed_config(
        openai_fake.base_url, anthropic_fake.base_url, router="  router: {type: none}"
    )


def _workers(g: GatewayProcess) -> list[int]:
    """Worker pids in start order (the order of the admin lines)."""
    assert g.proc is not None
    kids = [k for k in _children(g.proc.pid) if "plano_extproc" in _cmdline(k)]
    ports = [a.rsplit(":", 1)[1] for a in g.worker_admin]
    return [next(k for k in kids if f"--admin-port {p} " in _cmdline(k)) for p in ports]


def _served(admin: str) -> int:
    """Decisions a worker answered (its /metrics), or -1 while it is down."""
    try:
        text = httpx.get(admin + "/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1
    return decisions_answered(text)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


async def _load(
    url: str,
    total: int,
    on_done: Callable[[int], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> Counter[int]:
    """Up to ``total`` decision requests, CONCURRENCY at a time, stopping early once
    ``until()`` holds; status counts (0 = transport error)."""
    statuses: Counter[int] = Counter()
    sent = {"n": 0}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one_worker() -> None:
            while sent["n"] < total and not (until is not None and until()):
                sent["n"] += 1
                try:
                    r = await client.post(DECISION, json=BODY)
                    statuses[r.status_code] += 1
                    if r.status_code != 200:
                        assert r.json()["error"]["message"], r.text  # an error envelope
                except httpx.HTTPError:
                    statuses[0] += 1
                if on_done is not None:
                    on_done(sum(statuses.values()))

        await asyncio.wait_for(
            asyncio.gather(*(one_worker() for _ in range(CONCURRENCY))), timeout=120
        )
    return statuses


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_killed_worker_is_restarted_and_failures_stay_bounded(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider, transport: str
) -> None:
    config = _config(openai_fake, anthropic_fake)
    extra = ["--transport", transport]
    with GatewayProcess(config, tmp_path, workers=2, extra_args=extra) as g:
        victim = _workers(g)[0]
        killed: list[int] = []
        back_at: list[int] = []  # requests done when the restarted worker was ready
        done = {"n": 0}

        def kill_once(n: int) -> None:
            done["n"] = n
            if n >= 150 and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(n)
            if killed and not back_at and "ext_proc worker 0 restarted" in g.output():
                back_at.append(n)

        # Load from before the kill until 300 requests after the worker is back (bounded).
        statuses = asyncio.run(
            _load(
                g.url,
                30_000,
                kill_once,
                until=lambda: bool(back_at) and done["n"] > back_at[0] + 300,
            )
        )
        assert killed, statuses
        print(f"{transport}: SIGKILL after {killed[0]} requests: {dict(statuses)}")
        failed = sum(n for s, n in statuses.items() if s != 200)
        # Only requests in flight at the kill (at most CONCURRENCY) may fail.
        assert failed <= CONCURRENCY, statuses
        assert set(statuses) <= {200, 500, 503}, statuses  # 5xx: a JSON error envelope

        _wait(lambda: "ext_proc worker 0 restarted" in g.output(), 60, "worker 0 restarted")
        assert "ext_proc worker 0 exited unexpectedly (killed by SIGKILL)" in g.output()
        new = _workers(g)[0]
        assert new != victim
        assert httpx.get(g.worker_admin[0] + "/ready").json()["ready"] is True

        # Envoy sends traffic to the restarted worker again.
        def restarted_serves() -> bool:
            r = httpx.post(g.url + DECISION, json=BODY, timeout=10)
            assert r.status_code == 200, r.text
            return _served(g.worker_admin[0]) > 0

        _wait(restarted_serves, 30, "the restarted worker gets requests")
        assert g.proc is not None and g.proc.poll() is None


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_hung_worker_is_taken_out_of_rotation_then_restarted(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider, transport: str
) -> None:
    config = _config(openai_fake, anthropic_fake)
    extra = ["--transport", transport]
    with GatewayProcess(config, tmp_path, workers=2, extra_args=extra) as g:
        victim = _workers(g)[0]
        os.kill(victim, signal.SIGSTOP)
        try:
            # After a detection delay (Envoy's health checks) every request is answered by
            # the other worker, well before the supervisor's 10 s hang limit. A request that
            # went to the stopped worker is abandoned after 2 s and counts as a failure.
            streak = {"ok": 0}

            def twenty_in_a_row() -> bool:
                try:
                    ok = httpx.post(g.url + DECISION, json=BODY, timeout=2).status_code == 200
                except httpx.TimeoutException:
                    ok = False
                streak["ok"] = streak["ok"] + 1 if ok else 0
                return streak["ok"] >= 20

            _wait(twenty_in_a_row, 30, "20 requests in a row succeed")
            assert "killing it" not in g.output()
            statuses = asyncio.run(_load(g.url, 200))
            assert statuses == Counter({200: 200}), statuses
            # The supervisor kills the hung worker and starts a new one.
            _wait(lambda: "ext_proc worker 0 restarted" in g.output(), 60, "worker 0 restarted")
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone once it was killed
                os.kill(victim, signal.SIGCONT)
        assert "ext_proc worker 0 has not answered /ready for 10s; killing it" in g.output()
        _wait(
            lambda: (
                httpx.post(g.url + DECISION, json=BODY, timeout=10).status_code == 200
                and _served(g.worker_admin[0]) > 0
            ),
            30,
            "the restarted worker gets requests",
        )
        assert _workers(g)[0] != victim


def test_worker_that_keeps_dying_stops_up(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path).start()
    assert g.proc is not None
    kids = _children(g.proc.pid)
    # Every restart now fails at start-up (unreadable config) until the supervisor gives up.
    g.config_path.write_text("version: v0.4.0\nlisteners: not-a-list\n")
    os.kill(_workers(g)[0], signal.SIGKILL)
    try:
        assert g.proc.wait(90) == 1
    finally:
        g.stop()
    out = g.output()
    assert "ext_proc worker 0 exited unexpectedly (killed by SIGKILL); restarting in 0.5s" in out
    assert "restarting in 4s" in out
    assert "it died 5 times within 60s; stopping the gateway" in out
    assert _wait_dead(kids)


def test_dead_envoy_takes_the_gateway_down(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path).start()
    assert g.proc is not None
    kids = _children(g.proc.pid)
    envoy = next(k for k in kids if "envoy" in _cmdline(k) and "plano_extproc" not in _cmdline(k))
    os.kill(envoy, signal.SIGKILL)
    assert g.proc.wait(20) == 1
    assert _wait_dead(kids)
    assert "envoy exited unexpectedly (killed by SIGKILL); stopping the gateway" in g.output()


def test_serve_workers_restart_a_killed_worker(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    """``serve --workers N`` (no Envoy) gets the same restarts."""
    path = tmp_path / "c.yaml"
    path.write_text(_config(openai_fake, anthropic_fake))
    admin = free_port_run(2)  # worker i's admin port is admin + i
    argv = [sys.executable, "-m", "plano_extproc", "serve", str(path), "--workers", "2"]
    argv += ["--port", "0", "--admin-port", str(admin), "--log-level", "warning"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        lines.extend(line.rstrip("\n") for line in proc.stdout)

    threading.Thread(target=pump, daemon=True).start()
    try:
        _wait(
            lambda: any("workers ready" in ln for ln in lines) or proc.poll() is not None,
            90,
            "workers ready",
        )
        assert proc.poll() is None, "\n".join(lines)
        worker = next(k for k in _children(proc.pid) if f"--admin-port {admin} " in _cmdline(k))
        os.kill(worker, signal.SIGKILL)
        _wait(lambda: any("worker 0 restarted" in ln for ln in lines), 60, "restarted")
        assert httpx.get(f"http://127.0.0.1:{admin}/ready").json()["ready"] is True
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


async def test_grpcio_transport_answers_grpc_health(
    openai_fake: FakeProvider, anthropic_fake: FakeProvider, tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(_config(openai_fake, anthropic_fake))
    running = await start(load_config(path), "127.0.0.1", 0, transport="grpcio")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert await check(b"", timeout=5) == b"\x08\x01"
            name = b"envoy.service.ext_proc.v3.ExternalProcessor"
            assert await check(b"\x0a" + bytes([len(name)]) + name, timeout=5) == b"\x08\x01"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await check(b"\x0a\x03foo", timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stop(running)
