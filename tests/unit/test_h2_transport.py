"""The built-in HTTP/2 transport (``server/h2.py``) spoken to frame by frame.

``test_servicer.py`` covers the normal exchange through grpcio's client; these tests open a
raw TCP connection instead and check what the server puts on the wire: connection setup,
flow control in both directions, frame size limits, CONTINUATION, padding, gRPC status
trailers, protocol errors, stream resets and graceful shutdown. Header blocks go through the
``hpack`` package. Every read has a timeout, so a server that stays silent fails a test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.routing.base import ChatMessage, RoutePreference, RouterResult
from plano_extproc.server.h2 import (
    CONNECTION_WINDOW,
    MAX_MESSAGE,
    STREAM_WINDOW,
    H2Connection,
    H2Server,
)
from plano_extproc.server.servicer import ExtProcStream
from tests.extproc_messages import (
    body_msg,
    chunk_msg,
    full_duplex,
    header_reply_sets,
    headers_msg,
    set_headers,
)
from tests.extproc_server import CONFIG as SERVER_CONFIG

TIMEOUT = 5.0
PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types, flags, settings and error codes (RFC 9113).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x3, 0x4
SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x5, 0x6
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL = 0x0, 0x1, 0x7, 0x8

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384

CONFIG = (
    SERVER_CONFIG
    + """routing_preferences:
  - name: chat
    description: small talk
    models: [openai/gpt-4o-mini]
