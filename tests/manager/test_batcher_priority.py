"""Priorities in batch formation: high first, low never starves (aging), same-priority FIFO."""

from __future__ import annotations

from nosq.manager.serving.batcher import Batcher, LatencyModel
from nosq.producer.wire import Request


def req(n: int, priority: int, read_ms: int, method: str | None = None) -> Request:
    return Request(id=f"r{n}", ct="msgpack", payload=b"", priority=priority, read_ms=read_ms, method=method)


def batcher(cap: int, aging_ms: float = 1000.0) -> Batcher:
    return Batcher(cap=cap, max_wait_ms=5, latency=LatencyModel(), aging_ms=aging_ms)


def test_same_priority_is_first_in_first_out() -> None:
    b = batcher(cap=2)
    for n in range(4):
        b.add(req(n, 1, 1000 + n))
    assert [r.id for r in b.take(now_ms=1010)] == ["r0", "r1"]
    assert [r.id for r in b.take(now_ms=1010)] == ["r2", "r3"]
    assert len(b) == 0


def test_high_priority_goes_first() -> None:
    b = batcher(cap=2)
    b.add(req(0, 2, 1000))
    b.add(req(1, 1, 1001))
    b.add(req(2, 0, 1002))
    b.add(req(3, 0, 1003))
    assert [r.id for r in b.take(now_ms=1005)] == ["r2", "r3"]
    assert [r.id for r in b.take(now_ms=1005)] == ["r1", "r0"]  # the batch fills in rank order
    assert len(b) == 0


def test_low_priority_ages_past_fresh_high_priority() -> None:
    b = batcher(cap=1, aging_ms=100)
    b.add(req(0, 2, 1000))  # low, waiting since t=1000
    b.add(req(1, 0, 1290))  # high, fresh
    # at t=1300 the low one has waited 300 ms: rank 2 - 3 = -1 beats the high one's 0 - 0.1
    assert [r.id for r in b.take(now_ms=1300)] == ["r0"]


def test_low_priority_is_never_starved_by_a_stream_of_high() -> None:
    b = batcher(cap=1, aging_ms=50)
    b.add(req(0, 2, 0))
    served_low_at = None
    for t in range(1, 400):
        b.add(req(t, 0, t))
        taken = b.take(now_ms=t)
        if taken[0].id == "r0":
            served_low_at = t
            break
    assert served_low_at is not None and served_low_at <= 2 * 50 + 1


def test_mixed_methods_stay_apart_under_priorities() -> None:
    b = batcher(cap=4)
    b.add(req(0, 1, 1000, method="a"))
    b.add(req(1, 0, 1001, method="b"))
    b.add(req(2, 2, 1002, method="b"))
    assert {r.method for r in b.take(now_ms=1003)} == {"b"}
    assert [r.id for r in b.take(now_ms=1003)] == ["r0"]


def test_expire_and_drain_keep_the_counts_right() -> None:
    b = batcher(cap=8)
    b.add(Request(id="d", ct="json", payload=b"", priority=0, read_ms=0, deadline_ms=5))
    b.add(req(1, 2, 0))
    expired, _ = b.expire(now_ms=10)
    assert [r.id for r in expired] == ["d"]
    assert [r.id for r in b.take(now_ms=10)] == ["r1"]  # one level left: FIFO path
    b.add(req(2, 1, 11))
    assert [r.id for r in b.drain_all()] == ["r2"]
    assert len(b) == 0


def test_a_batch_stops_at_its_byte_budget_and_keeps_the_rest_in_order() -> None:
    b = Batcher(cap=8, max_wait_ms=5, latency=LatencyModel(), max_bytes=250)
    for n in range(5):
        b.add(Request(id=f"r{n}", ct="msgpack", payload=b"x" * 100, read_ms=n))
    assert [r.id for r in b.take(now_ms=10)] == ["r0", "r1"]
    assert [r.id for r in b.take(now_ms=10)] == ["r2", "r3"]
    assert [r.id for r in b.take(now_ms=10)] == ["r4"]
    b.add(Request(id="big", ct="msgpack", payload=b"x" * 400, read_ms=11))
    assert [r.id for r in b.take(now_ms=12)] == ["big"]  # one request always leaves (admit refuses oversize)
