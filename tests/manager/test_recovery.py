"""Crash safety inside one process: worker processes that die, consumers that die (janitor:
reclaim and dead-letter), and Redis state that changes under a running manager.

Each test runs a manager of its own: the settings under test (dispatch attempts, janitor
timing) differ from test to test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from nosq.producer import AsyncProducer, keys
from nosq.producer.wire import ErrorCode
from tests.manager.harness import (
    config,
    entry,
    manager_settings,
    redis_settings,
    running_manager,
    spec,
    stream_is_drained,
    wait_envelope,
    wait_for,
    xadd_all,
)
from tests.manager.models import MAGIC, read_record

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


@pytest.fixture
async def producer(redis_db10: redis.asyncio.Redis) -> AsyncIterator[AsyncProducer]:
    async with AsyncProducer(redis_settings(), default_timeout_s=60) as client:
        yield client


def vec(first: float, d: int = 4) -> np.ndarray:
    item = np.arange(d, dtype=np.float32)
    item[0] = first
    return item


# -- worker processes that die ---------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_worker_death_mid_batch_is_retried_and_loses_nothing(
    producer: AsyncProducer, tmp_path: Path, tmp_record: Path,
) -> None:
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    model = spec("crashy", "crashing", max_batch=16,
                 options={"crash_dir": str(crash_dir), "crashes": 1, "record": str(tmp_record)})
    values = [1.0, 2.0, 3.0, MAGIC, 5.0, 6.0, 7.0, 8.0]
    async with running_manager(config(model), manager_settings()):
        handles = await producer.submit_many("crashy", [vec(v) for v in values])
        envelopes = [await producer.outcome(h) for h in handles]

    for value, envelope in zip(values, envelopes, strict=True):
        assert envelope.ok, envelope
        np.testing.assert_array_equal(envelope.out, vec(value))
    assert len(list(crash_dir.iterdir())) == 1, "the worker process was to die exactly once"
    pids = [call["pid"] for call in read_record(tmp_record)]
    assert len(set(pids)) == 2, f"the actor was to be restarted in a new process once: {pids}"


@pytest.mark.timeout(150)
async def test_input_that_always_kills_its_worker_fails_alone(
    redis_db10: redis.asyncio.Redis, tmp_path: Path,
) -> None:
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    model = spec("killer", "always_crashing", max_batch=16, options={"crash_dir": str(crash_dir)})
    values = [3.0, MAGIC]
    requests = [entry("killer", vec(v)) for v in values]
    async with running_manager(config(model), manager_settings(dispatch_attempts=2)):
        await xadd_all(redis_db10, "killer", [fields for _, fields in requests])  # one batch
        envelopes = [await wait_envelope(redis_db10, rid, timeout_s=120) for rid, _ in requests]

    good, bad = envelopes
    assert good.ok, good
    np.testing.assert_array_equal(good.out, vec(3.0))
    assert bad.code == ErrorCode.WORKER_DIED, bad
    assert "died 2 times" in bad.message
    # the pair twice, then the killer alone twice; the other half ran without it
    assert len(list(crash_dir.iterdir())) == 4


@pytest.mark.timeout(150)
async def test_a_batch_queued_behind_a_killer_is_not_blamed(
    producer: AsyncProducer, tmp_path: Path, tmp_record: Path,
) -> None:
    """A replica holds two batches (inflight_per_replica=2): when the running one kills the
    worker, the batch queued behind it fails too, through no fault of its own. That failure
    must not count against its inputs: only the killer may end ``worker_died``.

    One dispatch attempt makes this deterministic. With more, the innocent batch loses an
    attempt whenever its retry lands behind the killer's retry on the restarted actor: with
    ``dispatch_attempts=2`` it ended ``worker_died`` in about half of the runs."""
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    model = spec("killer", "always_crashing", max_batch=16,
                 options={"crash_dir": str(crash_dir), "delay_s": 1.0, "record": str(tmp_record)})
    async with running_manager(config(model), manager_settings(dispatch_attempts=1)):
        first = await producer.submit("killer", vec(1.0))
        await wait_for(lambda: any(1.0 in c["firsts"] for c in read_record(tmp_record)), 30,
                       "the first batch to run")
        killer = await producer.submit("killer", vec(MAGIC))  # dispatched to the second slot
        await asyncio.sleep(0.3)  # read and dispatched alone, not batched with the next one
        innocent = await producer.submit("killer", vec(3.0))  # gets a slot when `first` ends
        envelopes = [await producer.outcome(h, timeout_s=120) for h in (first, killer, innocent)]

    assert envelopes[0].ok, envelopes[0]
    assert envelopes[1].code == ErrorCode.WORKER_DIED, envelopes[1]
    assert len(list(crash_dir.iterdir())) == 1
    assert envelopes[2].ok, f"an input that never killed anything was failed: {envelopes[2]}"
    np.testing.assert_array_equal(envelopes[2].out, vec(3.0))


# -- consumers that die: the janitor ---------------------------------------------------------


async def _ghost_takes(client: redis.asyncio.Redis, model: str, values: list[float],
                       retrycount: int | None = None) -> list[tuple[str, bytes]]:
    """Enqueue requests that consumer "ghost" reads, in the same MULTI, and never acks (it
    died): a running manager's reader never sees them. ``retrycount`` sets the first one's
    delivery count, as if that many consumers had read it and died."""
    stream = keys.requests(model)
    requests = [entry(model, vec(v)) for v in values]
    async with client.pipeline(transaction=True) as pipe:
        for _, fields in requests:
            pipe.xadd(stream, fields)
        pipe.xreadgroup(keys.GROUP, "ghost", {stream: ">"}, count=len(values))
        replies = await pipe.execute()
    entry_ids = replies[: len(values)]
    assert [eid for eid, _ in replies[-1][0][1]] == entry_ids
    if retrycount is not None:
        await client.xclaim(stream, keys.GROUP, "ghost", 0, [entry_ids[0]], retrycount=retrycount)
    return [(rid, eid) for (rid, _), eid in zip(requests, entry_ids, strict=True)]


@pytest.mark.timeout(60)
async def test_janitor_reclaims_entries_of_a_dead_consumer(
    redis_db10: redis.asyncio.Redis,
) -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    settings = manager_settings(janitor_interval_s=0.2, min_idle_ms=500)
    async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), settings):
        taken = await _ghost_takes(redis_db10, "noop", values)
        envelopes = [await wait_envelope(redis_db10, rid, timeout_s=30) for rid, _ in taken]

        for value, envelope in zip(values, envelopes, strict=True):
            assert envelope.ok, envelope
            np.testing.assert_array_equal(envelope.out, vec(value))
            assert envelope.deliveries == 2  # the ghost's read, then the janitor's claim
            assert envelope.timings["queued_ms"] >= 500  # claimed only once idle for min_idle_ms
        assert await stream_is_drained(redis_db10, "noop") == (0, 0)


@pytest.mark.timeout(60)
async def test_janitor_dead_letters_an_entry_delivered_too_often(
    redis_db10: redis.asyncio.Redis,
) -> None:
    settings = manager_settings(janitor_interval_s=0.2, min_idle_ms=500, max_deliveries=5)
    async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), settings):
        (poison, poison_entry), (healthy, _) = await _ghost_takes(redis_db10, "noop", [1.0, 2.0], retrycount=5)
        dead = await wait_envelope(redis_db10, poison, timeout_s=30)
        ok = await wait_envelope(redis_db10, healthy, timeout_s=30)

        assert dead.code == ErrorCode.DEAD_LETTER
        assert "delivered 6 times" in dead.message and keys.dead_letters("noop") in dead.message
        assert ok.ok and ok.deliveries == 2
        letters = await redis_db10.xrange(keys.dead_letters("noop"))
        assert len(letters) == 1
        fields = letters[0][1]
        assert fields[b"id"] == poison.encode()
        assert fields[b"code"] == b"dead_letter"
        assert fields[b"reason"] == b"delivered 6 times"
        assert fields[b"entry"] == poison_entry
        assert await stream_is_drained(redis_db10, "noop") == (0, 0)


@pytest.mark.timeout(60)
async def test_entries_reclaimed_at_start_run_once(
    redis_db10: redis.asyncio.Redis, tmp_record: Path,
) -> None:
    """Entries a dead consumer left pending before this manager started: its janitor claims
    them on its first pass while its reader recovers its own pending entries (design.md
    section 3.1). Each must be admitted once: run once, with its real delivery count."""
    await redis_db10.xgroup_create(keys.requests("rec"), keys.GROUP, id="0", mkstream=True)
    values = [1.0, 2.0, 3.0]
    taken = await _ghost_takes(redis_db10, "rec", values)
    await asyncio.sleep(0.6)  # idle past min_idle_ms before the manager's first janitor pass
    model = spec("rec", "slow", options={"delay_s": 0.0, "record": str(tmp_record)})
    settings = manager_settings(janitor_interval_s=0.2, min_idle_ms=500)
    async with running_manager(config(model), settings):
        envelopes = [await wait_envelope(redis_db10, rid, timeout_s=30) for rid, _ in taken]
        await asyncio.sleep(0.5)  # a duplicate would run right behind the first copy

    assert all(e.ok for e in envelopes), envelopes
    runs = [v for call in read_record(tmp_record) for v in call["firsts"]]
    assert sorted(runs) == values, f"each entry was to run once; runs: {sorted(runs)}"
    pending = await redis_db10.xpending_range(keys.requests("rec"), keys.GROUP, "-", "+", 10)
    assert pending == []


@pytest.mark.timeout(60)
async def test_a_live_manager_does_not_reclaim_entries_it_holds(
    producer: AsyncProducer, tmp_record: Path,
) -> None:
    """Entries this manager has read and holds in its batcher while its replica is busy are
    work in progress, however long they wait: its own janitor must not claim them again
    (design.md section 3.8: nobody reclaims work that is still being done). Every claim counts
    a delivery, so a healthy request ends up dead-lettered by the live manager holding it.

    Here the second batch waits one 1 s batch, three times min_idle_ms, with max_deliveries=2."""
    model = spec("slow", "slow", max_batch=4, options={"delay_s": 1.0, "record": str(tmp_record)})
    settings = manager_settings(inflight_per_replica=1, janitor_interval_s=0.1, min_idle_ms=300, max_deliveries=2)
    values = [float(v) for v in range(1, 9)]
    async with running_manager(config(model), settings):
        handles = await producer.submit_many("slow", [vec(v) for v in values])
        envelopes = [await producer.outcome(h, timeout_s=30) for h in handles]
        await asyncio.sleep(1.2)  # a duplicate still buffered would run now

    failed = {v: e.code for v, e in zip(values, envelopes, strict=True) if not e.ok}
    assert not failed, f"requests a live manager held failed: {failed}"
    runs = [v for call in read_record(tmp_record) for v in call["firsts"]]
    assert sorted(runs) == values, f"each request was to run once; runs: {sorted(runs)}"


# -- Redis changing under a running manager --------------------------------------------------


@pytest.mark.timeout(60)
async def test_manager_survives_its_stream_being_deleted(
    producer: AsyncProducer, redis_db10: redis.asyncio.Redis,
) -> None:
    """An operator's ``DEL`` (or FLUSHDB) of a request stream: the reader, blocked on it, and
    the janitor, which claims from it, must recreate the group and go on serving."""
    settings = manager_settings(janitor_interval_s=0.1)
    async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), settings) as manager:
        assert (await producer.outcome(await producer.submit("noop", vec(1.0)))).ok
        await redis_db10.delete(keys.requests("noop"))
        await asyncio.sleep(0.5)  # the reader's blocking read returns; a few janitor passes run
        assert manager.failed is None, f"deleting the stream stopped the manager: {manager.failed!r}"
        envelope = await producer.outcome(await producer.submit("noop", vec(2.0)), timeout_s=10)
        assert envelope.ok
        np.testing.assert_array_equal(envelope.out, vec(2.0))


@pytest.mark.timeout(90)
async def test_a_model_served_by_another_manager_is_not_unknown(
    producer: AsyncProducer, tmp_record: Path,
) -> None:
    """Two managers with different model sets on one Redis (design.md section 5: several
    managers agree through Redis): neither answers ``unknown_model`` for the other's model,
    even while that model's backlog waits for its busy replica."""
    slow = spec("slow", "slow", max_batch=4, options={"delay_s": 0.3, "record": str(tmp_record)})
    settings_a = manager_settings(unknown_scan_interval_s=0.1)
    settings_b = manager_settings(unknown_scan_interval_s=0.1, inflight_per_replica=1)
    async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), settings_a), \
            running_manager(config(slow), settings_b):
        # B announces its models from its heartbeat task, after start() returned: requests sent
        # at once can still be answered unknown_model by A (seen once in a loaded full run)
        await asyncio.sleep(0.5)
        handles = await producer.submit_many("slow", [vec(float(i)) for i in range(24)])
        envelopes = [await producer.outcome(h, timeout_s=30) for h in handles]

    codes = [e.code for e in envelopes if not e.ok]
    assert not codes, f"{len(codes)} of {len(envelopes)} requests for a served model failed: {set(codes)}"


