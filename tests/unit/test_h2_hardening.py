"""Limits of the built-in HTTP/2 transport against a hostile peer, spoken frame by frame.

Each test drives ``H2Server`` over a real socket with the raw client of
``test_h2_transport.py`` and asserts on what the server puts on the wire (GOAWAY codes,
WINDOW_UPDATE grants, RST_STREAM), never on elapsed time: a flood test passes when the server
ends the connection after a bounded number of frames. The health check is called with
grpcio's own client.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from plano_extproc.server.h2 import (
    FLOOD_BURST,
    GRANT_BUDGET,
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_BLOCK,
    MAX_HEADER_FRAMES,
    STREAM_WINDOW,
)
from tests.extproc_messages import body_msg, headers_msg, set_headers
from tests.unit.test_h2_transport import (
    CHAT_BODY,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PRIORITY,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    TIMEOUT,
    WINDOW_UPDATE,
    H2Client,
    Harness,
    frame,
    grpc_message,
    h2,
    parse_goaway,
    ready,
    request_fields,
)

__all__ = ["h2"]  # the fixture, re-used

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, ENHANCE_YOUR_CALM = 0x1, 0x3, 0xB
HEALTH = "/grpc.health.v1.Health/Check"


async def read_until_goaway(c: H2Client, limit: int = 100_000) -> tuple[int, int, bytes]:
    """Skip frames until GOAWAY (at most ``limit``); return last stream id, code, debug."""
    for _ in range(limit):
        f = await c.read_frame()
        if f.type == GOAWAY:
            last, code = parse_goaway(f)
            return last, code, f.payload[8:]
    raise AssertionError(f"no GOAWAY within {limit} frames")


async def expect_goaway(c: H2Client, code: int, debug: bytes) -> None:
    _, got, text = await read_until_goaway(c)
    assert (got, text) == (code, debug)
    assert await c.read_eof() == b""  # and the connection is closed


async def grant_for(c: H2Client, sid: int, limit: int = 1000) -> int:
    """The next WINDOW_UPDATE for ``sid`` (other frames skipped)."""
    for _ in range(limit):
        f = await c.read_frame()
        if f.type == WINDOW_UPDATE and f.sid == sid:
            return int.from_bytes(f.payload, "big")
    raise AssertionError(f"no WINDOW_UPDATE for stream {sid}")


async def no_grant_before_pong(c: H2Client, sid: int) -> None:
    """Nothing for ``sid`` is on the wire before the answer to a PING sent now."""
    await c.ping()
    for _ in range(1000):
        f = await c.read_frame()
        if f.type == PING:
            return
        assert f.sid != sid, f"unexpected frame type {f.type} for stream {sid}"
    raise AssertionError("no PING ACK")


def big_body(size: int) -> bytes:
    """A chat body of about ``size`` bytes."""
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * size}]}
    ).encode()


# --------------------------------------------------------------------------- header blocks


async def test_empty_continuation_flood_ends_after_max_frames(h2: Harness) -> None:
    """576 KiB of empty CONTINUATION frames once kept a worker busy for 32 s: now the block
    ends at MAX_HEADER_FRAMES frames, whatever their size."""
    c = await ready(h2)
    try:
        flood = frame(HEADERS, 0, 1, b"") + frame(CONTINUATION, 0, 1, b"") * 65_536
        c.writer.write(flood)  # not drained: the server closes long before reading it all
        await expect_goaway(c, ENHANCE_YOUR_CALM, b"header block in too many frames")
    finally:
        await c.close()


async def test_header_block_frame_cap_counts_frames_not_bytes(h2: Harness) -> None:
    c = await ready(h2)
    try:
        block = c.header_block(request_fields())
        # MAX_HEADER_FRAMES frames are fine: the block is decoded and the stream served.
        parts = [block[:1]] + [b""] * (MAX_HEADER_FRAMES - 2) + [block[1:]]
        wire = frame(HEADERS, 0, 1, parts[0])
        wire += b"".join(frame(CONTINUATION, 0, 1, p) for p in parts[1:-1])
        wire += frame(CONTINUATION, END_HEADERS, 1, parts[-1])
        await c.send(wire)
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True), end_stream=True)
        res = await c.read_stream(1)
        assert res.trailers == {"grpc-status": "0"}
        # One more frame is too many.
        wire = frame(HEADERS, 0, 3, block[:1])
        wire += frame(CONTINUATION, 0, 3, b"") * (MAX_HEADER_FRAMES - 1)
        wire += frame(CONTINUATION, END_HEADERS, 3, block[1:])
        await c.send(wire)
        await expect_goaway(c, ENHANCE_YOUR_CALM, b"header block in too many frames")
    finally:
        await c.close()


@pytest.mark.parametrize("split", [False, True])
async def test_header_block_over_the_byte_cap(h2: Harness, split: bool) -> None:
    c = await ready(h2)
    try:
        junk = b"\x00" * (MAX_HEADER_BLOCK + 1)
        if split:
            wire = frame(HEADERS, 0, 1, junk[:DEFAULT_MAX_FRAME])
            for off in range(DEFAULT_MAX_FRAME, len(junk), DEFAULT_MAX_FRAME):
                wire += frame(CONTINUATION, 0, 1, junk[off : off + DEFAULT_MAX_FRAME])
        else:
            wire = frame(HEADERS, 0, 1, junk)
        await c.send(wire)
        await expect_goaway(c, ENHANCE_YOUR_CALM, b"header block too large")
    finally:
        await c.close()


# --------------------------------------------------------------------------- receive windows


async def test_data_beyond_the_stream_window_is_flow_control_error(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1)
        raw = grpc_message(body_msg(big_body(STREAM_WINDOW)))
        assert len(raw) > STREAM_WINDOW
        # The whole message in one frame, before the server could grant anything.
        await c.send_frame(DATA, 0, 1, raw)
        await expect_goaway(c, FLOW_CONTROL_ERROR, b"DATA beyond the window of stream 1")
    finally:
        await c.close()


async def test_pipelined_messages_are_bounded_by_the_window(h2: Harness) -> None:
    """While the logic works on a body, more messages only fill the window, never more."""
    h2.router.gate = asyncio.Event()
    c = await ready(h2)
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("POST", "/routing/v1/chat/completions"))
        await c.read_frame()  # response HEADERS
        await c.read_frame()  # request_headers reply
        await c.send_message(1, body_msg(CHAT_BODY))
        await asyncio.wait_for(h2.router.entered.wait(), TIMEOUT)
        one = grpc_message(headers_msg("GET", "/v1/models"))
        n = 0
        sent = len(grpc_message(headers_msg("POST", "/routing/v1/chat/completions")))
        sent += len(grpc_message(body_msg(CHAT_BODY)))
        while sent + len(one) <= STREAM_WINDOW:
            n += 1
            sent += len(one)
        await c.send_frame(DATA, 0, 1, one * n)  # exactly what the window allows
        await no_grant_before_pong(c, 1)  # queued, no more window while the router works
        await c.send_frame(DATA, 0, 1, one)
        await expect_goaway(c, FLOW_CONTROL_ERROR, b"DATA beyond the window of stream 1")
    finally:
        await c.close()


async def test_large_messages_get_whole_grants_from_a_bounded_pool(h2: Harness) -> None:
    """Three 30 MiB messages: two get their grant at once, the third waits for the pool
    (GRANT_BUDGET) until the first is consumed, then completes: bounded and deadlock-free."""
    h2.router.gate = asyncio.Event()
    c = await ready(h2)
    try:
        raw = grpc_message(body_msg(big_body(30 << 20)))
        head = grpc_message(headers_msg("POST", "/routing/v1/chat/completions"))
        assert 2 * len(raw) < GRANT_BUDGET < 3 * len(raw)
        sids = (1, 3, 5)
        for sid in sids:
            await c.send_headers(sid)
            await c.send_message(sid, headers_msg("POST", "/routing/v1/chat/completions"))
        for sid in sids:  # the first frame of each message: the size is known
            await c.send_frame(DATA, 0, sid, raw[:DEFAULT_MAX_FRAME])
        window = STREAM_WINDOW - len(head) - DEFAULT_MAX_FRAME
        for sid in (1, 3):
            assert window + await grant_for(c, sid) == len(raw) - DEFAULT_MAX_FRAME
        await no_grant_before_pong(c, 5)
        # Stream 1 sends the rest: the message goes to the logic, its grant returns to the
        # pool, and stream 5 gets the whole rest of its message.
        for off in range(DEFAULT_MAX_FRAME, len(raw), 1 << 20):
            await c.send_frame(DATA, 0, 1, raw[off : off + (1 << 20)])
        assert window + await grant_for(c, 5) == len(raw) - DEFAULT_MAX_FRAME
        for sid in (3, 5):
            for off in range(DEFAULT_MAX_FRAME, len(raw), 1 << 20):
                await c.send_frame(DATA, 0, sid, raw[off : off + (1 << 20)])
        h2.router.gate.set()
        done = set()
        for _ in range(1000):
            f = await c.read_frame()
            if f.type == HEADERS and f.flags & END_STREAM:
                assert f.headers == {"grpc-status": "0"}
                done.add(f.sid)
                if len(done) == 3:
                    break
        assert done == set(sids)
        assert h2.router.calls == 3
    finally:
        await c.close()


async def test_32_mib_message_passes(h2: Harness) -> None:
    """Envoy's default listener limit is 32 MiB, sent as one ext_proc message."""
    c = await ready(h2)
    try:
        body = big_body((32 << 20) - len(big_body(0)))
        assert len(body) == 32 << 20
        raw = grpc_message(body_msg(body))
        await c.send_headers(1)
        await c.send_message(1, headers_msg("POST", "/v1/chat/completions"))
        await c.send_frame(DATA, 0, 1, raw[:DEFAULT_MAX_FRAME])
        await grant_for(c, 1)
        for off in range(DEFAULT_MAX_FRAME, len(raw), 1 << 20):
            await c.send_frame(DATA, 0, 1, raw[off : off + (1 << 20)])
        res = await c.read_stream(1, started=True)
        assert res.trailers == {"grpc-status": "0"}
        [reply] = [m for m in res.messages() if m.WhichOneof("response") == "request_body"]
        assert set_headers(reply)["x-plano-upstream"] == "openai_api_openai_com_443"
    finally:
        await c.close()


