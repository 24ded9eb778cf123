"""A pipeline that stops (an eviction, a shutdown) leaves nothing it has read in its batcher.

The reader's last blocking XREADGROUP may return entries after ``halt()``; the batch loop must
still be there to drain them (served, or refused by the registry and left pending), not have
returned already and left them buffered in a pipeline that nobody runs: there they were
answered only once another manager reclaimed them after ``min_idle_ms`` (30 s by default), and
again, as a duplicate notice, if this manager loaded the model later.

The interleaving is forced, not timed: the reader's blocking read is held open until the test
lets it return; the test waits until the batch loop has seen the pipeline draining with nothing
buffered (or has ended, the bug), only then adds the entry and lets the read return it.

fakeredis for Redis and a fake actor for Ray: no server, no Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import fakeredis
import numpy as np
import pytest

from nosq.manager.serving import pipeline as pipeline_module
from nosq.manager.serving.pipeline import ModelPipeline, Phase
from nosq.manager.serving.replicas import Replica, ReplicaPool
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys
from nosq.producer.codec import encode_value
from nosq.producer.wire import request_fields
from nosq.workers.datapath import BatchInput, BatchOutput
from nosq.workers.spec import ModelSpec


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


async def test_entries_read_while_halting_are_drained_not_left_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
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

    in_blocking_read, let_read_return = asyncio.Event(), asyncio.Event()
    real_read_group = pipeline_module.read_group

    async def held_read_group(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("start", ">") == ">" and kwargs.get("block_ms"):  # a blocking read of new entries
            in_blocking_read.set()
            await let_read_return.wait()  # whatever was added meanwhile, this read returns
            kwargs["block_ms"] = None
        return await real_read_group(*args, **kwargs)

    saw_draining_empty = asyncio.Event()
    real_wait = pipeline_module._wait

    async def watched_wait(event: asyncio.Event, timeout_s: float | None) -> None:
        if pipeline.phase is Phase.DRAINING and not len(pipeline.batcher):
            saw_draining_empty.set()  # the batch loop looked: draining, nothing buffered
        await real_wait(event, timeout_s)

    monkeypatch.setattr(pipeline_module, "read_group", held_read_group)
    monkeypatch.setattr(pipeline_module, "_wait", watched_wait)
    settings = ManagerSettings(consumer="c1", block_ms=5000)
    pipeline = ModelPipeline(spec, client=client, pool=pool, settings=settings, spawn=spawn)
    await pipeline.ensure_group()
    reader, batcher = spawn(pipeline.read_loop(), "read"), spawn(pipeline.batch_loop(), "batch")
    try:
        await asyncio.wait_for(in_blocking_read.wait(), 5)  # the reader is inside its blocking XREADGROUP
        await pipeline.halt()
        looked = asyncio.ensure_future(saw_draining_empty.wait())
        await asyncio.wait({looked, batcher}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        looked.cancel()
        assert saw_draining_empty.is_set() or batcher.done()  # one of the two, never a timeout
        rid = "r1"
        payload = encode_value("msgpack", np.ones(4, dtype=np.float32))
        fields: dict[Any, Any] = dict(request_fields(request_id=rid, ct="msgpack", payload=payload))
        await client.xadd(keys.requests("m"), fields)
        let_read_return.set()
        await asyncio.wait_for(asyncio.gather(reader, batcher), timeout=5)
        await pipeline.halt()  # as Loader.evict does: batches released while stopping end
        assert saw_draining_empty.is_set(), "the batch loop ended while the reader could still admit entries"
        assert len(pipeline.batcher) == 0, "an entry read while halting was left in the batcher"
        assert actor.calls == 1
        assert await client.get(keys.result(rid)) is not None
        assert await client.xlen(keys.requests("m")) == 0
    finally:
        let_read_return.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