@pytest.mark.timeout(60)
async def test_own_pending_entries_keep_their_delivery_count_across_a_restart(
    redis_db10: redis.asyncio.Redis,
) -> None:
    """A manager restarted under its own consumer name (the default: the host name) reads its
    pending entries again. An entry that Redis shows delivered more than max_deliveries times
    (an input that killed the manager each time) is dead-lettered, not run again; the others
    run, and every result states Redis's own delivery count."""
    settings = manager_settings(janitor_interval_s=0.2, max_deliveries=5)
    stream = keys.requests("noop")
    await redis_db10.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    (poison, poison_fields), (healthy, healthy_fields) = entry("noop", vec(1.0)), entry("noop", vec(2.0))
    poison_entry, _ = await xadd_all(redis_db10, "noop", [poison_fields, healthy_fields])
    await redis_db10.xreadgroup(keys.GROUP, settings.consumer, {stream: ">"}, count=2)
    for _ in range(5):  # five earlier lives of this manager read it again and died
        await redis_db10.xreadgroup(keys.GROUP, settings.consumer, {stream: "0"}, count=1)
    rows = await redis_db10.xpending_range(stream, keys.GROUP, "-", "+", 10)
    assert {r["message_id"]: r["times_delivered"] for r in rows}[poison_entry] == 6

    async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), settings):
        dead = await wait_envelope(redis_db10, poison, timeout_s=30)
        ok = await wait_envelope(redis_db10, healthy, timeout_s=30)

    assert dead.code == ErrorCode.DEAD_LETTER, dead
    assert dead.deliveries == 7 and "delivered 7 times" in dead.message  # the restart's read is the 7th
    assert ok.ok and ok.deliveries == 2
    letters = await redis_db10.xrange(keys.dead_letters("noop"))
    assert [(f[b"id"], f[b"code"], f[b"entry"]) for _, f in letters] == [
        (poison.encode(), b"dead_letter", poison_entry)]
    assert await stream_is_drained(redis_db10, "noop") == (0, 0)
