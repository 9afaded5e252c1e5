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
``grpc-status`` trailers. Not supported: TLS, server push, message compression (a compressed
message is answered with UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast
from urllib.parse import quote

import hpack
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from hpack.table import HeaderTable

from plano_extproc.server.servicer import ExtProcStream, Reply

log = logging.getLogger("plano_extproc.server.h2")

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

# gRPC status codes used here.
GRPC_OK, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 0, 8, 12, 13

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME = 1 << 20  # largest frame we accept (advertised)
MAX_CONCURRENT_STREAMS = 1024
MAX_HEADER_BLOCK = 64 << 10
MAX_MESSAGE = 64 << 20  # same receive limit as the grpc.aio transport

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


# Our SETTINGS and the connection window raised to the maximum, sent after the client preface.
SERVER_PREFACE = _frame(
    SETTINGS,
    0,
    0,
    b"".join(
        _SETTING.pack(k, v)
        for k, v in ((3, MAX_CONCURRENT_STREAMS), (4, MAX_WINDOW), (5, MAX_FRAME),
                     (6, MAX_HEADER_BLOCK))
    ),
) + _frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))  # fmt: skip

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
        "headers_sent",
        "inbuf",
        "local_closed",
        "logic",
        "out",
        "pending",
        "recv_unacked",
        "remote_closed",
        "send_window",
        "sid",
        "task",
        "trailers",
    )

    def __init__(self, sid: int, logic: ExtProcStream, send_window: int) -> None:
        self.sid = sid
        self.logic = logic
        self.inbuf = bytearray()
        self.pending: deque[pb.ProcessingRequest] = deque()
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.out = bytearray()  # DATA payload waiting for flow-control window
        self.trailers: bytes | None = None  # sent once ``out`` is empty
        self.headers_sent = False
        self.remote_closed = False
        self.local_closed = False
        self.recv_unacked = 0


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
        self.recv_unacked = 0
        self.table_size_update = False
        self.goaway_sent = False
        self.closed = False
        self._hb: tuple[int, int, list[bytes]] | None = None  # header block in progress
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
        for s in self.streams.values():
            if s.task is not None:
                s.task.cancel()
        self.streams.clear()
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

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._hb is not None and ftype != CONTINUATION:
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
            if not flags & ACK:
                self._emit(_frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise _ConnectionError(PROTOCOL_ERROR, "bad RST_STREAM")
            s = self.streams.pop(sid, None)
            if s is not None and s.task is not None:
                s.task.cancel()
            self.server.notify_idle()
        elif ftype == GOAWAY:
            pass  # Envoy opens no new streams here; the ones in flight still finish
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 sections 5.3.2 and 5.5).

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
        self.recv_unacked += flow
        if self.recv_unacked > MAX_WINDOW // 2:
            self._emit(_frame(WINDOW_UPDATE, 0, 0, self.recv_unacked.to_bytes(4, "big")))
            self.recv_unacked = 0
        payload = self._unpad(flags, payload)
        s = self.streams.get(sid)
        if s is None or s.remote_closed:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we already finished or reset
        s.recv_unacked += flow
        if s.recv_unacked > MAX_WINDOW // 2:
            self._emit(_frame(WINDOW_UPDATE, 0, sid, s.recv_unacked.to_bytes(4, "big")))
            s.recv_unacked = 0
        if not s.local_closed and s.trailers is None:
            s.inbuf += payload
            self._read_messages(s)
        if flags & END_STREAM:
            s.remote_closed = True
            self._pump(s)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_header_block(sid, flags, payload)
        else:
            self._hb = (sid, flags, [payload])

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._hb is None or self._hb[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        parts = self._hb[2]
        parts.append(payload)
        if sum(map(len, parts)) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            start_flags = self._hb[1]
            self._hb = None
            self._on_header_block(sid, start_flags, b"".join(parts))

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        headers = self._decode(block)
        s = self.streams.get(sid)
        if s is not None or sid <= self.last_sid:
            # Trailers from the client (gRPC clients send none): only END_STREAM matters.
            if not flags & END_STREAM:
                raise _ConnectionError(PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            if s is not None:
                s.remote_closed = True
                self._pump(s)
            return
        if sid % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"even stream id {sid} from a client")
        self.last_sid = sid
        if self.goaway_sent or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._emit(_frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        s = _Stream(sid, self.server.new_stream(), self.peer_initial_window)
        self.streams[sid] = s
        fields = dict(headers)
        path = fields.get(b":path", b"")
        if fields.get(b":method") != b"POST" or path != PROCESS_PATH:
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
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        s = self.streams.get(sid)
        if s is None:
            return
        if inc == 0 or s.send_window + inc > MAX_WINDOW:
            self._reset(s, PROTOCOL_ERROR if inc == 0 else FLOW_CONTROL_ERROR)
            return
        s.send_window += inc
        self._flush_stream(s)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
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

    # ------------------------------------------------------------------ gRPC messages

    def _read_messages(self, s: _Stream) -> None:
        inbuf = s.inbuf
        while len(inbuf) >= 5 and not s.local_closed:
            size = int.from_bytes(inbuf[1:5], "big")
            if size > MAX_MESSAGE:
                self._finish(s, GRPC_RESOURCE_EXHAUSTED, f"message of {size} bytes is too large")
                return
            if len(inbuf) < 5 + size:
                return
            if inbuf[0]:
                self._finish(s, GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                return
            raw = bytes(inbuf[5 : 5 + size])
            del inbuf[: 5 + size]
            try:
                s.pending.append(pb.ProcessingRequest.FromString(raw))
            except DecodeError:
                self._finish(s, GRPC_INTERNAL, "cannot parse the ProcessingRequest")
                return
        self._pump(s)

    def _pump(self, s: _Stream) -> None:
        """Run queued messages through the stream logic, one at a time, in order."""
        # A final reply may still wait for flow-control window (trailers queued): nothing
        # after it is processed, as with grpc.aio where the handler has returned.
        while not s.busy and s.pending and not s.local_closed and s.trailers is None:
            req = s.pending.popleft()
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
            # Envoy half-closed the stream with nothing left to answer: end it cleanly.
            self._finish(s, GRPC_OK)

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
        msg = reply.message.SerializeToString()
        head = b"" if s.headers_sent else self._header_frame(s.sid, RESPONSE_HEADERS, 0)
        s.headers_sent = True
        s.out += len(msg).to_bytes(5, "big")  # flag byte 0 (uncompressed) + 32-bit length
        s.out += msg
        if reply.last:
            s.trailers = TRAILERS_OK
        if head:
            self._emit(head)
        self._flush_stream(s)

    def _finish(self, s: _Stream, code: int, message: str = "") -> None:
        """End the stream with a gRPC status (after any DATA still queued)."""
        if s.local_closed or s.trailers is not None:
            return
        s.pending.clear()
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
        self.server.notify_idle()

    def _reset(self, s: _Stream, code: int) -> None:
        if s.task is not None:
            s.task.cancel()
        self.streams.pop(s.sid, None)
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
            self.transport.close()

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
        if self.transport is not None and not self.closed:
            self.transport.close()


class H2Server:
    """Serves ``ExternalProcessor/Process`` over HTTP/2 with one ``ExtProcStream`` per stream."""

    def __init__(self, new_stream: Callable[[], ExtProcStream]) -> None:
        self.new_stream = new_stream
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
