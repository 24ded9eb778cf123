"""A pipeline that stops (an eviction, a shutdown) leaves nothing it has read in its batcher.

The reader's last blocking XREADGROUP may return entries after ``halt()``; the batch loop must
still be there to drain them (served, or refused by the registry and left pending), not have
returned already and left them buffered in a pipeline that nobody runs: there they were
answered only once another manager reclaimed them after ``min_idle_ms`` (30 s by default), and
again, as a duplicate notice, if this manager loaded the model later.

fakeredis for Redis and a fake actor for Ray: no server, no Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import fakeredis
import numpy as np

from nosq.manager.serving.pipeline import ModelPipeline
from nosq.manager.serving.replicas import Replica, ReplicaPool
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys
from nosq.producer.codec import encode_value
from nosq.producer.wire import request_fields
from nosq.workers.datapath import BatchInput, BatchOutput
from nosq.workers.spec import ModelSpec

BLOCK_MS = 400  # the reader's blocking read: long enough to land an entry inside it


class _Echo:
    """``actor.run.remote(batch)``: an awaitable BatchOutput (its inputs back), like a Ray ref."""

    def __init__(self) -> None:
        self.run = self
        self.calls = 0

    def remote(self, batch: BatchInput) -> Coroutine[Any, Any, BatchOutput]:
        self.calls += 1

        async def answer() -> BatchOutput:
            return BatchOutput(batch.buffer, batch.offsets, exec_ms=0.1)

        return answer()


async def test_entries_read_while_halting_are_drained_not_left_buffered() -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    spec = ModelSpec(id="m", factory="nosq.workers.demo:noop", device="cpu", max_batch=8, max_wait_ms=1.0)
    pool = ReplicaPool(spec, inflight_per_replica=1, dispatch_attempts=1)
    actor = _Echo()
    pool.replicas.append(Replica(index=0, actor=actor))
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        return task

    settings = ManagerSettings(consumer="c1", block_ms=BLOCK_MS)
    pipeline = ModelPipeline(spec, client=client, pool=pool, settings=settings, spawn=spawn)
    await pipeline.ensure_group()
    loops = [spawn(pipeline.read_loop(), "read"), spawn(pipeline.batch_loop(), "batch")]
    try:
        await asyncio.sleep(0.1)  # the reader is now inside its blocking XREADGROUP
        halting = asyncio.create_task(pipeline.halt())
        await asyncio.sleep(0.05)  # the batch loop has seen "not reading, nothing buffered"
        rid = "r1"
        payload = encode_value("msgpack", np.ones(4, dtype=np.float32))
        fields: dict[Any, Any] = dict(request_fields(request_id=rid, ct="msgpack", payload=payload))
        await client.xadd(keys.requests("m"), fields)
        await halting
        await asyncio.wait_for(asyncio.gather(*loops), timeout=5)
        await pipeline.halt()  # as Loader.evict does: batches released while stopping end
        assert len(pipeline.batcher) == 0, "an entry read while halting was left in the batcher"
        assert actor.calls == 1
        assert await client.get(keys.result(rid)) is not None
        assert await client.xlen(keys.requests("m")) == 0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
