"""What one token rate limit (Plano ``ratelimits``) costs a request: no limit vs a limit whose
budget lives in the workers' shared-memory table vs one whose budget lives in Redis.

Issue target (docs/benchmarks.md): with one limit configured, the memory path adds <= 0.05 ms
of CPU per request and the Redis path <= 0.3 ms to p50, both against no limit, A/B in one run.

Four gateways from this tree, started once, on the fixed upstream of bench/overhead.py, all
with ``router: {type: none}`` (overhead.py's proxy row) and the same wrk script, which sends
``x-tenant: bench`` to all of them so that only the config differs:

- ``none``: no ``ratelimits``;
- ``memory``: one limit on the requested model selected by ``x-tenant``, a budget so large
  that nothing is refused; the budget in the table every worker maps;
- ``redis``: the same limit with ``routing.session_cache`` on a throwaway redis-server
  (tests/redis_server.py, free port): a Lua script per request, one more per settlement;
- ``control``: a second gateway like ``none`` (A/A): its difference from ``none`` is what two
  identical gateways differ by in the same run, the noise floor of the other rows' deltas.

The fixed upstream's reply carries ``usage`` (41 tokens), so every request's usage record
also settles its budget (the estimate differs from 41: one ``adjust`` per request), as in
production. Pre-flight: a request per gateway must be answered 200 with the client's key
replaced, and the limited gateways must count its tokens in ``plano_ratelimit_tokens_total``
(charged at admission, settled from the usage record); for Redis, the budget scripts must run
in Redis. After the measurements the same counters must cover every request wrk completed, so
a limited row cannot silently have measured the no-limit path.

Load: interleaved rounds (a 2 s warm-up round, then ``--rounds`` of ``--duration`` s) at
c=1 and c=16. Rows are medians of req/s, p50, ext_proc and Envoy CPU per request (utime+stime
over the wrk window / requests) and, for the Redis row, redis-server's CPU per request (its
own column, not in the sum). The Δ columns are paired: each round's difference from the same
round's ``none``, then the median of those (rounds drift on a shared host; a row's rounds run
back to back with ``none``'s). Needs wrk.

    .venv/bin/python bench/ratelimit.py [--rounds 5] [--duration 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ov

from tests.redis_server import RedisServer, find_redis_server

TENANT = "bench"
LIMIT = f"""
ratelimits:
  - model: {ov.MODEL}
    selector: {{key: x-tenant, value: "*"}}
    limit: {{tokens: 100000000, unit: minute}}
"""
# A second gateway without limits, measured like the others: its difference from ``none`` is
# what two identical gateways differ by in one run (the A/A noise floor of the other deltas).
CONTROL = "control"
LABEL = f"{ov.MODEL} x-tenant=*"  # the limit's label in /ready and the metrics
USAGE_TOKENS = 41  # the fixed upstream's usage.total_tokens (overhead.COMPLETION)


# ---------------------------------------------------------------------------- redis


def redis_info(port: int, section: str) -> dict[str, str]:
    """``INFO <section>`` over a raw socket (bounded reads), as a flat dict."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        buf = b""
        for _ in range(1000):
            buf += s.recv(65536)
            head, sep, rest = buf.partition(b"\r\n")
            if sep and head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
        else:
            raise SystemExit("redis INFO: no complete reply")
    out = {}
    for line in rest.decode().splitlines():
        if ":" in line and not line.startswith("#"):
            k, _, v = line.partition(":")
            out[k] = v
    return out


def redis_script_calls(port: int) -> int:
    """EVAL/EVALSHA (and FCALL) calls Redis has executed so far."""
    total = 0
    for k, v in redis_info(port, "commandstats").items():
        if k in ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_fcall"):
            total += int(v.split(",", 1)[0].split("=", 1)[1])
    return total


def redis_all_calls(port: int) -> dict[str, int]:
    return {
        k.removeprefix("cmdstat_"): int(v.split(",", 1)[0].split("=", 1)[1])
        for k, v in redis_info(port, "commandstats").items()
    }


def proc_cpu(pid: int) -> float:
    return ov.cpu_seconds([pid])


# ---------------------------------------------------------------------------- gateways


@dataclass
class Row:
    name: str
    gw: ov.Gateway
    metrics_url: str
    samples: dict[int, list[ov.Sample]] = field(default_factory=dict)
    redis_ms: dict[int, list[float]] = field(default_factory=dict)
    requests: int = 0  # every request wrk completed, warm-up included


def gateway_urls(out: Path) -> tuple[str, list[str]]:
    """The aggregated /metrics URL and the workers' admin bases, from ``up``'s stdout."""
    metrics, admins = "", []
    for line in out.read_text().splitlines():
        if line.startswith("gateway metrics:"):
            metrics = line.split()[2]
        if line.startswith("ext_proc worker admin:"):
            admins.append(line.split()[3].rsplit("/", 1)[0])
    if not metrics or not admins:
        raise SystemExit(f"no metrics/admin URLs in {out}")
    return metrics, admins


