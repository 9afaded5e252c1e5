"""Differential test: our HTTP/2 server against the ``h2`` package (python-hyper) as oracle.

Seeded random frame sequences (``SEEDS`` of them, at most ``MAX_FRAMES`` frames each; set
``H2_DIFF_SEEDS`` for a longer run), valid and invalid, go byte for byte to our server over
a real socket and to a server-side ``h2.connection.H2Connection`` in memory. Each side's
outcome is a connection error (our GOAWAY code; h2 raises ``ProtocolError`` with its code)
or no connection error plus the streams reset at the HTTP/2 layer. They must agree, except:

- Where RFC 9113 is explicit and h2 is laxer, the oracle is corrected to the RFC: RST_STREAM
  and WINDOW_UPDATE on an idle stream (5.1: PROTOCOL_ERROR; h2 accepts them), CONTINUATION
  outside a header block on a closed stream (6.10; h2 ignores it), the codes of bad SETTINGS
  (6.5, 6.5.2: an INITIAL_WINDOW_SIZE over 2^31-1 is FLOW_CONTROL_ERROR, h2 says
  PROTOCOL_ERROR; with several faults in one frame we check sizes, stream, then values).
- Frames for a stream our server has already ended (it answers an unknown method or a
  request at once; h2, with no application, keeps the stream open) are ignored by us, as
  5.1 allows after a close; so h2's errors on such frames (STREAM_CLOSED resets, trailers
  without END_STREAM, DATA beyond that stream's window) are not required of us.
- We do not validate request header fields (Envoy is the only client; a request without a
  known ``:path`` gets gRPC UNIMPLEMENTED), so the generator sends well-formed requests and
  trailers only.

Like h2, we widen three stream errors to connection errors (RFC 9113 5.4.1 allows it): a
PRIORITY of the wrong size, a stream depending on itself, a WINDOW_UPDATE of 0 on a stream.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import hpack
import pytest
from hyperframe.frame import Frame as HFrame
from hyperframe.frame import RstStreamFrame

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.h2 import (
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME,
    MAX_HEADER_BLOCK,
    STREAM_WINDOW,
    H2Server,
)
from plano_extproc.server.servicer import ExtProcStream
from tests.extproc_messages import headers_msg
from tests.unit.test_h2_transport import CONFIG, PREFACE, H2Client, frame, grpc_message

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
SEEDS = int(
    __import__("os").environ.get("H2_DIFF_SEEDS", "200")
)  # sequences per test run (bounded; each is a fresh connection)
MAX_FRAMES = 10  # frames per sequence
PONG = b"diffdone"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

# What our server advertises, so that h2's limits are the same once the client ACKs them.
OUR_SETTINGS: dict[h2.settings.SettingCodes | int, int] = {
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
}


@dataclass
class Outcome:
    conn_error: int | None = None
    at: int = -1  # index of the element (of frames()) that caused the connection error
    resets: dict[int, int] = field(default_factory=dict)  # stream id -> error code

    def __str__(self) -> str:
        if self.conn_error is not None:
            return f"connection error {self.conn_error:#x}"
        return f"accepted, resets {sorted(self.resets.items())}"


@dataclass
class Gen:
    """Random frames with just enough state to make most of them meaningful."""

    rng: random.Random
    next_sid: int = 1
    open: list[int] = field(default_factory=list)  # streams opened, not half-closed by us
    half: list[int] = field(default_factory=list)  # streams we sent END_STREAM on
    sent: dict[int, int] = field(default_factory=dict)  # DATA bytes per stream
    # Streams our server has ended by then (it answers an unknown method, a request
    # without body and a /v1/models message at once), before each element of frames().
    server_closed: set[int] = field(default_factory=set)
    closed_before: list[frozenset[int]] = field(default_factory=list)

    def block(self, path: str = PROCESS) -> bytes:
        enc = hpack.Encoder()  # a fresh encoder: every block is self-contained
        return enc.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )

    def new_sid(self) -> int:
        sid = self.next_sid
        self.next_sid += 2
        return sid

    def any_sid(self) -> int:
        pool = self.open + self.half
        return self.rng.choice(pool) if pool else 1

    def open_stream(self) -> bytes:
        sid = self.new_sid()
        end = self.rng.random() < 0.3
        (self.half if end else self.open).append(sid)
        flags = END_HEADERS | (END_STREAM if end else 0)
        path = self.rng.choice([PROCESS, "/other.Service/Method"])
        if end or path != PROCESS:
            self.server_closed.add(sid)
        block = self.block(path)
        if self.rng.random() < 0.3:  # split over CONTINUATION frames
            cut = self.rng.randint(0, len(block))
            return frame(HEADERS, flags & ~END_HEADERS, sid, block[:cut]) + frame(
                CONTINUATION, END_HEADERS, sid, block[cut:]
            )
        if self.rng.random() < 0.2:  # padded, with a priority block
            pad = self.rng.randint(0, 20)
            payload = bytes([pad]) + struct.pack(">IB", 0, 15) + block + b"\x00" * pad
            return frame(HEADERS, flags | PADDED | PRIORITY_FLAG, sid, payload)
        return frame(HEADERS, flags, sid, block)

    def data(self) -> bytes:
        r = self.rng.random()
        if r < 0.6 and self.open:
            sid = self.rng.choice(self.open)
            msg = grpc_message(headers_msg("GET", "/v1/models", eos=True))
            if self.sent.get(sid, 0) + len(msg) + 30 > STREAM_WINDOW:
                msg = b""
            self.sent[sid] = self.sent.get(sid, 0) + len(msg)
            end = self.rng.random() < 0.4
            if msg or end:
                self.server_closed.add(sid)  # answered at once (or ended empty)
            if end:
                self.open.remove(sid)
                self.half.append(sid)
            flags = END_STREAM if end else 0
            if self.rng.random() < 0.3:
                pad = self.rng.randint(0, 20)
                return frame(DATA, flags | PADDED, sid, bytes([pad]) + msg + b"\x00" * pad)
            return frame(DATA, flags, sid, msg)
        if r < 0.7 and self.half:
            sid = self.rng.choice(self.half)
            self.server_closed.add(sid)  # reset with STREAM_CLOSED if it was still open
            return frame(DATA, 0, sid, b"\x00\x00\x00\x00\x00")
        if r < 0.78:
            return frame(DATA, 0, self.next_sid + 2 * self.rng.randint(0, 3), b"x")  # idle
        if r < 0.84:
            return frame(DATA, 0, 0, b"x")
        if r < 0.9 and self.open:  # more than the stream window in one frame
            return frame(DATA, 0, self.rng.choice(self.open), b"\x00" * (STREAM_WINDOW + 1))
        sid = self.any_sid()
        return frame(DATA, PADDED, sid, bytes([10]) + b"abc")  # pad length >= payload

    def control(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(16)
        sid = self.any_sid()
        if kind == 0:
            return frame(PING, rng.choice([0, ACK]), 0, b"abcdefgh")
        if kind == 1:
            return frame(PING, 0, rng.choice([0, 1]), b"x" * rng.choice([7, 8, 9]))
        if kind == 2:
            settings = [(rng.choice([1, 2, 3, 4, 5, 6, 0x99]), rng.choice([0, 1, 100, 16384]))]
            return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in settings))
        if kind == 3:
            bad = rng.choice([(2, 2), (4, 2**31), (5, 100), (5, 1 << 24)])
            return frame(SETTINGS, 0, 0, struct.pack(">HI", *bad))
        if kind == 4:
            return frame(SETTINGS, rng.choice([0, ACK]), rng.choice([0, 1]), b"\x00" * 5)
        if kind == 5:
            return frame(WINDOW_UPDATE, 0, rng.choice([0, sid]), struct.pack(">I", 1000))
        if kind == 6:
            return frame(WINDOW_UPDATE, 0, rng.choice([0, sid]), struct.pack(">I", 0))
        if kind == 7:
            return frame(WINDOW_UPDATE, 0, rng.choice([0, sid]), struct.pack(">I", 2**31 - 1))
        if kind == 8:
            return frame(WINDOW_UPDATE, 0, rng.choice([0, sid]), b"\x00\x00\x01")
        if kind == 9:
            target = rng.choice([sid, 0, self.next_sid])
            if target in self.open:
                self.open.remove(target)
            if target in self.half:
                self.half.remove(target)
            self.server_closed.add(target)
            return frame(RST_STREAM, 0, target, struct.pack(">I", rng.choice([0, 8])))
        if kind == 10:
            return frame(RST_STREAM, 0, sid, b"\x00\x00\x08")
        if kind == 11:
            dep = rng.choice([0, sid + 2])
            return frame(PRIORITY, 0, rng.choice([sid, self.next_sid]), struct.pack(">IB", dep, 15))
        if kind == 12:
            return frame(PRIORITY, 0, rng.choice([0, sid]), b"\x00" * rng.choice([4, 5, 6]))
        if kind == 13:
            return frame(0x42, rng.randrange(256), rng.choice([0, sid]), b"anything")
        if kind == 14:
            return frame(CONTINUATION, END_HEADERS, sid, self.block())  # no HEADERS before
        return frame(PUSH_PROMISE, END_HEADERS, sid, struct.pack(">I", 2) + self.block())

    def interrupted_block(self) -> bytes:
        sid = self.new_sid()
        block = self.block()
        other = self.rng.choice([frame(PING, 0, 0, b"abcdefgh"), frame(CONTINUATION, 4, sid + 2)])
        return frame(HEADERS, 0, sid, block[:5]) + other

    def bad_headers(self) -> bytes:
        kind = self.rng.randrange(3 if self.open or self.half else 2)
        if kind == 0:
            return frame(HEADERS, END_HEADERS, 0, self.block())
        if kind == 1:
            sid = self.new_sid() + 1  # even
            return frame(HEADERS, END_HEADERS, sid, self.block())
        sid = self.any_sid()  # trailers (no pseudo-headers), with or without END_STREAM
        trailers = hpack.Encoder().encode([("x-trailer", "1")])
        if self.rng.random() < 0.5:
            self.server_closed.add(sid)
            return frame(HEADERS, END_HEADERS | END_STREAM, sid, trailers)
        return frame(HEADERS, END_HEADERS, sid, trailers)

    def valid_data(self) -> bytes:
        if self.open:
            sid = self.rng.choice(self.open)
            msg = grpc_message(headers_msg("GET", "/v1/models", eos=True))
            if self.sent.get(sid, 0) + len(msg) > STREAM_WINDOW // 2:
                msg = b""
            self.sent[sid] = self.sent.get(sid, 0) + len(msg)
            self.server_closed.add(sid)  # answered (and ended) at once
            return frame(DATA, self.rng.choice([0, END_STREAM]), sid, msg)
        if self.half:  # a stream error (STREAM_CLOSED): the "reset" class of outcome
            sid = self.rng.choice(self.half)
            self.server_closed.add(sid)
            return frame(DATA, 0, sid, b"\x00\x00\x00\x00\x00")
        return self.open_stream()

    def valid_control(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            return frame(PING, 0, 0, b"abcdefgh")
        if kind == 1:
            setting = rng.choice([(1, 4096), (3, 100), (4, 65535), (6, 1000), (0x99, 1)])
            return frame(SETTINGS, 0, 0, struct.pack(">HI", *setting))
        if kind == 2:
            sid = rng.choice(self.open + self.half + [0])
            return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", 1000))
        if kind == 3 and self.open:
            sid = rng.choice(self.open)
            self.open.remove(sid)
            self.server_closed.add(sid)
            return frame(RST_STREAM, 0, sid, struct.pack(">I", 8))
        if kind == 4:
            return frame(PRIORITY, 0, self.next_sid, struct.pack(">IB", 0, 15))
        return frame(0x42, rng.randrange(256), 0, b"anything")

    def frames(self) -> list[bytes]:
        """A sequence: mostly valid frames, with a per-sequence rate of invalid ones."""
        rng = self.rng
        bad = rng.choice([0.0, 0.05, 0.3])
        out = []
        for _ in range(rng.randint(1, MAX_FRAMES)):
            self.closed_before.append(frozenset(self.server_closed))
            if rng.random() < bad:
                pick = rng.choice(
                    [self.control, self.data, self.bad_headers, self.interrupted_block]
                )
                out.append(pick())
                continue
            r = rng.random()
            if r < 0.35:
                out.append(self.open_stream())
            elif r < 0.7:
                out.append(self.valid_data())
            else:
                out.append(self.valid_control())
        return out


def handshake_bytes() -> bytes:
    # Client preface, empty SETTINGS, and the ACK of the server's SETTINGS.
    return PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0)


def oracle(frames: list[bytes]) -> Outcome:
    """What h2 makes of the same bytes."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.local_settings.update(OUR_SETTINGS)
    conn.initiate_connection()
    conn.data_to_send()
    out = Outcome()
    f = b""
    opened = 0
    try:
        conn.receive_data(handshake_bytes())
        for out.at, f in enumerate([*frames, frame(PING, 0, 0, PONG)]):
            ftype, sid = f[3], int.from_bytes(f[5:9], "big")
            if ftype in (RST_STREAM, WINDOW_UPDATE) and sid > opened and len(f) == 13:
                # RFC 9113 5.1: any frame but HEADERS/PRIORITY on an idle stream is a
                # PROTOCOL_ERROR; h2 lets these two through.
                out.conn_error = 0x1
                return out
            if ftype == CONTINUATION:
                # RFC 9113 6.10: a CONTINUATION outside a header block (every element
                # leaves none open) is a PROTOCOL_ERROR; h2 ignores it on a closed stream.
                out.conn_error = 0x1
                return out
            conn.receive_data(f)
            if ftype == HEADERS:
                opened = max(opened, sid)
            _collect_resets(conn.data_to_send(), out)
        out.at = -1
    except h2.exceptions.ProtocolError as e:
        out.conn_error = int(e.error_code)
        if f[3] == SETTINGS:
            out.conn_error = settings_error(f)
    return out


