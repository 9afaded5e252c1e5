"""Config loading and validation (reference §1 and the §10 schema checklist).

Every rejection must name the YAML path of the offending value, so each test asserts the
path prefix of the problem as well as what it says.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from plano_extproc.config import (
    DEFAULT_MAX_REQUEST_BYTES,
    SUPPORTED_VERSIONS,
    ConfigError,
    load_config,
    parse_config,
)

LISTENER = """\
listeners:
  - name: model_listener
    type: model
    port: 12000
"""

PROVIDERS = """\
model_providers:
  - model: openai/gpt-4o
    access_key: sk-a
    default: true
  - model: openai/gpt-4o-mini
    access_key: sk-a
  - model: anthropic/claude-sonnet-4-20250514
    access_key: sk-b
"""


def cfg(body: str = PROVIDERS, *, version: str = "v0.4.0", listeners: str = LISTENER, env=None):
    text = f"version: {version}\n{listeners}{textwrap.dedent(body)}"
    return parse_config(text, env={} if env is None else env)


def problems(body: str = PROVIDERS, **kw) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        cfg(body, **kw)
    return ei.value.problems


def one_problem(body: str = PROVIDERS, **kw) -> str:
    ps = problems(body, **kw)
    assert len(ps) == 1, ps
    return ps[0]


def prov(model: str, extra: str = "    access_key: k\n") -> str:
    return f"  - model: {model}\n{extra}"


# --------------------------------------------------------------------------- happy path


def test_minimal_config_loads_with_defaults() -> None:
    c = cfg()
    assert c.version == "v0.4.0"
    assert [p.name for p in c.providers] == [
        "openai/gpt-4o",
        "openai/gpt-4o-mini",
        "anthropic/claude-sonnet-4-20250514",
    ]
    assert c.default_provider is not None and c.default_provider.name == "openai/gpt-4o"
    assert c.listener.address == "0.0.0.0"
    assert c.listener.port == 12000
    assert c.listener.timeout_seconds == 300.0
    assert c.listener.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    assert c.router.type == "embedded"
    assert c.router.explicit is False
    assert c.router.context_length == 8192
    assert c.session_cache.type == "memory"
    assert c.session_cache.ttl_seconds == 600
    assert c.session_cache.max_entries == 10000
    assert c.connect_timeout_seconds == 5.0
    assert c.preferences == ()
    assert c.warnings == ()


def test_provider_normalisation() -> None:
    c = cfg()
    p = c.providers[0]
    assert p.model == "openai/gpt-4o"
    assert p.model_id == "gpt-4o"
    assert p.interface == "openai"
    assert (p.scheme, p.host, p.port, p.path_prefix) == ("https", "api.openai.com", 443, "/v1")
    assert p.access_key == "sk-a"
    assert p.wildcard is False
    assert p.custom_endpoint is False
    a = c.providers[2]
    assert (a.host, a.path_prefix, a.interface) == ("api.anthropic.com", "/v1", "anthropic")


def test_model_id_is_everything_after_the_first_slash() -> None:
    c = cfg("model_providers:\n" + prov("openrouter/anthropic/claude-3.5"))
    p = c.providers[0]
    assert p.model_id == "anthropic/claude-3.5"
    assert p.interface == "openrouter"
    assert (p.host, p.path_prefix) == ("openrouter.ai", "/api/v1")


def test_name_defaults_to_model_and_can_be_set() -> None:
    c = cfg("model_providers:\n" + prov("openai/gpt-4o", "    name: smart\n    access_key: k\n"))
    assert c.providers[0].name == "smart"
    assert c.providers[0].model == "openai/gpt-4o"


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_schema_version_is_accepted(version: str) -> None:
    assert set(SUPPORTED_VERSIONS) == {"v0.1", "v0.1.0", "0.1-beta", "0.2.0", "v0.3.0", "v0.4.0"}
    assert cfg(version=f'"{version}"').version == version


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    f = tmp_path / "plano.yaml"
    f.write_text(f"version: v0.4.0\n{LISTENER}{PROVIDERS}", encoding="utf-8")
    assert len(load_config(f, env={}).providers) == 3


def test_load_config_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.yaml", env={})
    assert str(tmp_path / "nope.yaml") in ei.value.problems[0]
    assert "cannot read config" in ei.value.problems[0]


def test_config_error_str_lists_every_problem() -> None:
    e = ConfigError(["a: one", "b: two"])
    assert str(e) == "invalid config:\n  - a: one\n  - b: two"
    assert e.problems == ["a: one", "b: two"]


# --------------------------------------------------------------------------- top level


def test_invalid_yaml() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("version: [unclosed\n", env={}, source="x.yaml")
    assert ei.value.problems[0].startswith("x.yaml: not valid YAML")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, env={}, source="x.yaml")
    assert "must be a YAML mapping" in ei.value.problems[0]


def test_unknown_top_level_key_rejected() -> None:
    p = one_problem(PROVIDERS + "model_aliasses: {}\n")
    assert p.startswith("model_aliasses: ")
    assert "unknown key" in p


def test_unknown_nested_key_rejected_with_path() -> None:
    p = one_problem(
        "model_providers:\n" + prov("openai/gpt-4o", "    access_key: k\n    acess_key: k\n")
    )
    assert p.startswith("model_providers[0].acess_key: ")
    assert "unknown key" in p


def test_missing_required_keys() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("version: v0.4.0\n", env={})
    assert ei.value.problems == ["listeners: required key is missing"]
    with pytest.raises(ConfigError) as ei:
        parse_config(LISTENER, env={})
    assert ei.value.problems == ["version: required key is missing"]


def test_version_v041_rejected() -> None:
    p = one_problem(version="v0.4.1")
    assert p.startswith("version: ")
    assert "'v0.4.1'" in p
    assert "v0.4.0" in p


@pytest.mark.parametrize("version", ["0.4.0", "v0.4", "V0.4.0", "v0.4.0 "])
def test_version_must_match_the_enum_exactly(version: str) -> None:
    assert one_problem(version=f'"{version}"').startswith("version: ")


def test_many_problems_reported_at_once() -> None:
    ps = problems(
        "model_providers:\n"
        + prov("gpt-4o")
        + prov("ollama/llama3")
        + prov("openai/a", "    access_key: k\n    default: true\n")
        + prov("openai/b", "    access_key: k\n    default: true\n")
    )
    assert len(ps) == 3
    assert ps[0].startswith("model_providers[0].model: ")
    assert ps[1].startswith("model_providers[1].base_url: ")
    assert ps[2].startswith("model_providers: There must be at most one default")


# --------------------------------------------------------------------------- listeners


def test_only_one_model_listener() -> None:
    listeners = (
        "listeners:\n"
        "  - {name: a, type: model, port: 12000}\n"
        "  - {name: b, type: model, port: 12001}\n"
        "  - {name: c, type: prompt, port: 10000}\n"
    )
    p = one_problem(listeners=listeners)
    assert p == "listeners: only one model listener is allowed, found 2"


def test_listener_fields() -> None:
    listeners = (
        "listeners:\n"
        "  - {name: p, type: prompt, port: 10000}\n"
        "  - name: m\n    type: model\n    address: 127.0.0.1\n    port: 8080\n"
        "    timeout: 30s\n    max_retries: 3\n    max_request_bytes: 2048\n"
    )
    li = cfg(listeners=listeners).listener
    assert (li.address, li.port, li.timeout_seconds, li.max_retries) == ("127.0.0.1", 8080, 30, 3)
    assert li.max_request_bytes == 2048


@pytest.mark.parametrize(("value", "seconds"), [("500ms", 0.5), ("2m", 120.0), ("45", 45.0)])
def test_listener_timeout_durations(value: str, seconds: float) -> None:
    listeners = f"listeners:\n  - {{name: m, type: model, timeout: '{value}'}}\n"
    assert cfg(listeners=listeners).listener.timeout_seconds == seconds


def test_bad_listener_timeout_names_path() -> None:
    listeners = (
        "listeners:\n  - {name: p, type: prompt}\n  - {name: m, type: model, timeout: soon}\n"
    )
    p = one_problem(listeners=listeners)
    assert p.startswith("listeners[1].timeout: ")
    assert "'soon'" in p


def test_bad_listener_type_names_path() -> None:
    p = one_problem(listeners="listeners:\n  - {name: m, type: llm}\n")
    assert p.startswith("listeners[0].type: ")


def test_legacy_listener_bad_value_reports_only_that_value() -> None:
    p = one_problem(listeners="listeners:\n  egress_traffic: {port: high}\n")
    assert p.startswith("listeners.egress_traffic.port: ")


def test_listeners_of_the_wrong_type() -> None:
    p = one_problem(listeners="listeners: everything\n")
    assert p.startswith("listeners: must be a list of listeners")


def test_no_model_listener_uses_defaults() -> None:
    li = cfg(listeners="listeners:\n  - {name: p, type: prompt, port: 10000}\n").listener
    assert (li.address, li.port, li.timeout_seconds) == ("0.0.0.0", 12000, 300.0)


def test_legacy_listeners_object_form() -> None:
    listeners = (
        "listeners:\n"
        "  ingress_traffic:\n    address: 0.0.0.0\n    port: 10000\n    message_format: openai\n"
        "  egress_traffic:\n    address: 127.0.0.1\n    port: 12345\n"
        "    message_format: openai\n    timeout: 60s\n"
    )
    li = cfg(listeners=listeners).listener
    assert (li.address, li.port, li.timeout_seconds) == ("127.0.0.1", 12345, 60.0)


def test_legacy_listeners_without_egress_use_defaults() -> None:
    listeners = "listeners:\n  ingress_traffic:\n    port: 10000\n"
    li = cfg(listeners=listeners).listener
    assert (li.address, li.port, li.timeout_seconds) == ("0.0.0.0", 12000, 300.0)


def test_legacy_listener_bad_timeout_names_path() -> None:
    listeners = "listeners:\n  egress_traffic:\n    timeout: forever\n"
    assert one_problem(listeners=listeners).startswith("listeners.egress_traffic.timeout: ")


# --------------------------------------------------------------------------- providers


def test_llm_providers_legacy_key() -> None:
    c = cfg(PROVIDERS.replace("model_providers:", "llm_providers:"))
    assert c.providers[0].name == "openai/gpt-4o"


def test_llm_providers_errors_name_the_legacy_key() -> None:
    p = one_problem("llm_providers:\n" + prov("gpt-4o"))
    assert p.startswith("llm_providers[0].model: ")


def test_both_model_providers_and_llm_providers_rejected() -> None:
    p = one_problem(PROVIDERS + "llm_providers:\n" + prov("openai/o3"))
    assert p.startswith("llm_providers: ")
    assert "Please provide either llm_providers or model_providers, not both" in p


def test_model_without_slash() -> None:
    p = one_problem("model_providers:\n" + prov("gpt-4o"))
    assert p.startswith("model_providers[0].model: ")
    assert "invalid model name 'gpt-4o'" in p
    assert "<provider>/<model_id>" in p
    assert "<provider>/*" in p


@pytest.mark.parametrize("model", ["openai/", "/gpt-4o"])
def test_model_with_empty_part(model: str) -> None:
    assert one_problem("model_providers:\n" + prov(model)).startswith("model_providers[0].model: ")


def test_duplicate_name() -> None:
    body = (
        "model_providers:\n"
        + prov("openai/gpt-4o", "    name: smart\n    access_key: k\n")
        + prov("openai/o3", "    name: smart\n    access_key: k\n")
    )
    p = one_problem(body)
    assert p.startswith("model_providers[1].name: ")
    assert "duplicate name 'smart'" in p
    assert "model_providers[0]" in p


def test_duplicate_model() -> None:
    body = (
        "model_providers:\n"
        + prov("openai/gpt-4o")
        + prov("openai/gpt-4o", "    name: other\n    access_key: k\n")
    )
    # Reported once, not again as a duplicate model id.
    assert problems(body) == [
        "model_providers[1].model: duplicate model 'openai/gpt-4o' "
        "(already used by model_providers[0])"
    ]


def test_duplicate_model_id_across_providers() -> None:
    body = (
        "model_providers:\n"
        + prov("openai/gpt-4o")
        + prov(
            "azure_openai/gpt-4o", "    access_key: k\n    base_url: https://x.openai.azure.com\n"
        )
    )
    p = one_problem(body)
    assert p.startswith("model_providers[1].model: ")
    assert "duplicate model id 'gpt-4o'" in p


def test_duplicate_wildcards_of_different_providers_are_fine() -> None:
    c = cfg("model_providers:\n" + prov("openai/*") + prov("anthropic/*"))
    assert [p.wildcard for p in c.providers] == [True, True]
    assert c.providers[0].model_id == "*"


def test_two_defaults_rejected() -> None:
    body = (
        "model_providers:\n"
        + prov("openai/a", "    access_key: k\n    default: true\n")
        + prov("openai/b", "    access_key: k\n    default: true\n")
    )
    p = one_problem(body)
    assert p.startswith("model_providers: ")
    assert "There must be at most one default LLM Provider" in p
    assert "openai/a" in p and "openai/b" in p


def test_wildcard_default_rejected() -> None:
    extra = "    access_key: k\n    default: true\n"
    p = one_problem("model_providers:\n" + prov("openai/*", extra))
    assert p.startswith("model_providers[0].default: ")
    assert "wildcard" in p


def test_wildcard_with_routing_preferences_rejected() -> None:
    extra = "    access_key: k\n    routing_preferences:\n      - {name: a, description: b}\n"
    p = one_problem("model_providers:\n" + prov("openai/*", extra))
    assert p.startswith("model_providers[0].routing_preferences: ")


@pytest.mark.parametrize(
    "model", ["azure_openai/gpt-4o", "ollama/llama3", "qwen/qwen-max", "amazon_bedrock/nova"]
)
def test_providers_requiring_base_url(model: str) -> None:
    p = one_problem("model_providers:\n" + prov(model))
    prefix = model.split("/")[0]
    assert p.startswith("model_providers[0].base_url: ")
    assert f"provider '{prefix}' requires 'base_url' to be set for model {model}" in p


def test_amazon_alias_requires_base_url_too() -> None:
    p = one_problem("model_providers:\n" + prov("amazon/nova"))
    assert p.startswith("model_providers[0].base_url: ")


@pytest.mark.parametrize(
    "extra",
    [
        "    access_key: k\n",
        "    access_key: k\n    base_url: http://10.0.0.5:8000/v1\n",
        "    access_key: k\n    provider_interface: openai\n",
    ],
)
def test_unknown_prefix_needs_base_url_and_interface(extra: str) -> None:
    p = one_problem("model_providers:\n" + prov("vllm/llama3", extra))
    assert p.startswith("model_providers[0]: ")
    assert "unknown provider 'vllm'" in p
    assert "'base_url' and 'provider_interface'" in p


def test_unknown_prefix_with_base_url_and_interface() -> None:
    extra = "    base_url: http://10.0.0.5:8000/v1\n    provider_interface: openai\n"
    p = cfg("model_providers:\n" + prov("vllm/llama3", extra)).providers[0]
    assert p.interface == "openai"
    assert (p.scheme, p.host, p.port, p.path_prefix) == ("http", "10.0.0.5", 8000, "/v1")
    assert p.custom_endpoint is True
    assert p.access_key is None
    assert p.model_id == "llama3"


def test_unknown_provider_interface_value_rejected() -> None:
    extra = "    base_url: http://h/v1\n    provider_interface: anthropic\n"
    p = one_problem("model_providers:\n" + prov("vllm/llama3", extra))
    assert p.startswith("model_providers[0].provider_interface: ")
    assert "'anthropic' is not one of" in p


def test_provider_interface_on_builtin_prefix_rejected() -> None:
    extra = "    provider_interface: openai\n"
    p = one_problem("model_providers:\n" + prov("openai/gpt-4o", extra))
    assert p.startswith("model_providers[0].provider_interface: ")
    assert "built-in provider 'openai'" in p


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("google", "gemini"), ("together", "together_ai"), ("do", "digitalocean")],
)
def test_provider_prefix_aliases(alias: str, canonical: str) -> None:
    p = cfg("model_providers:\n" + prov(f"{alias}/m1")).providers[0]
    assert p.interface == canonical
    assert p.name == f"{alias}/m1"


@pytest.mark.parametrize("url", ["ftp://h/v1", "localhost:11434", "http:///v1", "https://"])
def test_base_url_must_be_http_with_host(url: str) -> None:
    p = one_problem("model_providers:\n" + prov("ollama/llama3", f"    base_url: '{url}'\n"))
    assert p.startswith("model_providers[0].base_url: ")


def test_base_url_bad_port() -> None:
    p = one_problem("model_providers:\n" + prov("ollama/llama3", "    base_url: http://h:99999\n"))
    assert p.startswith("model_providers[0].base_url: ")
    assert "port" in p


@pytest.mark.parametrize(
    ("model", "base_url", "prefix"),
    [
        # A base_url path replaces the provider's default API prefix.
        ("openai/gpt-4o", "https://proxy.example.com/openai/v1", "/openai/v1"),
        ("openai/gpt-4o", "https://proxy.example.com/openai/v1/", "/openai/v1"),
        # Without a path the provider's default prefix stays.
        ("openai/gpt-4o", "https://proxy.example.com", "/v1"),
        ("groq/llama", "https://proxy.example.com", "/openai/v1"),
        ("gemini/g", "https://proxy.example.com", "/v1beta/openai"),
        ("zhipu/glm", "https://proxy.example.com", "/api/paas/v4"),
        ("ollama/llama3", "http://localhost:11434", "/v1"),
        ("qwen/qwen-max", "https://dashscope.aliyuncs.com", "/compatible-mode/v1"),
        ("azure_openai/gpt-4o", "https://r.openai.azure.com", ""),
        ("amazon_bedrock/nova", "https://bedrock-runtime.us-east-1.amazonaws.com", ""),
        ("ollama/llama3", "http://localhost:11434/custom", "/custom"),
    ],
)
def test_base_url_path_prefix(model: str, base_url: str, prefix: str) -> None:
    extra = f"    access_key: k\n    base_url: {base_url}\n"
    p = cfg("model_providers:\n" + prov(model, extra)).providers[0]
    assert p.path_prefix == prefix
    assert p.custom_endpoint is True


def test_cluster_and_authority() -> None:
    body = (
        "model_providers:\n"
        + prov("openai/gpt-4o")
        + prov("ollama/llama3", "    base_url: http://localhost:11434\n")
        + prov("openai/o3", "    access_key: k\n    base_url: http://10.1.2.3:80/v1\n")
        + prov(
            "vllm/q",
            "    base_url: https://gw.internal:8443/v1\n    provider_interface: openai\n"
            "    http_host: models.example.com\n",
        )
    )
    openai, ollama, plain, vllm = cfg(body).providers
    assert openai.cluster == "openai_api_openai_com_443"
    assert openai.authority == "api.openai.com"
    assert openai.tls is True
    assert ollama.cluster == "ollama_localhost_11434"
    assert ollama.authority == "localhost:11434"
    assert ollama.tls is False
    assert plain.authority == "10.1.2.3"
    assert plain.cluster == "openai_10_1_2_3_80"
    assert vllm.authority == "models.example.com"
    assert vllm.cluster == "openai_gw_internal_8443_models_example_com"
    assert vllm.http_host == "models.example.com"


def test_headers_lowercased_and_kept_in_order() -> None:
    extra = "    access_key: k\n    headers:\n      X-Org: acme\n      OpenAI-Project: p1\n"
    p = cfg("model_providers:\n" + prov("openai/gpt-4o", extra)).providers[0]
    assert p.headers == (("x-org", "acme"), ("openai-project", "p1"))


def test_passthrough_auth_drops_access_key_with_warning() -> None:
    extra = "    access_key: k\n    passthrough_auth: true\n"
    c = cfg("model_providers:\n" + prov("openai/gpt-4o", extra))
    assert c.providers[0].access_key is None
    assert c.providers[0].passthrough_auth is True
    assert any("passthrough_auth" in w for w in c.warnings)


def test_empty_access_key_means_none() -> None:
    p = cfg("model_providers:\n" + prov("openai/gpt-4o", "    access_key: ''\n")).providers[0]
    assert p.access_key is None


# --------------------------------------------------------------------------- env substitution


@pytest.mark.parametrize("ref", ["$OPENAI_KEY", "${OPENAI_KEY}"])
def test_env_substitution(ref: str) -> None:
    body = "model_providers:\n" + prov("openai/gpt-4o", f"    access_key: {ref}\n")
    assert cfg(body, env={"OPENAI_KEY": "sk-123"}).providers[0].access_key == "sk-123"


def test_env_substitution_inside_strings_and_nested() -> None:
    extra = (
        "    access_key: pre-${K}-post\n    base_url: http://$HOST:11434/v1\n"
        "    headers:\n      x-team: ${TEAM}\n"
    )
    body = "model_providers:\n" + prov("ollama/llama3", extra)
    p = cfg(body, env={"K": "x", "HOST": "gpu1", "TEAM": "ml"}).providers[0]
    assert p.access_key == "pre-x-post"
    assert p.host == "gpu1"
    assert p.headers == (("x-team", "ml"),)


def test_env_default_used_only_when_unset() -> None:
    body = "model_providers:\n" + prov("openai/gpt-4o", "    access_key: ${K:-fallback}\n")
    assert cfg(body).providers[0].access_key == "fallback"
    assert cfg(body, env={"K": "real"}).providers[0].access_key == "real"
    body = "model_providers:\n" + prov("openai/gpt-4o", "    access_key: ${K:-}\n")
    assert cfg(body).providers[0].access_key is None


def test_env_set_to_empty_string_is_used() -> None:
    body = "model_providers:\n" + prov("openai/gpt-4o", "    access_key: ${K:-fallback}\n")
    assert cfg(body, env={"K": ""}).providers[0].access_key is None


def test_missing_env_var_names_variable_and_path() -> None:
    body = "model_providers:\n" + prov("openai/a")
    body += prov("openai/b", "    access_key: $MISSING_KEY\n")
    p = one_problem(body)
    assert p.startswith("model_providers[1].access_key: ")
    assert "environment variable MISSING_KEY is not set" in p


def test_missing_env_vars_all_reported_with_paths() -> None:
    body = (
        "model_providers:\n"
        + prov("openai/a", "    access_key: ${A_KEY}\n")
        + prov("ollama/b", "    base_url: http://${B_HOST}:1/v1\n")
    )
    ps = problems(body)
    assert any(p.startswith("model_providers[0].access_key: ") and "A_KEY" in p for p in ps), ps
    assert any(p.startswith("model_providers[1].base_url: ") and "B_HOST" in p for p in ps), ps


def test_env_substitution_uses_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLANO_TEST_KEY_XYZ", "from-env")
    text = (
        f"version: v0.4.0\n{LISTENER}"
        + "model_providers:\n"
        + prov("openai/gpt-4o", "    access_key: $PLANO_TEST_KEY_XYZ\n")
    )
    assert parse_config(text).providers[0].access_key == "from-env"


def test_dollar_not_followed_by_a_name_is_literal() -> None:
    extra = "    access_key: k\n    headers:\n      x-price: costs $5 or $\n"
    p = cfg("model_providers:\n" + prov("openai/gpt-4o", extra)).providers[0]
    assert p.headers == (("x-price", "costs $5 or $"),)


# --------------------------------------------------------------------------- aliases


def test_model_aliases_resolve_to_provider_names() -> None:
    body = PROVIDERS + (
        "model_aliases:\n"
        "  fast: {target: openai/gpt-4o-mini}\n"
        "  smart: {target: gpt-4o}\n"
        "  claude: {target: claude-sonnet-4-20250514}\n"
    )
    c = cfg(body)
    assert dict(c.aliases) == {
        "fast": "openai/gpt-4o-mini",
        "smart": "openai/gpt-4o",
        "claude": "anthropic/claude-sonnet-4-20250514",
    }


def test_model_alias_to_custom_name() -> None:
    body = "model_providers:\n" + prov("openai/gpt-4o", "    name: smart\n    access_key: k\n")
    body += "model_aliases:\n  s: {target: smart}\n  s2: {target: openai/gpt-4o}\n"
    assert dict(cfg(body).aliases) == {"s": "smart", "s2": "smart"}


def test_model_alias_unknown_target() -> None:
    p = one_problem(PROVIDERS + "model_aliases:\n  fast:\n    target: openai/gpt-5\n")
    assert p.startswith("model_aliases.fast.target: ")
    assert "'openai/gpt-5' is not defined as a model" in p
    assert "Available models: openai/gpt-4o, openai/gpt-4o-mini" in p


def test_model_alias_shape_errors_name_path() -> None:
    p = one_problem(PROVIDERS + "model_aliases:\n  fast: openai/gpt-4o\n")
    assert p.startswith("model_aliases.fast")


# --------------------------------------------------------------------------- routing_preferences

PREFS = """\
routing_preferences:
  - name: code
    description: writing code
    models: [anthropic/claude-sonnet-4-20250514, openai/gpt-4o]
  - name: chat
    description: small talk
    models: [gpt-4o-mini]
    selection_policy: {prefer: none}