# --------------------------------------------------------------------------- streams


async def test_streams_beyond_max_concurrent_are_refused(h2: Harness) -> None:
    c = await ready(h2)
    try:
        block = c.header_block(request_fields())
        wire = b"".join(
            frame(HEADERS, END_HEADERS, 1 + 2 * i, block) for i in range(MAX_CONCURRENT_STREAMS)
        )
        await c.send(wire)
        over = 1 + 2 * MAX_CONCURRENT_STREAMS
        await c.send_frame(HEADERS, END_HEADERS, over, block)
        f = await c.read_frame()
        assert (f.type, f.sid, f.payload) == (RST_STREAM, over, REFUSED_STREAM.to_bytes(4, "big"))
        # Finishing one stream makes room for the next.
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True), end_stream=True)
        res = await c.read_stream(1, started=False)
        assert res.trailers == {"grpc-status": "0"}
        await c.send_frame(HEADERS, END_HEADERS, over + 2, block)
        await c.send_message(over + 2, headers_msg("GET", "/v1/models", eos=True), True)
        res = await c.read_stream(over + 2)
        assert res.trailers == {"grpc-status": "0"}
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("ftype", "debug"),
    [
        (RST_STREAM, b"RST_STREAM on idle stream 7"),
        (WINDOW_UPDATE, b"WINDOW_UPDATE on idle stream 7"),
    ],
)
async def test_frames_on_idle_streams_are_protocol_errors(
    h2: Harness, ftype: int, debug: bytes
) -> None:
    c = await ready(h2)
    try:
        await c.send_frame(ftype, 0, 7, (1).to_bytes(4, "big"))
        await expect_goaway(c, PROTOCOL_ERROR, debug)
    finally:
        await c.close()


