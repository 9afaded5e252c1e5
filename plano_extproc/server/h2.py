"""A small HTTP/2 server for one gRPC method: Envoy's ext_proc ``Process`` stream.

Why it exists: grpc.aio spends 0.3-0.45 ms of CPU per ext_proc stream on our 2-core box
(C-core batch operations, a poller thread and event-loop hand-offs for each of the ~6
operations of a stream), several times the work of parsing and routing the request. Envoy is
the only client and the method is fixed, so an asyncio protocol that reads frames itself does
the same job at about a third of the CPU: one read callback per TCP segment, one write per
reply. ``--transport grpcio`` keeps the grpc.aio server for comparison and as a fallback.

Scope: the server side of RFC 9113 over cleartext with prior knowledge (what Envoy's gRPC
client speaks): SETTINGS, PING, GOAWAY, RST_STREAM, flow control in both directions,
HEADERS/CONTINUATION through the ``hpack`` decoder, padding, gRPC length-prefixed messages and
``grpc-status`` trailers, plus the unary ``grpc.health.v1.Health/Check`` (always SERVING while
the process accepts streams) for Envoy's gRPC health checker. Not supported: TLS, server push,
message compression (a compressed message is answered with UNIMPLEMENTED).

Limits, because any local process can connect (each one ends the connection with GOAWAY):

- a header block is at most ``MAX_HEADER_BLOCK`` bytes in at most ``MAX_HEADER_FRAMES``
  frames (ENHANCE_YOUR_CALM); fragments are appended to one buffer, never re-summed;
- receive windows are real: each stream gets ``STREAM_WINDOW``, and a message larger than
  that gets the rest of its declared size granted at once from a per-connection pool of
  ``GRANT_BUDGET`` bytes (whole-message grants cannot deadlock). Window is returned only when
  a message has been handed to the stream logic, so at most ``CONNECTION_BUDGET`` bytes
  (about 128 MiB) are buffered per connection; DATA beyond a window is FLOW_CONTROL_ERROR;
- at most ``MAX_CONCURRENT_STREAMS`` open streams (more are REFUSED_STREAM);
- frames that cost work but carry no request (PING, SETTINGS, WINDOW_UPDATE, PRIORITY,
  unknown types, empty DATA/CONTINUATION, refused streams, RST_STREAM of a stream we were
  still working on, more RST_STREAMs than streams opened) draw from a token bucket of
  ``FLOOD_BURST`` refilled at ``FLOOD_RATE`` per second (ENHANCE_YOUR_CALM when empty).
  Envoy's normal traffic (a PING every 30 s, one RST_STREAM per finished stream) never
  touches it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast
from urllib.parse import quote

import hpack
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from hpack.table import HeaderTable

from plano_extproc.server.servicer import (
    HEALTH_SERVING,
    ExtProcStream,
    Reply,
    health_check_error,
)

log = logging.getLogger("plano_extproc.server.h2")

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_PATH = b"/grpc.health.v1.Health/Check"
# Envoy's OpenTelemetry access logger sends the usage records here (batched, unary).
LOGS_PATH = b"/opentelemetry.proto.collector.logs.v1.LogsService/Export"
MAX_HEALTH_REQUEST = 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# gRPC status codes used here.
GRPC_OK, GRPC_NOT_FOUND, GRPC_RESOURCE_EXHAUSTED = 0, 5, 8
GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 12, 13

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME = 1 << 20  # largest frame we accept (advertised)
MAX_CONCURRENT_STREAMS = 1024
MAX_HEADER_BLOCK = 64 << 10  # bytes of one HPACK block (Envoy's default header limit is 60 KiB)
MAX_HEADER_FRAMES = 16  # HEADERS + CONTINUATION frames of one block (Envoy sends one)
MAX_MESSAGE = 64 << 20  # same receive limit as the grpc.aio transport
# Receive flow control: what one connection may make us buffer.
STREAM_WINDOW = DEFAULT_WINDOW  # per stream, before a large message asks for more
GRANT_BUDGET = MAX_MESSAGE  # shared by the streams whose message exceeds their window
CONNECTION_BUDGET = MAX_CONCURRENT_STREAMS * STREAM_WINDOW + GRANT_BUDGET  # ~128 MiB
CONNECTION_UPDATE = 1 << 20  # consumed bytes returned to the connection window in batches
CONNECTION_WINDOW = CONNECTION_BUDGET + CONNECTION_UPDATE  # never the tighter window
LINGER = 1.0  # seconds a connection ended with an error GOAWAY keeps draining its input
# Frames that cost work without carrying a request: a token bucket per connection.
FLOOD_BURST = 1000
FLOOD_RATE = 100.0  # tokens per second

_FRAME = struct.Struct(">BHBBI")  # 24-bit length split as 8 + 16 bits, type, flags, stream id
_SETTING = struct.Struct(">HI")


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name (we never touch the dynamic table)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# Our SETTINGS and the connection window raised to its budget, sent after the client preface.
SERVER_PREFACE = _frame(
    SETTINGS,
    0,
    0,
    b"".join(
        _SETTING.pack(k, v)
        for k, v in (
            (3, MAX_CONCURRENT_STREAMS),
            (4, STREAM_WINDOW),
            (5, MAX_FRAME),
            (6, MAX_HEADER_BLOCK),
        )
    ),
) + _frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))

# ":status: 200" is static entry 8; content-type is static name 31, sent as a literal.
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _hpack_int(16, 7) + b"application/grpc"
TRAILERS_OK = _hpack_literal(b"grpc-status", b"0")
_HTTP1_TEXT = b"this port speaks gRPC over HTTP/2 (Envoy ext_proc), not HTTP/1.x\r\n"
HTTP1_REPLY = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_HTTP1_TEXT), _HTTP1_TEXT)
)


def _trailers(code: int, message: str = "") -> bytes:
    block = _hpack_literal(b"grpc-status", str(code).encode())
    if message:
        encoded = quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
        block += _hpack_literal(b"grpc-message", encoded)
    return block


class _VersionedTable(HeaderTable):
    """HPACK dynamic table that counts its changes, so decoded blocks can be reused safely."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @HeaderTable.maxsize.setter  # type: ignore[attr-defined]
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = (
        "busy",
        "export",
        "extra",
        "headers_sent",
        "held",
        "inbuf",
        "local_closed",
        "logic",
        "need",
        "out",
        "pending",
        "remote_closed",
        "send_window",
        "sid",
        "task",
        "trailers",
        "window",
    )

    def __init__(self, sid: int, logic: ExtProcStream | None, send_window: int) -> None:
        self.sid = sid
        self.logic = logic  # None: a unary call (health check, usage log export)
        self.export = False  # a LogsService/Export call (else, without logic: a health check)
        self.inbuf = bytearray()
        # Parsed messages waiting for the logic, with their size on the wire.
        self.pending: deque[tuple[pb.ProcessingRequest, int]] = deque()
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.out = bytearray()  # DATA payload waiting for flow-control window
        self.trailers: bytes | None = None  # sent once ``out`` is empty
        self.headers_sent = False
        self.remote_closed = False
        self.local_closed = False
        self.window = STREAM_WINDOW  # receive window we advertised and Envoy has not used
        self.held = 0  # received bytes not yet handed to the logic (inbuf + pending)
        self.need = 0  # bytes still to come for the message being received
        self.extra = 0  # our share of the connection's GRANT_BUDGET


