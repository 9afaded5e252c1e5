"""Embedded in-process router: picks a route by sentence-embedding similarity, no LLM, no network.

Each route is represented by the centroid of its texts (the description, the description's
phrases, each phrase reworded as a request, and any ``examples``), a tiny softmax classifier
trained over those texts at ``prepare()`` time, and a lexical profile (content-word stems and
"action" words). A built-in intent bank (``data/intent_bank.yaml``) of generic categories with
example requests expands descriptions at load: a category whose description is close to a
route's lends the route its examples; the bank's no-match categories (greetings, thanks, small
talk, trivia, time and weather) are the "no match" anchors unless a route describes them; task
categories no route claims stand for "another task" (no match). The encoder is multilingual,
so a prompt in Spanish or Japanese scores against English descriptions. The latest user turn
decides; earlier user turns nudge, and a short follow-up ("now in Rust") inherits them unless it
is chit-chat itself. A short prompt of several sentences is also scored by its first and last
sentence (the instruction usually sits there); long prompts only by head/tail windows, because
an embedding of a pasted document says what the document is, not what the user asked. Inference
runs on a small bounded thread pool so a long prompt never blocks the event loop.

Inline route sets are client-controlled work (every phrase of every description is embedded),
so a request has a deadline (``routing.router.timeout_ms``) after which it fails open with
``router_error``; an inline set is built on its own single-thread lane in chunks, checking the
deadline between them, with a short bounded queue, so a client sending heavy sets cannot take
the encoder from requests on the configured routes (whose index is pinned, never evicted).
Any exception fails open too, reported by class only (no request data in errors or logs).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plano_extproc.routing.base import ChatMessage, RoutePreference, RouterResult
from plano_extproc.routing.embedding import DATA_DIR, MODEL_SHA256, Encoder, EncoderError
from plano_extproc.routing.lanes import Lanes

#: Defaults calibrated on the development sets (docs/embedded-router.md): the dev split of
#: tests/data/routing_eval.jsonl and tests/data/router_sets/dev.
DEFAULT_THRESHOLD = 0.1
DEFAULT_MARGIN = -0.26
#: Weight of the latest user turn, then of each earlier one (newest first); others are ignored.
TURN_WEIGHTS: tuple[float, ...] = (1.0, 0.35, 0.15)
#: A latest turn this short ("now in Rust", "make it shorter") is a follow-up: earlier user turns
#: then weigh FOLLOWUP_WEIGHTS, so it inherits the conversation's task...
FOLLOWUP_WORDS = 10
FOLLOWUP_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 0.5)
#: ...unless it is chit-chat by itself (its best no-match anchor at least this similar): "thanks!"
#: after a code request is no match whatever came before.
CHITCHAT = 0.6
#: Prompts up to this many words are embedded whole; longer ones by windows.
FULL_TEXT_WORDS = 64
#: Decisions in flight per lane (``threads``): those queued behind busy lanes are decided
#: together, their texts in one forward pass, about 30% less CPU per text from four texts a
#: pass (routing/lanes.py, docs/benchmarks.md).
IN_FLIGHT_PER_LANE = 8
#: Up to this many windows are scored against the route and bank matrices one by one
#: (``EmbeddedRouter._sims``).
FEW_WINDOWS = 8
#: Words in the head and tail windows of a long prompt.
WINDOW_WORDS = 40
#: A focus span with at least this share of its text's words is not embedded on its own: its
#: vector is nearly the whole text's. On the 15 route lists and the old test split, accuracy
#: is unchanged (0.7997 vs 0.7996 mean) for about 10% fewer encoded tokens, and a 50-word
#: prompt whose first sentence is most of it encodes about 45% fewer (docs/benchmarks.md).
SPAN_MAX_SHARE = 0.6
#: An anchor this similar to one of the route's own vectors is dropped for that route set,
#: so a user route like "small talk" is not shadowed by the built-in anchors.
ANCHOR_CONFLICT = 0.80
#: Weight and cap of the lexical overlap bonus (stemmed words shared with the route's texts).
LEXICAL_WEIGHT = 0.05
LEXICAL_CAP = 1.5
#: Bonus when the text's leading action word ("translate", "summarize", "fix") is one of the
#: route's action words (``action_stems``); split evenly between the routes that share it.
HEAD_WEIGHT = 0.1
#: Hubness correction: subtract this times the route centroid's mean cosine to every example of
#: the intent bank (a broad sample of what users ask), so a route whose texts are close to
#: everything ("how the hiring process works", "explanations") does not win by default.
HUB_WEIGHT = 1.0
#: Weight of the window's best cosine to one of the route's own texts (description, phrases,
#: examples): a prompt about "W-4 withholding" matches the phrase "tax withholding" best.
PHRASE_WEIGHT = 0.5
#: Each description phrase is also embedded reworded as a request (prompts are requests).
PHRASE_TEMPLATE = "I need help {}."
#: Weight of the per-route-set softmax classifier's probability, its input scale, L2 and steps.
CLASSIFIER_WEIGHT = 0.05
CLASSIFIER_SCALE = 10.0
CLASSIFIER_L2 = 1e-3
CLASSIFIER_STEPS = 300
#: How many inline route sets to keep indexes for (configured sets are pinned besides).
MAX_ROUTE_SETS = 64
#: Per-request deadline when none is configured (``routing.router.timeout_ms``).
DEFAULT_TIMEOUT_MS = 3000
#: Texts embedded, or classifier steps taken, between deadline checks while building an index.
BUILD_CHUNK = 8
CLASSIFIER_CHECK_EVERY = 20
#: Inline route-set builds admitted at once (one runs, the rest wait); more fail open at once.
MAX_PENDING_BUILDS = 4
#: Generic tasks and the no-match categories; intents of customer-facing verticals.
BANK_PATHS: tuple[Path, ...] = (
    DATA_DIR / "intent_bank.yaml",
    DATA_DIR / "intent_bank_domains.yaml",
)
#: A bank category whose description is at least this similar to a route's description (or
#: one of its phrases) lends that route its example requests; a no-match category also stops
#: being a no-match anchor then, so a configured "small talk" or "trivia" route wins its requests.
BANK_MATCH = 0.5
#: Examples of the bank's task categories no route claimed stand for "another task": a prompt
#: closest to one of them (a cover letter when the routes are code and cooking) is no match.
#: Their cosine counts this much less than a no-match anchor's.
OTHER_PENALTY = 0.1
#: A no-match category yields to a route at this similarity (BANK_MATCH for task categories).
NO_MATCH_YIELD = 0.45
#: A route's score is at least its nearest borrowed example's cosine minus this.
KNN_OFFSET = 0.3
#: Weight of the lent examples' mean in a route's centroid (its own texts' mean has weight 1).
BANK_WEIGHT = 1.0
_ROUTED_ROLES = frozenset({"user"})

_PHRASE_SPLIT = re.compile(
    r"[,;:()\[\]/\n]+|\.(?:\s+|$)|\s+(?:or|and|and/or|as well as|such as|including|e\.g\.|like)\s+",
    re.IGNORECASE,
)
_STOPWORDS = frozenset(
    "a an the to of in for and or with this that these those me my you your can could would "
    "please its is are be on at by from as into about some any what how do does did we our us "
    "need want like make give get just also so but not no than then there their they them he "
    "she his her was were will should may might have has had been being which who when where "
    "why all each other new".split()
)
_SUFFIXES = (
    "izations",
    "ization",
    "ations",
    "ation",
    "ments",
    "ment",
    "ings",
    "ing",
    "ies",
    "ied",
    "es",
    "ed",
    "s",
    "e",
    "y",
)
_LEADING_JOINER = re.compile(r"^(?:or|and|as well as|also|e\.g\.|etc\.?)\s+", re.IGNORECASE)
#: Words skipped when looking for a text's leading action word ("Can you please translate …").
_FILLER = frozenset(
    "please pls can could would will you i i'd i'm we need want like to me us help a an the "
    "hey hi so ok okay also now just then quickly briefly kindly".split()
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?:])\s+|\n+")


class EmbeddedRouterError(Exception):
    """The embedded router cannot start; the message says how to fix it."""


class DeadlineExceeded(Exception):
    """A request's routing work ran past its deadline (or was abandoned); it fails open."""


