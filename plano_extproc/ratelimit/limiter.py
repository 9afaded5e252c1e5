"""Which budgets a request draws on, the check before dispatch, and the settlement after.

A ``ratelimits`` entry applies to a request when the model that serves it is one the entry
names and the request carries the entry's header (with its value, for a literal selector).
Every configured selector header is read from the request itself: Plano's
``x-arch-ratelimit-selector`` (naming the header to key on) changes nothing, since the header
it names is read anyway, and a client cannot escape a limit by leaving it out.

Before dispatch the request's candidate models (the routed model, then the rest of its route)
are offered to the store in order, one group of buckets each, with the prompt's estimated
tokens: the first model whose budgets all hold the estimate is charged and serves; models
before it are skipped (over budget) and later ones stay failover candidates only while they
could take the estimate too. When none can, the client gets a 429 in its own API's format
with ``Retry-After``: the seconds until the first of them could.

After the reply Envoy's usage record reaches a worker (``server/usage_log.py``), and
``settle`` charges the difference between the estimate and what the provider reported (input
plus output tokens) to the budgets of the model that actually served; when failover moved the
request to another model, the admitted model's budgets get the estimate back and the serving
model's are charged. A failed reply without usage gives the estimate back (the provider
billed nothing); a successful one without usage keeps it.

Bucket keys name a limit by a digest of its definition (model, header, value, tokens, unit:
editing a limit starts a fresh budget) and a selector value by a digest (the value itself,
client-controlled and possibly long, is never stored or logged).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plano_extproc.config import RateLimitConfig
from plano_extproc.errors import GatewayError, RateLimitError
from plano_extproc.ratelimit.budget import NEVER, Bucket, BudgetStore

if TYPE_CHECKING:
    from plano_extproc.metrics import Metrics

log = logging.getLogger("plano_extproc.ratelimit")

MAX_PENDING = 1000  # settlement batches in flight (Redis); beyond it dropped and counted
MAX_OWED = 4096  # buckets owing a correction before a flush is forced
MAX_SETTLEMENT_CHARS = 16384
MAX_SEEN = 4096  # cached (limit, selector value) buckets; cleared when full
MAX_SEEN_CHARS = 256  # longer selector values are digested every time


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def limit_id(limit: RateLimitConfig) -> str:
    """A stable name for one limit: the same on every replica with the same config."""
    value = "*" if limit.value is None else "=" + limit.value
    return _digest(f"{limit.model}\0{limit.header}\0{value}\0{limit.tokens}\0{limit.unit}")[:16]


@dataclass(frozen=True, slots=True)
class Admitted:
    """``index``: the candidate that was charged; ``keep``: which candidates may still serve
    (the charged one and later ones that could take the estimate); ``settlement``: what the
    usage record brings back to ``settle`` (None: no budget was involved)."""

    index: int
    keep: tuple[bool, ...]
    settlement: str | None


_KEEP_ONE = (True,)


@dataclass(frozen=True, slots=True)
class Refused:
    error: GatewayError
    retry_after: int | None  # whole seconds; None: the request can never fit the limit
    limits: tuple[str, ...]  # the labels of the limits that refused it


_ONE = Admitted(0, _KEEP_ONE, None)  # one candidate, no budget involved


class RateLimiter:
    """The configured limits over one budget store; see the module docstring."""

    def __init__(
        self,
        limits: Sequence[RateLimitConfig],
        store: BudgetStore,
        telemetry: Metrics | None = None,
    ) -> None:
        self.limits = tuple(limits)
        self.store = store
        self.telemetry = telemetry
        self._ids = tuple(limit_id(lim) for lim in self.limits)
        self._by_model: dict[str, list[int]] = {}
        for i, lim in enumerate(self.limits):
            for name in lim.models:
                self._by_model.setdefault(name, []).append(i)
        self._pending: set[asyncio.Task[None]] = set()
        self._owed: dict[str, tuple[Bucket, float]] = {}
        self._counted: dict[str, int] = {}  # tokens per limit label, counted at flush
        self._take_now = getattr(store, "take_now", None)
        self.dropped = 0
        # (limit, selector value) -> its bucket and settlement reference: the same tenants
        # recur, and a digest per request and limit is most of the lookup's cost. Bounded.
        self._seen: dict[tuple[int, str], tuple[Bucket, str]] = {}
        # Settlement tails written (by candidates and references) and read (by text): the
        # same few recur, JSON costs more than the rest of a check. Bounded.
        self._tails: dict[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], str] = {}
        self._parsed: dict[str, tuple[str, dict[str, tuple[list[Bucket], list[str]]]]] = {}

    @property
    def active(self) -> bool:
        return bool(self.limits)

    def health(self) -> dict[str, Any]:
        """For the worker's /ready: the limits, the store's state, dropped settlements."""
        health = getattr(self.store, "health", None)
        # Not the shared table's entry count: the supervisor asks every second, and counting
        # would read the whole table.
        state = health() if health is not None else {"backend": "memory"}
        return {
            "limits": [lim.label for lim in self.limits],
            "store": state,
            "settlements_dropped": self.dropped,
        }

    def applies_to(self, model: str) -> bool:
        return model in self._by_model

    def _bucket(self, i: int, digest: str) -> Bucket:
        """Limit ``i``'s bucket for a selector value's digest ("" for a literal selector)."""
        lim = self.limits[i]
        key = f"{self._ids[i]}:{digest}" if digest else self._ids[i]
        tokens = float(lim.tokens)
        return Bucket(key, tokens, tokens / lim.window_seconds)

    def buckets(self, model: str, headers: Mapping[str, str]) -> list[tuple[int, Bucket, str]]:
        """The limits on ``model`` this request's headers select: (limit, bucket, reference)."""
        found: list[tuple[int, Bucket, str]] = []
        for i in self._by_model.get(model, ()):
            lim = self.limits[i]
            value = headers.get(lim.header)
            if value is None or (lim.value is not None and value != lim.value):
                continue
            seen = self._seen.get((i, value))
            if seen is None:
                digest = _digest(value)[:16] if lim.value is None else ""
                seen = (self._bucket(i, digest), f"{i}:{digest}")
                if len(value) <= MAX_SEEN_CHARS:  # memory stays small whatever clients send
                    if len(self._seen) >= MAX_SEEN:
                        self._seen.clear()
                    self._seen[(i, value)] = seen
            found.append((i, *seen))
        return found

    async def admit(
        self, models: Sequence[str], headers: Mapping[str, str], estimate: int
    ) -> Admitted | Refused:
        """Charge ``estimate`` to the first of ``models`` whose budgets all hold it."""
        if len(models) == 1:  # most requests: one model (no route, or failover off)
            return await self._admit_one(models[0], headers, estimate)
        chosen = [self.buckets(m, headers) for m in models]
        if not any(chosen):
            return Admitted(0, (True,) * len(models), None)
        groups = [[b for _, b, _ in group] for group in chosen]
        verdict = await self.store.take(groups, float(estimate))
        if verdict.taken is None:
            return self._refusal(models, chosen, verdict.waits, estimate)
        k = verdict.taken
        keep = tuple(i == k or (i > k and w == 0.0) for i, w in enumerate(verdict.waits))
        refs = tuple(
            (m, tuple(ref for _, _, ref in group))
            for m, group, kept in zip(models, chosen, keep, strict=True)
            if group and kept
        )
        return Admitted(k, keep, self._settlement(estimate, models[k], refs))

    async def _admit_one(
        self, model: str, headers: Mapping[str, str], estimate: int
    ) -> Admitted | Refused:
        """``admit`` for one candidate, with less bookkeeping (it runs on every request)."""
        group = self.buckets(model, headers)
        if not group:
            return _ONE
        groups = ([b for _, b, _ in group],)
        # The shared table, or a Redis lease (ratelimit/lease.py), answers at once: no
        # coroutine. None: ask the store.
        take_now = self._take_now
        verdict = take_now(groups, float(estimate)) if take_now is not None else None
        if verdict is None:
            verdict = await self.store.take(groups, float(estimate))
        if verdict.taken is None:
            return self._refusal((model,), (group,), verdict.waits, estimate)
        refs = ((model, tuple(ref for _, _, ref in group)),)
        return Admitted(0, _KEEP_ONE, self._settlement(estimate, model, refs))

    def _settlement(
        self, estimate: int, admitted: str, refs: tuple[tuple[str, tuple[str, ...]], ...]
    ) -> str:
        """What the usage record brings back to ``settle``: the estimate, then the admitted
        model and each candidate's budget references as JSON (that tail recurs: cached)."""
        key = (admitted, refs)
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tail(admitted, refs)
            if len(self._tails) >= MAX_SEEN:
                self._tails.clear()
            self._tails[key] = tail
        return f"{estimate} {tail}"

    @staticmethod
    def _tail(admitted: str, refs: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
        doc = {"a": admitted, "b": {m: list(r) for m, r in refs}}
        tail = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
        if len(tail) > MAX_SETTLEMENT_CHARS - 32:  # a config with hundreds of limits
            doc["b"] = {m: list(r) for m, r in refs if m == admitted}
            tail = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
        return tail

    def _refusal(
        self,
        models: Sequence[str],
        chosen: Sequence[list[tuple[int, Bucket, str]]],
        waits: Sequence[float],
        estimate: int,
    ) -> Refused:
        soonest = min(waits) if waits else NEVER
        first = next(g for g in chosen if g)  # the first model with a budget in the way
        labels = tuple(dict.fromkeys(self.limits[i].label for i, _, _ in first))
        lim = self.limits[first[0][0]]
        rule = f"{lim.tokens} tokens per {lim.unit}"
        if self.telemetry is not None:
            for group, w in zip(chosen, waits, strict=True):
                for i, _, _ in group if w > 0.0 else ():
                    self.telemetry.count_ratelimit_rejection(self.limits[i].label)
        if math.isinf(soonest):
            message = (
                f"Rate limit {labels[0]!s}: this request needs about {estimate} tokens, more "
                f"than the limit allows in total ({rule}); it cannot be served under this limit."
            )
            return Refused(RateLimitError(message), None, labels)
        seconds = max(1, math.ceil(soonest))
        message = (
            f"Rate limit {labels[0]!s} reached ({rule}; this request needs about {estimate} "
            f"tokens). Retry after {seconds} s."
        )
        if len(models) > 1:
            message += f" Every model that can serve it is over its budget ({len(models)} tried)."
        return Refused(RateLimitError(message), seconds, labels)

    # ------------------------------------------------------------------ after the reply

    def settle(self, settlement: str, served: str, status: int, used: int | None) -> None:
        """The usage record of an admitted request: what its budgets owe (see the module
        docstring), applied by ``flush``. ``used``: input + output tokens the provider
        reported, None if unknown."""
        owed = self._owed
        for buckets, delta in self.corrections(settlement, served, status, used):
            for b in buckets:
                before = owed.get(b.key)
                owed[b.key] = (b, delta + before[1] if before is not None else delta)
        if len(owed) >= MAX_OWED:
            self.flush()

    def flush(self) -> None:
        """Apply what ``settle`` collected: one store operation per batch of usage records
        (Envoy sends them in batches) instead of one per request, and one counter update per
        limit."""
        if self._counted:
            counted, self._counted = self._counted, {}
            if self.telemetry is not None:
                for label, tokens in counted.items():
                    self.telemetry.count_ratelimit_tokens(label, tokens)
        if not self._owed:
            return
        items = [item for item in self._owed.values() if item[1]]
        self._owed = {}
        now = getattr(self.store, "adjust_many_now", None)  # the shared table: no task needed
        if now is not None:
            now(items)
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += len(items)
            return
        task = asyncio.get_running_loop().create_task(self._adjust(items))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _adjust(self, items: list[tuple[Bucket, float]]) -> None:
        try:
            await self.store.adjust_many(items)
        except Exception:  # a store never raises by contract; never let a task die loud
            log.exception("rate limits: a budget correction failed")

    def corrections(
        self, settlement: str, served: str, status: int, used: int | None
    ) -> list[tuple[list[Bucket], float]]:
        """The (buckets, tokens) charges that settle one request; pure, for tests."""
        if not settlement or len(settlement) > MAX_SETTLEMENT_CHARS:
            return []
        head, _, tail = settlement.partition(" ")
        if not head.isdigit() or len(head) > 15:
            return []
        estimate = int(head)
        parsed = self._parsed.get(tail)
        if parsed is None:
            parsed = self._parse(tail)
            if parsed is None:
                return []
            if len(self._parsed) >= MAX_SEEN:
                self._parsed.clear()
            self._parsed[tail] = parsed
        admitted, refs = parsed
        ok = 200 <= status < 300
        actual = used if used is not None else (estimate if ok else 0)
        out: list[tuple[list[Bucket], float]] = []
        mine = refs.get(admitted)
        if served == admitted or served not in refs:
            # The admitted model served, or failover moved it to a model without budgets
            # here: either way the admitted model's budgets carry the difference or refund.
            delta = (actual - estimate) if served == admitted else -estimate
            if mine is not None and mine[0] and delta:
                out.append((mine[0], float(delta)))
            if served == admitted and mine is not None:
                self._count_tokens(mine[1], actual)
            return out
        if mine is not None and mine[0] and estimate:
            out.append((mine[0], float(-estimate)))
        charged, labels = refs[served]
        if charged and actual:
            out.append((charged, float(actual)))
        self._count_tokens(labels, actual)
        return out

    def _parse(self, tail: str) -> tuple[str, dict[str, tuple[list[Bucket], list[str]]]] | None:
        """A settlement's tail (``_tail``) back to the admitted model and, per model, its
        buckets and limit labels; None when malformed (references from another config are
        skipped)."""
        try:
            doc: Any = json.loads(tail)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        admitted, refs = doc.get("a"), doc.get("b")
        if not isinstance(admitted, str) or not isinstance(refs, dict):
            return None
        out: dict[str, tuple[list[Bucket], list[str]]] = {}
        for model, items in refs.items():
            if not isinstance(model, str) or not isinstance(items, list):
                continue
            buckets: list[Bucket] = []
            labels: list[str] = []
            for ref in items:
                if not isinstance(ref, str):
                    continue
                index, _, digest = ref.partition(":")
                if not index.isdigit() or len(index) > 6 or int(index) >= len(self.limits):
                    continue
                i = int(index)
                if (self.limits[i].value is None) != bool(digest) or len(digest) > 16:
                    continue
                buckets.append(self._bucket(i, digest))
                labels.append(self.limits[i].label)
            out[model] = (buckets, labels)
        return admitted, out

    def _count_tokens(self, labels: Sequence[str], tokens: int) -> None:
        """Tokens served under each limit, added to its counter at the next ``flush``."""
        if self.telemetry is None or not tokens:
            return
        counted = self._counted
        for label in labels:
            counted[label] = counted.get(label, 0) + tokens