# --------------------------------------------------------------------------- floods


def flood_frames(c: H2Client, kind: str, n: int) -> bytes:
    """``n`` frames of one abusive kind (each a complete, individually valid frame)."""
    if kind == "PING":
        return frame(PING, 0, 0, b"12345678") * n
    if kind == "SETTINGS":
        return frame(SETTINGS, 0, 0) * n
    if kind == "WINDOW_UPDATE":
        return frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * n
    if kind == "PRIORITY":
        return frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10") * n
    if kind == "unknown":
        return frame(0x42, 0, 0, b"") * n
    block = c.header_block(request_fields())
    if kind == "empty DATA":
        return frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, b"") * n
    if kind == "rapid reset":  # open a stream, reset it before the server answered
        cancel = (0x8).to_bytes(4, "big")
        return b"".join(
            frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, cancel)
            for sid in range(1, 2 * n, 2)
        )
    if kind == "RST_STREAM":  # one stream, then resets of it far beyond one per stream
        cancel = (0x8).to_bytes(4, "big")
        done = frame(HEADERS, END_HEADERS | END_STREAM, 1, block)
        return done + frame(RST_STREAM, 0, 1, cancel) * n
    raise AssertionError(kind)


FLOODS = [
    ("PING", b"too many PING frames"),
    ("SETTINGS", b"too many SETTINGS frames"),
    ("WINDOW_UPDATE", b"too many WINDOW_UPDATE frames"),
    ("PRIORITY", b"too many PRIORITY frames"),
    ("unknown", b"too many unknown frames"),
    ("empty DATA", b"too many empty DATA frames"),
    ("rapid reset", b"too many RST_STREAM frames"),
    ("RST_STREAM", b"too many RST_STREAM frames"),
]


