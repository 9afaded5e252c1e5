"""What the `h2` package (python-hyper) would cost per ext_proc stream, protocol work alone.

Why: issue #11 asked whether a maintained HTTP/2 stack could replace our own
(``server/h2.py``). This measures the `h2` package doing only the server's HTTP/2 work for one
ext_proc stream, in memory (no sockets, no gRPC framing beyond a 5-byte prefix, no protobuf, no
gateway logic): receive Envoy's HEADERS (the same header block each time, as Envoy sends it) and
two DATA frames (the request_headers and request_body messages), answer with response HEADERS,
two DATA frames and trailers, and process the client's WINDOW_UPDATEs. Compare the number with
``bench/h2_transport.py``, which measures our whole transport plus the gateway logic.

    .venv/bin/python bench/h2_package_cost.py [--streams 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import h2.config
import h2.connection
import h2.events

HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    (":authority", "plano_extproc"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("grpc-timeout", "16000m"),
    ("x-envoy-internal", "true"),
    ("x-forwarded-proto", "http"),
    ("x-request-id", "7c8a3e3c-0b1f-4a63-9f2a-2b6c1f0c9d11"),
]
REQUEST_MESSAGE = b"\x00\x00\x00\x01\x2c" + b"x" * 300  # a 300-byte gRPC message
REPLY_MESSAGE = b"\x00\x00\x00\x00\x80" + b"y" * 128


def one_run(streams: int) -> float:
    """µs of this process's CPU per stream, for the server connection's work only."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    spent = 0.0
    for i in range(streams):
        sid = 2 * i + 1
        client.send_headers(sid, HEADERS)
        client.send_data(sid, REQUEST_MESSAGE)
        client.send_data(sid, REQUEST_MESSAGE, end_stream=True)
        wire = client.data_to_send()
        t = time.process_time()
        for event in server.receive_data(wire):
            if isinstance(event, h2.events.DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, sid)
        server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        server.send_data(sid, REPLY_MESSAGE)
        server.send_data(sid, REPLY_MESSAGE)
        server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        out = server.data_to_send()
        spent += time.process_time() - t
        for event in client.receive_data(out):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, sid)
        # The client's WINDOW_UPDATEs go out with the next stream's frames (timed then).
    return spent / streams * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    results = [one_run(args.streams) for _ in range(args.runs)]
    print(
        f"h2 {h2.__version__}: server-side protocol work per ext_proc stream: median "
        f"{statistics.median(results):.1f} µs [{min(results):.1f}-{max(results):.1f}] over "
        f"{args.runs} x {args.streams} streams"
    )


if __name__ == "__main__":
    main()
