"""Prometheus metrics and a health endpoint, served by the manager on ``/metrics`` and ``/healthz``.

The counters and histograms are fed by the pipelines as batches complete; backlog, pending and
memory gauges are read from Redis and the replicas when scraped. The HTTP server is a few lines
of asyncio (no framework): GET only, one response per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nosq.producer.wire import ErrorCode

__all__ = ["Metrics", "MetricsServer"]

log = logging.getLogger(__name__)
_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FEW = 16


class Metrics:
    """Every metric a manager exports, in a registry of its own (tests create many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nosq_requests_total", "Requests answered, by outcome", ["model", "outcome"],
                                registry=r)
        self.errors = Counter("nosq_errors_total", "Error results, by code", ["model", "code"], registry=r)
        self.batches = Counter("nosq_batches_total", "Batches run, by release reason", ["model", "reason"], registry=r)
        self.batch_size = Histogram("nosq_batch_size", "Requests per batch", ["model"], buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_wait = Histogram("nosq_queue_wait_ms", "Enqueue to dispatch, ms", ["model"], buckets=_MS_BUCKETS,
                                    registry=r)
        self.exec_ms = Histogram("nosq_exec_ms", "Model execution per batch, ms", ["model"], buckets=_MS_BUCKETS,
                                 registry=r)
        self.backlog = Gauge("nosq_backlog", "Entries in the model's stream (waiting + pending)", ["model"],
                             registry=r)
        self.pending = Gauge("nosq_pending", "Entries delivered but not acknowledged", ["model"], registry=r)
        self.replicas = Gauge("nosq_replicas", "Replicas running", ["model"], registry=r)
        self.resident_bytes = Gauge("nosq_resident_bytes", "Bytes resident per device", ["device"], registry=r)
        self.loads = Counter("nosq_model_loads_total", "Model loads", ["model"], registry=r)
        self.evictions = Counter("nosq_model_evictions_total", "Model evictions", ["model"], registry=r)
        self.reclaimed = Counter("nosq_reclaimed_total", "Entries reclaimed from dead consumers", ["model"],
                                 registry=r)
        self.dead_letters = Counter("nosq_dead_letters_total", "Entries moved to the dead-letter stream",
                                    ["model"], registry=r)

    def batch(self, model: str, *, size: int, reason: str, exec_ms: float, waits_ms: Iterable[float]) -> None:
        self.batches.labels(model, reason).inc()
        self.batch_size.labels(model).observe(size)
        self.exec_ms.labels(model).observe(exec_ms)
        _observe_many(self.queue_wait.labels(model), waits_ms)

    def answered(self, model: str, ok: int, errors: Iterable[ErrorCode]) -> None:
        if ok:
            self.requests.labels(model, "ok").inc(ok)
        for code in errors:
            self.requests.labels(model, "error").inc()
            self.errors.labels(model, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, as one increment per bucket: a batch's
    per-request waits cost one call each otherwise. Uses prometheus_client's bucket layout
    (``_upper_bounds``, ``_buckets``, ``_sum``; the same fields ``observe`` uses)."""
    amounts = np.fromiter(values, dtype=np.float64)
    if amounts.size < _FEW:  # numpy's fixed cost is more than a few observe() calls
        for amount in amounts.tolist():
            histogram.observe(amount)
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, amounts, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(amounts.sum()))
    for bucket, count in zip(histogram._buckets, counts, strict=False):
        if count:
            bucket.inc(int(count))


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (200 when serving, else 503 and why)."""

    def __init__(self, metrics: Metrics, *, host: str, port: int,
                 refresh: Callable[[], Awaitable[None]], problem: Callable[[], str | None]) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._refresh = refresh
        self._problem = problem
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == b"/metrics":
                await self._refresh()
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
            elif path == b"/healthz":
                problem = self._problem()
                status, ctype = ("200 OK" if problem is None else "503 Service Unavailable"), "text/plain"
                body = b"ok\n" if problem is None else f"not serving: {problem}\n".encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that went away or sent nothing
        finally:
            writer.close()
