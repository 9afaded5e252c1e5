"""Inline per-request route preferences (``routing_preferences`` and ``routing_policy``)."""

from __future__ import annotations

from typing import Any

import pytest

from plano_extproc.catalog import Catalog
from plano_extproc.config import parse_config
from plano_extproc.errors import GatewayError
from plano_extproc.routing.base import RoutePreference
from plano_extproc.routing.preferences import INLINE_KEYS, parse_inline

CONFIG = """\
version: v0.4.0
listeners:
  - {name: m, type: model}
model_providers:
  - model: openai/gpt-4o
    access_key: k
  - model: openai/gpt-4o-mini
    access_key: k
  - model: anthropic/claude-sonnet-4-20250514
    access_key: k
  - model: groq/*
    access_key: k
model_aliases:
  fast: {target: openai/gpt-4o-mini}
"""


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return Catalog(parse_config(CONFIG, env={}))


def bad(body: dict[str, Any], cat: Catalog) -> str:
    with pytest.raises(GatewayError) as ei:
        parse_inline(body, cat)
    assert ei.value.status == 400
    assert ei.value.type == "invalid_request_error"
    return ei.value.message


def test_inline_keys() -> None:
    assert INLINE_KEYS == ("routing_preferences", "routing_policy")


def test_no_inline_preferences(cat: Catalog) -> None:
    assert parse_inline({"model": "gpt-4o", "messages": []}, cat) is None


def test_routing_preferences_form(cat: Catalog) -> None:
    body = {
        "routing_preferences": [
            {
                "name": "code",
                "description": "writing code",
                "models": ["anthropic/claude-sonnet-4-20250514", "gpt-4o"],
                "selection_policy": {"prefer": "cheapest"},
            },
            {"name": "chat", "description": "small talk", "models": ["fast"]},
        ]
    }
    assert parse_inline(body, cat) == (
        RoutePreference(
            name="code",
            description="writing code",
            models=("anthropic/claude-sonnet-4-20250514", "openai/gpt-4o"),
            prefer="cheapest",
        ),
        RoutePreference(name="chat", description="small talk", models=("openai/gpt-4o-mini",)),
    )


@pytest.mark.parametrize("policy", [None, {}, {"prefer": None}, {"prefer": ""}, {"prefer": "none"}])
def test_prefer_defaults_to_none(cat: Catalog, policy: Any) -> None:
    item: dict[str, Any] = {"name": "a", "description": "d", "models": ["gpt-4o"]}
    if policy is not None:
        item["selection_policy"] = policy
    prefs = parse_inline({"routing_preferences": [item]}, cat)
    assert prefs is not None and prefs[0].prefer == "none"


def test_prefer_fastest(cat: Catalog) -> None:
    item = {
        "name": "a",
        "description": "d",
        "models": ["gpt-4o"],
        "selection_policy": {"prefer": "fastest"},
    }
    prefs = parse_inline({"routing_preferences": [item]}, cat)
    assert prefs is not None and prefs[0].prefer == "fastest"


def test_wildcard_models_are_declared(cat: Catalog) -> None:
    item = {"name": "a", "description": "d", "models": ["groq/llama-3.3-70b"]}
    prefs = parse_inline({"routing_preferences": [item]}, cat)
    assert prefs is not None and prefs[0].models == ("groq/llama-3.3-70b",)


def test_empty_list_means_no_routes_for_this_request(cat: Catalog) -> None:
    assert parse_inline({"routing_preferences": []}, cat) == ()
    assert parse_inline({"routing_policy": []}, cat) == ()


def test_routing_policy_form(cat: Catalog) -> None:
    body = {
        "routing_policy": [
            {
                "model": "openai/gpt-4o",
                "routing_preferences": [
                    {"name": "reasoning", "description": "hard problems"},
                    {"name": "code", "description": "writing code"},
                ],
            },
            {
                "model": "claude-sonnet-4-20250514",
                "routing_preferences": [{"name": "code", "description": "ignored duplicate"}],
            },
            {
                "model": "gpt-4o",
                "routing_preferences": [{"name": "code", "description": "same model twice"}],
            },
        ]
    }
    assert parse_inline(body, cat) == (
        RoutePreference("reasoning", "hard problems", ("openai/gpt-4o",)),
        RoutePreference(
            "code", "writing code", ("openai/gpt-4o", "anthropic/claude-sonnet-4-20250514")
        ),
    )