def tokens_counted(metrics_url: str) -> float:
    """``plano_ratelimit_tokens_total{limit=LABEL}`` on the gateway's aggregated /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("plano_ratelimit_tokens_total{") and f'limit="{LABEL}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_tokens(metrics_url: str, at_least: float, within: float = 20.0) -> float:
    """Bounded wait: workers publish their series every ~2 s; usage records come late."""
    deadline = time.monotonic() + within
    seen = tokens_counted(metrics_url)
    while seen < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = tokens_counted(metrics_url)
    return seen


def preflight(row: Row, body: str, redis_port: int | None) -> None:
    url = f"http://127.0.0.1:{row.gw.port}/v1/chat/completions"
    scripts0 = redis_script_calls(redis_port) if redis_port else 0
    before = tokens_counted(row.metrics_url)
    status, headers, payload = ov.post(url, body, {"x-tenant": TENANT})
    ov.check(status == 200, f"{row.name}: HTTP 200", (status, payload[:300]))
    auth = headers.get("x-echo-authorization")
    ov.check(auth == f"Bearer {ov.OPENAI_KEY}", f"{row.name}: provider key set", headers)
    usage = json.loads(payload).get("usage")
    ov.check(bool(usage) and usage.get("total_tokens") == USAGE_TOKENS, "reply usage", usage)
    row.requests += 1
    if row.name in ("none", CONTROL):
        ov.check(before == 0.0, "no limit: no tokens counted", before)
        return
    seen = wait_tokens(row.metrics_url, before + USAGE_TOKENS)
    ov.check(seen >= before + USAGE_TOKENS, f"{row.name}: the budget charged", seen - before)
    print(f"pre-flight {row.name}: plano_ratelimit_tokens_total +{seen - before:.0f}",
          file=sys.stderr)  # fmt: skip
    if redis_port:
        calls = redis_script_calls(redis_port) - scripts0
        ov.check(calls >= 1, "redis: budget scripts ran", calls)
        print(f"pre-flight redis: {calls} script call(s) for one request", file=sys.stderr)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument("--duration", type=int, default=6, help="seconds per wrk run (default 6)")
    ap.add_argument("--conns", default="1,16", help="wrk connection counts (default 1,16)")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench/ratelimit.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.conns.split(",")]
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="plano-ratelimit-bench-"))
    body = ov.chat_body()
    script = work / "chat.lua"
    script.write_text(f'wrk.headers["x-tenant"] = "{TENANT}"\n' + ov.lua_script(body, unique=False))
    redis = RedisServer(binary=find_redis_server())
    upstream: ov.Envoy | None = None
    rows: list[Row] = []
    try:
        redis.start()
        redis_pid = int(redis_info(redis.port, "server")["process_id"])
        up_port, up_admin = ov.free_port(), ov.free_port()
        upstream = ov.Envoy.start(
            ov.upstream_bootstrap(up_port, up_admin), up_port, up_admin, work, "upstream"
        )
        cache = f"  session_cache: {{type: redis, url: {redis.url}}}\n"
        for name in ("none", "memory", "redis", CONTROL):
            text = ov.config_yaml(up_port, ov.free_port(), "none")
            if name not in ("none", CONTROL):
                text += LIMIT
            if name == "redis":
                text = text.replace("routing:\n", "routing:\n" + cache, 1)
            cfg = work / f"{name}.yaml"
            cfg.write_text(text)
            gw = ov.Gateway.start(str(cfg), 1, 1, work, f"gw-{name}")
            metrics_url, admins = gateway_urls(work / f"gw-{name}.out")
            row = Row(name, gw, metrics_url)
            rows.append(row)
            with urllib.request.urlopen(admins[0] + "/ready", timeout=10) as resp:
                ready = json.loads(resp.read())["ratelimits"]
            if name in ("none", CONTROL):
                ov.check(ready is None, f"{name}: no limits in /ready", ready)
            else:
                ov.check(LABEL in ready["limits"], f"{name}: the limit in /ready", ready)
                want = "redis" if name == "redis" else None
                backend = ready["store"]["backend"]
                ov.check(want is None or backend == want, f"{name}: store backend", ready)
                ov.check(want is not None or backend != "redis", f"{name}: store", ready)
                print(f"{name}: /ready ratelimits store {ready['store']}", file=sys.stderr)
            preflight(row, body, redis.port if name == "redis" else None)

        redis_calls0 = redis_all_calls(redis.port)
        redis_requests = 0
        for conns_n in conns:
            for rnd in range(args.rounds + 1):  # round 0 warms up
                duration = 2 if rnd == 0 else args.duration
                for row in rows:
                    url = f"http://127.0.0.1:{row.gw.port}/v1/chat/completions"
                    r0 = proc_cpu(redis_pid)
                    x = ov.run_wrk(url, script, conns_n, duration, row.gw.worker_pids(),
                                   row.gw.envoy_pids())  # fmt: skip
                    r1 = proc_cpu(redis_pid)
                    n = round(x.rps * duration)  # approximate; only for the totals check
                    row.requests += n
                    if row.name == "redis":
                        redis_requests += n
                    if rnd == 0:
                        continue
                    row.samples.setdefault(conns_n, []).append(x)
                    redis_ms = (r1 - r0) * 1000 / max(1.0, x.rps * duration)
                    row.redis_ms.setdefault(conns_n, []).append(redis_ms)
                    print(
                        f"round {rnd} c={conns_n:<2} {row.name:<6} {x.rps:8,.0f} req/s  "
                        f"p50 {x.p50_ms:6.3f} ms  ext_proc {ov.fmt_ms(x.server_ms, 3)} ms/req  "
                        f"envoy {x.envoy_ms:.3f} ms/req  redis-server {redis_ms:.3f} ms/req",
                        file=sys.stderr,
                        flush=True,
                    )
        # Every request of the limited rows charged and settled: tokens counted cover them
        # (the request counts come from wrk's rate: allow 2 % for rounding).
        for row in rows[1:3]:
            floor = 0.98 * row.requests * USAGE_TOKENS
            seen = wait_tokens(row.metrics_url, floor, within=30)
            ov.check(seen >= floor, f"{row.name}: tokens counted for every request",
                     (seen, row.requests))  # fmt: skip
            print(f"{row.name}: {seen:,.0f} tokens counted for ~{row.requests:,} requests "
                  f"({seen / row.requests:.1f} per request)", file=sys.stderr)  # fmt: skip
        calls1 = redis_all_calls(redis.port)
        per_req = {
            k: (calls1.get(k, 0) - redis_calls0.get(k, 0)) / max(1, redis_requests)
            for k in calls1
            if calls1.get(k, 0) != redis_calls0.get(k, 0)
        }
        print("redis commands per request of the redis row (commands inside the scripts too): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_req.items())),
              file=sys.stderr)  # fmt: skip
        redis_summary = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_req.items()))
    finally:
        for row in rows:
            row.gw.stop()
        if upstream is not None:
            upstream.stop()
        redis.stop()
    load1 = os.getloadavg()
    print()
    print(f"machine: {ov.machine()}")
    print(
        f"wrk -t1 -c<conc> -d{args.duration}s, {args.rounds} interleaved rounds after a 2 s "
        f"warm-up, body {len(body)} B + x-tenant header, 1 ext_proc worker (h2), gateway Envoy "
        f"--concurrency 1, upstream reply has usage ({USAGE_TOKENS} tokens: settlements run), "
        f"loadavg before {load0[0]:.2f} / after {load1[0]:.2f}"
    )
    print(f"redis commands per request (redis row; inside the scripts too): {redis_summary}")
    print()
    print(table(rows, conns))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def table(rows: list[Row], conns: list[int]) -> str:
    lines = [
        "| limit | conc | req/s | p50 ms | Δp50 ms | ext_proc CPU ms/req | Envoy CPU ms/req "
        "| sum ms/req | Δext_proc ms | Δsum ms | redis-server CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conns:
        base = rows[0].samples[c]
        for row in rows:
            xs = row.samples[c]
            rps = statistics.median(x.rps for x in xs)
            p50 = statistics.median(x.p50_ms for x in xs)
            srv = statistics.median(x.server_ms or 0.0 for x in xs)
            env = statistics.median(x.envoy_ms for x in xs)
            tot = statistics.median((x.server_ms or 0.0) + x.envoy_ms for x in xs)
            if row is rows[0]:
                deltas = "| - | "
                dcpu = "- | - |"
            else:
                # Each round against the same round of ``none`` (the rows of a round run
                # back to back), then the median: the host's drift between rounds cancels.
                pairs = list(zip(xs, base, strict=True))
                dp50 = statistics.median(x.p50_ms - b.p50_ms for x, b in pairs)
                dsrv = statistics.median(
                    (x.server_ms or 0.0) - (b.server_ms or 0.0) for x, b in pairs
                )
                dtot = statistics.median(
                    (x.server_ms or 0.0) + x.envoy_ms - (b.server_ms or 0.0) - b.envoy_ms
                    for x, b in pairs
                )
                deltas = f"| {dp50:+.3f} | "
                dcpu = f"{dsrv:+.3f} | {dtot:+.3f} |"
            redis = (
                f" {statistics.median(row.redis_ms[c]):.3f} |" if row.name == "redis" else " - |"
            )
            lines.append(
                f"| {row.name} | {c} | {rps:,.0f} | {p50:.3f} {deltas}{srv:.3f} | {env:.3f} "
                f"| {tot:.3f} | {dcpu}{redis}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
