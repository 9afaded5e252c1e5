"""How much of a pass-through request's CPU any ext_proc worker would cost (issue #14).

One run starts, on 127.0.0.1 with free ports (bench/overhead.py's pieces):

- the fast upstream and ``direct`` (bare Envoy, no ext_proc), as in bench/overhead.py;
- two workers, each ``serve`` on the same ``router: {type: none}`` config: ``real`` (this
  tree's worker) and ``replay`` (bench/replay_worker.py: replays the first request's replies,
  so its CPU is only the transport: frames, protobuf, usage records);
- for each worker, two gateway Envoys rendered by ``render_bootstrap``: ``full`` (as
  ``plano-extproc up`` runs it) and ``bare`` (the same bootstrap with only the routing ext_proc
  filter before the router: no usage log, usage extractors, hide-usage Lua filter,
  response-translation filter or header sanitiser).

Every row gets the same ~300-byte chat request from ``wrk -t1 -c<conc>`` (overhead.py's Lua
script), interleaved rounds with the order rotating; CPU per request is utime+stime of the
Envoy and of the worker over the wrk window (a worker shared by two Envoys is only loaded by
the row being measured). Rows show medians over rounds and the ratio of the row's Envoy +
worker CPU to ``direct``'s.

What it answers: ``replay`` + ``bare`` is what the ext_proc protocol itself costs (Envoy's
gRPC client and the smallest worker), ``replay`` + ``full`` adds the gateway's Envoy-side
features, ``real`` adds our request logic.

    .venv/bin/python bench/extproc_floor.py [--conc 16] [--rounds 5] [--duration 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import (
    Envoy,
    Sample,
    chat_body,
    config_yaml,
    direct_bootstrap,
    lua_script,
    machine,
    post,
    run_wrk,
    stop_proc,
    upstream_bootstrap,
    wait_for_output,
)

from plano_extproc.config import load_config
from plano_extproc.envoy_config import render_bootstrap
from plano_extproc.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
ROUTING_FILTER = "envoy.filters.http.ext_proc"


def bare(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """``bootstrap`` with only the routing ext_proc filter before the router, no access log."""
    out = copy.deepcopy(bootstrap)
    for listener in out["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                hcm["http_filters"] = [
                    x
                    for x in hcm["http_filters"]
                    if x["name"] in (ROUTING_FILTER, "envoy.filters.http.router")
                ]
                hcm.pop("access_log", None)
    return out


def start_worker(script: list[str], config: Path, work: Path, name: str) -> tuple[Any, int]:
    port, admin = free_port(), free_port()
    out = work / f"{name}.out"
    proc = subprocess.Popen(
        [sys.executable, *script, "serve", str(config), "--host", "127.0.0.1", "--port",
         str(port), "--admin-port", str(admin), "--log-level", "warning"],
        stdout=out.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    wait_for_output(proc, out, b"READY", f"worker {name}", 120)
    return proc, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--conc", type=int, default=16, help="wrk connections")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="plano-floor-"))
    stops: list[Any] = []
    try:
        up_port, up_admin = free_port(), free_port()
        stops.append(Envoy.start(upstream_bootstrap(up_port, up_admin), up_port, up_admin,
                                 work, "upstream"))  # fmt: skip
        cfg_path = work / "config.yaml"
        cfg_path.write_text(config_yaml(up_port, free_port(), "none"))
        config = load_config(str(cfg_path))
        d_port, d_admin = free_port(), free_port()
        direct = Envoy.start(direct_bootstrap(str(cfg_path), d_port, d_admin), d_port, d_admin,
                             work, "direct")  # fmt: skip
        stops.append(direct)
        rows: dict[str, tuple[int, list[int], list[int]]] = {"direct": (d_port, direct.pids(), [])}
        for worker, script in (("real", ["-m", "plano_extproc"]),
                               ("replay", [str(ROOT / "bench" / "replay_worker.py")])):  # fmt: skip
            proc, grpc_port = start_worker(script, cfg_path, work, worker)
            stops.append(proc)
            for kind in ("full", "bare"):
                port, admin = free_port(), free_port()
                boot = render_bootstrap(config, extproc=[("127.0.0.1", grpc_port)],
                                        admin_port=admin, listen_address="127.0.0.1",
                                        listen_port=port)  # fmt: skip
                envoy = Envoy.start(boot if kind == "full" else bare(boot), port, admin, work,
                                    f"{worker}-{kind}")  # fmt: skip
                stops.append(envoy)
                rows[f"{worker} worker, {kind} Envoy"] = (port, envoy.pids(), [proc.pid])
        script = work / "chat.lua"
        script.write_text(lua_script(chat_body(), unique=False))
        for name, (port, _, _) in rows.items():  # one request each first (replay keeps it)
            status, _, answer = post(f"http://127.0.0.1:{port}/v1/chat/completions", chat_body())
            if status != 200:
                raise SystemExit(f"{name}: pre-flight answered {status}: {answer[:300]!r}")
        samples: dict[str, list[Sample]] = {name: [] for name in rows}
        names = list(rows)
        for r in range(-1, args.rounds):  # round -1: warm-up, not kept
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                port, envoy_pids, worker_pids = rows[name]
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                s = run_wrk(url, script, args.conc, args.duration if r >= 0 else 2,
                            worker_pids, envoy_pids)  # fmt: skip
                if r >= 0:
                    samples[name].append(s)
        base = statistics.median(s.envoy_ms for s in samples["direct"])
        print(f"\n{machine()}\nwrk -t1 -c{args.conc} -d{args.duration}s, {args.rounds} rounds\n")
        print("| row | Envoy CPU ms/req | worker CPU ms/req | total | x direct | req/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, ss in samples.items():
            envoy_ms = statistics.median(s.envoy_ms for s in ss)
            worker_ms = statistics.median((s.server_ms or 0.0) for s in ss)
            rps = statistics.median(s.rps for s in ss)
            total = envoy_ms + worker_ms
            print(f"| {name} | {envoy_ms:.3f} | {worker_ms:.3f} | {total:.3f} | "
                  f"{total / base:.2f}x | {rps:,.0f} |")  # fmt: skip
    finally:
        for s in reversed(stops):
            if isinstance(s, subprocess.Popen):
                stop_proc(s)
            else:
                s.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
