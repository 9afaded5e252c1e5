"""`plano-extproc up` as a process: Ctrl-C, taken ports, workers, config, Envoy validate."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from plano_extproc.config import load_config
from plano_extproc.envoy_config import render_bootstrap, render_yaml
from plano_extproc.supervisor import wait_envoy_ready
from tests.conftest import seed_config
from tests.fakes import FakeProvider, free_port
from tests.gateway_proc import ROOT, GatewayProcess, assert_envoy_accepts, decisions_answered

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_dead(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _config(openai_fake: FakeProvider, anthropic_fake: FakeProvider) -> str:
    return seed_config(
        openai_fake.base_url, anthropic_fake.base_url, router="  router: {type: none}"
    )


def test_ctrl_c_stops_envoy_and_workers(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path, workers=2).start()
    assert g.proc is not None
    kids = _children(g.proc.pid)
    assert any("envoy" in _cmdline(k) for k in kids)
    assert sum("plano_extproc" in _cmdline(k) for k in kids) == 2
    assert httpx.get(g.url + "/healthz").status_code == 200
    assert g.stop() == 0
    assert _wait_dead(kids), [(_cmdline(k)) for k in kids if _alive(k)]


def _second_up(
    tmp_path: Path, config: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "second.yaml"
    cfg.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "plano_extproc", "up", str(cfg), "--log-level", "warning", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("taken", ["envoy-admin-port", "port", "grpc-port", "worker-admin-port"])
def test_second_up_on_a_taken_port_names_the_flag(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider, taken: str
) -> None:
    """Never a false "up" line because ANOTHER gateway answered (issue 11, item 15)."""
    config = _config(openai_fake, anthropic_fake)
    with GatewayProcess(config, tmp_path) as first:
        worker_admin = int(first.worker_admin[0].rsplit(":", 1)[1])
        ports = {"envoy-admin-port": free_port(), "port": free_port(), "grpc-port": 0}
        ports["worker-admin-port"] = 0
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        with held:
            taken_port = {
                "envoy-admin-port": first.admin_port,
                "port": first.port,
                "grpc-port": held.getsockname()[1],
                "worker-admin-port": worker_admin,
            }[taken]
            ports[taken] = taken_port
            args = [f"--{k}={v}" for k, v in ports.items()] + ["--address", "127.0.0.1"]
            res = _second_up(tmp_path, config, *args)
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert "plano-extproc up:" not in out
        assert f"port 127.0.0.1:{taken_port} is already in use" in out
        assert f"--{taken}" in out
        # The first gateway is unharmed.
        assert httpx.get(first.url + "/healthz").status_code == 200


def test_envoy_admin_port_zero_picks_a_free_port_and_prints_it(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(
        _config(openai_fake, anthropic_fake), tmp_path, extra_args=["--envoy-admin-port", "0"]
    )
    with g:
        line = next(ln for ln in g.lines if ln.startswith("envoy admin: "))
        admin = line.split()[-1]
        assert admin != "http://127.0.0.1:0"
        assert httpx.get(admin + "/ready").text.strip() == "LIVE"
        assert httpx.get(g.url + "/healthz").status_code == 200


def test_readiness_is_checked_against_the_envoy_we_started(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    """Another Envoy answering /ready on the admin port is not taken for ours."""
    with GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path) as other:
        ours = subprocess.Popen(["sleep", "30"])
        try:
            with pytest.raises(SystemExit) as e:
                wait_envoy_ready(
                    f"http://127.0.0.1:{other.admin_port}", ours, str(tmp_path / "x.yaml"), 1, 5
                )
            assert "is not the Envoy this gateway started" in str(e.value)
            assert "--envoy-admin-port" in str(e.value)
        finally:
            ours.kill()
            ours.wait()


def test_supervisor_killed_leaves_no_orphans(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    g = GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path).start()
    assert g.proc is not None
    kids = _children(g.proc.pid)
    os.kill(g.proc.pid, signal.SIGKILL)
    g.proc.wait(10)
    assert _wait_dead(kids)


def test_two_workers_serve_traffic(
    tmp_path: Path, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    with GatewayProcess(_config(openai_fake, anthropic_fake), tmp_path, workers=2) as g:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        for _ in range(40):
            r = httpx.post(g.url + "/routing/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200
        served = []
        for admin in g.worker_admin:
            text = httpx.get(admin + "/metrics").text
            served.append(decisions_answered(text))
        assert len(served) == 2 and sum(served) == 40
        assert all(n > 0 for n in served), served


def test_bad_config_fails_fast_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "version: v0.4.0\nlisteners: [{name: m, type: model}]\n"
        "model_providers:\n  - model: openai/gpt-4o\n    access_key: $PLANO_TEST_UNSET_KEY\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PLANO_TEST_UNSET_KEY"}
    for cmd in ("validate", "up"):
        res = subprocess.run(
            [sys.executable, "-m", "plano_extproc", cmd, str(cfg)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1
        assert "model_providers[0].access_key" in res.stderr
        assert "PLANO_TEST_UNSET_KEY" in res.stderr


def test_validate_ok(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "plano_extproc", "validate", str(ROOT / "examples/quickstart.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.yaml")),
)
def test_rendered_bootstrap_passes_envoy_validate(tmp_path: Path, path: str) -> None:
    cfg = load_config(ROOT / path, env={"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"})
    bootstrap = render_bootstrap(cfg, extproc=[("127.0.0.1", 9091), ("127.0.0.1", 9092)])
    assert_envoy_accepts(bootstrap, tmp_path)


def test_checked_in_envoy_example_matches_renderer() -> None:
    """envoy/envoy.yaml is the rendered quick-start; keep it in sync with the renderer."""
    cfg = load_config(ROOT / "examples/quickstart.yaml", env={})
    expected = render_yaml(render_bootstrap(cfg, extproc=[("127.0.0.1", 9091)]))
    assert (ROOT / "envoy/envoy.yaml").read_text() == expected


def test_open_file_limit_is_raised_for_envoy() -> None:
    # A soft limit of 256 would cap Envoy far below listeners.max_connections; `up` raises the
    # limit (inherited by Envoy) towards max_connections + max_concurrent_requests + 256, within
    # the hard limit.
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"hard open-file limit {hard} is below what this test needs")
    code = (
        "import resource\n"
        "from plano_extproc.supervisor import raise_fd_limit\n"
        "print(raise_fd_limit(4096), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4096", "4096"]
    assert "warning" not in res.stderr
