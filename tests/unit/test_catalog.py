"""Model resolution: request ``model`` → configured provider."""

from __future__ import annotations

import pytest

from plano_extproc.catalog import Catalog
from plano_extproc.config import parse_config
from plano_extproc.errors import GatewayError

CONFIG = """\
version: v0.4.0
listeners:
  - {name: m, type: model}
model_providers:
  - model: openai/gpt-4o
    access_key: k
  - model: openai/gpt-4o-mini
    access_key: k
    default: true
  - model: anthropic/claude-sonnet-4-20250514
    name: claude
    access_key: k
  - model: google/gemini-2.0-flash
    access_key: k
  - model: anthropic/*
    access_key: k
  - model: groq/*
    access_key: k
  - model: vllm/*
    base_url: http://10.0.0.5:8000/v1
    provider_interface: openai
model_aliases:
  fast: {target: gpt-4o-mini}
  smart: {target: openai/gpt-4o}
  coder: {target: claude}
"""


def catalog(text: str = CONFIG) -> Catalog:
    return Catalog(parse_config(text, env={}))


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return catalog()


@pytest.mark.parametrize(
    ("requested", "name"),
    [
        # aliases
        ("fast", "openai/gpt-4o-mini"),
        ("smart", "openai/gpt-4o"),
        ("coder", "claude"),
        # provider name / full model / bare id
        ("openai/gpt-4o", "openai/gpt-4o"),
        ("gpt-4o", "openai/gpt-4o"),
        ("claude", "claude"),
        ("anthropic/claude-sonnet-4-20250514", "claude"),
        ("claude-sonnet-4-20250514", "claude"),
        # provider prefix aliases (google ↔ gemini)
        ("google/gemini-2.0-flash", "google/gemini-2.0-flash"),
        ("gemini/gemini-2.0-flash", "google/gemini-2.0-flash"),
        ("gemini-2.0-flash", "google/gemini-2.0-flash"),
    ],
)
def test_exact_lookups(cat: Catalog, requested: str, name: str) -> None:
    p = cat.resolve(requested)
    assert p.name == name
    assert cat.lookup(requested) is p


def test_explicit_model_beats_wildcard(cat: Catalog) -> None:
    p = cat.resolve("anthropic/claude-sonnet-4-20250514")
    assert p.wildcard is False and p.name == "claude"


@pytest.mark.parametrize(
    ("requested", "name", "model_id", "interface"),
    [
        (
            "anthropic/claude-3-5-haiku",
            "anthropic/claude-3-5-haiku",
            "claude-3-5-haiku",
            "anthropic",
        ),
        ("groq/llama-3.3-70b", "groq/llama-3.3-70b", "llama-3.3-70b", "groq"),
        ("groq/meta/llama/x", "groq/meta/llama/x", "meta/llama/x", "groq"),
        ("vllm/qwen2.5", "vllm/qwen2.5", "qwen2.5", "openai"),
    ],
)
def test_wildcard_providers(
    cat: Catalog, requested: str, name: str, model_id: str, interface: str
) -> None:
    p = cat.resolve(requested)
    assert (p.name, p.model_id, p.interface, p.wildcard) == (name, model_id, interface, False)
    # The synthesised provider resolves to itself again (affinity caches store the name).
    again = cat.lookup(p.name)
    assert again is not None
    assert (again.name, again.model_id, again.host) == (p.name, p.model_id, p.host)


def test_wildcard_keeps_endpoint_settings(cat: Catalog) -> None:
    p = cat.resolve("vllm/qwen2.5")
    assert (p.host, p.port, p.path_prefix, p.custom_endpoint) == ("10.0.0.5", 8000, "/v1", True)


def test_custom_prefix_wildcard_does_not_capture_its_interface(cat: Catalog) -> None:
    # vllm/* speaks the openai interface, but openai/<x> is not a vllm model.
    with pytest.raises(GatewayError):
        cat.resolve("openai/gpt-5")
    assert cat.lookup("openai/o3") is None


def test_wildcard_needs_a_model_after_the_prefix(cat: Catalog) -> None:
    assert cat.lookup("groq/") is None
    assert cat.lookup("groq/*") is None
    assert cat.lookup("groq") is None