"""
)

CHAT_BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


# --------------------------------------------------------------------------- raw HTTP/2 client


@dataclass(slots=True)
class Frame:
    type: int
    flags: int
    sid: int
    payload: bytes
    headers: dict[str, str] | None = None  # decoded header block (HEADERS frames)


@dataclass(slots=True)
class StreamResult:
    """Everything the server sent on one stream until it ended it."""

    headers: dict[str, str] | None = None
    data: list[bytes] = field(default_factory=list)  # payloads of DATA frames, in order
    trailers: dict[str, str] | None = None
    rst: int | None = None
    trailers_only: bool = False  # the stream ended with a single HEADERS frame
    others: list[Frame] = field(default_factory=list)  # frames seen for other streams

    def messages(self) -> list[pb.ProcessingResponse]:
        return parse_grpc(b"".join(self.data))


def parse_grpc(raw: bytes) -> list[pb.ProcessingResponse]:
    """Split gRPC length-prefixed messages; every byte must belong to a whole message."""
    out = []
    pos = 0
    while pos < len(raw):
        assert len(raw) - pos >= 5, "truncated gRPC message prefix"
        assert raw[pos] == 0, "compressed flag set by the server"
        size = int.from_bytes(raw[pos + 1 : pos + 5], "big")
        assert len(raw) - pos - 5 >= size, "truncated gRPC message"
        out.append(pb.ProcessingResponse.FromString(raw[pos + 5 : pos + 5 + size]))
        pos += 5 + size
    return out


def grpc_message(msg: pb.ProcessingRequest, flag: int = 0) -> bytes:
    raw = msg.SerializeToString()
    return bytes([flag]) + len(raw).to_bytes(4, "big") + raw


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    )


def settings_payload(settings: dict[int, int]) -> bytes:
    return b"".join(struct.pack(">HI", k, v) for k, v in settings.items())


def parse_settings(payload: bytes) -> dict[int, int]:
    assert len(payload) % 6 == 0
    return dict(struct.unpack_from(">HI", payload, off) for off in range(0, len(payload), 6))


def parse_goaway(f: Frame) -> tuple[int, int]:
    assert f.type == GOAWAY and f.sid == 0
    return int.from_bytes(f.payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(f.payload[4:8], "big")


def request_fields(path: str = PROCESS_PATH) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "extproc"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


class H2Client:
    """Just enough of an HTTP/2 client to drive the server by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        return cls(reader, writer)

    async def handshake(self, settings: dict[int, int] | None = None) -> tuple[Frame, Frame]:
        """Preface + SETTINGS; returns the server's SETTINGS and its connection WINDOW_UPDATE
        after the server has acknowledged ours."""
        await self.send(PREFACE + frame(SETTINGS, 0, 0, settings_payload(settings or {})))
        server_settings = await self.read_frame()
        window_update = await self.read_frame()
        await self.send_frame(SETTINGS, ACK, 0)
        ack = await self.read_frame()
        assert (ack.type, ack.flags, ack.sid, ack.payload) == (SETTINGS, ACK, 0, b"")
        return server_settings, window_update

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass

    # ---------------------------------------------------------------- sending

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def send_frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        await self.send(frame(ftype, flags, sid, payload))

    def header_block(self, fields: Sequence[tuple[str, str]]) -> bytes:
        return self.encoder.encode(list(fields))

    async def send_headers(
        self, sid: int, fields: Sequence[tuple[str, str]] | None = None, end_stream: bool = False
    ) -> None:
        block = self.header_block(request_fields() if fields is None else fields)
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        await self.send_frame(HEADERS, flags, sid, block)

    async def send_message(
        self, sid: int, msg: pb.ProcessingRequest, end_stream: bool = False
    ) -> None:
        await self.send_frame(DATA, END_STREAM if end_stream else 0, sid, grpc_message(msg))

    async def ping(self, opaque: bytes = b"12345678") -> None:
        """Round trip: the server handles frames in order, so anything it had to send in
        answer to earlier frames is on the wire before the PING ACK."""
        await self.send_frame(PING, 0, 0, opaque)

    # ---------------------------------------------------------------- receiving

    async def read_frame(self) -> Frame:
        head = await asyncio.wait_for(self.reader.readexactly(9), TIMEOUT)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)
        sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        f = Frame(head[3], head[4], sid, payload)
        if f.type == HEADERS:
            # The server never pads, never sends priority and never needs CONTINUATION.
            assert f.flags & END_HEADERS, "server split a header block"
            assert not f.flags & (PADDED | PRIORITY_FLAG)
            fields = [(str(k), str(v)) for k, v in self.decoder.decode(payload)]
            f.headers = dict(fields)
            assert len(f.headers) == len(fields), f"repeated header names: {fields}"
        return f

    async def read_stream(self, sid: int, started: bool = False) -> StreamResult:
        """Frames until ``sid`` ends (HEADERS with END_STREAM or RST_STREAM); ``started``:
        the response HEADERS were already read, so the next HEADERS are the trailers."""
        res = StreamResult(headers={} if started else None)
        while True:
            f = await self.read_frame()
            if f.sid != sid:
                res.others.append(f)
                continue
            if f.type == DATA:
                assert res.headers is not None, "DATA before response HEADERS"
                assert not f.flags & END_STREAM, "gRPC responses end with trailers"
                res.data.append(f.payload)
            elif f.type == HEADERS:
                assert f.headers is not None
                if res.headers is None:
                    res.headers = f.headers
                    if f.flags & END_STREAM:
                        res.trailers_only = True
                        res.trailers = f.headers
                        return res
                else:
                    assert f.flags & END_STREAM, "trailers without END_STREAM"
                    res.trailers = f.headers
                    return res
            elif f.type == RST_STREAM:
                res.rst = int.from_bytes(f.payload, "big")
                return res
            else:
                raise AssertionError(f"unexpected frame type {f.type} on stream {sid}")

    async def read_eof(self) -> bytes:
        """Everything left until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), TIMEOUT)


# --------------------------------------------------------------------------- ext_proc messages


# --------------------------------------------------------------------------- server fixture


class GateRouter:
    """Answers the first preference; when ``gate`` is set, waits for it first."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.calls = 0

    async def start(self) -> None:
        return None

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preferences: Sequence[RoutePreference],
        *,
        request_id: str,
    ) -> RouterResult:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return RouterResult(route=preferences[0].name)

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class Harness:
    server: H2Server
    port: int
    router: GateRouter


@pytest.fixture
async def h2() -> AsyncIterator[Harness]:
    router = GateRouter()
    gateway = Gateway(parse_config(CONFIG), router, MemorySessionCache())
    metrics = Metrics()
    server = H2Server(lambda: ExtProcStream(gateway, metrics))
    port = await server.start("127.0.0.1", 0)
    yield Harness(server, port, router)
    if router.gate is not None:
        router.gate.set()
    await server.stop(None)


