"""A model whose requests spread over several streams (``partitions = N``) on a real Redis, a
real manager and real Ray actors: producers follow the tags the manager publishes, the manager
reads every partition into one batcher, its janitor reclaims and dead-letters per partition,
and streams of a partition count that was lowered are drained, not forgotten.

(The same on a Redis Cluster, where the partitions land on different masters:
``tests/rediscluster``.)"""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
import redis.asyncio

from nosq.producer import AsyncProducer, Producer, keys
from nosq.producer.wire import ErrorCode
from tests.manager.harness import (
    config,
    entry,
    manager_settings,
    redis_settings,
    running_manager,
    spec,
    wait_envelope,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]
NOOP = "nosq.workers.demo:noop"


async def _added(client: redis.asyncio.Redis, tag: str) -> int:
    """Entries ever added to a partition's stream (answered entries are deleted)."""
    info = await client.xinfo_stream(keys.requests(tag))
    return int(info["entries-added"])


async def _drained(client: redis.asyncio.Redis, tags: list[str]) -> bool:
    for tag in tags:
        stream = keys.requests(tag)
        if await client.xlen(stream) or (await client.xpending(stream, keys.GROUP))["pending"]:
            return False
    return True


@pytest.mark.timeout(180)
async def test_partitioned_model_is_served_from_every_partition_once(redis_db10: redis.asyncio.Redis) -> None:
    tags = keys.partition_tags("hot", 3)
    # before the manager starts: a dead consumer's unanswered read in partition 2, and an entry
    # without a usable id in partition 1 (nobody to answer: dead-lettered, acked in its stream)
    ghost_id, ghost_fields = entry("hot", np.full(4, -1.0, dtype=np.float32))
    ghost_stream = keys.requests(tags[2])
    await redis_db10.xgroup_create(ghost_stream, keys.GROUP, id="0", mkstream=True)
    await redis_db10.xadd(ghost_stream, ghost_fields)  # type: ignore[arg-type]
    assert len((await redis_db10.xreadgroup(keys.GROUP, "ghost", {ghost_stream: ">"}))[0][1]) == 1
    await redis_db10.xgroup_create(keys.requests(tags[1]), keys.GROUP, id="0", mkstream=True)
    await redis_db10.xadd(keys.requests(tags[1]), {"v": "1", "p": b"junk"})

    settings = manager_settings(janitor_interval_s=0.2, min_idle_ms=500)
    hot = spec("hot", NOOP, partitions=3, max_backlog=3000, max_batch=32)
    async with running_manager(config(hot), settings):
        admission = await redis_db10.hgetall(keys.admission("hot"))  # type: ignore[misc]
        assert admission[b"partitions"] == b"3" and admission[b"tags"] == " ".join(tags).encode()
        for tag in tags:  # the backlog limit split evenly over the partitions
            assert await redis_db10.hget(keys.admission(tag), "max_backlog") == b"1000"  # type: ignore[misc]
        async with AsyncProducer(redis_settings(), default_timeout_s=60) as producer:
            inputs = [np.full(4, float(i), dtype=np.float32) for i in range(600)]
            handles = await producer.submit_many("hot", inputs[:300])
            handles += await asyncio.gather(*(producer.submit("hot", x) for x in inputs[300:]))
            outs = await producer.gather(handles)
        with Producer(redis_settings()) as sync_producer:  # in a thread: the manager runs on this loop
            sync_handles = await asyncio.to_thread(sync_producer.submit_many, "hot", inputs[:90])
            sync_outs = await asyncio.to_thread(sync_producer.gather, sync_handles, 60)
        ghost = await wait_envelope(redis_db10, ghost_id)
        await wait_for(lambda: _drained(redis_db10, tags), 20, "every partition answered and acked")
        dead = await redis_db10.xrange(keys.dead_letters("hot"))
    assert [float(out[0]) for out in outs] == [float(i) for i in range(600)]
    assert [float(out[0]) for out in sync_outs] == [float(i) for i in range(90)]
    assert ghost.ok and ghost.deliveries == 2 and float(np.asarray(ghost.out)[0]) == -1.0  # reclaimed
    assert len(dead) == 1 and dead[0][1][b"code"] == str(ErrorCode.BAD_REQUEST).encode()
    # every request on the partition its id hashes to, and each partition got its share
    wanted = Counter(tags[keys.partition_of(h.id, 3)] for h in [*handles, *sync_handles])
    wanted[tags[2]] += 1  # the ghost's entry
    wanted[tags[1]] += 1  # the entry without an id
    assert {tag: await _added(redis_db10, tag) for tag in tags} == dict(wanted)
    assert min(wanted.values()) > 150


@pytest.mark.timeout(120)
async def test_streams_of_a_lowered_partition_count_are_drained(redis_db10: redis.asyncio.Redis) -> None:
    """Entries left in partition 2 of a model now configured with one stream (or written there by
    a client that read the tags before the change) are still answered."""
    old_tags = keys.partition_tags("cooled", 3)
    ids = []
    for i in range(20):
        rid, fields = entry("cooled", np.full(4, float(i), dtype=np.float32))
        await redis_db10.xadd(keys.requests(old_tags[1 + i % 2]), fields)  # type: ignore[arg-type]
        ids.append(rid)
    async with running_manager(config(spec("cooled", NOOP)), manager_settings()):
        envelopes = [await wait_envelope(redis_db10, rid) for rid in ids]
        assert await redis_db10.hget(keys.admission("cooled"), "tags") is None  # type: ignore[misc]
        await wait_for(lambda: _drained(redis_db10, old_tags), 20, "the old partitions drained")
    assert [float(np.asarray(e.out)[0]) for e in envelopes] == [float(i) for i in range(20)]