def test_wildcard_reached_through_prefix_alias() -> None:
    text = CONFIG.replace("  - model: groq/*\n", "  - model: gemini/*\n")
    p = catalog(text).resolve("google/gemini-1.5-pro")
    assert (p.interface, p.model_id) == ("gemini", "gemini-1.5-pro")


def test_bare_name_resolves_through_its_family_wildcard(cat: Catalog) -> None:
    # As in Plano: "claude-3-5-haiku" with anthropic/* configured is anthropic/claude-3-5-haiku.
    p = cat.resolve("claude-3-5-haiku")
    assert (p.name, p.interface, p.model_id) == (
        "anthropic/claude-3-5-haiku",
        "anthropic",
        "claude-3-5-haiku",
    )


@pytest.mark.parametrize("bare", ["gpt-5", "llama3.1", "o3something"])
def test_bare_name_without_a_family_wildcard_is_400(cat: Catalog, bare: str) -> None:
    # openai has no wildcard here; llama has no family; o3something is not an o3 model.
    with pytest.raises(GatewayError) as ei:
        cat.resolve(bare)
    assert ei.value.status == 400


@pytest.mark.parametrize(
    "hostile",
    [
        "groq/x\r\nX-Smuggled: 1",
        "groq/x\nX-Smuggled: 1",
        "groq/a b",
        "groq/\u00e9t\u00e9",
        "groq/lone\ud83d",
        "groq/" + "a" * 257,
        "claude-x\r\nX: 1",
    ],
)
def test_wildcard_model_ids_are_validated(cat: Catalog, hostile: str) -> None:
    with pytest.raises(GatewayError) as ei:
        cat.resolve(hostile)
    assert ei.value.status == 400
    assert "\r" not in ei.value.message and "\n" not in ei.value.message


def test_wildcard_model_id_keeps_real_world_shapes(cat: Catalog) -> None:
    for mid in ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1:8b", "@cf/meta/llama-3", "a" * 256):
        assert cat.resolve(f"groq/{mid}").model_id == mid


def test_missing_model_uses_default(cat: Catalog) -> None:
    assert cat.resolve(None).name == "openai/gpt-4o-mini"


def test_missing_model_without_default_is_400() -> None:
    c = catalog(CONFIG.replace("    default: true\n", ""))
    with pytest.raises(GatewayError) as ei:
        c.resolve(None)
    assert ei.value.status == 400
    assert "'model' is required" in ei.value.message
    assert "openai/gpt-4o" in ei.value.message


def test_unknown_model_is_400_listing_models(cat: Catalog) -> None:
    with pytest.raises(GatewayError) as ei:
        cat.resolve("gpt-5")
    e = ei.value
    assert e.status == 400
    assert e.type == "invalid_request_error"
    assert e.message.startswith("Model 'gpt-5' not found in configured providers")
    for name in ("openai/gpt-4o", "openai/gpt-4o-mini", "claude", "fast", "smart", "coder"):
        assert name in e.message


@pytest.mark.parametrize("value", ["", 42, ["gpt-4o"], {"m": 1}, True])
def test_model_of_the_wrong_type_is_400(cat: Catalog, value: object) -> None:
    with pytest.raises(GatewayError) as ei:
        cat.resolve(value)
    assert ei.value.status == 400
    assert "'model' must be a non-empty string" in ei.value.message


def test_names_lists_providers_then_aliases(cat: Catalog) -> None:
    assert cat.names() == [
        "openai/gpt-4o",
        "openai/gpt-4o-mini",
        "claude",
        "google/gemini-2.0-flash",
        "anthropic/*",
        "groq/*",
        "vllm/*",
        "fast",
        "smart",
        "coder",
    ]


def test_alias_is_a_single_exact_lookup(cat: Catalog) -> None:
    # Aliases are not chained, not prefix-matched and case-sensitive.
    assert cat.lookup("openai/fast") is None
    assert cat.lookup("FAST") is None
    assert cat.lookup("fast") is not None


def test_alias_shadows_a_bare_model_id() -> None:
    text = CONFIG.replace(
        "  coder: {target: claude}\n", "  coder: {target: claude}\n  gpt-4o: {target: claude}\n"
    )
    c = catalog(text)
    # An alias shadows a bare model id (the alias lookup happens first).
    assert c.resolve("gpt-4o").name == "claude"
    assert c.resolve("openai/gpt-4o").name == "openai/gpt-4o"