@pytest.fixture
async def client(h2: Harness) -> AsyncIterator[H2Client]:
    c = await H2Client.connect(h2.port)
    yield c
    await c.close()


async def ready(h2: Harness, settings: dict[int, int] | None = None) -> H2Client:
    c = await H2Client.connect(h2.port)
    await c.handshake(settings)
    return c


# --------------------------------------------------------------------------- tests


async def test_settings_window_update_and_ping(client: H2Client) -> None:
    await client.send(PREFACE + frame(SETTINGS, 0, 0, settings_payload({0x2: 0})))
    # The server's first frame is its SETTINGS, then the connection window raised to its
    # budget, then the ACK of ours.
    first = await client.read_frame()
    assert (first.type, first.flags, first.sid) == (SETTINGS, 0, 0)
    assert parse_settings(first.payload) == {
        SETTINGS_MAX_CONCURRENT_STREAMS: 1024,
        SETTINGS_INITIAL_WINDOW_SIZE: 65535,
        SETTINGS_MAX_FRAME_SIZE: 1 << 20,
        SETTINGS_MAX_HEADER_LIST_SIZE: 64 << 10,
    }
    second = await client.read_frame()
    assert (second.type, second.flags, second.sid) == (WINDOW_UPDATE, 0, 0)
    ack = await client.read_frame()
    assert (ack.type, ack.flags, ack.sid, ack.payload) == (SETTINGS, ACK, 0, b"")
    await client.send_frame(SETTINGS, ACK, 0)  # acknowledging the server's: no answer

    await client.send_frame(PING, 0, 0, b"\x00\x01\x02\x03\xfc\xfd\xfe\xff")
    pong = await client.read_frame()
    assert (pong.type, pong.flags, pong.sid) == (PING, ACK, 0)
    assert pong.payload == b"\x00\x01\x02\x03\xfc\xfd\xfe\xff"

    # A PING ACK from the client is not answered: the next frame is the ACK of the next PING.
    await client.send_frame(PING, ACK, 0, b"ignored!")
    await client.send_frame(PING, 0, 0, b"second!!")
    pong = await client.read_frame()
    assert (pong.type, pong.flags, pong.payload) == (PING, ACK, b"second!!")


async def test_full_exchange_over_raw_frames(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1, request_fields())
        await c.send_message(1, headers_msg("POST", "/v1/chat/completions"))
        f = await c.read_frame()
        assert (f.type, f.flags, f.sid) == (HEADERS, END_HEADERS, 1)
        assert f.headers == {":status": "200", "content-type": "application/grpc"}
        f = await c.read_frame()
        assert (f.type, f.flags, f.sid) == (DATA, 0, 1)
        [first] = parse_grpc(f.payload)
        assert first.WhichOneof("response") == "request_headers"

        await c.send_message(1, body_msg(CHAT_BODY))
        f = await c.read_frame()
        assert (f.type, f.flags, f.sid) == (DATA, 0, 1)
        [second] = parse_grpc(f.payload)
        assert second.WhichOneof("response") == "request_body"
        hdrs = set_headers(second)
        assert hdrs["x-plano-upstream"] == "openai_api_openai_com_443"
        assert hdrs["authorization"] == "Bearer sk-test"
        assert second.request_body.response.clear_route_cache is True
        f = await c.read_frame()
        assert (f.type, f.flags, f.sid) == (HEADERS, END_HEADERS | END_STREAM, 1)
        assert f.headers == {"grpc-status": "0"}
        assert h2.router.calls == 1
        # The stream is over; a half-close from the client now changes nothing.
        await c.send_frame(DATA, END_STREAM, 1)
        await c.ping()
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)
    finally:
        await c.close()


