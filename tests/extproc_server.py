"""The worker's ext_proc server on a free port, for the servicer tests: the same stream logic
behind either transport (the built-in HTTP/2 server or grpc.aio), reached through grpcio's own
client, the way Envoy reaches it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.server.app import GRPC_OPTIONS
from plano_extproc.server.h2 import H2Server
from plano_extproc.server.servicer import ExternalProcessor, ExtProcStream

TRANSPORTS = ["h2", "grpcio"]

# Two providers (an OpenAI default, an Anthropic model), no router.
CONFIG = """
version: v0.4.0
listeners: [{name: m, type: model, port: 12000}]
model_providers:
  - model: openai/gpt-4o-mini
    access_key: sk-test
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    access_key: sk-ant
routing:
  router: {type: none}
"""


@asynccontextmanager
async def running(transport: str, gateway: Gateway) -> AsyncIterator[pb_grpc.ExternalProcessorStub]:
    """``gateway`` served over ``transport`` on 127.0.0.1; a stub of a channel to it."""
    metrics = Metrics()
    server: H2Server | grpc.aio.Server
    if transport == "h2":
        server = H2Server(lambda: ExtProcStream(gateway, metrics))
        port = await server.start("127.0.0.1", 0)
    else:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(gateway, metrics), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.ExternalProcessorStub(channel)
    finally:
        await channel.close()
        await server.stop(None)
