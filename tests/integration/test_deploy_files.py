"""The deployment files (Dockerfile, docker-compose, k8s/) agree with the CLI, the config schema
and the rendered bootstrap.

No container engine runs here, so the images are not built; what these files tell the
processes to do is checked instead: every command line parses with our CLI, every config they
mount loads, the bootstrap the k8s init container renders passes ``envoy --mode validate``,
and the Istio patch uses the same ext_proc settings and ports as the rendered bootstrap.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from plano_extproc.cli import build_parser
from plano_extproc.config import load_config, parse_config
from plano_extproc.envoy_config import render_bootstrap
from tests.gateway_proc import assert_envoy_accepts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"OPENAI_API_KEY": "k1", "ANTHROPIC_API_KEY": "k2"}


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "k8s" / name).read_text()) if d]


def cli(argv: list[str]) -> Any:
    return build_parser().parse_args(argv)


def test_dockerfile_command_parses_and_its_config_loads() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["plano-extproc"]
    args = cli(cmd)
    assert args.command == "up" and args.address == "0.0.0.0"
    assert args.metrics_address == "0.0.0.0"  # scraped from outside the container
    assert f"EXPOSE 12000 {args.metrics_port}" in text
    assert args.config.startswith("/app/")
    load_config(ROOT / args.config.removeprefix("/app/"), env=KEYS)


def test_compose_command_parses_and_mounted_config_loads() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    args = cli([str(a) for a in gateway["command"]])
    mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in gateway["volumes"])
    source = mounts[args.config]
    cfg = load_config(ROOT / source, env=KEYS)
    assert cfg.session_cache.type == "redis"
    assert cfg.session_cache.url is not None and "redis:6379" in cfg.session_cache.url
    assert "redis" in compose["services"]
    assert f"{cfg.listener.port}:{cfg.listener.port}" in gateway["ports"]
    assert args.metrics_address == "0.0.0.0"
    assert f"127.0.0.1:{args.metrics_port}:{args.metrics_port}" in gateway["ports"]


def _pod() -> dict[str, Any]:
    [deployment] = [d for d in docs("deployment.yaml") if d["kind"] == "Deployment"]
    return dict(deployment["spec"]["template"]["spec"])


def _configmap_config() -> str:
    [cm] = docs("configmap.yaml")
    return str(cm["data"]["config.yaml"])


def test_k8s_commands_parse_and_agree_on_ports(tmp_path: Path) -> None:
    pod = _pod()
    secret = docs("secret.example.yaml")[0]["stringData"]
    cfg = parse_config(_configmap_config(), env=secret)
    [init] = pod["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    render_cmd, _, target = init["command"][2].partition(">")
    render_argv = shlex.split(render_cmd)
    assert render_argv[0] == "plano-extproc"
    render = cli(render_argv[1:])
    containers = {c["name"]: c for c in pod["containers"]}
    serve = cli(containers["extproc"]["args"])
    assert serve.command == "serve" and render.command == "envoy-config"
    # The bootstrap's ext_proc endpoints are the ports the workers listen on.
    assert (render.grpc_port, render.workers) == (serve.port, serve.workers)
    assert serve.host == "127.0.0.1"  # the ext_proc port stays inside the pod (no TLS)
    envoy = containers["envoy"]["command"]
    assert envoy[:3] == ["envoy", "-c", target.strip()]
    probe = containers["extproc"]["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/ready", serve.admin_port)
    http = containers["envoy"]["ports"][0]["containerPort"]
    assert http == cfg.listener.port

    # What the init container writes is a valid Envoy bootstrap.
    eps = [("127.0.0.1", render.grpc_port + i) for i in range(render.workers)]
    assert_envoy_accepts(render_bootstrap(cfg, extproc=eps), tmp_path)


def test_istio_patch_matches_the_rendered_ext_proc_filter() -> None:
    [patch] = docs("istio-envoyfilter.yaml")
    patches = patch["spec"]["configPatches"]
    [cluster] = [p["patch"]["value"] for p in patches if p["applyTo"] == "CLUSTER"]
    filters = [p["patch"]["value"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert {p["patch"]["operation"] for p in patches if p["applyTo"] == "HTTP_FILTER"} == {
        "INSERT_BEFORE"
    }
    ours = render_bootstrap(
        parse_config(_configmap_config(), env=KEYS), extproc=[("127.0.0.1", 9091)]
    )
    hcm = ours["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    chain = hcm["typed_config"]["http_filters"]
    # Same filters in the same order before the router: the strip, ext_proc, usage, response.
    assert [f["name"] for f in filters] == [f["name"] for f in chain[:-1]]
    assert filters[0]["typed_config"] == chain[0]["typed_config"]
    for rendered_filter, patched in zip(chain[1:-1], filters[1:], strict=True):
        istio, rendered = patched["typed_config"], rendered_filter
        if istio["@type"].endswith(".ExtensionWithMatcher"):  # skipped unless needed
            assert istio["xds_matcher"] == rendered["typed_config"]["xds_matcher"]
            istio, rendered = istio["extension_config"]["typed_config"], rendered["typed_config"]
            rendered = rendered["extension_config"]
        if "ext_proc" not in istio["@type"]:  # the usage extractors: copied as rendered
            assert istio == rendered["typed_config"], patched["name"]
            continue
        for key in (
            "processing_mode",
            "failure_mode_allow",
            "allow_mode_override",
            "metadata_options",
            "stat_prefix",
            "mutation_rules",
        ):
            assert istio.get(key) == rendered["typed_config"].get(key), (patched["name"], key)
        for key in ("observability_mode", "deferred_close_timeout"):
            assert istio.get(key) == rendered["typed_config"].get(key), (patched["name"], key)
        timeouts = [c.get("message_timeout") for c in (istio, rendered["typed_config"])]
        seconds = [float(t.rstrip("s")) if t else None for t in timeouts]
        assert seconds[0] == seconds[1], patched["name"]
        assert istio["grpc_service"]["envoy_grpc"]["cluster_name"] == cluster["name"]
    assert istio["grpc_service"]["envoy_grpc"]["cluster_name"] == cluster["name"]
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 9091
    options = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in json.dumps(options)
