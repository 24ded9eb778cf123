"""Batch formation, pure: which requests leave together, when, and why.

Work-conserving: with an idle replica, whatever is buffered leaves at once. While every
replica is busy the batch grows up to the cap, but never past ``max_wait_ms`` after its first
request arrived, nor past the moment when the predicted run time would make the tightest
deadline in it slip.

Which latency is predicted where: the curve is the profile's p50 per batch size (refined online
by observed batches). Holding a batch for a deadline uses the tail, p50 x the profiled p95/p50
ratio at that size: a deadline should hold in 95% of runs, not in half. Rejecting a request as
hopeless on arrival uses p50: only what would miss even in a typical run is refused.

Batches by length (``LengthBuckets``, a spec's ``bucketing``; text models): a batch padded to its
longest item wastes the work of the padding, so requests are grouped by a length estimate the
manager can make without decoding (payload bytes / bytes per token) into buckets of token
lengths. The batch starts with the oldest request (or the highest ranked, with priorities), so
none starves; it takes the requests of that request's bucket, oldest first, then those of the
nearest shorter buckets, then of longer ones, while its size x its longest bucket stays within
the token budget (long texts leave in small batches, short ones in large). Under load a bucket
fills a batch alone; with little waiting, neighbours share one rather than leave one by one.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from enum import StrEnum

from nosq.producer.wire import Request

__all__ = ["Batcher", "LatencyModel", "LengthBuckets", "Reason"]

DEADLINE_MARGIN_MS = 1.0  # slack for the dispatch hop and the result write
DEFAULT_AGING_MS = 1000.0  # a waiting request gains one priority level per second


class Reason(StrEnum):
    """Why a batch was released (``batch.reason`` in every result)."""

    FULL = "full"  # it reached the batch cap
    IDLE = "idle"  # a replica was idle: work-conserving dispatch
    WAIT = "wait"  # max wait elapsed since its first request arrived
    DEADLINE = "deadline"  # waiting longer would miss the tightest deadline in it
    DRAIN = "drain"  # the manager is shutting down


class LatencyModel:
    """latency(b) in ms: measured points (from the profile), refined by observed batches.

    ``curve`` is {b: p50 ms}; ``tail`` ({b: p95 ms}, same profile) gives ``predict_tail``."""

    def __init__(self, curve: dict[int, float] | None = None, *, alpha: float = 0.2,
                 tail: dict[int, float] | None = None) -> None:
        self._points: dict[int, float] = dict(curve or {})
        self._alpha = alpha
        # p95/p50 per profiled size: how much slower than typical a slow run is
        self._ratios: dict[int, float] = {
            b: max(1.0, ms / self._points[b]) for b, ms in (tail or {}).items() if self._points.get(b, 0) > 0
        }

    def observe(self, size: int, ms: float) -> None:
        """Fold one observed batch into the curve (EWMA at its power-of-two bucket)."""
        bucket = 1 << max(0, math.ceil(math.log2(max(1, size))))
        old = self._points.get(bucket)
        self._points[bucket] = ms if old is None else (1 - self._alpha) * old + self._alpha * ms

    def predict(self, size: int) -> float:
        """Predicted (typical, p50) run time of a batch of ``size``; 0 when nothing is known yet."""
        if not self._points:
            return 0.0
        return _interpolate(self._points, size, beyond=lambda top, ms: ms * size / top)  # beyond: linear in size

    def predict_tail(self, size: int) -> float:
        """Predicted slow (p95) run time: ``predict`` x the profiled p95/p50 ratio near ``size``."""
        typical = self.predict(size)
        if not self._ratios:
            return typical
        return typical * _interpolate(self._ratios, size, beyond=lambda top, ratio: ratio)

    def curve(self) -> dict[int, float]:
        return dict(sorted(self._points.items()))


class LengthBuckets:
    """Token-length buckets of requests, from their payload's byte length (see the module doc).

    ``edges``: each bucket's longest item in tokens, increasing; a request's bucket is the first
    edge at or above ``2 + bytes / bytes_per_token`` (two special tokens), the last one beyond
    it (the model cuts longer texts). ``cap(edge)``: the batch size the token budget allows."""

    def __init__(self, edges: Sequence[int], *, token_budget: int, bytes_per_token: float) -> None:
        if not edges or list(edges) != sorted(set(edges)) or edges[0] < 1:
            raise ValueError(f"bucket edges must be increasing token counts >= 1, got {list(edges)!r}")
        self.edges = tuple(edges)
        self.token_budget = token_budget
        self.bytes_per_token = bytes_per_token

    def of(self, request: Request) -> int:
        """The bucket (its edge, in tokens) of ``request``."""
        tokens = 2 + len(request.payload) / self.bytes_per_token
        index = bisect.bisect_left(self.edges, tokens)
        return self.edges[min(index, len(self.edges) - 1)]

    def cap(self, edge: int) -> int:
        """How many items of bucket ``edge`` (and shorter) one batch may hold: at least one."""
        return max(1, self.token_budget // edge)


class Batcher:
    """The requests read for one model and not yet dispatched."""

    def __init__(self, *, cap: int, max_wait_ms: float, latency: LatencyModel,
                 aging_ms: float = DEFAULT_AGING_MS, max_bytes: int | None = None,
                 buckets: LengthBuckets | None = None) -> None:
        self.cap = cap
        self.max_bytes = max_bytes  # payload bytes one batch may carry (at least one request)
        self.max_wait_ms = max_wait_ms
        self.latency = latency
        self.aging_ms = aging_ms
        self.buckets = buckets  # None: batches in arrival order, up to ``cap`` items
        self._queue: deque[Request] = deque()
        self._with_deadline = 0  # buffered requests that carry a deadline
        self._by_priority = [0, 0, 0]  # buffered requests per priority level
        self._by_bucket: dict[int, int] = {}  # buffered requests per length bucket (with ``buckets``)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, request: Request) -> None:
        self._queue.append(request)
        self._count(request, 1)

    def _count(self, request: Request, delta: int) -> None:
        if request.deadline_ms is not None:
            self._with_deadline += delta
        self._by_priority[request.priority] += delta
        if self.buckets is not None:
            edge = self.buckets.of(request)
            self._by_bucket[edge] = self._by_bucket.get(edge, 0) + delta

    def bucket_of(self, requests: Sequence[Request]) -> int | None:
        """The longest length bucket among ``requests`` (None without bucketing): a batch's."""
        if self.buckets is None or not requests:
            return None
        return max(self.buckets.of(r) for r in requests)

    def expire(self, now_ms: int) -> tuple[list[Request], float]:
        """Remove the requests that became hopeless (see ``hopeless``) while they waited, and
        return them with the ms until the next one would: the loop wakes then, busy or not."""
        if not self._with_deadline:
            return [], math.inf
        alone = self.latency.predict(1)
        expired: list[Request] = []
        kept: deque[Request] = deque()
        next_ms = math.inf
        for request in self._queue:
            deadline = request.deadline_ms
            if deadline is not None and now_ms + alone > deadline:
                expired.append(request)
                continue
            if deadline is not None:
                next_ms = min(next_ms, deadline - alone - now_ms)
            kept.append(request)
        if expired:
            self._queue = kept
            for request in expired:
                self._count(request, -1)
        return expired, max(0.0, next_ms)

    def hopeless(self, request: Request, now_ms: int) -> bool:
        """True when the request's deadline cannot be met even if it ran alone right now."""
        deadline = request.deadline_ms
        return deadline is not None and now_ms + self.latency.predict(1) > deadline

    def decide(self, now_ms: int, *, idle_replica: bool, draining: bool = False) -> tuple[Reason | None, float]:
        """(reason to release now, or None and the ms to wait before deciding again)."""
        queue = self._queue
        if not queue:
            return None, math.inf
        if len(queue) >= self.cap or self._head_bucket_full():
            return Reason.FULL, 0.0
        if draining:
            return Reason.DRAIN, 0.0
        if idle_replica:
            return Reason.IDLE, 0.0
        wait_left = queue[0].read_ms + self.max_wait_ms - now_ms
        if wait_left <= 0:
            return Reason.WAIT, 0.0
        tightest = min((r.deadline_ms for r in queue if r.deadline_ms is not None), default=None)
        if tightest is not None:
            # waiting for one more request means running a batch one larger, later (p95: see above)
            slack = tightest - now_ms - self.latency.predict_tail(len(queue) + 1) - DEADLINE_MARGIN_MS
            if slack <= 0:
                return Reason.DEADLINE, 0.0
            wait_left = min(wait_left, slack)
        return None, wait_left

    def take(self, now_ms: int | None = None) -> list[Request]:
        """Up to ``cap`` requests for the same method: oldest first when all share a priority;
        otherwise by rank = priority - waited / aging_ms (high priority first, and a waiting
        low-priority request climbs one level every ``aging_ms``, so it never starves)."""
        mixed = sum(1 for n in self._by_priority if n) > 1
        if self.buckets is not None and self._queue:
            batch = self._take_bucketed(self._ranked(now_ms) if mixed else list(self._queue), self.buckets)
        else:
            batch = self._take_ranked(now_ms) if mixed else self._take()
        if self.max_bytes is not None:
            batch = self._within_bytes(batch)
        for request in batch:
            self._count(request, -1)
        return batch

    def _within_bytes(self, batch: list[Request]) -> list[Request]:
        """Cut the batch where its payloads pass ``max_bytes``; the rest goes back to the front."""
        total = 0
        for index, request in enumerate(batch):
            total += len(request.payload)
            if index and total > (self.max_bytes or 0):
                self._queue.extendleft(reversed(batch[index:]))
                return batch[:index]
        return batch

    def _head_bucket_full(self) -> bool:
        """With length buckets: the oldest request's bucket holds a whole batch."""
        if self.buckets is None:
            return False
        edge = self.buckets.of(self._queue[0])
        return self._by_bucket.get(edge, 0) >= min(self.cap, self.buckets.cap(edge))

    def _take_bucketed(self, order: list[Request], buckets: LengthBuckets) -> list[Request]:
        """The head of ``order`` (oldest, or highest ranked), its bucket's requests in ``order``,
        then the nearest shorter buckets', then longer ones', while size x longest bucket fits
        the token budget and size fits ``cap``."""
        head = order[0]
        method = head.method
        home = buckets.of(head)
        same = [(buckets.of(r), i, r) for i, r in enumerate(order) if r.method == method]
        limit = min(self.cap, buckets.cap(home))
        batch = [r for edge, _, r in same if edge == home][:limit]
        if len(batch) < limit:
            shorter = sorted(((-edge, i, r) for edge, i, r in same if edge < home), key=lambda t: t[:2])
            room = limit - len(batch)
            batch.extend(r for _, _, r in shorter[:room])
            for edge, _, r in sorted((t for t in same if t[0] > home), key=lambda t: t[:2]):
                if len(batch) >= self.cap or (len(batch) + 1) * edge > buckets.token_budget:
                    break
                batch.append(r)
        chosen = {id(r) for r in batch}
        self._queue = deque(r for r in self._queue if id(r) not in chosen)
        return batch

    def _ranked(self, now_ms: int | None) -> list[Request]:
        now = now_ms if now_ms is not None else max(r.read_ms for r in self._queue)
        aging = max(self.aging_ms, 1e-9)
        return sorted(self._queue, key=lambda r: (r.priority - (now - r.read_ms) / aging, r.read_ms))

    def _take_ranked(self, now_ms: int | None) -> list[Request]:
        ranked = self._ranked(now_ms)
        method = ranked[0].method
        batch = [r for r in ranked if r.method == method][: self.cap]
        chosen = {id(r) for r in batch}
        self._queue = deque(r for r in self._queue if id(r) not in chosen)
        return batch

    def _take(self) -> list[Request]:
        queue = self._queue
        method = queue[0].method
        if all(r.method == method for r in _head(queue, self.cap)):
            return [queue.popleft() for _ in range(min(self.cap, len(queue)))]
        batch: list[Request] = []
        rest: deque[Request] = deque()
        while queue:
            request = queue.popleft()
            if request.method == method and len(batch) < self.cap:
                batch.append(request)
            else:
                rest.append(request)
        self._queue = rest
        return batch

    def pending(self) -> list[Request]:
        """Everything buffered, oldest first (read-only view for the janitor)."""
        return list(self._queue)

    def drain_all(self) -> list[Request]:
        """Everything still buffered (on shutdown)."""
        items = list(self._queue)
        self._queue.clear()
        self._with_deadline = 0
        self._by_priority = [0, 0, 0]
        self._by_bucket.clear()
        return items


def _interpolate(points: dict[int, float], size: int, *, beyond: Callable[[int, float], float]) -> float:
    """Piecewise linear in ``points``; flat below the first; ``beyond(top, value)`` above the last."""
    sizes = sorted(points)
    if size <= sizes[0]:
        return points[sizes[0]]
    for low, high in itertools.pairwise(sizes):
        if size <= high:
            frac = (size - low) / (high - low)
            return points[low] + frac * (points[high] - points[low])
    top = sizes[-1]
    return beyond(top, points[top])


def _head(queue: deque[Request], n: int) -> list[Request]:
    return [queue[i] for i in range(min(n, len(queue)))]
