"""Routed requests through one tree's gateway with failover on vs ``enabled: false``.

Isolates what failover adds to a routed request that succeeds at once from everything else
that differs between trees (``bench/overhead.py --baseline`` compares trees). Starts the same
fake router LLM and fixed upstream as bench/overhead.py, two gateways, and interleaves wrk runs
(c=1 and 16, 4 rounds of 6 s): medians of req/s, p50, ext_proc and Envoy CPU per request.
Needs wrk. Usage: .venv/bin/python bench/failover_onoff.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ov

ROUNDS, SECONDS = 4, 6


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="plano-failover-onoff-"))
    fake = ov.FakeRouter(ov.ROUTE).start()
    up_port, up_admin = ov.free_port(), ov.free_port()
    upstream = ov.Envoy.start(
        ov.upstream_bootstrap(up_port, up_admin), up_port, up_admin, work, "upstream"
    )
    script = work / "chat.lua"
    script.write_text(ov.lua_script(ov.chat_body(), unique=False))
    gateways: dict[str, ov.Gateway] = {}
    try:
        for name, knob in (("on", ""), ("off", "  failover: {enabled: false}\n")):
            cfg = work / f"{name}.yaml"
            text = ov.routed_config_yaml(up_port, ov.free_port(), fake.port)
            cfg.write_text(text.replace("routing:\n", "routing:\n" + knob, 1))
            gateways[name] = ov.Gateway.start(str(cfg), 1, 1, work, f"gw-{name}")
        for conns in (1, 16):
            samples: dict[str, list[ov.Sample]] = {k: [] for k in gateways}
            for duration in [2] + [SECONDS] * ROUNDS:  # the first round warms up
                for name, g in gateways.items():
                    url = f"http://127.0.0.1:{g.port}/v1/chat/completions"
                    s = ov.run_wrk(url, script, conns, duration, g.worker_pids(), g.envoy_pids())
                    if duration == SECONDS:
                        samples[name].append(s)
            for name, xs in samples.items():
                print(
                    f"c={conns} failover {name}: "
                    f"{statistics.median(x.rps for x in xs):,.0f} req/s, "
                    f"p50 {statistics.median(x.p50_ms for x in xs):.2f} ms, "
                    f"ext_proc {statistics.median(x.server_ms or 0.0 for x in xs):.3f} ms/req, "
                    f"Envoy {statistics.median(x.envoy_ms for x in xs):.3f} ms/req",
                    flush=True,
                )
    finally:
        for g in gateways.values():
            g.stop()
        upstream.stop()
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
