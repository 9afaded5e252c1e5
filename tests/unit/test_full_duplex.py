"""The routing stream in FULL_DUPLEX_STREAMED mode (the bootstrap's), over a real gRPC channel
on both transports: Envoy sends the body without waiting, holds the headers, and gets the header
reply and the body together once the worker has the whole body. Envoy buffers nothing in this
mode, so the worker bounds the body (max_request_bytes: 413) and the bytes it holds (503)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.config import parse_config
from plano_extproc.gateway import BodyBudget, Gateway
from plano_extproc.names import DECISION_METADATA, LENGTH_KEY
from plano_extproc.routing.base import NullRouter
from plano_extproc.server.servicer import STREAMED_PIECE
from tests.extproc_messages import (
    chunk_msg,
    full_duplex,
    header_reply_sets,
    headers_msg,
    trailers_msg,
)
from tests.extproc_server import CONFIG, TRANSPORTS, running

MAX = 1 << 20

Serve = Callable[..., Any]
Served = AsyncIterator[tuple[pb_grpc.ExternalProcessorStub, Gateway]]


@pytest.fixture(params=TRANSPORTS)
def serve(request: pytest.FixtureRequest) -> Serve:
    @asynccontextmanager
    async def run(max_bytes: int = MAX) -> Served:
        listener = (
            f"listeners: [{{name: m, type: model, port: 12000, max_request_bytes: {max_bytes}}}]"
        )
        text = CONFIG.replace("listeners: [{name: m, type: model, port: 12000}]", listener)
        assert text != CONFIG
        gateway = Gateway(parse_config(text), NullRouter(), MemorySessionCache())
        async with running(request.param, gateway) as stub:
            yield stub, gateway

    return run


def chat(model: str, text: str = "hi") -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": text}]}, separators=(",", ":")
    ).encode()


async def read_all(call: Any) -> list[pb.ProcessingResponse]:
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


def streamed(replies: list[pb.ProcessingResponse]) -> list[pb.StreamedBodyResponse]:
    return [r.request_body.response.body_mutation.streamed_response for r in replies]


async def test_the_header_reply_waits_for_the_body_and_comes_with_it(serve: Serve) -> None:
    async with serve() as (stub, gateway):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        body = chat("anthropic/claude-sonnet-4-20250514")
        await call.write(chunk_msg(body[:10], False))
        await call.write(chunk_msg(body[10:], False))
        await call.write(chunk_msg(b"", True))  # HTTP/2 can end a body with an empty frame
        await call.done_writing()
        head, *rest = await read_all(call)
    # The header reply carries what only the body could decide: the model's provider.
    assert head.WhichOneof("response") == "request_headers"
    hdrs = header_reply_sets(head)
    assert hdrs["x-plano-upstream"].startswith("anthropic")
    assert hdrs["x-api-key"] == "sk-ant"
    assert "content-length" not in hdrs  # Envoy ignores it here; the metadata carries it
    assert head.request_headers.response.clear_route_cache is True
    [piece] = streamed(rest)
    assert piece.end_of_stream
    sent = json.loads(piece.body)
    assert sent["model"] == "claude-sonnet-4-20250514" and "max_tokens" in sent
    decision = head.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    assert decision[LENGTH_KEY].string_value == str(len(piece.body))
    assert decision["model"].string_value == "anthropic/claude-sonnet-4-20250514"
    assert gateway.bodies.held == 0


async def test_an_unchanged_body_is_sent_back_byte_for_byte(serve: Serve) -> None:
    async with serve() as (stub, _):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        body = b'{"model": "gpt-4o-mini",  "messages": [{"role": "user", "content": "hi"}]}'
        await call.write(chunk_msg(body, True))
        await call.done_writing()
        head, *rest = await read_all(call)
    [piece] = streamed(rest)
    assert piece.body == body and piece.end_of_stream  # Envoy drained the original
    decision = head.dynamic_metadata.fields[DECISION_METADATA].struct_value.fields
    assert decision[LENGTH_KEY].string_value == str(len(body))


async def test_a_large_body_goes_back_in_pieces_of_at_most_64_kib(serve: Serve) -> None:
    async with serve() as (stub, _):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        body = chat("gpt-4o-mini", "x" * (3 * STREAMED_PIECE + 123))
        for i in range(0, len(body), 16_000):
            await call.write(chunk_msg(body[i : i + 16_000], False))
        await call.write(chunk_msg(b"", True))
        await call.done_writing()
        _, *rest = await read_all(call)
    pieces = streamed(rest)
    assert len(pieces) == 4
    assert all(len(p.body) <= STREAMED_PIECE for p in pieces)
    assert [p.end_of_stream for p in pieces] == [False, False, False, True]
    assert b"".join(p.body for p in pieces) == body


async def test_a_request_with_trailers_ends_with_the_trailers_reply(serve: Serve) -> None:
    async with serve() as (stub, _):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        body = chat("gpt-4o-mini")
        await call.write(chunk_msg(body, False))
        await call.write(trailers_msg(**{"x-checksum": "abc"}))
        await call.done_writing()
        replies = await read_all(call)
    kinds = [r.WhichOneof("response") for r in replies]
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    [piece] = streamed(replies[1:2])
    assert piece.body == body and not piece.end_of_stream  # the trailers end the request


@pytest.mark.parametrize(
    ("path", "anthropic"), [("/v1/chat/completions", False), ("/v1/messages", True)]
)
async def test_a_body_over_max_request_bytes_is_a_413_in_the_clients_format(
    serve: Serve, path: str, anthropic: bool
) -> None:
    async with serve(max_bytes=4096) as (stub, gateway):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", path)))
        await call.write(chunk_msg(b"{" + b" " * 3000, False))
        await call.write(chunk_msg(b" " * 3000, False))  # 6,001 bytes: over the limit
        [reply] = await read_all(call)
        assert gateway.bodies.held == 0
    imm = reply.immediate_response
    assert imm.status.code == 413
    error = json.loads(imm.body)
    if anthropic:
        assert error["type"] == "error"
        error = error["error"]
    else:
        error = error["error"]
    assert error["type"] == "request_too_large"
    assert "exceeds the gateway limit of 0.00390625 MiB" in error["message"]


async def test_the_worker_refuses_large_bodies_past_its_budget_not_small_ones(
    serve: Serve,
) -> None:
    async with serve() as (stub, gateway):
        gateway.bodies.limit = 150_000
        hog = stub.Process()  # holds 100 KB and never finishes
        await hog.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        await hog.write(chunk_msg(b"{" + b" " * 99_999, False))
        for _ in range(500):  # the stream logic runs as the message arrives
            if gateway.bodies.held == 100_000:
                break
            await asyncio.sleep(0.01)
        assert gateway.bodies.held == 100_000

        second = stub.Process()  # 100 KB more: over the budget, and not small
        await second.write(full_duplex(headers_msg("POST", "/v1/messages")))
        await second.write(chunk_msg(b"{" + b" " * 99_999, False))
        [refused] = await read_all(second)
        imm = refused.immediate_response
        assert imm.status.code == 503
        assert json.loads(imm.body)["error"]["type"] == "overloaded_error"

        small = stub.Process()  # a small body always passes
        await small.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        await small.write(chunk_msg(chat("gpt-4o-mini"), True))
        await small.done_writing()
        replies = await read_all(small)
        assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]

        hog.cancel()  # Envoy resets the stream: its bytes leave the budget
        for _ in range(500):
            if gateway.bodies.held == 0:
                break
            await asyncio.sleep(0.01)
        assert gateway.bodies.held == 0


def test_the_budget_counts_every_byte_and_refuses_only_large_bodies() -> None:
    budget = BodyBudget(100)
    assert budget.add(90, 90)
    assert budget.add(BodyBudget.SMALL, BodyBudget.SMALL)  # small: passes over the limit
    assert not budget.add(1, BodyBudget.SMALL + 1)  # that body grew past small: refused
    assert budget.held == 91 + BodyBudget.SMALL


async def test_without_full_duplex_the_headers_are_answered_at_once(serve: Serve) -> None:
    async with serve() as (stub, _):
        call = stub.Process()
        await call.write(headers_msg("POST", "/v1/chat/completions"))  # BUFFERED: no config
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"
        assert not first.request_headers.response.HasField("header_mutation")
        await call.write(chunk_msg(chat("gpt-4o-mini"), True))
        second = await call.read()
        assert second.WhichOneof("response") == "request_body"
        assert not second.request_body.response.body_mutation.HasField("streamed_response")
        await call.done_writing()


async def test_a_body_in_a_flood_of_tiny_pieces_is_refused(serve: Serve) -> None:
    """1-byte pieces (a client's 1-byte HTTP/2 DATA frames) would cost the worker a message
    each: past 4,096 pieces they must average 256 bytes."""
    async with serve() as (stub, gateway):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        for _ in range(BodyBudget.FREE_PIECES + 1):
            await call.write(chunk_msg(b" ", False))
        [reply] = await read_all(call)
        imm = reply.immediate_response
        assert imm.status.code == 400
        assert "pieces" in json.loads(imm.body)["error"]["message"]
        assert gateway.bodies.held == 0


async def test_many_pieces_of_a_few_hundred_bytes_are_fine(serve: Serve) -> None:
    async with serve(max_bytes=4 << 20) as (stub, _):
        call = stub.Process()
        await call.write(full_duplex(headers_msg("POST", "/v1/chat/completions")))
        body = chat("gpt-4o-mini", "y" * 300 * (BodyBudget.FREE_PIECES + 100))
        for i in range(0, len(body), 300):
            await call.write(chunk_msg(body[i : i + 300], False))
        await call.write(chunk_msg(b"", True))
        await call.done_writing()
        _, *rest = await read_all(call)
    assert b"".join(p.body for p in streamed(rest)) == body


def test_crumbs_counts_pieces_only_past_the_free_ones() -> None:
    free, floor = BodyBudget.FREE_PIECES, BodyBudget.MIN_PIECE_AVERAGE
    assert not BodyBudget.crumbs(free, free)  # 1 byte each, but within the free pieces
    assert BodyBudget.crumbs(free + 1, free + 1)
    assert not BodyBudget.crumbs(free + 1, floor * (free + 1))
