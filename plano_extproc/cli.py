"""Command line: validate, envoy-config, serve, up, route."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from plano_extproc.catalog import Catalog
from plano_extproc.config import Config, ConfigError, load_config


def _load(path: str, *, keys_optional: bool = False) -> Config:
    try:
        return load_config(path, keys_optional=keys_optional)
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="[%(asctime)s][%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    # Warnings are printed below, once, as part of the report (not also as log lines).
    logging.getLogger("plano_extproc.config").setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("ok")
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from plano_extproc.envoy_config import BootstrapError, render_bootstrap, render_yaml

    cfg = _load(args.config)
    eps = [("127.0.0.1", args.grpc_port + i) for i in range(args.workers)]
    try:
        bootstrap = render_bootstrap(cfg, extproc=eps, admin_port=args.envoy_admin_port)
    except BootstrapError as e:
        print(f"plano-extproc: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render_yaml(bootstrap))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    cfg = _load(args.config)
    if args.workers > 1:
        from plano_extproc.supervisor import run_workers

        return run_workers(
            args.config,
            host=args.host,
            port=args.port,
            admin_port=args.admin_port,
            workers=args.workers,
            log_level=args.log_level,
            transport=args.transport,
            request_log=args.request_log,
        )
    from plano_extproc.server.app import run

    return run(
        cfg,
        args.host,
        args.port,
        args.admin_port,
        admin_host=args.admin_host,
        transport=args.transport,
        access_log=args.request_log,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from plano_extproc.supervisor import run_up

    _logging(args.log_level)
    cfg = _load(args.config)
    return run_up(
        cfg,
        args.config,
        workers=args.workers,
        grpc_port=args.grpc_port,
        worker_admin_port=args.worker_admin_port,
        envoy_admin_port=args.envoy_admin_port,
        listen_address=args.address,
        listen_port=args.port,
        access_log=args.access_log,
        log_level=args.log_level,
        envoy_concurrency=args.envoy_concurrency,
        transport=args.transport,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        request_log=args.request_log,
    )


def cmd_route(args: argparse.Namespace) -> int:
    from plano_extproc.routing.base import ChatMessage
    from plano_extproc.server.app import StartupError, build_router

    _logging("warning")
    # Routing calls no model provider, so their keys need not be set; the router LLM's does.
    cfg = _load(args.config, keys_optional=True)
    router_provider = None
    if cfg.router.type == "orchestrator" and cfg.router.model is not None:
        router_provider = cfg.router.hosted or Catalog(cfg).lookup(cfg.router.model)
    if router_provider is not None and router_provider.access_key_env:
        if not router_provider.access_key and router_provider.access_key_env not in os.environ:
            print(
                f"the router LLM {router_provider.name} needs its key: export "
                f"{router_provider.access_key_env}=<key>",
                file=sys.stderr,
            )
            return 1
    if not cfg.preferences:
        print("no routing_preferences in the config: nothing to route", file=sys.stderr)
        return 1

    async def go() -> dict[str, object]:
        router = build_router(cfg)
        await router.start()
        prepare = getattr(router, "prepare", None)
        if prepare is not None:
            prepare(cfg.preferences)
        borrowed = getattr(router, "borrowed", None)
        try:
            result = await router.route(
                [ChatMessage("user", args.text)], cfg.preferences, request_id="cli"
            )
            lent = borrowed(cfg.preferences) if borrowed is not None and args.explain else None
        finally:
            await router.close()
        pref = next((p for p in cfg.preferences if p.name == result.route), None)
        out: dict[str, object] = {
            "models": list(pref.models) if pref else ["none"],
            "route": result.route,
        }
        if result.error:
            out["router_error"] = result.error
        if args.explain:
            out["scores"] = {k: round(v, 4) for k, v in result.scores.items()}
            if result.no_match is not None:
                # The score a route must beat (by the margin) to be chosen over "no match".
                out["no_match_score"] = round(result.no_match, 4)
            if lent is not None:
                # Which built-in intent-bank categories lent each route their examples.
                out["borrowed"] = lent
        return out

    try:
        print(json.dumps(asyncio.run(go()), indent=2))
    except StartupError as e:
        print(f"plano-extproc: {e}", file=sys.stderr)
        return 2
    return 0


def _transport_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--transport",
        choices=["h2", "grpcio"],
        default="h2",
        help="ext_proc server stack: h2 = built-in HTTP/2 server (default, ~3x less CPU per "
        "request), grpcio = grpc.aio",
    )


REQUEST_LOG_HELP = (
    "append one JSON line per proxied request to PATH ('-' = stdout): request id, client API, "
    "requested and served model, route, pinned, attempts, status, tokens, duration, TTFT; no "
    "prompt text, no credentials (off by default)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plano-extproc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a config; prints ok or the problems")
    v.add_argument("config")
    v.set_defaults(func=cmd_validate)

    e = sub.add_parser("envoy-config", help="print the Envoy bootstrap for a config")
    e.add_argument("config")
    e.add_argument("--grpc-port", type=int, default=9091)
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--envoy-admin-port", type=int, default=9901)
    e.set_defaults(func=cmd_envoy_config)

    s = sub.add_parser("serve", help="run the ext_proc gRPC server only (bring your own Envoy)")
    s.add_argument("config")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=9091, help="gRPC port (workers use port+i)")
    s.add_argument("--admin-port", type=int, default=9190, help="/ready and /metrics")
    s.add_argument("--admin-host", default=None, help="admin bind address (default: --host)")
    s.add_argument("--request-log", default=None, metavar="PATH", help=REQUEST_LOG_HELP)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default="info")
    _transport_arg(s)
    s.set_defaults(func=cmd_serve)

    u = sub.add_parser("up", help="run ext_proc workers and Envoy in the foreground")
    u.add_argument("config")
    u.add_argument("--workers", type=int, default=1)
    u.add_argument("--grpc-port", type=int, default=0, help="first worker port; 0 = free ports")
    u.add_argument(
        "--envoy-admin-port", type=int, default=9901, help="Envoy admin port; 0 = a free one"
    )
    u.add_argument(
        "--worker-admin-port", type=int, default=0, help="first worker /ready port; 0 = free"
    )
    u.add_argument(
        "--metrics-port",
        type=int,
        default=9092,
        help="the gateway's one Prometheus /metrics (all workers summed, plus Envoy's provider "
        "series) on 127.0.0.1; 0 = a free one (default 9092)",
    )
    u.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address of that endpoint (default 127.0.0.1; 0.0.0.0 for a scraper outside a "
        "container or pod: it shows model and route names, no prompts or credentials)",
    )
    u.add_argument("--address", default=None, help="override the listener address")
    u.add_argument("--port", type=int, default=None, help="override the listener port")
    u.add_argument("--access-log", action="store_true", help="Envoy access log on stdout")
    u.add_argument("--request-log", default=None, metavar="PATH", help=REQUEST_LOG_HELP)
    u.add_argument("--envoy-concurrency", type=int, default=None)
    u.add_argument("--log-level", default="info")
    _transport_arg(u)
    u.set_defaults(func=cmd_up)

    r = sub.add_parser("route", help="print the routing decision for a prompt")
    r.add_argument("config")
    r.add_argument("text")
    r.add_argument("--explain", action="store_true", help="add per-route scores")
    r.set_defaults(func=cmd_route)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
