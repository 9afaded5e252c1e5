"""Affinity id validation and cache-key layout (Plano-compatible)."""

from __future__ import annotations

import pytest

from plano_extproc.affinity.keys import (
    AFFINITY_HEADER,
    REDIS_PREFIX,
    InvalidAffinityId,
    cache_key,
    validate_affinity_id,
)


def test_constants() -> None:
    assert AFFINITY_HEADER == "x-model-affinity"
    assert REDIS_PREFIX == "plano:affinity:"


def test_plain_id_is_used_verbatim() -> None:
    assert cache_key("session-123") == "session-123"
    assert cache_key("Ünïcode sess/1 ") == "Ünïcode sess/1 "


def test_tenant_scoping() -> None:
    assert cache_key("s1", "acme") == "acme:s1"
    assert cache_key("s1", "acme") != cache_key("s1", "globex")
    assert cache_key("s1", None) == "s1"
    assert cache_key("s1", "") == "s1"


def test_256_bytes_ok_257_rejected() -> None:
    assert validate_affinity_id("a" * 256) == "a" * 256
    with pytest.raises(InvalidAffinityId, match="257 bytes"):
        validate_affinity_id("a" * 257)


def test_length_counts_utf8_bytes_not_characters() -> None:
    # 128 x 2-byte characters = 256 bytes (ok); one more = 258 bytes (rejected).
    validate_affinity_id("é" * 128)
    with pytest.raises(InvalidAffinityId, match="258 bytes"):
        validate_affinity_id("é" * 129)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "\x00", "tab\there", "del\x7f", "c1\x85"])
def test_control_characters_rejected(bad: str) -> None:
    with pytest.raises(InvalidAffinityId, match="control character"):
        validate_affinity_id(bad)


def test_empty_rejected() -> None:
    with pytest.raises(InvalidAffinityId, match="empty"):
        validate_affinity_id("")


def test_error_is_a_value_error_and_does_not_echo_value() -> None:
    with pytest.raises(ValueError) as info:
        validate_affinity_id("secret\n" + "x" * 300)
    assert "secret" not in str(info.value)


def test_tenant_is_validated_too() -> None:
    with pytest.raises(InvalidAffinityId, match="tenant"):
        cache_key("s1", "bad\ntenant")
    with pytest.raises(InvalidAffinityId, match="tenant"):
        cache_key("s1", "t" * 257)
    with pytest.raises(InvalidAffinityId, match="affinity id"):
        cache_key("", "acme")
