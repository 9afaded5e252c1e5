"""Run one ext_proc server process: build router and session cache, serve gRPC and admin.

The router's model loads before the gRPC port opens, so "ready" means ready to route.
The admin HTTP port serves ``/ready`` (JSON with router and session-cache state) and
``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CONTENT_TYPE_LATEST

from plano_extproc.access_log import AccessLog
from plano_extproc.affinity.base import SessionCache
from plano_extproc.config import Config
from plano_extproc.cooldown import Cooldowns
from plano_extproc.gateway import Gateway
from plano_extproc.metrics import Metrics
from plano_extproc.model_metrics import ModelMetrics
from plano_extproc.ratelimit.factory import build_budget_store
from plano_extproc.ratelimit.limiter import RateLimiter
from plano_extproc.ratelimit.redis_store import RedisBudgets
from plano_extproc.routing.base import NullRouter, Router
from plano_extproc.server.h2 import H2Server
from plano_extproc.server.servicer import ExternalProcessor, ExtProcStream, health_handler
from plano_extproc.server.usage_log import UsageLog
from plano_extproc.spans import SpanExporter

log = logging.getLogger("plano_extproc.server")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # Envoy pings the ext_proc connection; accept it instead of answering GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]


Transport = Literal["h2", "grpcio"]
TRANSPORTS: tuple[Transport, ...] = ("h2", "grpcio")


class StartupError(Exception):
    """A start-up problem with a message that tells the user how to fix it."""


def build_router(config: Config) -> Router:
    rc = config.router
    if rc.type == "none":
        return NullRouter()
    if rc.type == "orchestrator":
        from plano_extproc.catalog import Catalog
        from plano_extproc.routing.orchestrator import OrchestratorRouter

        assert rc.model is not None
        prov = rc.hosted or Catalog(config).lookup(rc.model)
        assert prov is not None
        url = f"{prov.scheme}://{prov.host}:{prov.port}{prov.path_prefix}/chat/completions"
        headers = {"authorization": f"Bearer {prov.access_key}"} if prov.access_key else {}
        if prov.http_host:
            headers["host"] = prov.http_host
        headers.update(dict(prov.headers))
        return OrchestratorRouter(
            url=url,
            model_id=prov.model_id,
            prompt=rc.prompt,
            timeout_ms=rc.timeout_ms,
            context_length=rc.context_length,
            headers=headers,
            ca_file=config.tls_ca_path,
        )
    try:
        from plano_extproc.routing.embedded import EmbeddedRouter
    except ImportError as e:
        raise StartupError(
            f"the embedded router needs the 'router' extra ({e.name} is missing): run "
            "pip install 'plano-extproc[router]', or set routing.router.type: orchestrator "
            "(or none) in the config"
        ) from e
    return EmbeddedRouter(
        threshold=rc.threshold,
        margin=rc.margin,
        max_concurrency=rc.threads,
        timeout_ms=rc.timeout_ms,
    )


def build_cache(config: Config) -> SessionCache:
    from plano_extproc.affinity.factory import build_session_cache

    sc = config.session_cache
    return build_session_cache(
        sc.type,
        url=sc.url,
        ttl_seconds=sc.ttl_seconds,
        max_entries=sc.max_entries,
        near_cache_seconds=sc.near_cache_seconds,
        ca_file=config.tls_ca_path,
    )


class ExtProcServer(Protocol):
    async def stop(self, grace: float | None) -> Any: ...


@dataclass
class Running:
    server: ExtProcServer
    admin: web.AppRunner | None
    gateway: Gateway
    port: int
    admin_port: int | None
    spans: SpanExporter | None = None
    access_log: AccessLog | None = None
    health_task: asyncio.Task[None] | None = None


CACHE_HEALTH_SECONDS = 2.0


async def _health(
    cache: SessionCache | None, limiter: RateLimiter | None, metrics: Metrics
) -> None:
    """Keep plano_session_cache_healthy and the budget store's series current without
    traffic (a lookup also updates the cache's): the gateway's one endpoint reads the
    workers' files, it cannot ask them."""
    store = limiter.store if limiter is not None else None
    served_locally = 0
    while True:
        if cache is not None:
            metrics.set_cache_healthy(cache.healthy)
        if isinstance(store, RedisBudgets):
            now = store.fallbacks
            metrics.set_ratelimit_store(store.healthy, now - served_locally)
            served_locally = now
        await asyncio.sleep(CACHE_HEALTH_SECONDS)


async def start(
    config: Config,
    host: str,
    port: int,
    admin_port: int | None = None,
    admin_host: str | None = None,
    transport: Transport = "h2",
    access_log: str | None = None,
) -> Running:
    router = build_router(config)
    cache = build_cache(config)
    try:
        await router.start()
    except StartupError:
        raise
    except Exception as e:
        raise StartupError(f"the {config.router.type} router failed to start: {e}") from e
    prepare = getattr(router, "prepare", None)
    if prepare is not None and config.preferences:
        await asyncio.to_thread(prepare, config.preferences)
    await cache.start()
    metrics = ModelMetrics(config.metrics_sources, config.tls_ca_path)
    await metrics.start()
    if not config.preferences:
        log.warning("no routing_preferences configured: routes are inactive, models pass as sent")
    cooldowns = Cooldowns.from_env([p.name for p in config.providers], config.failover)
    counters = Metrics(
        routes=[r.name for r in config.preferences],
        models=[*(p.name for p in config.providers), *config.aliases],
        router=config.router.type,
    )
    if cache is not None:
        counters.set_cache_healthy(cache.healthy)
    limiter = None
    if config.ratelimits:
        store = build_budget_store(config)
        if isinstance(store, RedisBudgets):
            await store.start()
            counters.set_ratelimit_store(store.healthy)
        limiter = RateLimiter(config.ratelimits, store, counters)
    gateway = Gateway(
        config, router, cache, metrics, cooldowns, telemetry=counters, limiter=limiter
    )
    log_file = AccessLog(access_log) if access_log else None
    spans = None
    if config.tracing is not None:  # GenAI spans with token usage, into Envoy's traces
        spans = SpanExporter(config.tracing.host, config.tracing.port)
        await spans.start()
    usage = UsageLog(counters, log_file, spans, limiter)
    server, bound = await _start_extproc(transport, gateway, counters, host, port, usage)
    runner = None
    bound_admin = None
    if admin_port is not None:
        runner, bound_admin = await _start_admin(
            admin_host or host, admin_port, gateway, counters, transport
        )
    log.info(
        "ext_proc listening on %s:%d (transport=%s, router=%s, session_cache=%s)",
        host,
        bound,
        transport,
        config.router.type,
        config.session_cache.type,
    )
    health_task = None
    if cache is not None or limiter is not None:
        health_task = asyncio.get_running_loop().create_task(_health(cache, limiter, counters))
    return Running(server, runner, gateway, bound, bound_admin, spans, log_file, health_task)


async def _start_extproc(
    transport: Transport,
    gateway: Gateway,
    metrics: Metrics,
    host: str,
    port: int,
    usage: UsageLog,
) -> tuple[ExtProcServer, int]:
    if transport == "h2":
        h2 = H2Server(lambda: ExtProcStream(gateway, metrics), usage.export)
        try:
            return h2, await h2.start(host, port)
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(gateway, metrics), server)
    server.add_generic_rpc_handlers((health_handler(), usage.grpc_handler()))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise StartupError(f"cannot listen on {host}:{port} (port in use?)")
    await server.start()
    return server, bound