def settings_error(f: bytes) -> int:
    """RFC 9113 6.5's code for a bad SETTINGS frame. h2 says PROTOCOL_ERROR for an
    INITIAL_WINDOW_SIZE over 2^31-1 (6.5.2: FLOW_CONTROL_ERROR) and, with several faults in
    one frame, picks by its parse order; ours checks sizes, then the stream, then values."""
    size = len(f) - 9
    if (f[4] & ACK and size) or size % 6:
        return 0x6
    if int.from_bytes(f[5:9], "big"):
        return 0x1
    for off in range(9, len(f), 6):
        ident, value = struct.unpack_from(">HI", f, off)
        if ident == 4 and value > 2**31 - 1:
            return 0x3
    return 0x1


def _collect_resets(data: bytes, out: Outcome) -> None:
    pos = 0
    while pos < len(data):
        f, length = HFrame.parse_frame_header(memoryview(data[pos : pos + 9]))
        f.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        if isinstance(f, RstStreamFrame):
            out.resets[f.stream_id] = f.error_code
        pos += 9 + length


async def ours(port: int, frames: list[bytes]) -> tuple[Outcome, set[int]]:
    """Our server's outcome, and the streams it finished itself (gRPC trailers)."""
    c = await H2Client.connect(port)
    out = Outcome()
    finished: set[int] = set()
    try:
        await c.send(handshake_bytes())
        wire = b"".join(frames) + frame(PING, 0, 0, PONG)
        c.writer.write(wire)
        for _ in range(10_000):
            try:
                f = await c.read_frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                out.conn_error = -1  # closed without a GOAWAY we could read: never right
                return out, finished
            if f.type == GOAWAY:
                out.conn_error = int.from_bytes(f.payload[4:8], "big")
                return out, finished
            if f.type == RST_STREAM:
                out.resets[f.sid] = int.from_bytes(f.payload, "big")
            elif f.type == HEADERS and f.flags & END_STREAM:
                finished.add(f.sid)
            elif f.type == PING and f.flags & ACK and f.payload == PONG:
                return out, finished
        raise AssertionError("no PING ACK and no GOAWAY")
    finally:
        await c.close()