@pytest.mark.parametrize(("kind", "debug"), FLOODS, ids=[k for k, _ in FLOODS])
async def test_flood_ends_with_enhance_your_calm(h2: Harness, kind: str, debug: bytes) -> None:
    c = await ready(h2)
    try:
        c.writer.write(flood_frames(c, kind, 3 * FLOOD_BURST))  # not drained (see above)
        await expect_goaway(c, ENHANCE_YOUR_CALM, debug)
    finally:
        await c.close()


async def test_normal_envoy_traffic_never_runs_out_of_budget(h2: Harness) -> None:
    """Twice the burst of requests, each reset by the client after its answer (as Envoy
    does), with PINGs and a SETTINGS change in between: no GOAWAY."""
    c = await ready(h2)
    try:
        cancel = (0x8).to_bytes(4, "big")
        block = c.header_block(request_fields())
        msg = grpc_message(headers_msg("GET", "/v1/models", eos=True))
        sid = 1
        for batch in range(2 * FLOOD_BURST // 100):
            wire = b""
            sids = []
            for _ in range(100):
                wire += frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, msg)
                sids.append(sid)
                sid += 2
            await c.send(wire)
            done = 0
            while done < len(sids):
                f = await c.read_frame()
                assert f.type != GOAWAY, parse_goaway(f)
                if f.type == HEADERS and f.flags & END_STREAM:
                    assert f.headers == {"grpc-status": "0"}
                    done += 1
            # Window for the replies back (as Envoy returns it), and the resets.
            returned = frame(WINDOW_UPDATE, 0, 0, (100 * 400).to_bytes(4, "big"))
            await c.send(returned + b"".join(frame(RST_STREAM, 0, s, cancel) for s in sids))
            await c.ping(b"batch%03d" % batch)
            if batch == 3:
                await c.send_frame(SETTINGS, 0, 0, b"")
            f = await c.read_frame()
            while f.type == SETTINGS:
                f = await c.read_frame()
            assert (f.type, f.payload) == (PING, b"batch%03d" % batch)
    finally:
        await c.close()


# --------------------------------------------------------------------------- health check


def _health_call(port: int, request: bytes) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(HEALTH)
        return check(request, timeout=TIMEOUT)


async def test_health_check_answers_serving_to_grpcio(h2: Harness) -> None:
    # HealthCheckRequest{} and {service: "envoy.service.ext_proc.v3.ExternalProcessor"}
    named = b"envoy.service.ext_proc.v3.ExternalProcessor"
    for request in (b"", b"\x0a" + bytes([len(named)]) + named):
        reply = await asyncio.to_thread(_health_call, h2.port, request)
        assert reply == b"\x08\x01"  # HealthCheckResponse{status: SERVING}


@pytest.mark.parametrize(
    "request_bytes",
    [b"\x0a\x05other", b"\x0a\xc8\x01" + b"s" * 200, b"\x12\x00", b"\x0a\x09short"],
    ids=["unknown", "long name", "other field", "truncated"],
)
async def test_health_check_unknown_service_is_not_found(h2: Harness, request_bytes: bytes) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await asyncio.to_thread(_health_call, h2.port, request_bytes)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_check_over_raw_frames(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1, request_fields(HEALTH))
        await c.send_frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00")
        res = await c.read_stream(1)
        assert res.headers == {":status": "200", "content-type": "application/grpc"}
        assert b"".join(res.data) == b"\x00\x00\x00\x00\x02\x08\x01"
        assert res.trailers == {"grpc-status": "0"}
    finally:
        await c.close()