async def test_full_duplex_answers_nothing_until_the_body_ends_then_all_in_one_write(
    h2: Harness,
) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1, request_fields())
        await c.send_message(1, full_duplex(headers_msg("POST", "/v1/chat/completions")))
        await c.send_message(1, chunk_msg(CHAT_BODY[:20], False))
        await c.ping()  # everything the server had to send is on the wire before the ACK
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)

        await c.send_message(1, chunk_msg(CHAT_BODY[20:], True))
        f = await c.read_frame()
        assert (f.type, f.sid) == (HEADERS, 1)
        f = await c.read_frame()  # one DATA frame: the header reply and the body's
        assert (f.type, f.sid) == (DATA, 1)
        head, body = parse_grpc(f.payload)
        assert header_reply_sets(head)["x-plano-upstream"] == "openai_api_openai_com_443"
        streamed = body.request_body.response.body_mutation.streamed_response
        assert streamed.body == CHAT_BODY and streamed.end_of_stream
        f = await c.read_frame()
        assert (f.type, f.flags, f.sid) == (HEADERS, END_HEADERS | END_STREAM, 1)
        assert f.headers == {"grpc-status": "0"}
    finally:
        await c.close()


async def test_unknown_path_is_trailers_only_unimplemented(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1, request_fields("/grpc.reflection.v1.ServerReflection/Info"))
        f = await c.read_frame()
        assert (f.type, f.flags, f.sid) == (HEADERS, END_HEADERS | END_STREAM, 1)
        assert f.headers == {
            ":status": "200",
            "content-type": "application/grpc",
            "grpc-status": "12",
            "grpc-message": "unknown method /grpc.reflection.v1.ServerReflection/Info",
        }
        # Messages the client still sends on that stream are ignored.
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True), end_stream=True)
        await c.ping()
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)
    finally:
        await c.close()


async def test_compressed_message_is_unimplemented(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1)
        await c.send_frame(DATA, 0, 1, grpc_message(headers_msg("GET", "/v1/models"), flag=1))
        res = await c.read_stream(1)
        assert res.trailers_only
        assert res.trailers is not None
        assert res.trailers["grpc-status"] == "12"
        assert res.trailers["grpc-message"] == "compressed messages are not supported"
        assert res.data == []
    finally:
        await c.close()


async def test_oversized_message_is_resource_exhausted(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(1)
        # Only the 5-byte prefix: the server must refuse on the declared length alone.
        await c.send_frame(DATA, 0, 1, b"\x00" + (MAX_MESSAGE + 1).to_bytes(4, "big"))
        res = await c.read_stream(1)
        assert res.trailers_only
        assert res.trailers is not None
        assert res.trailers["grpc-status"] == "8"
        assert res.trailers["grpc-message"] == f"message of {MAX_MESSAGE + 1} bytes is too large"
        # The connection is still fine for other streams.
        await c.send_headers(3)
        await c.send_message(3, headers_msg("GET", "/v1/models", eos=True))
        res = await c.read_stream(3)
        assert res.trailers == {"grpc-status": "0"}
        [resp] = res.messages()
        assert resp.immediate_response.status.code == 200
    finally:
        await c.close()


async def test_send_flow_control_waits_for_window_update(h2: Harness) -> None:
    c = await ready(h2, {SETTINGS_INITIAL_WINDOW_SIZE: 16})
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True))
        f = await c.read_frame()
        assert (f.type, f.sid) == (HEADERS, 1)
        assert f.headers == {":status": "200", "content-type": "application/grpc"}
        f = await c.read_frame()
        assert (f.type, f.sid, len(f.payload)) == (DATA, 1, 16)
        data = [f.payload]
        # Nothing more until the window opens: the PING ACK comes next.
        await c.ping()
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)

        await c.send_frame(WINDOW_UPDATE, 0, 1, (10).to_bytes(4, "big"))
        f = await c.read_frame()
        assert (f.type, f.sid, len(f.payload)) == (DATA, 1, 10)
        data.append(f.payload)
        await c.ping()
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)

        await c.send_frame(WINDOW_UPDATE, 0, 1, (100_000).to_bytes(4, "big"))
        res = await c.read_stream(1, started=True)
        assert res.others == []
        assert res.trailers == {"grpc-status": "0"}
        data += res.data
        [resp] = parse_grpc(b"".join(data))
        imm = resp.immediate_response
        assert imm.status.code == 200
        ids = [m["id"] for m in json.loads(imm.body)["data"]]
        assert ids == ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-20250514"]
        assert sum(map(len, data)) > 16 + 10  # the message really needed the third window
    finally:
        await c.close()