def _queue_message(s: _Stream, msg: bytes) -> None:
    """One gRPC message onto the stream's outgoing DATA: flag byte 0 (uncompressed), a 32-bit
    length, the message."""
    s.out += len(msg).to_bytes(5, "big")
    s.out += msg


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy, carrying many concurrent ext_proc streams."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_ok = False
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.table = self.decoder.header_table = _VersionedTable()
        # Envoy sends the same header block for every ext_proc stream; decoding it is a
        # pure-Python Huffman walk, so blocks that did not touch the dynamic table are kept
        # (tagged with the table version they were decoded against).
        self.decoded: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.send_window = DEFAULT_WINDOW  # the peer's connection window for our DATA
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.recv_window = CONNECTION_WINDOW  # what Envoy may still send on the connection
        self.recv_unacked = 0  # consumed bytes not yet returned with WINDOW_UPDATE
        self.grant_free = GRANT_BUDGET
        self.waiting: dict[int, _Stream] = {}  # streams whose message waits for a grant
        self._granting = False
        self.table_size_update = False
        self.goaway_sent = False
        self.closed = False
        self.calm = float(FLOOD_BURST)  # flood token bucket
        self.calm_at = time.monotonic()
        self.free_resets = 0  # RST_STREAMs of finished streams that cost nothing
        self.settings_acks = 1  # ACKs we expect (one per SETTINGS we sent)
        # Header block in progress: stream (0 = none), HEADERS flags, fragments, frame count.
        self._hb_sid = 0
        self._hb_flags = 0
        self._hb_buf = bytearray()
        self._hb_frames = 0
        self._batching = False
        self._out: list[bytes] = []

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        # Our SETTINGS go out once the client preface has arrived (data_received), so that
        # an HTTP/1.x client gets a readable 400 instead of binary frames before it.

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._drop_streams()

    def _drop_streams(self) -> None:
        """Cancel every stream's pending work and forget the streams (the connection ends)."""
        for s in self.streams.values():
            if s.task is not None:
                s.task.cancel()
            if s.logic is not None:
                s.logic.close()
        self.streams.clear()
        self.waiting.clear()
        self.server.notify_idle()

    def pause_writing(self) -> None:
        # Envoy is not reading our replies: stop reading its requests until it catches up,
        # so buffered replies cannot grow without bound.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self.buf
        buf += data
        self._batching = True
        try:
            if not self.preface_ok:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        self._reject_non_h2()
                    return
                if not buf.startswith(PREFACE):
                    self._reject_non_h2()
                    return
                del buf[: len(PREFACE)]
                self.preface_ok = True
                self._out.append(SERVER_PREFACE)
            pos, n = 0, len(buf)
            while n - pos >= 9 and not self.closed:
                hi, lo, ftype, flags, sid = _FRAME.unpack_from(buf, pos)
                length = hi << 16 | lo
                if length > MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = pos + 9 + length
                if end > n:
                    break
                payload = bytes(buf[pos + 9 : end])
                pos = end
                self._on_frame(ftype, flags, sid & 0x7FFFFFFF, payload)
            del buf[:pos]
            self._return_connection_window()
        except _ConnectionError as e:
            log.warning("ext_proc HTTP/2 connection error %d: %s", e.code, e)
            self._goaway(e.code, str(e))
        except Exception:  # a bug here must not leave a half-read connection behind
            log.exception("ext_proc HTTP/2 connection failed")
            self._goaway(INTERNAL_ERROR, "internal error")
        finally:
            self._batching = False
            self._flush_out()

    # ------------------------------------------------------------------ frames in

    def _charge(self, what: str) -> None:
        """Take one token for a frame that made us work without carrying a request."""
        self.calm -= 1.0
        if self.calm < 0.0:
            now = time.monotonic()
            self.calm = min(float(FLOOD_BURST), self.calm + (now - self.calm_at) * FLOOD_RATE)
            self.calm_at = now
            if self.calm < 0.0:
                raise _ConnectionError(ENHANCE_YOUR_CALM, f"too many {what} frames")

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._hb_sid and ftype != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "header block interrupted")
        if ftype == DATA:
            self._on_data(flags, sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == PING:
            if sid != 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
            self._charge("PING")  # we never send PINGs, so an ACK is as unasked-for
            if not flags & ACK:
                self._emit(_frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            self._on_rst_stream(sid, payload)
        elif ftype == PRIORITY:
            if sid == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            # Stream errors in RFC 9113 6.3 and 5.3.1, which 5.4.1 lets us widen.
            if len(payload) != 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PRIORITY payload is not 5 bytes")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"stream {sid} depends on itself")
            self._charge("PRIORITY")
        elif ftype == GOAWAY:
            if sid != 0:
                raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            self._charge("GOAWAY")  # Envoy opens no new streams; the ones in flight finish
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            self._charge("unknown")  # ignored (RFC 9113 section 5.5)

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if sid > self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        s = self.streams.pop(sid, None)
        if s is None:
            # Envoy resets each stream once it is over: one per stream opened is free.
            if self.free_resets > 0:
                self.free_resets -= 1
            else:
                self._charge("RST_STREAM")
            return
        if not s.headers_sent or s.busy:
            self._charge("RST_STREAM")  # reset while we worked on it ("rapid reset")
        if s.task is not None:
            s.task.cancel()
        self._release(s)
        self.server.notify_idle()

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flow > self.recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= flow
        payload = self._unpad(flags, payload)
        size = len(payload)
        if not size and not flags & END_STREAM:
            self._charge("empty DATA")
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self.recv_unacked += flow  # a stream we already finished or reset
            return
        if flow > s.window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, f"DATA beyond the window of stream {sid}")
        s.window -= flow
        if s.remote_closed:
            self.recv_unacked += flow
            self._reset(s, STREAM_CLOSED)
            return
        self.recv_unacked += flow - size  # padding is consumed at once
        if not s.local_closed and s.trailers is None:
            s.held += size
            s.inbuf += payload
            if flags & END_STREAM:
                s.remote_closed = True
            self._read_messages(s)
        else:
            self.recv_unacked += size
            if flags & END_STREAM:
                s.remote_closed = True
                self._pump(s)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS priority block truncated")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"stream {sid} depends on itself")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_header_block(sid, flags, payload)
            return
        if len(payload) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if not payload:
            self._charge("empty HEADERS")
        self._hb_sid, self._hb_flags, self._hb_frames = sid, flags, 1
        self._hb_buf = bytearray(payload)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self._hb_sid or self._hb_sid != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._hb_frames += 1
        if self._hb_frames > MAX_HEADER_FRAMES:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block in too many frames")
        buf = self._hb_buf
        buf += payload  # appended in place: the block is never re-joined or re-measured
        if len(buf) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._hb_sid = 0
            self._hb_buf = bytearray()
            self._on_header_block(sid, self._hb_flags, bytes(buf))
        elif not payload:
            self._charge("empty CONTINUATION")

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        headers = self._decode(block)
        s = self.streams.get(sid)
        if s is not None or sid <= self.last_sid:
            # Trailers from the client (gRPC clients send none): only END_STREAM matters.
            # On a stream already closed the block was decoded (HPACK state) and is ignored.
            if s is not None and not flags & END_STREAM:
                raise _ConnectionError(PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            if s is not None:
                if s.remote_closed:
                    self._reset(s, STREAM_CLOSED)
                    return
                s.remote_closed = True
                self._pump(s)
            return
        if sid % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"even stream id {sid} from a client")
        self.last_sid = sid
        if self.goaway_sent or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._charge("refused HEADERS")
            self._emit(_frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        if self.free_resets < MAX_CONCURRENT_STREAMS:
            self.free_resets += 1
        fields = dict(headers)
        path = fields.get(b":path", b"")
        health = path == HEALTH_PATH
        export = path == LOGS_PATH and self.server.export is not None
        unary = health or export
        s = _Stream(sid, None if unary else self.server.new_stream(), self.peer_initial_window)
        s.export = export
        self.streams[sid] = s
        if fields.get(b":method") != b"POST" or (path != PROCESS_PATH and not unary):
            self._finish(s, GRPC_UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}")
        elif not fields.get(b"content-type", b"").startswith(b"application/grpc"):
            self._finish(s, GRPC_UNIMPLEMENTED, "content-type must be application/grpc")
        if flags & END_STREAM:
            s.remote_closed = True
            self._pump(s)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        version = self.table.version
        hit = self.decoded.get(block)
        if hit is not None and hit[0] == version:
            return hit[1]
        try:
            headers: list[tuple[bytes, bytes]] = self.decoder.decode(block, raw=True)  # type: ignore[assignment]
        except hpack.HPACKError as e:  # includes oversized header lists
            raise _ConnectionError(COMPRESSION_ERROR, f"HPACK: {e}") from None
        if self.table.version == version:
            if len(self.decoded) >= 64:
                self.decoded.clear()
            self.decoded[block] = (version, headers)
        return headers

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if inc == 0:  # on a stream, a stream error widened (RFC 9113 6.9, 5.4.1)
            raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        self._charge("WINDOW_UPDATE")  # each DATA frame we send gives a token back
        if sid == 0:
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        if sid > self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        s = self.streams.get(sid)
        if s is None:
            return
        if s.send_window + inc > MAX_WINDOW:
            self._reset(s, FLOW_CONTROL_ERROR)
            return
        s.send_window += inc
        self._flush_stream(s)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if flags & ACK and payload:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        if sid != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if self.settings_acks > 0:
                self.settings_acks -= 1
            else:
                self._charge("SETTINGS ACK")
            return
        self._charge("SETTINGS")
        grow = False
        for off in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, off)
            if ident == 1:  # HEADER_TABLE_SIZE: we never index, say so on the next block
                self.table_size_update = True
            elif ident == 2 and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            elif ident == 4:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.send_window += delta
                grow = grow or delta > 0
            elif ident == 5:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
        self._emit(_frame(SETTINGS, ACK, 0))
        if grow:
            self._flush_blocked()

    def _flush_blocked(self) -> None:
        for s in list(self.streams.values()):
            if s.out or s.trailers is not None:
                self._flush_stream(s)

    # ------------------------------------------------------------------ receive windows

    def _settle(self, s: _Stream) -> None:
        """Size the stream's receive window after its buffered bytes or message changed.

        The window is raised to ``STREAM_WINDOW`` once half of it is used up (not while the
        logic works on a message: Envoy's last message needs no more window), and at once to
        the whole rest of a message that does not fit (from ``GRANT_BUDGET``, or the stream
        waits for a grant until other streams' messages are consumed).
        """
        allowance = s.window + s.held
        want = s.held + s.need
        if want < STREAM_WINDOW:
            want = STREAM_WINDOW
        grow = want - allowance
        if (
            grow > 0
            and (s.window < s.need or (grow >= STREAM_WINDOW // 2 and not s.busy))
            and not s.remote_closed
            and not s.local_closed
            and s.trailers is None
        ):
            extra = want - STREAM_WINDOW
            delta = extra - s.extra
            if delta > self.grant_free:
                if s.window < s.need:
                    self.waiting[s.sid] = s
                return
            self.waiting.pop(s.sid, None)
            self.grant_free -= delta
            s.extra = extra
            s.window += grow
            self._emit(_frame(WINDOW_UPDATE, 0, s.sid, grow.to_bytes(4, "big")))
            return
        extra = allowance - STREAM_WINDOW if allowance > STREAM_WINDOW else 0
        if extra < s.extra:
            self.grant_free += s.extra - extra
            s.extra = extra
            if self.waiting:
                self._grant_waiting()

    def _grant_waiting(self) -> None:
        """Grant window to streams waiting for it, oldest first, while the budget allows."""
        if self._granting:
            return
        self._granting = True
        try:
            for s in list(self.waiting.values()):
                self._settle(s)
                if s.sid in self.waiting:
                    break
        finally:
            self._granting = False

    def _release(self, s: _Stream) -> None:
        """The stream is gone: its buffered bytes and its grant go back to the connection."""
        if s.logic is not None:
            s.logic.close()
        self.recv_unacked += s.held
        s.held = s.window = s.need = 0
        s.inbuf.clear()
        s.pending.clear()
        self.waiting.pop(s.sid, None)
        if s.extra:
            self.grant_free += s.extra
            s.extra = 0
            if self.waiting:
                self._grant_waiting()

    def _return_connection_window(self) -> None:
        if self.recv_unacked >= CONNECTION_UPDATE and not self.closed:
            n, self.recv_unacked = self.recv_unacked, 0
            self.recv_window += n
            self._emit(_frame(WINDOW_UPDATE, 0, 0, n.to_bytes(4, "big")))

    # ------------------------------------------------------------------ gRPC messages

    def _read_messages(self, s: _Stream) -> None:
        inbuf = s.inbuf
        while len(inbuf) >= 5 and not s.local_closed:
            size = int.from_bytes(inbuf[1:5], "big")
            limit = MAX_MESSAGE if s.logic is not None or s.export else MAX_HEALTH_REQUEST
            if size > limit:
                self._finish(s, GRPC_RESOURCE_EXHAUSTED, f"message of {size} bytes is too large")
                return
            if len(inbuf) < 5 + size:
                s.need = 5 + size - len(inbuf)
                break
            if inbuf[0]:
                self._finish(s, GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                return
            raw = bytes(inbuf[5 : 5 + size])
            del inbuf[: 5 + size]
            if s.export:
                self._export(s, raw)
                return
            if s.logic is None:
                self._health(s, raw)
                return
            try:
                s.pending.append((pb.ProcessingRequest.FromString(raw), 5 + size))
            except DecodeError:
                self._finish(s, GRPC_INTERNAL, "cannot parse the ProcessingRequest")
                return
        else:
            s.need = 5 - len(inbuf) if inbuf else 0
        self._pump(s)

    def _export(self, s: _Stream, raw: bytes) -> None:
        """``LogsService/Export``: Envoy's batched usage records (answered when read)."""
        export = self.server.export
        assert export is not None
        try:
            reply = export(raw)
        except Exception:
            log.exception("usage records could not be read")
            self._finish(s, GRPC_INTERNAL, "cannot read the usage records")
            return
        self._send_message(s, reply, True)

    def _health(self, s: _Stream, raw: bytes) -> None:
        """Answer ``grpc.health.v1.Health/Check`` as the grpcio transport does."""
        error = health_check_error(raw)
        if error is not None:
            self._finish(s, GRPC_NOT_FOUND, error)
            return
        self._send_message(s, HEALTH_SERVING, True)

    def _pump(self, s: _Stream) -> None:
        """Run queued messages through the stream logic, one at a time, in order."""
        # A final reply may still wait for flow-control window (trailers queued): nothing
        # after it is processed, as with grpc.aio where the handler has returned.
        while not s.busy and s.pending and not s.local_closed and s.trailers is None:
            req, size = s.pending.popleft()
            s.held -= size  # handed over: Envoy may send that much again
            self.recv_unacked += size
            assert s.logic is not None
            try:
                result = s.logic.step(req)
            except Exception:
                log.exception("ext_proc stream failed")
                self._finish(s, GRPC_INTERNAL, "internal error in plano-extproc")
                return
            if isinstance(result, Reply):
                self._reply(s, result)
            else:
                s.busy = True
                s.task = asyncio.get_running_loop().create_task(self._await_reply(s, result))
        if (
            s.remote_closed
            and not s.busy
            and not s.pending
            and not s.local_closed
            and s.trailers is None
        ):
            # Envoy half-closed the stream with nothing left to answer: end it cleanly (a
            # health check that ended without its request message is a client error).
            if s.logic is not None:
                self._finish(s, GRPC_OK)
            else:
                self._finish(s, GRPC_INTERNAL, "health check without a request message")
        elif self.streams.get(s.sid) is s:
            self._settle(s)

    async def _await_reply(self, s: _Stream, pending: Coroutine[Any, Any, Reply]) -> None:
        try:
            reply = await pending
        except Exception:
            log.exception("ext_proc stream failed")
            reply = None
        s.busy, s.task = False, None
        if self.closed or self.streams.get(s.sid) is not s:
            return  # reset by Envoy or connection gone while we worked
        self._batching = True  # one write for HEADERS + DATA + trailers
        try:
            if reply is None:
                self._finish(s, GRPC_INTERNAL, "internal error in plano-extproc")
            else:
                self._reply(s, reply)
                self._pump(s)
            self._return_connection_window()
        finally:
            self._batching = False
            self._flush_out()

    # ------------------------------------------------------------------ frames out

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        if not self._batching:
            self._flush_out()

    def _flush_out(self) -> None:
        if self._out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
        self._out.clear()

    def _header_frame(self, sid: int, block: bytes, flags: int) -> bytes:
        if self.table_size_update:
            self.table_size_update = False
            block = b"\x20" + block  # dynamic table size update to 0
        return _frame(HEADERS, END_HEADERS | flags, sid, block)

    def _reply(self, s: _Stream, reply: Reply) -> None:
        message, more = reply.message, reply.more
        if message is None:
            return  # a full-duplex body chunk: answered with the whole body later
        if not more:
            self._send_message(s, message.SerializeToString(), reply.last)
            return
        # All of them in one DATA frame (window permitting): one read for Envoy.
        for then in (message, *more[:-1]):
            _queue_message(s, then.SerializeToString())
        self._send_message(s, more[-1].SerializeToString(), reply.last)

    def _send_message(self, s: _Stream, msg: bytes, last: bool) -> None:
        head = b"" if s.headers_sent else self._header_frame(s.sid, RESPONSE_HEADERS, 0)
        s.headers_sent = True
        _queue_message(s, msg)
        if last:
            s.trailers = TRAILERS_OK
            self._drop_input(s)
        if head:
            self._emit(head)
        self._flush_stream(s)

    def _drop_input(self, s: _Stream) -> None:
        """Nothing more will be read on this stream: free what it buffered."""
        if s.held:
            self.recv_unacked += s.held
            s.held = 0
            s.inbuf.clear()
            s.pending.clear()

    def _finish(self, s: _Stream, code: int, message: str = "") -> None:
        """End the stream with a gRPC status (after any DATA still queued)."""
        if s.local_closed or s.trailers is not None:
            return
        self._drop_input(s)
        if s.task is not None:
            s.task.cancel()
            s.task, s.busy = None, False
        block = _trailers(code, message)
        if not s.headers_sent:  # trailers-only response
            s.headers_sent = True
            s.local_closed = True
            self._emit(self._header_frame(s.sid, RESPONSE_HEADERS + block, END_STREAM))
            self._forget(s)
            return
        s.trailers = block
        self._flush_stream(s)

    def _flush_stream(self, s: _Stream) -> None:
        out = s.out
        while out:
            n = min(len(out), self.send_window, s.send_window, self.peer_max_frame)
            if n <= 0:
                return  # wait for WINDOW_UPDATE
            if n == len(out):
                chunk = bytes(out)
                out.clear()
            else:
                chunk = bytes(out[:n])
                del out[:n]
            self.send_window -= n
            s.send_window -= n
            if self.calm < FLOOD_BURST:
                self.calm += 1.0  # one WINDOW_UPDATE per DATA frame we send is fair
            self._emit(_frame(DATA, 0, s.sid, chunk))
        if s.trailers is not None and not s.local_closed:
            block, s.trailers = s.trailers, None
            s.local_closed = True
            self._emit(self._header_frame(s.sid, block, END_STREAM))
            self._forget(s)

    def _forget(self, s: _Stream) -> None:
        # Our side is closed; anything Envoy still sends on this stream is ignored.
        if self.streams.get(s.sid) is s:
            del self.streams[s.sid]
            self._release(s)
        self.server.notify_idle()

    def _reset(self, s: _Stream, code: int) -> None:
        if s.task is not None:
            s.task.cancel()
        if self.streams.pop(s.sid, None) is s:
            self._release(s)
        self._emit(_frame(RST_STREAM, 0, s.sid, code.to_bytes(4, "big")))
        self.server.notify_idle()

    def _goaway(self, code: int, debug: str = "") -> None:
        if self.transport is None or self.closed:
            return
        payload = self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big") + debug.encode()
        self._out.append(_frame(GOAWAY, 0, 0, payload))
        self.goaway_sent = True
        if code != NO_ERROR:
            self._flush_out()
            self.closed = True
            self._linger()

    def _linger(self) -> None:
        """Close after an error so that the GOAWAY arrives: send FIN now, discard what the
        peer still sends, close for good after ``LINGER`` seconds. Closing at once with
        unread input makes the kernel send RST, which can destroy the GOAWAY in flight."""
        transport = self.transport
        assert transport is not None
        self.buf.clear()
        self._hb_buf = bytearray()
        self._drop_streams()
        try:
            transport.resume_reading()  # keep draining even if writes were backed up
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        asyncio.get_running_loop().call_later(LINGER, transport.close)

    def _reject_non_h2(self) -> None:
        assert self.transport is not None
        if self.buf[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ") or self.buf[:3] == b"PRI":
            self._out.append(HTTP1_REPLY)
        self._flush_out()
        self.closed = True
        self.transport.close()

    def shutdown(self) -> None:
        """Graceful: refuse new streams; the ones in flight finish."""
        if not self.goaway_sent and not self.closed:
            self._goaway(NO_ERROR)
            self._flush_out()

    def abort(self) -> None:
        # Also ends a connection still lingering after an error GOAWAY.
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class H2Server:
    """Serves ``ExternalProcessor/Process`` over HTTP/2 with one ``ExtProcStream`` per stream."""

    def __init__(
        self,
        new_stream: Callable[[], ExtProcStream],
        export: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """``export``: reads one serialized ExportLogsServiceRequest, returns the serialized
        response (None: the LogsService is not served)."""
        self.new_stream = new_stream
        self.export = export
        self.connections: set[H2Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: H2Connection(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    def notify_idle(self) -> None:
        if self._idle is not None and not any(c.streams for c in self.connections):
            self._idle.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, send GOAWAY, let streams in flight finish for ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            conn.shutdown()
        self.notify_idle()
        if grace:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("ext_proc streams still open after %.1fs; closing", grace)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