#: Called between chunks of work; raises ``DeadlineExceeded`` when the request is out of time.
Check = Callable[[], None]


def deadline_check(deadline: float, abandoned: threading.Event) -> Check:
    """A ``Check`` for a ``time.monotonic()`` deadline and an "abandoned by the caller" flag."""

    def check() -> None:
        if abandoned.is_set() or time.monotonic() > deadline:
            raise DeadlineExceeded

    return check


def split_phrases(description: str) -> list[str]:
    """Split a route description into its phrases ("a, b, or c" -> a, b, c).

    Plano descriptions are lists of intents; each phrase scored on its own matches a short
    prompt far better than the whole comma list does.
    """
    phrases: list[str] = []
    for raw in _PHRASE_SPLIT.split(description):
        phrase = _LEADING_JOINER.sub("", raw.strip()).strip(" .-")
        if len(phrase) < 3 or phrase.lower() in {p.lower() for p in phrases}:
            continue
        phrases.append(phrase)
    return phrases


def stem(word: str) -> str:
    """Crude stem (one suffix off, then 5 letters): "summarizing"/"summary" -> "summa"."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:5]


def stems(text: str) -> frozenset[str]:
    """Content-word stems of a text, for the lexical bonus."""
    return frozenset(
        stem(w) for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in _STOPWORDS
    )


def lexical_weights(route_stems: Sequence[frozenset[str]]) -> dict[str, float]:
    """IDF of each stem across the routes: a word in every route's texts tells nothing."""
    counts: dict[str, int] = {}
    for bag in route_stems:
        for s in bag:
            counts[s] = counts.get(s, 0) + 1
    n = len(route_stems)
    return {s: math.log(1 + n / c) for s, c in counts.items()}


