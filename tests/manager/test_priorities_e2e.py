"""Priorities end to end (issue #8, point 4): a real manager, real Ray, real Redis (db 1).

One slow model with one replica and one batch in flight at a time, so the order in which
batches run is the order the manager chose. Every result names its batch (``batch.id``, a
counter per manager), which gives each request's completion rank without any clock:

* a backlog of low-priority requests, then high-priority ones: the high ones run first;
* a closed loop keeps high-priority requests waiting all the time, and the low ones still all
  complete while it runs (aging: a waiting request climbs a level every second), with high
  ones still being served after the last low one.

``priority_lookahead`` (default 256) lets the manager read past the next batches, so that priorities act
across a backlog in the stream; without it only the few requests it has read are reordered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis
import redis.asyncio

from nosq.producer import RedisSettings
from nosq.producer.aio import AsyncProducer
from nosq.producer.wire import Envelope, decode_envelope
from tests.manager.harness import config, entry, locked_db, manager_settings, running_manager, spec, wait_for, xadd_all
from tests.manager.harness import results as result_envelopes

pytestmark = [pytest.mark.integration, pytest.mark.ray]

REDIS_URL = "redis://127.0.0.1:6379/1"  # db 1: shared with tests/cluster, under the same lock
HIGH, LOW = 0, 2


@pytest.fixture
async def db1() -> AsyncIterator[redis.asyncio.Redis]:
    async with locked_db(1) as client:
        yield client


def batch_rank(envelope: Envelope) -> int:
    """The manager's batch counter: batches run one at a time here, so this is run order."""
    return int(str(envelope.batch["id"]).rsplit(":", 1)[1])


async def all_results(ids: list[str], timeout_s: float) -> dict[str, Envelope]:
    sync = redis.Redis.from_url(REDIS_URL)
    try:  # result keys written by the manager: polled, there is no event to wait on
        await wait_for(lambda: len(result_envelopes(sync, ids)) == len(ids), timeout_s, "every result")
        found = result_envelopes(sync, ids)
    finally:
        sync.close()
    return {rid: decode_envelope("msgpack", data) for rid, data in found.items()}


@pytest.mark.timeout(120)
async def test_high_priority_runs_before_a_backlog_of_low(ray_cluster: None, db1: redis.asyncio.Redis) -> None:
    model = spec("prio", "slow", max_batch=4, options={"delay_s": 0.05})
    settings = manager_settings(redis=RedisSettings(url=REDIS_URL), inflight_per_replica=1)  # the default lookahead
    lows = [entry("prio", [float(i)] * 4, priority=LOW) for i in range(40)]
    highs = [entry("prio", [float(1000 + i)] * 4, priority=HIGH) for i in range(12)]
    async with running_manager(config(model), settings):
        # one MULTI: the low backlog is in the stream ahead of the high requests
        await xadd_all(db1, "prio", [fields for _, fields in lows + highs])
        done = await all_results([rid for rid, _ in lows + highs], 60)
    assert all(env.ok for env in done.values()), {env.code for env in done.values()}
    high_ranks = sorted(batch_rank(done[rid]) for rid, _ in highs)
    low_ranks = sorted(batch_rank(done[rid]) for rid, _ in lows)
    assert high_ranks[-1] < low_ranks[0], f"high ran in batches {high_ranks}, low in {low_ranks}"


@pytest.mark.timeout(120)
async def test_low_priority_completes_while_high_keeps_arriving(ray_cluster: None, db1: redis.asyncio.Redis) -> None:
    model = spec("prio", "slow", max_batch=2, options={"delay_s": 0.05})
    settings = manager_settings(redis=RedisSettings(url=REDIS_URL), inflight_per_replica=1)  # the default lookahead
    high_in_flight = 8  # always this many high requests waiting or running: more than one batch
    stop = asyncio.Event()
    high_done: list[Envelope] = []
    high_after_lows: list[Envelope] = []  # those sent once the low ones were in the stream
    lows_sent = False
    progress = asyncio.Condition()  # notified at each high completion
    rng = np.random.default_rng(0)

    async def high_loop(producer: AsyncProducer) -> None:
        while not stop.is_set():
            handle = await producer.submit("prio", rng.standard_normal(4, dtype=np.float32), priority=HIGH)
            after = lows_sent
            envelope = await producer.outcome(handle, timeout_s=60)
            high_done.append(envelope)
            if after:
                high_after_lows.append(envelope)
            async with progress:
                progress.notify_all()

    async with running_manager(config(model), settings), AsyncProducer(RedisSettings(url=REDIS_URL)) as producer:
        loops = [asyncio.create_task(high_loop(producer)) for _ in range(high_in_flight)]
        try:
            async with progress:  # high traffic is flowing and queueing
                await progress.wait_for(lambda: len(high_done) >= 20)
            low_handles = await producer.submit_many("prio", [np.full(4, -1.0, dtype=np.float32)] * 10,
                                                     priority=LOW)
            lows_sent = True
            async with asyncio.timeout(60):  # starved: they would wait as long as the loop runs
                lows = [await producer.outcome(h, timeout_s=60) for h in low_handles]
            highs_when_lows_done = len(high_done)
            async with progress:  # the loop goes on
                await progress.wait_for(lambda: len(high_done) >= highs_when_lows_done + 2 * high_in_flight)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.gather(*loops)
    assert all(env.ok for env in lows + high_done)
    last_low = max(batch_rank(env) for env in lows)
    first_low = min(batch_rank(env) for env in lows)
    later_highs = [batch_rank(env) for env in high_after_lows]
    # high first: many high requests sent after the low ones ran before them ...
    assert sum(1 for rank in later_highs if rank < first_low) >= high_in_flight, (first_low, later_highs)
    # ... and the low ones did not wait for the high traffic to end (the loop ran on after them)
    assert sum(1 for rank in later_highs if rank > last_low) >= high_in_flight, (last_low, later_highs)