async def test_nothing_is_processed_after_a_final_reply_waiting_for_window(h2: Harness) -> None:
    c = await ready(h2, {SETTINGS_INITIAL_WINDOW_SIZE: 16})
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True))
        await c.read_frame()  # response HEADERS
        f = await c.read_frame()
        assert (f.type, f.sid, len(f.payload)) == (DATA, 1, 16)
        # The final reply is still queued; a further message on the stream must be ignored.
        await c.send_message(1, body_msg(b'{"messages": [{"role": "user", "content": "hi"}]}'))
        await c.send_frame(WINDOW_UPDATE, 0, 1, (100_000).to_bytes(4, "big"))
        res = await c.read_stream(1, started=True)
        assert res.trailers == {"grpc-status": "0"}
        [resp] = parse_grpc(f.payload + b"".join(res.data))
        assert resp.immediate_response.status.code == 200
    finally:
        await c.close()


async def test_initial_window_increase_unblocks_stream(h2: Harness) -> None:
    c = await ready(h2, {SETTINGS_INITIAL_WINDOW_SIZE: 8})
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True))
        await c.read_frame()  # response HEADERS
        f = await c.read_frame()
        assert (f.type, f.sid, len(f.payload)) == (DATA, 1, 8)
        data = [f.payload]
        # Raising SETTINGS_INITIAL_WINDOW_SIZE grows the open stream's window (RFC 9113 6.9.2).
        await c.send_frame(SETTINGS, 0, 0, settings_payload({SETTINGS_INITIAL_WINDOW_SIZE: 20}))
        f = await c.read_frame()
        assert (f.type, f.flags) == (SETTINGS, ACK)
        f = await c.read_frame()
        assert (f.type, f.sid, len(f.payload)) == (DATA, 1, 12)
        data.append(f.payload)
        await c.send_frame(SETTINGS, 0, 0, settings_payload({SETTINGS_INITIAL_WINDOW_SIZE: 65535}))
        res = await c.read_stream(1, started=True)
        assert [(f.type, f.flags) for f in res.others] == [(SETTINGS, ACK)]
        assert res.trailers == {"grpc-status": "0"}
        [resp] = parse_grpc(b"".join(data + res.data))
        assert resp.immediate_response.status.code == 200
    finally:
        await c.close()


@pytest.mark.parametrize("max_frame", [None, 20000])
async def test_peer_max_frame_size_respected(h2: Harness, max_frame: int | None) -> None:
    settings = {} if max_frame is None else {SETTINGS_MAX_FRAME_SIZE: max_frame}
    limit = max_frame or DEFAULT_MAX_FRAME
    c = await ready(h2, settings)
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("POST", "/v1/chat/completions"))
        res_head = await c.read_frame()
        assert res_head.type == HEADERS
        f = await c.read_frame()
        assert parse_grpc(f.payload)[0].WhichOneof("response") == "request_headers"

        content = "abcdefghij" * 4000
        body = json.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": content}],
                "routing_preferences": [],
            }
        ).encode()
        raw = grpc_message(body_msg(body))
        for off in range(0, len(raw), DEFAULT_MAX_FRAME):
            await c.send_frame(DATA, 0, 1, raw[off : off + DEFAULT_MAX_FRAME])
        res = await c.read_stream(1, started=True)
        assert res.trailers == {"grpc-status": "0"}
        sizes = [len(d) for d in res.data]
        assert len(sizes) >= 3
        assert max(sizes) == limit  # full frames up to the peer's limit, never above
        assert all(s == limit for s in sizes[:-1])
        [resp] = res.messages()
        new_body = resp.request_body.response.body_mutation.body
        assert json.loads(new_body) == {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": content}],
        }
        assert set_headers(resp)["content-length"] == str(len(new_body))
    finally:
        await c.close()