"""


def test_top_level_preferences() -> None:
    c = cfg(PROVIDERS + PREFS)
    assert [(p.name, p.description, p.models, p.prefer) for p in c.preferences] == [
        ("code", "writing code", ("anthropic/claude-sonnet-4-20250514", "openai/gpt-4o"), "none"),
        ("chat", "small talk", ("openai/gpt-4o-mini",), "none"),
    ]


def test_preference_examples_extension() -> None:
    body = PROVIDERS + PREFS + "    examples: [hi there, how are you]\n"
    assert cfg(body).preferences[1].examples == ("hi there", "how are you")


@pytest.mark.parametrize("prefer", ["null", "''", "none"])
def test_prefer_null_empty_missing_mean_none(prefer: str) -> None:
    body = PROVIDERS + (
        "routing_preferences:\n  - name: a\n    description: d\n    models: [openai/gpt-4o]\n"
        f"    selection_policy: {{prefer: {prefer}}}\n"
    )
    assert cfg(body).preferences[0].prefer == "none"


def test_prefer_unknown_value_rejected() -> None:
    body = PROVIDERS + (
        "routing_preferences:\n  - name: a\n    description: d\n    models: [openai/gpt-4o]\n"
        "    selection_policy: {prefer: random}\n"
    )
    assert one_problem(body).startswith("routing_preferences[0].selection_policy.prefer: ")


def test_top_level_preferences_need_v040_exact_message() -> None:
    p = one_problem(PROVIDERS + PREFS, version="v0.3.0")
    assert p == (
        "routing_preferences: top-level routing_preferences requires version v0.4.0 or above. "
        "Update the version field or remove routing_preferences."
    )


@pytest.mark.parametrize("version", ["v0.1", "0.1-beta", "0.2.0"])
def test_top_level_preferences_rejected_on_old_versions(version: str) -> None:
    p = one_problem(PROVIDERS + PREFS, version=f'"{version}"')
    assert "requires version v0.4.0 or above" in p


def test_duplicate_preference_name() -> None:
    body = (
        PROVIDERS
        + PREFS
        + ("  - name: code\n    description: again\n    models: [openai/gpt-4o]\n")
    )
    p = one_problem(body)
    assert p.startswith("routing_preferences[2].name: ")
    assert "duplicate route name 'code'" in p


def test_preference_model_not_declared_plano_message() -> None:
    body = PROVIDERS + (
        "routing_preferences:\n  - name: code\n    description: d\n"
        "    models: [openai/gpt-4o, openai/gpt-5]\n"
    )
    p = one_problem(body)
    assert p == (
        "routing_preferences[0].models[1]: routing_preferences route 'code' references model "
        "'openai/gpt-5' which is not declared in model_providers"
    )


def test_preference_empty_models() -> None:
    body = PROVIDERS + "routing_preferences:\n  - name: a\n    description: d\n    models: []\n"
    p = one_problem(body)
    assert p.startswith("routing_preferences[0].models: ")


@pytest.mark.parametrize("missing", ["name", "description", "models"])
def test_preference_required_fields(missing: str) -> None:
    fields = {"name": "a", "description": "d", "models": "[openai/gpt-4o]"}
    del fields[missing]
    item = ", ".join(f"{k}: {v}" for k, v in fields.items())
    p = one_problem(PROVIDERS + f"routing_preferences:\n  - {{{item}}}\n")
    assert p == f"routing_preferences[0].{missing}: required key is missing"


def test_prefer_cheapest_without_cost_source() -> None:
    body = PROVIDERS + (
        "routing_preferences:\n  - name: a\n    description: d\n    models: [openai/gpt-4o]\n"
        "    selection_policy: {prefer: cheapest}\n"
    )
    p = one_problem(body)
    assert p.startswith("routing_preferences[0].selection_policy.prefer: ")
    assert "cost" in p


def test_prefer_fastest_without_latency_source() -> None:
    body = PROVIDERS + (
        "routing_preferences:\n  - name: a\n    description: d\n    models: [openai/gpt-4o]\n"
        "    selection_policy: {prefer: fastest}\n"
        "model_metrics_sources:\n  - {type: cost, provider: models.dev}\n"
    )
    p = one_problem(body)
    assert p.startswith("routing_preferences[0].selection_policy.prefer: ")
    assert "latency" in p


def test_prefer_cheapest_with_cost_source() -> None:
    body = PROVIDERS + (
        "routing_preferences:\n  - name: a\n    description: d\n    models: [openai/gpt-4o]\n"
        "    selection_policy: {prefer: cheapest}\n"
        "model_metrics_sources:\n  - {type: cost, provider: digitalocean}\n"
    )
    assert cfg(body).preferences[0].prefer == "cheapest"


def test_v03_per_provider_preferences_are_lifted() -> None:
    body = """\