def route_texts(pref: RoutePreference) -> list[str]:
    """All texts that stand for one route: the full description, its phrases, its examples."""
    texts: list[str] = []
    seen: set[str] = set()
    for text in [pref.description, *split_phrases(pref.description), *pref.examples]:
        key = text.strip().lower()
        if key and key not in seen:
            seen.add(key)
            texts.append(text.strip())
    return texts


def request_texts(pref: RoutePreference) -> list[str]:
    """``route_texts`` plus each description phrase reworded as a request
    ("debugging errors" -> "I need help debugging errors.")."""
    texts = route_texts(pref)
    seen = {t.lower() for t in texts}
    for phrase in split_phrases(pref.description):
        text = PHRASE_TEMPLATE.format(phrase)
        if text.lower() not in seen:
            seen.add(text.lower())
            texts.append(text)
    return texts


#: Endings of gerunds and action nouns ("explaining", "explanations", "analysis").
_ACTION_ENDINGS = ("ing", "ion", "ions", "ysis", "yses")
#: Words with those endings that do not name an action.
_NOT_ACTIONS = frozenset(
    "string strings thing things something anything everything nothing morning evening "
    "function functions question questions version versions region regions opinion "
    "opinions million millions billion".split()
)


def action_stems(pref: RoutePreference) -> frozenset[str]:
    """Stems of a route's action words: the leading word of each description phrase and
    example, plus every gerund or action noun anywhere in its description, so "detailed
    explanations" makes "Explain …" a complex_reasoning lead, not only the leading "detailed"."""
    leads = {head_stem(t) for t in [*split_phrases(pref.description), *pref.examples]}
    for word in re.findall(r"[a-z]+", pref.description.lower()):
        if len(word) > 4 and word.endswith(_ACTION_ENDINGS) and word not in _NOT_ACTIONS:
            leads.add(stem(word))
    return frozenset(h for h in leads if h)


def head_stem(text: str) -> str | None:
    """Stem of the text's leading action word, skipping politeness and filler
    ("Can you now translate this" -> "trans")."""
    for word in re.findall(r"[a-z']+", text.lower()):
        if word not in _FILLER and len(word) >= 2:
            return stem(word)
    return None