async def _start_admin(
    host: str, port: int, gateway: Gateway, metrics: Metrics, transport: Transport
) -> tuple[web.AppRunner, int]:
    async def ready(_: web.Request) -> web.Response:
        health = gateway.cache.health() if gateway.cache else None
        body = {
            "ready": True,
            "transport": transport,
            "router": gateway.config.router.type,
            "model_metrics": gateway.metrics.health() if gateway.metrics else [],
            "routes": [p.name for p in gateway.config.preferences],
            "session_cache": health,
            "ratelimits": gateway.limiter.health() if gateway.limiter else None,
        }
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def prom(_: web.Request) -> web.Response:
        if gateway.cache is not None:  # a cache that healed with no lookups since
            metrics.set_cache_healthy(gateway.cache.healthy)
        return web.Response(body=metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", prom)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound


async def stop(running: Running, grace: float = 5.0) -> None:
    if running.health_task is not None:
        running.health_task.cancel()
    await running.server.stop(grace)
    if running.admin is not None:
        await running.admin.cleanup()
    await running.gateway.router.close()
    if running.gateway.metrics is not None:
        await running.gateway.metrics.close()
    if running.gateway.cache is not None:
        await running.gateway.cache.close()
    if running.gateway.limiter is not None:
        store = running.gateway.limiter.store
        if isinstance(store, RedisBudgets):
            await store.close()
    if running.spans is not None:
        await running.spans.close()
    if running.access_log is not None:
        running.access_log.close()


async def serve_forever(
    config: Config,
    host: str,
    port: int,
    admin_port: int | None = None,
    admin_host: str | None = None,
    transport: Transport = "h2",
    access_log: str | None = None,
) -> None:
    running = await start(config, host, port, admin_port, admin_host, transport, access_log)
    # One line on stdout that supervisors wait for.
    print(f"READY grpc={running.port} admin={running.admin_port}", flush=True)
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    await stop_event.wait()
    await stop(running)


def run(
    config: Config,
    host: str,
    port: int,
    admin_port: int | None = None,
    *,
    admin_host: str | None = None,
    transport: Transport = "h2",
    access_log: str | None = None,
) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    try:
        asyncio.run(
            serve_forever(config, host, port, admin_port, admin_host, transport, access_log)
        )
    except StartupError as e:
        print(f"plano-extproc: {e}", file=sys.stderr)
        return 2
    return 0
