"""/metrics label values: escaped, inline routes folded, wildcard model ids bounded."""

from __future__ import annotations

import re
from dataclasses import dataclass

from plano_extproc.metrics import MAX_WILDCARD_MODELS, Metrics

# One sample line of the Prometheus text format, with escaped label values.
_SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="(?:[^"\\\n]|\\[\\"n])*",?)*\})? [0-9.e+-]+$')


@dataclass
class _Provider:
    name: str


@dataclass
class _Up:
    provider: _Provider
    route: str | None
    router_error: str | None = None
    pinned: bool | None = None
    replayed: bool = False


def routed(m: Metrics, route: str | None, model: str) -> None:
    m.count_routed(_Up(_Provider(model), route), 0.001)  # type: ignore[arg-type]


def samples(m: Metrics) -> list[str]:
    lines = [line for line in m.render(None).splitlines() if not line.startswith("#")]
    for line in lines:
        assert _SAMPLE.match(line), line
    return [line for line in lines if line.startswith("plano_extproc_route_decisions_total")]


def test_hostile_names_cannot_forge_series() -> None:
    m = Metrics(routes=['code "gen"'], models=["openai/gpt-4o"])
    routed(m, 'x"} 1\nfake_total 1\n#', "openai/gpt-4o")  # an inline route: folded
    routed(m, 'code "gen"', 'openai/a"}\\')  # a configured route, a wildcard id: escaped
    lines = samples(m)
    assert 'route="inline",model="openai/gpt-4o"} 1' in lines[1]
    assert 'route="code \\"gen\\"",model="openai/a\\"}\\\\"} 1' in lines[0]
    assert not any("fake_total" in line for line in m.render(None).splitlines())


def test_wildcard_model_ids_are_bounded() -> None:
    m = Metrics(routes=[], models=["openai/gpt-4o"])
    for i in range(MAX_WILDCARD_MODELS + 50):
        routed(m, None, f"openai/m-{i}")
    routed(m, None, "openai/gpt-4o")  # configured models always keep their own series
    routed(m, None, "openai/m-0")  # and so do the first wildcard ids seen
    lines = samples(m)
    assert len(lines) == MAX_WILDCARD_MODELS + 2
    assert any('model="other"} 50' in line for line in lines)
    assert any('model="openai/m-0"} 2' in line for line in lines)
    assert any('model="openai/gpt-4o"} 1' in line for line in lines)