model_providers:
  - model: openai/gpt-4o
    access_key: k
    routing_preferences:
      - {name: reasoning, description: hard problems}
      - {name: code, description: writing code}
  - model: anthropic/claude-sonnet-4-20250514
    access_key: k
    routing_preferences:
      - {name: code, description: a different description}
"""
    c = cfg(body, version="v0.3.0")
    assert [(p.name, p.description, p.models) for p in c.preferences] == [
        ("reasoning", "hard problems", ("openai/gpt-4o",)),
        ("code", "writing code", ("openai/gpt-4o", "anthropic/claude-sonnet-4-20250514")),
    ]
    assert any("deprecated" in w for w in c.warnings)
    assert any("first one is used" in w for w in c.warnings)


def test_lifted_preferences_keep_existing_top_level_names() -> None:
    body = (
        PROVIDERS.replace(
            "    default: true\n",
            "    default: true\n    routing_preferences:\n      - {name: code, description: old}\n"
            "      - {name: extra, description: lifted}\n",
        )
        + PREFS
    )
    c = cfg(body)
    assert [(p.name, p.description) for p in c.preferences] == [
        ("code", "writing code"),
        ("chat", "small talk"),
        ("extra", "lifted"),
    ]
    assert c.preferences[0].models == ("anthropic/claude-sonnet-4-20250514", "openai/gpt-4o")


# --------------------------------------------------------------------------- routing block


def test_redis_without_url() -> None:
    p = one_problem(PROVIDERS + "routing:\n  session_cache: {type: redis}\n")
    assert p.startswith("routing.session_cache.url: ")
    assert "redis" in p


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "tcp://h:1"])
def test_redis_url_bad_scheme(url: str) -> None:
    p = one_problem(PROVIDERS + f"routing:\n  session_cache: {{type: redis, url: '{url}'}}\n")
    assert p.startswith("routing.session_cache.url: ")
    assert "redis:// or rediss://" in p


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://:pw@cache.example:6380"])
def test_redis_ok(url: str) -> None:
    body = PROVIDERS + (
        "routing:\n  session_ttl_seconds: 60\n"
        f"  session_cache: {{type: redis, url: '{url}', tenant_header: X-Tenant-Id}}\n"
    )
    s = cfg(body).session_cache
    assert (s.type, s.url, s.tenant_header, s.ttl_seconds) == ("redis", url, "x-tenant-id", 60)


def test_session_cache_unknown_type() -> None:
    p = one_problem(PROVIDERS + "routing:\n  session_cache: {type: memcached}\n")
    assert p.startswith("routing.session_cache.type: ")


def test_session_max_entries_clamped() -> None:
    c = cfg(PROVIDERS + "routing:\n  session_max_entries: 50000\n")
    assert c.session_cache.max_entries == 10000
    assert any("clamped" in w for w in c.warnings)
    assert cfg(PROVIDERS + "routing:\n  session_max_entries: 7\n").session_cache.max_entries == 7


@pytest.mark.parametrize(("key", "value"), [("session_max_entries", 0), ("session_ttl_seconds", 0)])
def test_session_numbers_must_be_positive(key: str, value: int) -> None:
    p = one_problem(PROVIDERS + f"routing:\n  {key}: {value}\n")
    assert p.startswith(f"routing.{key}: ")


def test_route_on_user_only_is_read() -> None:
    assert cfg(PROVIDERS + "routing:\n  route_on_user_only: true\n").route_on_user_only is True
    assert cfg(PROVIDERS).route_on_user_only is False


def test_routing_budget_warns() -> None:
    c = cfg(PROVIDERS + "routing:\n  routing_budget: {max_switch_spend_pct: 20}\n")
    assert any("routing_budget" in w for w in c.warnings)


def test_unknown_routing_key() -> None:
    assert one_problem(PROVIDERS + "routing:\n  sessions: 1\n").startswith("routing.sessions: ")


# --------------------------------------------------------------------------- router


ORCH_PROVIDER = "  - model: ollama/Plano-Orchestrator\n    base_url: http://localhost:11434\n"


def test_router_defaults_to_embedded() -> None:
    r = cfg(PROVIDERS + PREFS).router
    assert (r.type, r.model, r.prompt, r.timeout_ms, r.explicit) == (
        "embedded",
        None,
        "plano_orchestrator_v1",
        3000,
        False,
    )


def test_llm_routing_model_alone_selects_orchestrator() -> None:
    body = PROVIDERS + ORCH_PROVIDER + "overrides:\n  llm_routing_model: Plano-Orchestrator\n"
    r = cfg(body).router
    assert (r.type, r.model, r.prompt, r.explicit) == (
        "orchestrator",
        "ollama/Plano-Orchestrator",
        "plano_orchestrator_v1",
        True,
    )


def test_llm_routing_model_provider_prefix_is_stripped() -> None:
    body = PROVIDERS + ORCH_PROVIDER + "overrides:\n  llm_routing_model: plano/Plano-Orchestrator\n"
    assert cfg(body).router.model == "ollama/Plano-Orchestrator"


def test_undeclared_llm_routing_model_uses_the_hosted_router_like_plano() -> None:
    # Two of Plano's own demo configs name Plano-Orchestrator without declaring it.
    c = cfg(PROVIDERS + PREFS + "overrides:\n  llm_routing_model: plano/Plano-Orchestrator\n")
    r = c.router
    assert (r.type, r.model, r.prompt) == (
        "orchestrator",
        "plano/Plano-Orchestrator",
        "plano_orchestrator_v1",
    )
    assert r.hosted is not None
    assert (r.hosted.scheme, r.hosted.host, r.hosted.port, r.hosted.path_prefix) == (
        "https",
        "archfc.katanemo.dev",
        443,
        "/v1",
    )
    assert (r.hosted.model_id, r.hosted.access_key) == ("Plano-Orchestrator", None)
    # internal: not a model clients can ask for, not in /v1/models, no Envoy cluster
    assert "plano/Plano-Orchestrator" not in {p.name for p in c.providers}
    assert any("hosted endpoint https://archfc.katanemo.dev/v1" in w for w in c.warnings)


def test_hosted_router_url_can_be_overridden() -> None:
    env = {"PLANO_EXTPROC_HOSTED_ROUTER_URL": "http://127.0.0.1:9/v1"}
    body = PROVIDERS + "overrides:\n  llm_routing_model: Arch-Router\n"
    r = cfg(body, env=env).router
    assert r.hosted is not None
    assert (r.hosted.host, r.hosted.port, r.prompt) == ("127.0.0.1", 9, "arch_router_v1")
    p = one_problem(body, env={"PLANO_EXTPROC_HOSTED_ROUTER_URL": "ftp://x"})
    assert p.startswith("PLANO_EXTPROC_HOSTED_ROUTER_URL: ")


def test_chatgpt_forwards_the_clients_own_credentials() -> None:
    c = cfg("model_providers:\n  - model: chatgpt/*\n  - model: chatgpt/gpt-5\n    access_key: k\n")
    for p in c.providers:
        assert (p.passthrough_auth, p.access_key) == (True, None)
        assert ("originator", "codex_cli_rs") in p.headers
    assert any("chatgpt uses each client's own ChatGPT credentials" in w for w in c.warnings)


def test_empty_model_providers_is_an_error() -> None:
    for key in ("model_providers", "llm_providers"):
        p = one_problem(f"{key}: []\n")
        assert p.startswith(f"{key}: declare at least one provider")


def test_secrets_never_appear_in_repr() -> None:
    body = (
        "model_providers:\n  - model: openai/gpt-4o\n    access_key: sk-SECRET-1\n"
        "    headers: {X-Org-Key: SECRET-2}\n"
        "routing:\n  session_cache: {type: redis, url: 'redis://:SECRET-3@h:6379/0'}\n"
    )
    c = cfg(body)
    for obj in (c, c.providers[0], c.session_cache):
        assert "SECRET" not in repr(obj)
    import yaml

    from plano_extproc.config import RawConfig

    raw = RawConfig.model_validate(yaml.safe_load(f"version: v0.4.0\n{LISTENER}{body}"))
    assert "SECRET" not in repr(raw)
    # the values are still there for the code that needs them
    assert c.providers[0].access_key == "sk-SECRET-1"


def test_router_block_model_must_be_declared() -> None:
    body = PROVIDERS + "routing:\n  router: {type: orchestrator, model: ollama/nope}\n"
    p = one_problem(body)
    assert p.startswith("routing.router.model: ")


def test_orchestrator_without_model() -> None:
    p = one_problem(PROVIDERS + "routing:\n  router: {type: orchestrator}\n")
    assert p.startswith("routing.router.model: ")


def test_router_block_fields() -> None:
    body = (
        PROVIDERS
        + ORCH_PROVIDER
        + (
            "routing:\n  router:\n    type: orchestrator\n    model: ollama/Plano-Orchestrator\n"
            "    prompt: arch_router_v1\n    timeout_ms: 750\n"
            "overrides:\n  orchestrator_model_context_length: 4096\n"
        )
    )
    r = cfg(body).router
    assert (r.type, r.model, r.prompt, r.timeout_ms, r.context_length, r.explicit) == (
        "orchestrator",
        "ollama/Plano-Orchestrator",
        "arch_router_v1",
        750,
        4096,
        True,
    )


def test_arch_router_model_name_picks_arch_prompt() -> None:
    body = PROVIDERS + "  - model: ollama/Arch-Router\n    base_url: http://localhost:11434\n"
    body += "overrides:\n  llm_routing_model: Arch-Router\n"
    r = cfg(body).router
    assert (r.model, r.prompt) == ("ollama/Arch-Router", "arch_router_v1")


def test_router_none_and_embedded_explicit() -> None:
    assert cfg(PROVIDERS + "routing:\n  router: {type: none}\n").router.type == "none"
    r = cfg(PROVIDERS + "routing:\n  router: {type: embedded, threshold: 0.4, margin: 0.05}\n")
    assert (r.router.type, r.router.explicit, r.router.threshold, r.router.margin) == (
        "embedded",
        True,
        0.4,
        0.05,
    )


def test_router_type_wins_over_llm_routing_model() -> None:
    body = (
        PROVIDERS
        + ORCH_PROVIDER
        + (
            "routing:\n  router: {type: embedded}\n"
            "overrides:\n  llm_routing_model: Plano-Orchestrator\n"
        )
    )
    assert cfg(body).router.type == "embedded"


def test_bad_router_values_name_path() -> None:
    p = one_problem(PROVIDERS + "routing:\n  router: {type: gpt}\n")
    assert p.startswith("routing.router.type: ")
    p = one_problem(PROVIDERS + "routing:\n  router: {timeout_ms: 1}\n")
    assert p.startswith("routing.router.timeout_ms: ")


# --------------------------------------------------------------------------- overrides


def test_overrides() -> None:
    body = PROVIDERS + (
        "overrides:\n  upstream_connect_timeout: 250ms\n  upstream_tls_ca_path: /ca.pem\n"
        "  optimize_context_window: true\n"
    )
    c = cfg(body)
    assert c.connect_timeout_seconds == 0.25
    assert c.tls_ca_path == "/ca.pem"


def test_bad_connect_timeout_names_path() -> None:
    p = one_problem(PROVIDERS + "overrides:\n  upstream_connect_timeout: fast\n")
    assert p.startswith("overrides.upstream_connect_timeout: ")


def test_plano_only_top_level_keys_are_accepted() -> None:
    body = PROVIDERS + (
        "tracing: {random_sampling: 10}\nprompt_caching: {enabled: false}\n"
        "endpoints: {}\nprompt_targets: []\nstate_storage: {type: memory}\nratelimits: []\n"
        "system_prompt: hi\nprompt_guards: {}\nagents: []\nfilters: []\nmode: llm\n"
    )
    assert cfg(body).version == "v0.4.0"


def test_config_is_immutable() -> None:
    c = cfg()
    with pytest.raises(AttributeError):
        c.version = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.providers[0].name = "x"  # type: ignore[misc]


def test_unset_variable_in_route_description_is_left_as_written() -> None:
    text = (
        f"version: v0.4.0\n{LISTENER}"
        + "model_providers:\n"
        + prov("openai/gpt-4o", "    access_key: k\n")
        + "routing_preferences:\n  - name: pricing\n    description: questions about $USD prices\n"
        + "    models: [openai/gpt-4o]\n"
    )
    assert parse_config(text, env={}).preferences[0].description == "questions about $USD prices"


def test_readme_config_reference_is_a_valid_config() -> None:
    """The annotated example in README.md loads, so the documented keys stay real."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", readme, re.S)
    assert block is not None
    env = {"OPENAI_API_KEY": "k1", "ANTHROPIC_API_KEY": "k2", "AZURE_KEY": "k3"}
    cfg = parse_config(block.group(1), env=env)
    assert [s.type for s in cfg.metrics_sources] == ["cost", "latency"]
    assert cfg.preferences[0].prefer == "cheapest"


