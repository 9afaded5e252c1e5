"""The backend factory maps config names to backends and rejects config errors early."""

from __future__ import annotations

import pytest

from plano_extproc.affinity.factory import build_session_cache
from plano_extproc.affinity.memory import MemorySessionCache
from plano_extproc.affinity.redis_cache import RedisSessionCache


def test_factory() -> None:
    mem = build_session_cache("memory", url=None, ttl_seconds=60, max_entries=7)
    assert isinstance(mem, MemorySessionCache)
    assert mem.capacity == 7
    red = build_session_cache("redis", url="redis://127.0.0.1:1/0", ttl_seconds=60, max_entries=7)
    assert isinstance(red, RedisSessionCache)
    with pytest.raises(ValueError, match="requires a url"):
        build_session_cache("redis", url=None, ttl_seconds=60, max_entries=7)
    with pytest.raises(ValueError, match="unknown session cache type"):
        build_session_cache("memcached", url=None, ttl_seconds=60, max_entries=7)
