"""Rolling figures of one model's recent traffic, for heartbeats and ``nosq status``."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

__all__ = ["RollingStats"]


class RollingStats:
    """The last ``window`` requests' latencies and the last batches' sizes, and a rate."""

    def __init__(self, window: int = 2048) -> None:
        self._latency_ms: deque[float] = deque(maxlen=window)
        self._batch_sizes: deque[int] = deque(maxlen=256)
        self._done: deque[tuple[float, int]] = deque(maxlen=256)  # (monotonic time, requests)
        self.served = 0
        self.errors = 0

    def batch(self, size: int) -> None:
        self._batch_sizes.append(size)

    def answered(self, latencies_ms: list[float], errors: int) -> None:
        self._latency_ms.extend(latencies_ms)
        self.served += len(latencies_ms)
        self.errors += errors
        self._done.append((time.monotonic(), len(latencies_ms)))

    def rate(self, since: float = 0.0) -> float:
        """Answers per second over the last 10 s, or since ``since`` (monotonic) if later: 0
        until two batches were answered in it."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._done if now - t <= 10.0 and t >= since]
        return sum(n for _, n in recent) / max(1e-9, now - recent[0][0]) if len(recent) > 1 else 0.0

    def snapshot(self) -> dict[str, Any]:
        latencies = sorted(self._latency_ms)
        rate = self.rate()
        sizes = self._batch_sizes
        return {
            "served": self.served,
            "errors": self.errors,
            "req_per_s": round(rate, 1),
            "mean_batch": round(sum(sizes) / len(sizes), 1) if sizes else 0.0,
            "p50_ms": round(_quantile(latencies, 0.5), 2),
            "p99_ms": round(_quantile(latencies, 0.99), 2),
        }


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
