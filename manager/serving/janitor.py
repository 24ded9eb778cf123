"""Crash safety: reclaim entries of dead consumers, keep long batches claimed, dead-letter poison.

Every few seconds, per model: ``XAUTOCLAIM`` entries idle past ``min_idle_ms`` (they belong to
a manager that died, or to this one before a restart); entries delivered more than
``max_deliveries`` times go to the dead-letter stream with a ``dead_letter`` result; batches
running longer than half of ``min_idle_ms`` have their entries' idle time reset
(``XCLAIM ... JUSTID``) so nobody reclaims work that is still being done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio

from nosq.manager.serving.pipeline import ModelPipeline, Phase
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys

__all__ = ["Janitor"]

log = logging.getLogger(__name__)
CLAIM_COUNT = 256


class Janitor:
    """Runs the periodic recovery passes for every model this manager serves."""

    def __init__(self, client: redis.asyncio.Redis, settings: ManagerSettings,
                 pipelines: dict[str, ModelPipeline]) -> None:
        self._redis = client
        self._settings = settings
        self._pipelines = pipelines
        self.reclaimed = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for pipeline in list(self._pipelines.values()):
                if pipeline.phase is Phase.READING:  # not while recovery re-reads its own entries
                    try:
                        await self.refresh(pipeline)
                        await self.reclaim(pipeline)
                    except redis.ResponseError as exc:
                        if "NOGROUP" not in str(exc):
                            raise
                        await pipeline.ensure_group()  # the stream was deleted: nothing to reclaim
            try:
                async with asyncio.timeout(self._settings.janitor_interval_s):
                    await stop.wait()
            except TimeoutError:
                pass

    async def reclaim(self, pipeline: ModelPipeline) -> int:
        """Take over entries idle past ``min_idle_ms`` in every partition's stream; returns how
        many were taken."""
        taken = 0
        for partition in range(len(pipeline.streams)):
            taken += await self._reclaim(pipeline, partition)
        if taken:
            self.reclaimed += taken
            pipeline.metrics.reclaimed.labels(pipeline.spec.id).inc(taken)
            log.warning("model %s: reclaimed %d idle entries", pipeline.spec.id, taken)
        return taken

    async def _reclaim(self, pipeline: ModelPipeline, partition: int) -> int:
        settings = self._settings
        stream = pipeline.streams[partition]
        start = "0-0"
        taken = 0
        while True:
            room = pipeline.prefetch_limit - len(pipeline.batcher)
            if room <= 0:
                break
            response: Any = await self._redis.xautoclaim(
                stream, keys.GROUP, settings.consumer, settings.min_idle_ms,
                start_id=start, count=min(room, CLAIM_COUNT),
            )
            start = response[0].decode() if isinstance(response[0], bytes) else response[0]
            entries = [(eid, fields) for eid, fields in response[1] if eid is not None]
            deleted = response[2] if len(response) > 2 else []
            if deleted:
                await self._redis.xack(stream, keys.GROUP, *deleted)
            if entries:
                taken += len(entries)
                await pipeline.admit_redelivered(entries, partition)
            if start == "0-0" or not entries:
                break
        return taken

    async def refresh(self, pipeline: ModelPipeline) -> None:
        """Reset the idle time of entries held for a while, buffered or running (XCLAIM JUSTID)."""
        held: dict[int, list[Any]] = {}
        for partition, entry_id in pipeline.held_entries(self._settings.min_idle_ms // 4):
            held.setdefault(partition, []).append(entry_id)
        for partition, ids in held.items():
            await self._redis.xclaim(pipeline.streams[partition], keys.GROUP, self._settings.consumer, 0, ids,
                                     justid=True)