async def test_headers_split_across_continuation(h2: Harness) -> None:
    c = await ready(h2)
    try:
        block = c.header_block(request_fields())
        a, b = len(block) // 3, 2 * len(block) // 3
        await c.send(
            frame(HEADERS, 0, 1, block[:a])
            + frame(CONTINUATION, 0, 1, block[a:b])
            + frame(CONTINUATION, END_HEADERS, 1, block[b:])
        )
        await c.send_message(1, headers_msg("GET", "/v1/models", eos=True), end_stream=True)
        res = await c.read_stream(1)
        assert res.headers == {":status": "200", "content-type": "application/grpc"}
        assert res.trailers == {"grpc-status": "0"}
        [resp] = res.messages()
        assert resp.immediate_response.status.code == 200
    finally:
        await c.close()


async def test_frame_inside_header_block_is_protocol_error(h2: Harness) -> None:
    c = await ready(h2)
    try:
        block = c.header_block(request_fields())
        await c.send(frame(HEADERS, 0, 1, block[:10]) + frame(PING, 0, 0, b"12345678"))
        f = await c.read_frame()
        assert parse_goaway(f) == (0, PROTOCOL_ERROR)
        assert await c.read_eof() == b""  # no PING ACK, connection closed
    finally:
        await c.close()


async def test_padded_headers_and_data(h2: Harness) -> None:
    c = await ready(h2)
    try:
        block = c.header_block(request_fields())
        # HEADERS with padding and a priority block (pad length, priority, block, padding).
        priority = (0).to_bytes(4, "big") + b"\x10"
        payload = bytes([7]) + priority + block + b"\x00" * 7
        await c.send_frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, payload)
        msg = grpc_message(headers_msg("POST", "/v1/chat/completions"))
        await c.send_frame(DATA, PADDED, 1, bytes([3]) + msg + b"\x00" * 3)
        res_head = await c.read_frame()
        assert res_head.headers == {":status": "200", "content-type": "application/grpc"}
        f = await c.read_frame()
        [first] = parse_grpc(f.payload)
        assert first.WhichOneof("response") == "request_headers"

        # The next message in two padded DATA frames (one with a zero pad length).
        msg = grpc_message(body_msg(CHAT_BODY))
        await c.send_frame(DATA, PADDED, 1, bytes([0]) + msg[:20])
        await c.send_frame(DATA, PADDED, 1, bytes([200]) + msg[20:] + b"\x00" * 200)
        res = await c.read_stream(1, started=True)
        assert res.trailers == {"grpc-status": "0"}
        [second] = res.messages()
        assert set_headers(second)["x-plano-upstream"] == "openai_api_openai_com_443"
    finally:
        await c.close()


async def test_even_stream_id_is_protocol_error(h2: Harness) -> None:
    c = await ready(h2)
    try:
        await c.send_headers(2)
        f = await c.read_frame()
        assert parse_goaway(f) == (0, PROTOCOL_ERROR)
        assert await c.read_eof() == b""
    finally:
        await c.close()


async def test_internal_failure_ends_the_connection_with_goaway_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> ExtProcStream:
        raise RuntimeError("boom")

    server = H2Server(broken)
    port = await server.start("127.0.0.1", 0)
    c = await H2Client.connect(port)
    try:
        await c.handshake()
        await c.send_headers(1)
        f = await c.read_frame()
        assert parse_goaway(f) == (1, 0x2)  # INTERNAL_ERROR
        assert await c.read_eof() == b""
        assert "ext_proc HTTP/2 connection failed" in caplog.text
    finally:
        await c.close()
        await server.stop(None)