def _our_deliberate_difference(gen: Gen, frames: list[bytes], want: Outcome, got: Outcome) -> bool:
    """The documented differences (module docstring)."""
    if want.conn_error is not None and 0 <= want.at < len(frames):
        # h2 failed on a frame for a stream our server had already ended: we ignore it.
        f = frames[want.at]
        sid = int.from_bytes(f[5:9], "big")
        if f[3] in (DATA, HEADERS, WINDOW_UPDATE, RST_STREAM) and sid in gen.closed_before[want.at]:
            return True
    if want.conn_error is not None or got.conn_error is not None:
        return False
    differ = {
        s for s in set(want.resets) | set(got.resets) if want.resets.get(s) != got.resets.get(s)
    }
    return differ <= gen.server_closed


def describe(frames: list[bytes]) -> str:
    """(type, flags, stream, length) of each frame, for a readable failure."""
    out = []
    for raw in frames:
        pos = 0
        while pos < len(raw):
            length = int.from_bytes(raw[pos : pos + 3], "big")
            sid = int.from_bytes(raw[pos + 5 : pos + 9], "big")
            out.append(f"({raw[pos + 3]},{raw[pos + 4]:#x},{sid},{length})")
            pos += 9 + length
    return " ".join(out)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    gateway = Gateway(parse_config(CONFIG), NullRouter(), MemorySessionCache())
    metrics = Metrics()
    server = H2Server(lambda: ExtProcStream(gateway, metrics))
    yield await server.start("127.0.0.1", 0)
    await server.stop(None)


async def test_outcomes_match_the_h2_package(port: int) -> None:
    mismatches = []
    kinds = {"conn": 0, "reset": 0, "ok": 0}
    for seed in range(SEEDS):
        gen = Gen(random.Random(seed))
        frames = gen.frames()
        want = oracle(frames)
        got, _ = await ours(port, frames)
        kinds["conn" if want.conn_error is not None else "reset" if want.resets else "ok"] += 1
        if want.conn_error is not None and want.conn_error == got.conn_error:
            continue  # what happened to streams before the connection died is moot
        if want.conn_error == got.conn_error and want.resets == got.resets:
            continue
        if _our_deliberate_difference(gen, frames, want, got):
            continue
        mismatches.append(f"seed {seed}: h2 {want}, ours {got}, frames {describe(frames)}")
    assert not mismatches, "\n".join(mismatches)
    # The generator covers all three classes of outcome.
    assert min(kinds.values()) >= 10, kinds