def test_both_forms_merge(cat: Catalog) -> None:
    body = {
        "routing_preferences": [{"name": "code", "description": "code", "models": ["gpt-4o"]}],
        "routing_policy": [
            {"model": "fast", "routing_preferences": [{"name": "code", "description": "x"}]},
            {"model": "fast", "routing_preferences": [{"name": "chat", "description": "talk"}]},
        ],
    }
    assert parse_inline(body, cat) == (
        RoutePreference("code", "code", ("openai/gpt-4o", "openai/gpt-4o-mini")),
        RoutePreference("chat", "talk", ("openai/gpt-4o-mini",)),
    )


def test_undeclared_models_are_named(cat: Catalog) -> None:
    body = {
        "routing_preferences": [
            {"name": "a", "description": "d", "models": ["gpt-5", "gpt-4o", "o3"]},
            {"name": "b", "description": "d", "models": ["gpt-5"]},
        ],
        "routing_policy": [
            {"model": "mistral/large", "routing_preferences": [{"name": "c", "description": "d"}]}
        ],
    }
    msg = bad(body, cat)
    assert msg == (
        "inline routing preferences reference models not declared in model_providers: "
        "gpt-5, o3, mistral/large"
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"routing_preferences": None}, "routing_preferences must be an array"),
        ({"routing_preferences": {"name": "a"}}, "routing_preferences must be an array"),
        ({"routing_preferences": "code"}, "routing_preferences must be an array"),
        ({"routing_preferences": ["code"]}, "routing_preferences[0] must be an object"),
        (
            {"routing_preferences": [{"description": "d", "models": ["gpt-4o"]}]},
            "routing_preferences[0].name must be a non-empty string",
        ),
        (
            {"routing_preferences": [{"name": " ", "description": "d", "models": ["gpt-4o"]}]},
            "routing_preferences[0].name must be a non-empty string",
        ),
        (
            {"routing_preferences": [{"name": "a", "description": 3, "models": ["gpt-4o"]}]},
            "routing_preferences[0].description must be a non-empty string",
        ),
        (
            {"routing_preferences": [{"name": "a", "description": "d"}]},
            "routing_preferences[0].models must be an array",
        ),
        (
            {"routing_preferences": [{"name": "a", "description": "d", "models": "gpt-4o"}]},
            "routing_preferences[0].models must be an array",
        ),
        (
            {"routing_preferences": [{"name": "a", "description": "d", "models": []}]},
            "routing_preferences[0].models must list at least one model",
        ),
        (
            {"routing_preferences": [{"name": "a", "description": "d", "models": ["gpt-4o", 7]}]},
            "routing_preferences[0].models[1] must be a non-empty string",
        ),
        (
            {
                "routing_preferences": [
                    {
                        "name": "a",
                        "description": "d",
                        "models": ["gpt-4o"],
                        "selection_policy": "cheapest",
                    }
                ]
            },
            "routing_preferences[0].selection_policy must be an object",
        ),
        (
            {
                "routing_preferences": [
                    {
                        "name": "a",
                        "description": "d",
                        "models": ["gpt-4o"],
                        "selection_policy": {"prefer": "random"},
                    }
                ]
            },
            "routing_preferences[0].selection_policy.prefer must be cheapest, fastest or none",
        ),
        (
            {
                "routing_preferences": [
                    {"name": "a", "description": "d", "models": ["gpt-4o"]},
                    {"name": "a", "description": "e", "models": ["gpt-4o"]},
                ]
            },
            "routing_preferences[1].name: duplicate route name 'a'",
        ),
        ({"routing_policy": None}, "routing_policy must be an array"),
        ({"routing_policy": [3]}, "routing_policy[0] must be an object"),
        (
            {"routing_policy": [{"routing_preferences": []}]},
            "routing_policy[0].model must be a non-empty string",
        ),
        (
            {"routing_policy": [{"model": "gpt-4o"}]},
            "routing_policy[0].routing_preferences must be an array",
        ),
        (
            {"routing_policy": [{"model": "gpt-4o", "routing_preferences": ["x"]}]},
            "routing_policy[0].routing_preferences[0] must be an object",
        ),
        (
            {"routing_policy": [{"model": "gpt-4o", "routing_preferences": [{"name": "x"}]}]},
            "routing_policy[0].routing_preferences[0].description must be a non-empty string",
        ),
    ],
)
def test_malformed_shapes_are_400(cat: Catalog, body: dict[str, Any], fragment: str) -> None:
    assert fragment in bad(body, cat)