async def test_http1_request_gets_400(h2: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", h2.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
        # Nothing HTTP/2 before it (no SETTINGS): an HTTP/1 client can read the whole reply.
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        head, _, text = reply.partition(b"\r\n\r\n")
        assert b"connection: close" in head
        assert f"content-length: {len(text)}".encode() in head
        assert b"not HTTP/1.x" in text
    finally:
        writer.close()


async def test_rst_stream_cancels_pending_body(h2: Harness) -> None:
    h2.router.gate = asyncio.Event()
    c = await ready(h2)
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("POST", "/routing/v1/chat/completions"))
        await c.read_frame()  # response HEADERS
        await c.read_frame()  # request_headers reply
        await c.send_message(1, body_msg(CHAT_BODY))
        await asyncio.wait_for(h2.router.entered.wait(), TIMEOUT)

        await c.send_frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big"))
        await asyncio.wait_for(h2.router.cancelled.wait(), TIMEOUT)
        assert not h2.router.gate.is_set()

        # Same connection, new stream: served, and nothing more arrives for stream 1.
        await c.send_headers(3)
        await c.send_message(3, headers_msg("GET", "/v1/models", eos=True), end_stream=True)
        res = await c.read_stream(3)
        assert res.trailers == {"grpc-status": "0"}
        assert res.messages()[0].immediate_response.status.code == 200
        assert res.others == []
        await c.ping()
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)
        assert not any(conn.streams for conn in h2.server.connections)
    finally:
        await c.close()


async def test_graceful_stop_finishes_stream_in_flight(h2: Harness) -> None:
    gate = h2.router.gate = asyncio.Event()
    c = await ready(h2)
    try:
        await c.send_headers(1)
        await c.send_message(1, headers_msg("POST", "/routing/v1/chat/completions"))
        await c.read_frame()  # response HEADERS
        await c.read_frame()  # request_headers reply
        await c.send_message(1, body_msg(CHAT_BODY), end_stream=True)
        await asyncio.wait_for(h2.router.entered.wait(), TIMEOUT)

        stop = asyncio.create_task(h2.server.stop(grace=5))
        f = await c.read_frame()
        assert parse_goaway(f) == (1, NO_ERROR)

        # A stream opened after the GOAWAY is refused; its DATA is ignored.
        await c.send_headers(3)
        await c.send_message(3, headers_msg("GET", "/v1/models", eos=True), end_stream=True)
        f = await c.read_frame()
        assert (f.type, f.sid, f.payload) == (RST_STREAM, 3, REFUSED_STREAM.to_bytes(4, "big"))
        await asyncio.sleep(0)
        assert not stop.done()

        gate.set()
        res = await c.read_stream(1, started=True)
        assert res.trailers == {"grpc-status": "0"}
        assert res.others == []
        [resp] = res.messages()
        imm = resp.immediate_response
        assert imm.status.code == 200
        assert imm.details == "plano_routing_decision"
        decision = json.loads(imm.body)
        assert (decision["models"], decision["route"]) == (["openai/gpt-4o-mini"], "chat")
        await asyncio.wait_for(stop, TIMEOUT)
        assert not h2.router.cancelled.is_set()
        assert await c.read_eof() == b""
    finally:
        await c.close()


async def test_initial_connection_window_and_large_upload(h2: Harness) -> None:
    c = await H2Client.connect(h2.port)
    try:
        server_settings, window_update = await c.handshake()
        assert (window_update.type, window_update.sid) == (WINDOW_UPDATE, 0)
        assert int.from_bytes(window_update.payload, "big") == CONNECTION_WINDOW - DEFAULT_WINDOW
        assert (
            parse_settings(server_settings.payload)[SETTINGS_INITIAL_WINDOW_SIZE] == STREAM_WINDOW
        )

        # A message over the stream window: its first frame carries the declared size, and
        # the server grants the whole rest of the message at once in one WINDOW_UPDATE.
        body = json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 150_000}]}
        ).encode()
        for sid in (1, 3):
            await c.send_headers(sid)
            await c.send_message(sid, headers_msg("POST", "/v1/chat/completions"))
            raw = grpc_message(body_msg(body))
            window = STREAM_WINDOW - len(grpc_message(headers_msg("POST", "/v1/chat/completions")))
            await c.send_frame(DATA, 0, sid, raw[:DEFAULT_MAX_FRAME])
            window -= DEFAULT_MAX_FRAME
            grant = None
            while grant is None:
                f = await c.read_frame()
                if f.type == WINDOW_UPDATE and f.sid == sid:
                    grant = int.from_bytes(f.payload, "big")
            assert window + grant == len(raw) - DEFAULT_MAX_FRAME  # exactly the rest
            for off in range(DEFAULT_MAX_FRAME, len(raw), DEFAULT_MAX_FRAME):
                await c.send_frame(DATA, 0, sid, raw[off : off + DEFAULT_MAX_FRAME])
            await c.send_frame(DATA, END_STREAM, sid)
            res = await c.read_stream(sid, started=True)
            assert res.trailers == {"grpc-status": "0"}
            kinds = [m.WhichOneof("response") for m in res.messages()]
            assert kinds == ["request_body"]
            assert res.others == []
        await c.ping()
        f = await c.read_frame()
        assert (f.type, f.flags) == (PING, ACK)
    finally:
        await c.close()