def test_tracing_off_unless_sampled() -> None:
    assert cfg(PROVIDERS).tracing is None
    assert cfg(PROVIDERS + "tracing: {random_sampling: 0}\n").tracing is None


def test_tracing_endpoint_default_env_and_tags() -> None:
    body = PROVIDERS + (
        "tracing:\n  random_sampling: 25\n"
        "  span_attributes: {static: {team: ml}, header_prefixes: [x-katanemo-]}\n"
    )
    c = cfg(body)
    assert c.tracing is not None
    assert (c.tracing.sampling_percent, c.tracing.host, c.tracing.port) == (25, "localhost", 4317)
    assert dict(c.tracing.static_tags) == {"team": "ml"}
    assert any(w.startswith("tracing.span_attributes.header_prefixes") for w in c.warnings)
    c = cfg(body, env={"OTEL_TRACING_GRPC_ENDPOINT": "http://otel-collector:4317"})
    assert c.tracing is not None and c.tracing.host == "otel-collector"


@pytest.mark.parametrize(
    "endpoint", ["https://collector:4317", "http://collector:4317/v1/traces", "collector:4317"]
)
def test_tracing_endpoint_must_be_plain_http_host_port(endpoint: str) -> None:
    p = one_problem(
        PROVIDERS + f"tracing: {{random_sampling: 10, opentracing_grpc_endpoint: '{endpoint}'}}\n"
    )
    assert p.startswith("tracing.opentracing_grpc_endpoint: ")


@pytest.mark.parametrize(
    "snippet",
    [
        "prompt_guards: {input_guards: {jailbreak: {on_exception: {message: no}}}}\n",
        "prompt_targets:\n  - {name: weather, description: get weather}\n",
    ],
)
def test_plano_features_outside_routing_load_with_a_warning(snippet: str) -> None:
    key = snippet.split(":", 1)[0]
    c = cfg(PROVIDERS + snippet)
    assert f"{key}: not supported by plano-extproc; ignored" in c.warnings


def test_validate_prints_each_warning_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plano_extproc.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"version: v0.4.0\n{LISTENER}{PROVIDERS}prompt_guards: {{x: 1}}\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "ok"
    assert out.err.count("prompt_guards: not supported") == 1