# --------------------------------------------------------------------------- hostile inline sets
# Issue 11 items 1 and 7: route names reach the x-plano-route response header, and every
# description phrase is work for the embedded router, so both are bounded at the edge.


@pytest.mark.parametrize(
    "name",
    [
        "code\r\nX-Route-Injected: yes",
        "code\nx",
        "code\rx",
        "nul\x00",
        "tab\there",
        "del\x7f",
        "line\u2028sep",
        "bidi\u202eoverride",
        "zero\u200bwidth",
        "lone \ud83d surrogate",
        "nbsp\u00a0inside",
        " leading",
        "trailing ",
        "x" * 129,
    ],
)
def test_hostile_route_names_are_a_400_in_both_forms(name: str, cat: Catalog) -> None:
    pref = {"name": name, "description": "writing code", "models": ["gpt-4o"]}
    msg = bad({"routing_preferences": [pref]}, cat)
    assert msg.startswith("routing_preferences[0].name ")
    assert "printable" in msg or "too long" in msg
    policy = [{"model": "gpt-4o", "routing_preferences": [{"name": name, "description": "d"}]}]
    msg = bad({"routing_policy": policy}, cat)
    assert msg.startswith("routing_policy[0].routing_preferences[0].name ")


@pytest.mark.parametrize(
    "name",
    [
        "code",
        "a",
        "x" * 128,
        "code generation",
        "c++/{x}~!",
        "código",
        "生成代码",
        "emoji \U0001f600",
    ],
)
def test_printable_route_names_up_to_128_chars_pass(name: str, cat: Catalog) -> None:
    pref = {"name": name, "description": "writing code", "models": ["gpt-4o"]}
    routes = parse_inline({"routing_preferences": [pref]}, cat)
    assert routes is not None and routes[0].name == name


def _routes(n: int, desc: str = "d") -> list[dict[str, Any]]:
    return [{"name": f"r{i}", "description": desc, "models": ["gpt-4o"]} for i in range(n)]


def test_inline_set_size_limits(cat: Catalog) -> None:
    assert parse_inline({"routing_preferences": _routes(32)}, cat) is not None
    assert bad({"routing_preferences": _routes(33)}, cat) == (
        "routing_preferences has 33 entries; at most 32"
    )
    assert bad({"routing_preferences": _routes(100, "x" * 40)}, cat) == (
        "routing_preferences has 100 entries; at most 32"
    )
    assert bad({"routing_preferences": _routes(1, "x" * 1025)}, cat) == (
        "routing_preferences[0].description is too long (1025 characters; at most 1024)"
    )
    assert parse_inline({"routing_preferences": _routes(8, "x" * 1000)}, cat) is not None
    msg = bad({"routing_preferences": _routes(9, "x" * 1000)}, cat)
    assert msg.startswith("inline routing preferences are too large (9018 characters")
    assert msg.endswith("at most 8192)")
    many_models = [{"name": "r", "description": "d", "models": ["gpt-4o"] * 65}]
    assert bad({"routing_preferences": many_models}, cat) == (
        "routing_preferences[0].models has 65 entries; at most 64"
    )


def test_routing_policy_form_is_bounded_too(cat: Catalog) -> None:
    def policy(models: int, routes: int) -> list[dict[str, Any]]:
        return [
            {
                "model": "gpt-4o",
                "routing_preferences": [
                    {"name": f"m{m}r{i}", "description": "d"} for i in range(routes)
                ],
            }
            for m in range(models)
        ]

    assert parse_inline({"routing_policy": policy(2, 16)}, cat) is not None
    assert bad({"routing_policy": policy(1, 33)}, cat) == (
        "routing_policy[0].routing_preferences has 33 entries; at most 32"
    )
    assert (
        bad({"routing_policy": policy(65, 1)}, cat) == "routing_policy has 65 entries; at most 64"
    )
    # Distinct routes across policies count together.
    assert bad({"routing_policy": policy(3, 11)}, cat) == (
        "inline routing preferences define 33 routes; at most 32"
    )