def test_decoded_header_blocks_are_reused_only_while_the_table_is_unchanged() -> None:
    conn = H2Connection(H2Server(lambda: ExtProcStream(None, Metrics())))  # type: ignore[arg-type]
    enc = hpack.Encoder()
    first = enc.encode([(b"x-a", b"1")])  # literal with incremental indexing: table changes
    again = enc.encode([(b"x-a", b"1")])  # now a 1-byte reference to dynamic entry 62
    assert len(again) == 1
    assert conn._decode(first) == [(b"x-a", b"1")]
    assert conn._decode(again) == [(b"x-a", b"1")]
    assert again in conn.decoded and first not in conn.decoded
    # A new entry shifts the dynamic indices: the same bytes now mean another header.
    assert conn._decode(enc.encode([(b"x-b", b"2")])) == [(b"x-b", b"2")]
    assert conn._decode(again) == [(b"x-b", b"2")]
    # A table size update (here to 0: the table empties) also invalidates earlier results.
    assert conn._decode(b"\x20") == []
    with pytest.raises(Exception, match="HPACK"):
        conn._decode(again)


async def test_write_backpressure_pauses_reading(h2: Harness) -> None:
    c = await ready(h2)
    try:
        [conn] = list(h2.server.connections)
        assert conn.transport is not None and conn.transport.is_reading()
        conn.pause_writing()  # what asyncio calls above the transport's high-water mark
        assert not conn.transport.is_reading()
        conn.resume_writing()
        assert conn.transport.is_reading()
        await c.ping()  # still serving
        f = await c.read_frame()
        assert f.type == PING
    finally:
        await c.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_frames_cut_at_arbitrary_byte_boundaries(h2: Harness, seed: int) -> None:
    """Many streams' frames, interleaved and sent in random small pieces, reassemble."""
    rng = random.Random(seed)
    c = await ready(h2)
    try:
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
        sids = [1 + 2 * i for i in range(8)]
        wire = b""
        for sid in sids:  # all request headers first: eight streams open at once
            block = c.header_block(request_fields())
            head = grpc_message(headers_msg("POST", "/v1/chat/completions"))
            wire += frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, 0, sid, head)
        pos = 0
        while pos < len(wire):  # cut anywhere, including inside frame headers
            step = rng.randint(1, 23)
            await c.send(wire[pos : pos + step])
            pos += step
        firsts: dict[int, str | None] = {}
        while len(firsts) < len(sids):
            f = await c.read_frame()
            if f.type == DATA:
                [msg] = parse_grpc(f.payload)
                firsts[f.sid] = msg.WhichOneof("response")
        assert firsts == dict.fromkeys(sids, "request_headers")
        wire = b"".join(frame(DATA, 0, sid, grpc_message(body_msg(body))) for sid in sids)
        pos = 0
        while pos < len(wire):
            step = rng.randint(1, 23)
            await c.send(wire[pos : pos + step])
            pos += step
        done: dict[int, str] = {}
        while len(done) < len(sids):
            f = await c.read_frame()
            if f.type == DATA:
                [msg] = parse_grpc(f.payload)
                hdrs = set_headers(msg)
                done[f.sid] = hdrs["x-plano-upstream"]
        assert set(done) == set(sids)
        assert len(set(done.values())) == 1
    finally:
        await c.close()
