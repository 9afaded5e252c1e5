"""Redis backend pieces that need no server: value format, URL masking, unreachable Redis."""

from __future__ import annotations

import asyncio
import json

import pytest

from plano_extproc.affinity.base import PinnedDecision
from plano_extproc.affinity.redis_cache import (
    RedisSessionCache,
    decode_decision,
    encode_decision,
)
from plano_extproc.redis_health import mask_url


def test_encode_is_plano_classic_format() -> None:
    assert json.loads(encode_decision(PinnedDecision("openai/gpt-4o", "code"))) == {
        "model_name": "openai/gpt-4o",
        "route_name": "code",
    }
    assert json.loads(encode_decision(PinnedDecision("openai/gpt-4o", None))) == {
        "model_name": "openai/gpt-4o",
        "route_name": None,
    }


def test_decode_round_trip_and_plano_written_values() -> None:
    d = PinnedDecision("a/b", "r")
    assert decode_decision(encode_decision(d)) == d
    assert decode_decision(b'{"model_name":"x/y","route_name":null}') == PinnedDecision("x/y", None)
    # extra fields (a newer writer) are tolerated
    assert decode_decision('{"model_name":"x/y","route_name":"r","v":2}') == PinnedDecision(
        "x/y", "r"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"x"',
        b"{}",
        b'{"model_name": 3}',
        b'{"model_name": ""}',
        b'{"model_name": "m", "route_name": 5}',
        b'{"anchor_model": "m"}',  # Plano 0.4.28+ binding, not a classic pin
    ],
)
def test_decode_rejects_malformed(raw: bytes) -> None:
    assert decode_decision(raw) is None


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@h:6380/2") == "redis://:***@h:6380/2"
    assert mask_url("rediss://user:s3cret@h/0") == "rediss://user:***@h/0"
    assert mask_url("redis://h:6380/0") == "redis://h:6380/0"


async def test_unreachable_redis_never_raises() -> None:
    # Port 1 on loopback refuses connections immediately; no server is involved.
    cache = RedisSessionCache("redis://:pw@127.0.0.1:1/0", retry_interval=0.05)
    await asyncio.wait_for(cache.start(), 5)
    try:
        assert await asyncio.wait_for(cache.get("k"), 5) is None
        d = PinnedDecision("m/n", None)
        assert await asyncio.wait_for(cache.put_if_absent("k", d), 5) == d
        h = cache.health()
        assert h["healthy"] is False
        assert h["errors"] >= 1
        assert h["last_error"]
        assert "pw" not in h["url"]
    finally:
        await cache.close()


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ValueError):
        RedisSessionCache("http://localhost:6379/0")
