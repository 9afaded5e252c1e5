"""Run a throw-away Prometheus server (Debian's ``prometheus`` package) for tests.

It listens on 127.0.0.1 on a free port picked at run time, keeps its TSDB in its own
temporary directory (removed on ``stop()``) and scrapes the given targets every second.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.fakes import free_port


class PrometheusError(RuntimeError):
    """prometheus could not be found, did not come up or a query failed."""


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    """One prometheus process scraping ``targets`` (``host:port`` with ``/metrics``) as job
    ``job``; ``query()`` runs an instant query through the HTTP API."""

    def __init__(
        self,
        targets: list[str],
        *,
        job: str = "plano",
        scrape_interval: str = "1s",
        startup_timeout: float = 20.0,
    ) -> None:
        binary = find_prometheus()
        if binary is None:
            raise PrometheusError("no prometheus binary: apt-get install prometheus")
        self.binary = binary
        self.targets = targets
        self.job = job
        self.scrape_interval = scrape_interval
        self.startup_timeout = startup_timeout
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        targets = ", ".join(f'"{t}"' for t in self.targets)
        return (
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  scrape_timeout: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            f"  - job_name: {self.job}\n"
            "    static_configs:\n"
            f"      - targets: [{targets}]\n"
        )

    def _log_tail(self) -> str:
        if self._dir is None or not (self._dir / "prometheus.log").exists():
            return ""
        return (self._dir / "prometheus.log").read_text(errors="replace")[-2000:]

    def start(self) -> PrometheusServer:
        self._dir = Path(tempfile.mkdtemp(prefix="plano-prometheus-test-"))
        config = self._dir / "prometheus.yml"
        config.write_text(self._config())
        for _ in range(3):  # a freshly picked port may be taken in between
            self.port = free_port()
            with (self._dir / "prometheus.log").open("ab") as log:
                self._proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self._dir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready():
                return self
            self._terminate()
        tail = self._log_tail()
        self.stop()
        raise PrometheusError(f"prometheus did not become ready:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                if self._client.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def query(self, promql: str) -> dict[str, Any]:
        """The JSON answer of ``/api/v1/query`` (any status; the caller checks it)."""
        resp = self._client.get(self.url + "/api/v1/query", params={"query": promql})
        try:
            body: dict[str, Any] = resp.json()
        except ValueError as exc:
            raise PrometheusError(f"{resp.status_code}: {resp.text[:500]}") from exc
        return body

    def vector(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result list; raises unless Prometheus says ``success``."""
        body = self.query(promql)
        if body.get("status") != "success":
            raise PrometheusError(f"{promql}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        self._terminate()
        self._client.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
