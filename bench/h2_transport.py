"""CPU per ext_proc stream of the built-in HTTP/2 transport alone, A/B between source files.

Why: the end-to-end bench (``overhead.py``) includes Envoy, wrk and the upstream, whose noise
on a shared 2-core machine is larger than the transport's own cost. Here a server process runs
one ``server/h2.py`` (given as a file, so an older copy can be measured against the current
one) with the real ``ExtProcStream`` / ``Gateway`` (router none), and this process plays
Envoy over one HTTP/2 connection: per request the same frames Envoy sends (HEADERS with a
repeated header block, the request_headers message, then the request_body message, and an
RST_STREAM once the stream is over), ``--streams`` requests in flight, connection
WINDOW_UPDATEs as replies arrive. The server's utime+stime (from /proc) over ``--requests``
requests gives µs per request. Variants run interleaved, ``--runs`` times; medians shown.

    .venv/bin/python bench/h2_transport.py [--requests 20000] [--runs 5] [--streams 16] \\
        NAME=path/to/h2.py [NAME=path/to/other_h2.py ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import hpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.extproc_messages import body_msg, headers_msg  # noqa: E402

SERVER = textwrap.dedent(
    """
    import asyncio, importlib.util, sys
    import uvloop
    from plano_extproc.affinity.memory import MemorySessionCache
    from plano_extproc.config import parse_config
    from plano_extproc.gateway import Gateway
    from plano_extproc.metrics import Metrics
    from plano_extproc.routing.base import NullRouter
    from plano_extproc.server.servicer import ExtProcStream
    spec = importlib.util.spec_from_file_location("h2_under_test", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    CONFIG = '''
    version: v0.4.0
    listeners: [{name: m, type: model, port: 12000}]
    model_providers:
      - model: openai/gpt-4o-mini
        access_key: sk-test
        default: true
    routing:
      router: {type: none}
    routing_preferences:
      - {name: chat, description: small talk, models: [openai/gpt-4o-mini]}
    '''
    async def main():
        gateway = Gateway(parse_config(CONFIG), NullRouter(), MemorySessionCache())
        metrics = Metrics()
        server = mod.H2Server(lambda: ExtProcStream(gateway, metrics))
        port = await server.start("127.0.0.1", 0)
        print(port, flush=True)
        await asyncio.Event().wait()
    uvloop.install()
    asyncio.run(main())
    """
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BODY = (
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": '
    b'"Write a Python function that implements binary search over a sorted list"}]}'
)


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    )


def grpc(msg: object) -> bytes:
    raw = msg.SerializeToString()  # type: ignore[attr-defined]
    return b"\x00" + len(raw).to_bytes(4, "big") + raw


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, requests: int, streams: int, pid: int) -> float:
    """Drive ``requests`` ext_proc streams; return the server's CPU µs per request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    enc = hpack.Encoder()
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
        (":authority", "ext_proc"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "200m"),
    ]
    first = enc.encode(fields)  # fills the dynamic table, as Envoy's encoder does
    block = enc.encode(fields)  # then the same short block for every other stream
    head = grpc(headers_msg("POST", "/v1/chat/completions", **{"content-type": "application/json"}))
    body = grpc(body_msg(BODY))
    writer.write(PREFACE + frame(4, 0, 0) + frame(8, 0, 0, (1 << 30).to_bytes(4, "big")))
    buf = bytearray()
    replies: dict[int, int] = {}  # stream -> gRPC messages seen
    started = done = 0
    received = 0
    next_sid = 1
    cpu0 = -1.0

    def open_stream() -> bytes:
        nonlocal next_sid, started
        sid = next_sid
        next_sid += 2
        started += 1
        replies[sid] = 0
        return frame(1, 4, sid, first if sid == 1 else block) + frame(0, 0, sid, head)

    out = b"".join(open_stream() for _ in range(streams))
    writer.write(out)
    while done < requests:
        chunk = await asyncio.wait_for(reader.read(1 << 16), 30)
        if not chunk:
            raise RuntimeError("server closed the connection")
        buf += chunk
        out = b""
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            pos += 9 + length
            if ftype == 0 and sid in replies:  # one reply message per DATA frame here
                received += length
                replies[sid] += 1
                if replies[sid] == 1:
                    out += frame(0, 0, sid, body)
            elif ftype == 1 and flags & 1 and sid in replies:  # trailers: stream over
                del replies[sid]
                done += 1
                if done == streams and cpu0 < 0:
                    cpu0 = cpu_seconds(pid)  # warm: start measuring
                    done = 0
                out += frame(3, 0, sid, (8).to_bytes(4, "big"))  # Envoy resets it
                if started < requests + streams:
                    out += open_stream()
            elif ftype == 7:
                raise RuntimeError(f"GOAWAY {bytes(buf[pos - length : pos])!r}")
        del buf[:pos]
        if received > 1 << 20:
            out += frame(8, 0, 0, received.to_bytes(4, "big"))
            received = 0
        if out:
            writer.write(out)
    cpu = cpu_seconds(pid) - cpu0
    writer.close()
    return cpu / requests * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=path/to/h2.py")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--streams", type=int, default=16, help="requests in flight")
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    results: dict[str, list[float]] = {name: [] for name, _ in variants}
    for run in range(args.runs):
        for name, path in variants:
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, path], cwd=ROOT, stdout=subprocess.PIPE, text=True
            )
            try:
                assert proc.stdout is not None
                port = int(proc.stdout.readline())
                us = asyncio.run(load(port, args.requests, args.streams, proc.pid))
            finally:
                proc.kill()
                proc.wait()
            results[name].append(us)
            print(f"run {run + 1} {name}: {us:.1f} µs/request", flush=True)
    print(f"\n{args.requests} requests x {args.runs} runs, {args.streams} in flight, loadavg "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, values in results.items():
        print(
            f"{name}: median {statistics.median(values):.1f} µs/request "
            f"[{min(values):.1f}-{max(values):.1f}]"
        )


if __name__ == "__main__":
    main()
