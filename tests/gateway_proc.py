"""Start the real gateway (``plano-extproc up``: ext_proc workers + Envoy) for a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    def __init__(
        self,
        config_text: str,
        tmp_dir: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.metrics_port = free_port()  # the aggregated /metrics (``up --metrics-port``)
        self.config_path = tmp_dir / f"config-{self.port}.yaml"
        self.config_path.write_text(config_text)
        self.workers = workers
        self.env = {**os.environ, **(env or {})}
        self.extra_args = extra_args or []
        self.lines: list[str] = []
        self.worker_admin: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 90.0) -> GatewayProcess:
        """Start ``up``. Ports are picked free when this object is made, and another gateway
        starting meanwhile may take one (its workers pick theirs at run time): a start that
        fails with a port in use is retried on fresh ports, at most three times."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError:
                if attempt == 2 or not any("already in use" in line for line in self.lines):
                    raise
                self.port, self.admin_port = free_port(), free_port()
                self.metrics_port = free_port()
                self.lines, self.worker_admin = [], []
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> GatewayProcess:
        argv = [
            sys.executable,
            "-m",
            "plano_extproc",
            "up",
            str(self.config_path),
            "--address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--envoy-admin-port",
            str(self.admin_port),
            "--metrics-port",
            str(self.metrics_port),
            "--workers",
            str(self.workers),
            "--envoy-concurrency",
            "1",
            "--log-level",
            "warning",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("ext_proc worker admin:"):
                    self.worker_admin.append(line.split()[3].rsplit("/", 1)[0])
                if line.startswith("plano-extproc up:"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gateway did not start:\n" + "\n".join(self.lines[-40:]))
        return self

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def decisions_answered(metrics_text: str) -> int:
    """The decision requests a worker answered (2xx), from its own /metrics text."""
    return int(
        sum(
            float(line.split()[-1])
            for line in metrics_text.splitlines()
            if line.startswith("plano_requests_total{")
            and 'endpoint="decision"' in line
            and 'status_class="2xx"' in line
        )
    )


def assert_envoy_accepts(bootstrap: dict[str, object], tmp_path: Path) -> None:
    """``envoy --mode validate`` on a rendered bootstrap: Envoy itself accepts the config."""
    from plano_extproc.envoy_config import render_yaml
    from plano_extproc.supervisor import envoy_binary

    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(bootstrap))
    res = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