def focus_spans(text: str) -> tuple[tuple[int, int], ...]:
    """Character spans of the first and last sentence (>= 3 words each) of a text that has
    several; empty for a one-sentence text. The instruction usually sits in one of them. A
    span holding ``SPAN_MAX_SHARE`` of the text's words or more is left out (the whole text
    stands for it)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_SPLIT.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    spans = [(lo, hi) for lo, hi in spans if len(text[lo:hi].split()) >= 3]
    if len(spans) < 2:
        return ()
    most = SPAN_MAX_SHARE * len(text.split())
    return tuple(s for s in (spans[0], spans[-1]) if len(text[s[0] : s[1]].split()) < most)


def text_windows(
    text: str, *, full_words: int = FULL_TEXT_WORDS, window_words: int = WINDOW_WORDS
) -> list[str]:
    """Texts to embed for one turn: the whole text if short, else head, tail and the first
    and last paragraphs when those are short (instructions tend to sit there)."""
    words = text.split()
    if not words:
        return []
    if len(words) <= full_words:
        return [" ".join(words)]
    windows = [" ".join(words[:window_words]), " ".join(words[-window_words:])]
    paragraphs = [p for p in re.split(r"\n\s*\n|\n", text) if p.strip()]
    for para in (paragraphs[0], paragraphs[-1]):
        para_words = para.split()
        if 3 <= len(para_words) <= full_words:
            candidate = " ".join(para_words)
            if candidate not in windows:
                windows.append(candidate)
    return windows


def turn_inputs(text: str) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """What one turn is encoded as, as (text, focus spans) pairs: a short turn whole, with the
    spans of its first and last sentence; a long one by its windows, each whole."""
    body = text.strip()
    if len(body.split()) <= FULL_TEXT_WORDS:
        return [(body, focus_spans(body))]
    return [(window, ()) for window in text_windows(body)]


def user_turns(messages: Sequence[ChatMessage], max_turns: int = len(TURN_WEIGHTS)) -> list[str]:
    """User turns with text, newest first; system/developer/tool/assistant turns never route."""
    turns: list[str] = []
    for message in reversed(messages):
        if message.role in _ROUTED_ROLES and message.content.strip():
            turns.append(message.content)
            if len(turns) == max_turns:
                break
    return turns


@dataclass(frozen=True)
class BankCategory:
    """One category of the built-in intent bank: a generic task ("translation") or, with
    ``no_match``, chit-chat that keeps the requested model ("greetings")."""

    name: str
    description: str
    no_match: bool
    examples: tuple[str, ...]


def load_bank(paths: Sequence[Path] = BANK_PATHS) -> list[BankCategory]:
    """The built-in intent bank (data/intent_bank*.yaml)."""
    import yaml

    categories: list[BankCategory] = []
    for path in paths:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        categories += [
            BankCategory(
                name=str(c["name"]),
                description=str(c["description"]),
                no_match=bool(c.get("no_match", False)),
                examples=tuple(str(e) for e in c["examples"]),
            )
            for c in data["categories"]
        ]
    return categories


def decide(
    scores: dict[str, float], no_match: float, *, threshold: float, margin: float
) -> str | None:
    """Best route, or None when it is below ``threshold`` or not ``margin`` above the
    no-match anchors."""
    if not scores:
        return None
    best = max(scores, key=lambda name: scores[name])
    if scores[best] < threshold or scores[best] - no_match < margin:
        return None
    return best


class _BuildQueueFull(Exception):
    """MAX_PENDING_BUILDS inline route sets are already being built or waiting."""


class LRU:
    """Tiny thread-safe LRU map; bounds memory of per-route-set vector indexes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def train_softmax(
    features: Any,
    labels: Any,
    classes: int,
    *,
    scale: float = CLASSIFIER_SCALE,
    l2: float = CLASSIFIER_L2,
    steps: int = CLASSIFIER_STEPS,
    check: Check | None = None,
) -> tuple[Any, Any]:
    """Class-balanced multinomial logistic regression (full-batch Adam, zero init, so the
    result is deterministic). Returns ``(weights, bias)`` to apply to unscaled features:
    ``logits = x @ weights.T + bias``. ~60 rows x 384 dims: a few ms. ``check`` is called
    every CLASSIFIER_CHECK_EVERY steps (large inline sets make this the costly part)."""
    import numpy as np

    x = np.asarray(features, dtype=np.float64) * scale
    y = np.asarray(labels, dtype=np.int64)
    n = len(x)
    onehot = np.eye(classes)[y]
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    sample_w = (n / (classes * np.maximum(counts, 1.0)))[y][:, None]
    w = np.zeros((classes, x.shape[1]))
    b = np.zeros(classes)
    mw, vw, mb, vb = np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)
    rate, beta1, beta2, eps = 0.05, 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        if check is not None and step % CLASSIFIER_CHECK_EVERY == 0:
            check()
        z = x @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) * sample_w / n
        gw = g.T @ x + l2 * w
        gb = g.sum(axis=0)
        mw = beta1 * mw + (1 - beta1) * gw
        vw = beta2 * vw + (1 - beta2) * gw**2
        mb = beta1 * mb + (1 - beta1) * gb
        vb = beta2 * vb + (1 - beta2) * gb**2
        c1, c2 = 1 - beta1**step, 1 - beta2**step
        w -= rate * (mw / c1) / (np.sqrt(vw / c2) + eps)
        b -= rate * (mb / c1) / (np.sqrt(vb / c2) + eps)
    return (w * scale).astype(np.float32), b.astype(np.float32)


def _starts(blocks: Sequence[Any]) -> Any:
    """First row of each block once the blocks are stacked (for ``np.maximum.reduceat``)."""
    import numpy as np

    return np.cumsum([0, *(len(b) for b in blocks[:-1])]) if blocks else None


@dataclass(frozen=True)
class RouteIndex:
    """Everything scoring needs for one route set, built once per set by ``prepare``."""

    names: tuple[str, ...]
    centroids: Any  # (routes, dim) float32, unit rows
    offsets: Any  # (routes,) hubness offsets (HUB_WEIGHT x mean cosine to the anchors)
    anchors: Any  # (anchors, dim) float32
    clf_weights: Any  # (routes, dim)
    clf_bias: Any  # (routes,)
    stems: tuple[frozenset[str], ...] = ()
    idf: dict[str, float] = field(default_factory=dict)
    heads: tuple[frozenset[str], ...] = ()
    head_counts: dict[str, int] = field(default_factory=dict)
    others: Any = None  # (examples, dim): unclaimed bank task categories' examples
    lent: Any = None  # (examples, dim): examples the routes borrowed, route after route
    lent_starts: Any = None  # first row in ``lent`` of each borrowing route's examples
    lent_routes: Any = None  # the route each of those segments belongs to
    own: Any = None  # (texts, dim): the routes' own texts (description, phrases, examples)
    own_starts: Any = None  # (routes,) first row in ``own`` of each route's texts


@dataclass
class Decision:
    """Full decision detail for --explain and the eval bench."""

    route: str | None
    scores: dict[str, float] = field(default_factory=dict)
    no_match: float = 0.0
    windows: int = 0

    def result(self) -> RouterResult:
        return RouterResult(route=self.route, scores=self.scores, no_match=self.no_match)


@dataclass(frozen=True, slots=True)
class _Job:
    """One queued decision: what ``decide`` needs, and its deadline check."""

    messages: list[ChatMessage]
    prefs: list[RoutePreference]
    index: RouteIndex | None
    check: Check


def _route_key(preferences: Sequence[RoutePreference]) -> tuple[Any, ...]:
    return tuple((p.name, p.description, p.examples) for p in preferences)


class EmbeddedRouter:
    """In-process router over a multilingual sentence encoder (see module docstring)."""

    def __init__(
        self,
        *,
        threshold: float | None = None,
        margin: float | None = None,
        max_concurrency: int = 2,
        cache_size: int = 4096,  # ~6 MB; holds a timed-out inline set's texts for the retry
        model_dir: Path | None = None,
        model_sha256: str = MODEL_SHA256,
        turn_weights: Sequence[float] = TURN_WEIGHTS,
        followup_words: int = FOLLOWUP_WORDS,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
    ) -> None:
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.timeout = timeout_ms / 1000.0
        self.margin = DEFAULT_MARGIN if margin is None else margin
        self.turn_weights = tuple(turn_weights)
        self.followup_words = followup_words
        # ``max_concurrency`` lanes (threads) decide at once, each a batch of the decisions
        # queued (routing/lanes.py); up to IN_FLIGHT_PER_LANE per lane in flight.
        self._max_concurrency = max(1, max_concurrency)
        self._in_flight = self._max_concurrency * IN_FLIGHT_PER_LANE
        self._encoder = Encoder(
            model_dir=model_dir, model_sha256=model_sha256, cache_size=cache_size
        )
        self._indexes = LRU(MAX_ROUTE_SETS)
        self._prepared: dict[tuple[Any, ...], RouteIndex] = {}  # configured sets: never evicted
        self._anchor_vectors: Any = None
        self._bank_names: tuple[str, ...] = ()
        self._bank_no_match: tuple[bool, ...] = ()
        self._bank_descs: Any = None
        self._bank_examples: list[Any] = []
        self._bank_all: Any = None  # every bank example, in one matrix
        self._lanes: Lanes | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._build_executor: ThreadPoolExecutor | None = None
        self._build_lock: asyncio.Lock | None = None
        self._pending_builds = 0
        self._np: Any = None

    @property
    def backend(self) -> str:
        return self._encoder.backend

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    async def start(self) -> None:
        """Load and verify the model off the loop, embed the anchors, warm up."""
        await asyncio.to_thread(self.start_sync)
        self._lanes = Lanes(self._decide_batch, self._max_concurrency, name="embedded-router")
        self._semaphore = asyncio.Semaphore(self._in_flight)
        self._build_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="embedded-router-build"
        )
        self._build_lock = asyncio.Lock()

    def start_sync(self) -> None:
        """Synchronous start for the CLI / eval (no thread pool); a no-op once loaded."""
        if self._encoder.loaded and self._anchor_vectors is not None:
            return
        try:
            self._encoder.load()
            import numpy

            self._np = numpy
            bank = load_bank()
            self._bank_names = tuple(c.name for c in bank)
            self._bank_no_match = tuple(c.no_match for c in bank)
            encode = self._encoder.encode_many
            self._bank_descs = encode([c.description for c in bank], cache=False)
            examples = encode([e for c in bank for e in c.examples], cache=False)
            bounds = numpy.cumsum([0, *(len(c.examples) for c in bank)])
            self._bank_examples = [examples[a:b] for a, b in itertools.pairwise(bounds)]
            self._bank_all = examples
            self._anchor_vectors = self._anchors_except(set())
            self._encoder.encode("warm up the session " * 12)
        except EncoderError as exc:
            raise EmbeddedRouterError(str(exc)) from exc
        except OSError as exc:
            raise EmbeddedRouterError(
                f"embedded router data is unreadable ({exc}); reinstall plano-extproc "
                "with the router extra: pip install --force-reinstall 'plano-extproc[router]'"
            ) from exc

    def prepare(self, preferences: Sequence[RoutePreference]) -> None:
        """Embed a configured route set once at load so requests only embed the prompt; it is
        pinned, so churn of inline sets cannot evict it."""
        prefs = [p for p in preferences if p.name]
        self._prepared[_route_key(prefs)] = self._index_for(prefs)

    def cached_index(self, preferences: Sequence[RoutePreference]) -> RouteIndex | None:
        """The index of a prepared or recently built route set, without building one."""
        key = _route_key(preferences)
        pinned = self._prepared.get(key)
        return pinned if pinned is not None else self._indexes.get(key)

    def _index_for(
        self, preferences: Sequence[RoutePreference], check: Check | None = None
    ) -> RouteIndex:
        cached = self.cached_index(preferences)
        if cached is not None:
            return cached
        np = self._require_np()
        rows: list[Any] = []
        bags: list[frozenset[str]] = []
        heads: list[frozenset[str]] = []
        for pref in preferences:
            # A route with no description or examples still gets a vector (its name).
            texts = request_texts(pref) or [pref.name]
            chunks = []
            for start in range(0, len(texts), BUILD_CHUNK):
                if check is not None:
                    check()
                chunks.append(self._encoder.encode_many(texts[start : start + BUILD_CHUNK]))
            rows.append(np.concatenate(chunks))
            bags.append(frozenset().union(*(stems(t) for t in route_texts(pref))))
            heads.append(action_stems(pref))
        head_counts: dict[str, int] = {}
        for bag in heads:
            for h in bag:
                head_counts[h] = head_counts.get(h, 0) + 1
        dim = self._anchor_vectors.shape[1]
        lent = self._lend(preferences)
        own_rows = list(rows)
        borrowed = [
            np.concatenate([self._bank_examples[c] for c in cs]) if cs else None for cs in lent
        ]
        means = np.stack(
            [
                own.mean(axis=0) + (0.0 if more is None else BANK_WEIGHT * more.mean(axis=0))
                for own, more in zip(own_rows, borrowed, strict=True)
            ]
        )
        centroids = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
        rows = [
            own if more is None else np.concatenate([own, more])
            for own, more in zip(own_rows, borrowed, strict=True)
        ]
        vectors = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
        claimed = {c for cs in lent for c in cs}
        anchors = self._anchors_except(claimed)
        others = self._bank_rows(claimed, no_match=False)
        lenders = [r for r, more in enumerate(borrowed) if more is not None]
        if len(vectors) and len(anchors):
            keep = (anchors @ vectors.T).max(axis=1) < ANCHOR_CONFLICT
            anchors = anchors[keep]
        offsets = (
            HUB_WEIGHT * (background @ centroids.T).mean(axis=0)
            if len(background := self._bank_all if self._bank_all is not None else anchors)
            else np.zeros(len(rows))
        )
        labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])
        clf_w, clf_b = train_softmax(vectors, labels, len(rows), check=check)
        index = RouteIndex(
            names=tuple(p.name for p in preferences),
            centroids=centroids,
            offsets=offsets,
            anchors=anchors,
            others=others,
            lent=np.concatenate([borrowed[r] for r in lenders]) if lenders else None,
            lent_starts=_starts([borrowed[r] for r in lenders]),
            lent_routes=np.asarray(lenders),
            own=np.concatenate(own_rows) if own_rows else None,
            own_starts=_starts(own_rows),
            clf_weights=clf_w,
            clf_bias=clf_b,
            stems=tuple(bags),
            idf=lexical_weights(bags),
            heads=tuple(heads),
            head_counts=head_counts,
        )
        self._indexes.put(_route_key(preferences), index)
        return index

    def _lend(self, preferences: Sequence[RoutePreference]) -> list[list[int]]:
        """Bank categories lent to each route: a category goes to the route whose description
        (or one of its phrases) is most similar to the category's, if at least BANK_MATCH."""
        np = self._np
        lent: list[list[int]] = [[] for _ in preferences]
        if self._bank_descs is None or not len(self._bank_descs) or not preferences:
            return lent
        sims = np.stack(
            [
                (
                    self._encoder.encode_many(route_texts(p)[:1] + split_phrases(p.description))
                    @ self._bank_descs.T
                ).max(axis=0)
                if p.description.strip()
                else np.full(len(self._bank_descs), -1.0)
                for p in preferences
            ]
        )  # (routes, categories)
        for c in range(sims.shape[1]):
            r = int(sims[:, c].argmax())
            if sims[r, c] >= (NO_MATCH_YIELD if self._bank_no_match[c] else BANK_MATCH):
                lent[r].append(c)
        return lent

    def borrowed(self, preferences: Sequence[RoutePreference]) -> dict[str, list[str]]:
        """The intent-bank categories each route borrows examples from (for ``--explain``)."""
        prefs = [p for p in preferences if p.name]
        self._require_np()
        lent = self._lend(prefs)
        return {
            p.name: [self._bank_names[c] for c in cs] for p, cs in zip(prefs, lent, strict=True)
        }

    def _bank_rows(self, claimed: set[int], *, no_match: bool) -> Any:
        """Examples of the bank's no-match (or task) categories no route claimed; None if none."""
        kept = [
            self._bank_examples[c]
            for c, kind in enumerate(self._bank_no_match)
            if kind == no_match and c not in claimed
        ]
        return self._np.concatenate(kept) if kept else None

    def _anchors_except(self, claimed: set[int]) -> Any:
        """No-match anchors: the bank's unclaimed no-match categories' examples (the fixed
        anchors when there is no bank, as in unit tests with a fake encoder)."""
        if not self._bank_examples:
            return self._anchor_vectors
        rows = self._bank_rows(claimed, no_match=True)
        return rows if rows is not None else self._bank_all[:0]

    def _require_np(self) -> Any:
        if self._np is None or not self._encoder.loaded:
            raise EmbeddedRouterError("embedded router used before start()")
        return self._np

    def _sims(self, windows: Any, matrix: Any) -> Any:
        """``windows @ matrix.T``, one window at a time for a turn's few windows: OpenBLAS
        multiplies a 2-4-row matrix by the bank-sized ones (1,700 x 512) about 5x slower than
        it does each row as a matrix-vector product (586 vs 106 us for two rows measured;
        docs/benchmarks.md)."""
        if len(windows) > FEW_WINDOWS:
            return windows @ matrix.T
        return self._np.stack([matrix @ row for row in windows])

    def _score_turn(self, text: str, index: RouteIndex) -> tuple[Any, float, int]:
        """Per-route score and the best anchor cosine over the turn's windows.

        Route score per window = cosine to the route centroid - its hubness offset
        + CLASSIFIER_WEIGHT x the classifier's probability + a capped IDF-weighted overlap of
        stemmed words with the route's texts + a bonus when the window's leading action word
        is one of the route's action words (``action_stems``). Embeddings are topic-heavy; the
        lexical and head-word terms give the verbs that carry intent ("translate", "summarize",
        "fix") their weight back, the classifier separates routes along what tells them apart.
        """
        np = self._np
        sims = self._sims
        inputs = turn_inputs(text)
        if len(inputs) == 1:  # a short turn, with its focus spans
            body, spans = inputs[0]
            windows = self._encoder.encode_spans(body, spans)
            texts = [" ".join(body[lo:hi].split()) for lo, hi in ((0, len(body)), *spans)]
        else:
            texts = [window for window, _ in inputs]
            windows = self._encoder.encode_many(texts)
        per_route = (sims(windows, index.centroids) - index.offsets).astype(np.float64)
        if index.own is not None:
            # Each route's best own text (rows are route after route).
            near_own = np.maximum.reduceat(sims(windows, index.own), index.own_starts, axis=1)
            per_route += PHRASE_WEIGHT * near_own
        if index.lent is not None:
            # Symmetric with the anchors' nearest-example score: a prompt that is close to one
            # of a route's borrowed examples scores at least that closeness, less KNN_OFFSET.
            near = np.maximum.reduceat(sims(windows, index.lent), index.lent_starts, axis=1)
            r = index.lent_routes
            per_route[:, r] = np.maximum(per_route[:, r], near - KNN_OFFSET)
        logits = sims(windows, index.clf_weights) + index.clf_bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        per_route += CLASSIFIER_WEIGHT * probs / probs.sum(axis=1, keepdims=True)
        for w, window_text in enumerate(texts):
            window_stems = stems(window_text)
            head = head_stem(window_text)
            for r in range(len(index.names)):
                lexical = sum(index.idf[s] for s in window_stems & index.stems[r])
                per_route[w, r] += LEXICAL_WEIGHT * min(LEXICAL_CAP, lexical)
                if head is not None and head in index.heads[r]:
                    per_route[w, r] += HEAD_WEIGHT / index.head_counts[head]
        anchor = float(sims(windows, index.anchors).max()) if len(index.anchors) else -1.0
        if index.others is not None:
            anchor = max(anchor, float(sims(windows, index.others).max()) - OTHER_PENALTY)
        return per_route.max(axis=0), anchor, len(texts)

    def decide(
        self,
        messages: Sequence[ChatMessage],
        preferences: Sequence[RoutePreference],
        *,
        index: RouteIndex | None = None,
    ) -> Decision:
        """Score the conversation against the routes and apply threshold and margin
        (``index``: the routes' index when the caller already has it)."""
        np = self._require_np()
        prefs = [p for p in preferences if p.name]
        turns = user_turns(messages, len(self.turn_weights))
        if not prefs or not turns:
            return Decision(route=None)
        if index is None:
            index = self._index_for(prefs)
        scored = [self._score_turn(text, index) for text in turns]
        latest_anchor = scored[0][1]
        weights = self.turn_weights
        if len(turns) > 1 and len(turns[0].split()) <= self.followup_words:
            weights = FOLLOWUP_WEIGHTS
        total = np.zeros(len(prefs), dtype=np.float64)
        anchor_total = 0.0
        weight_sum = 0.0
        windows = 0
        for weight, (per_route, anchor, count) in zip(weights, scored, strict=False):
            total += weight * per_route
            anchor_total += weight * anchor
            weight_sum += weight
            windows += count
        scores = {
            name: round(float(s / weight_sum), 4)
            for name, s in zip(index.names, total, strict=True)
        }
        # A chit-chat turn is judged on its own; otherwise no-match is context-weighted too.
        no_match = latest_anchor if latest_anchor >= CHITCHAT else anchor_total / weight_sum
        route = decide(scores, no_match, threshold=self.threshold, margin=self.margin)
        return Decision(route=route, scores=scores, no_match=round(no_match, 4), windows=windows)

    def _inputs(self, job: _Job) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
        """What ``decide`` will encode for ``job``, so a batch of decisions is encoded in one
        pass first."""
        if not job.prefs:
            return []
        turns = user_turns(job.messages, len(self.turn_weights))
        return [item for text in turns for item in turn_inputs(text)]

    def _decide_batch(self, jobs: list[_Job]) -> list[Decision | BaseException]:
        """Decide a batch of queued requests (one lane, one thread): every text they need in
        one forward pass first, then each decision from the cache. A request past its deadline
        or abandoned gets its exception back instead, and so does one whose decision fails."""
        live: list[_Job] = []
        out: dict[int, Decision | BaseException] = {}
        for job in jobs:
            try:
                job.check()
                live.append(job)
            except BaseException as exc:
                out[id(job)] = exc
        if len(live) > 1:
            self._encoder.prefetch([item for job in live for item in self._inputs(job)])
        for job in live:
            try:
                out[id(job)] = self.decide(job.messages, job.prefs, index=job.index)
            except Exception as exc:
                out[id(job)] = exc
        return [out[id(job)] for job in jobs]

    def route_sync(
        self, messages: Sequence[ChatMessage], preferences: Sequence[RoutePreference]
    ) -> RouterResult:
        """Same decision as ``route``, synchronously (CLI, eval)."""
        return self.decide(messages, preferences).result()

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preferences: Sequence[RoutePreference],
        *,
        request_id: str,
    ) -> RouterResult:
        """Route within the deadline on the bounded pools; every failure (timeout, a full build
        queue, any exception) comes back as ``error`` so the request fails open."""
        if self._lanes is None or self._semaphore is None:
            return RouterResult(route=None, error="embedded router not started")
        abandoned = threading.Event()
        check = deadline_check(time.monotonic() + self.timeout, abandoned)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._route_within(list(messages), list(preferences), check)
        except (TimeoutError, DeadlineExceeded):
            return RouterResult(
                route=None,
                error=f"embedded router timed out after {round(self.timeout * 1000)} ms",
            )
        except _BuildQueueFull:
            return RouterResult(
                route=None, error="embedded router busy: too many inline route sets queued"
            )
        except Exception as exc:  # any failure must fail open, never 500; no data in the reason
            return RouterResult(route=None, error=f"embedded router failed ({type(exc).__name__})")
        finally:
            abandoned.set()  # a worker thread still on this request stops at its next check

    async def _route_within(
        self, messages: list[ChatMessage], preferences: list[RoutePreference], check: Check
    ) -> RouterResult:
        assert self._lanes is not None and self._semaphore is not None
        prefs = [p for p in preferences if p.name]
        index = self.cached_index(prefs) if prefs else None
        if prefs and index is None and user_turns(messages, 1):
            index = await self._build(prefs, check)
        job = _Job(messages, prefs, index, check)
        async with self._semaphore:
            check()
            decision = await self._lanes.submit(job)
        if isinstance(decision, BaseException):
            raise decision
        return decision.result()

    async def _build(self, prefs: list[RoutePreference], check: Check) -> RouteIndex:
        """Build an uncached (inline) route set's index on the one-thread build lane."""
        assert self._build_executor is not None and self._build_lock is not None
        if self._pending_builds >= MAX_PENDING_BUILDS:
            raise _BuildQueueFull
        self._pending_builds += 1
        try:
            async with self._build_lock:
                check()
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self._build_executor, self._index_for, prefs, check
                )
        finally:
            self._pending_builds -= 1

    async def close(self) -> None:
        """Stop the lanes and the build pool; queued decisions finish first."""
        if self._lanes is not None:
            await asyncio.to_thread(self._lanes.close)
        if self._build_executor is not None:
            await asyncio.to_thread(self._build_executor.shutdown, wait=True)
        self._lanes = None
        self._build_executor = None
