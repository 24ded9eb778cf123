"""One model's path through the manager: read → admit → batch → dispatch → write.

Three kinds of task per model: the reader (XREADGROUP, bounded prefetch), the batcher (forms
and releases batches), and one task per batch in flight (runs it on a replica, writes its
results, acks its entries). Nothing here sleeps to poll: waits are on events with timeouts.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio
from ray.exceptions import RayError

from nosq.manager.memory.registry import Registry
from nosq.manager.ops.metrics import Metrics
from nosq.manager.profiles.store import latency_model
from nosq.manager.runtime.redislink import RedisLink, retrying
from nosq.manager.serving.batcher import Batcher, LatencyModel, LengthBuckets, Reason
from nosq.manager.serving.replicas import Replica, ReplicaPool
from nosq.manager.serving.results import BatchInfo, Finished, ResultWriter, Successes, error
from nosq.manager.serving.traffic import RollingStats
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys
from nosq.producer.resp import Commands, read_group
from nosq.producer.wire import BadEntry, ErrorCode, Request, clip, now_ms, parse_request
from nosq.workers.channel import ChannelError
from nosq.workers.profiles.curve import Profile
from nosq.workers.spec import ModelSpec

__all__ = ["ModelPipeline", "Phase"]

log = logging.getLogger(__name__)
_batch_ids = itertools.count(1)
# bytes one XREADGROUP should bring back at most: a read of hundreds of 512 KiB entries in one
# reply stalls the event loop (and every other model's pipeline) while it is parsed
READ_BYTES = 8 * 1024 * 1024


class Phase(enum.Enum):
    """A pipeline's lifecycle: ``RECOVERING → READING → DRAINING``, ``HELD`` until loaded here;
    ``resume`` starts again at ``RECOVERING`` after a (re)load."""

    HELD = "held"  # not read: the model is not loaded here (yet); its entries wait in the stream
    RECOVERING = "recovering"  # the read loop first re-reads this consumer's own pending entries
    READING = "reading"  # reading new entries; the janitor reclaims for it only now
    DRAINING = "draining"  # stopped reading: what was read is released, then the loops end


class ModelPipeline:
    """Serves one model's stream with one pool of replicas."""

    def __init__(self, spec: ModelSpec, *, client: redis.asyncio.Redis, pool: ReplicaPool,
                 settings: ManagerSettings, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
                 latency: LatencyModel | None = None, metrics: Metrics | None = None,
                 registry: Registry | None = None, link: RedisLink | None = None) -> None:
        self.spec = spec
        # one stream per partition (``keys.partition_tags``), more when an earlier configuration
        # had more partitions (``find_leftovers``); read by one reader each into one batcher
        self.tags = keys.partition_tags(spec.id, spec.partitions)
        self.streams = [keys.requests(tag) for tag in self.tags]
        self._leftovers_checked = False
        self._redis = client
        self._pool = pool
        self._settings = settings
        self._spawn = spawn
        self.link = link or RedisLink(client.ping)
        buckets = None if spec.bucketing is None else LengthBuckets(
            spec.bucketing.edges, token_budget=spec.bucketing.token_budget,
            bytes_per_token=spec.bucketing.bytes_per_token)
        self.batcher = Batcher(cap=spec.max_batch, max_wait_ms=spec.max_wait_ms, latency=latency or LatencyModel(),
                               max_bytes=settings.max_batch_bytes, buckets=buckets)
        self.writer = ResultWriter(client, model=spec.id, consumer=settings.consumer,
                                   reply_maxlen=settings.reply_maxlen, link=self.link,
                                   reply_inline_bytes=settings.reply_inline_bytes, streams=self.streams)
        self.metrics = metrics or Metrics()
        self.stats = RollingStats()
        self._wake = asyncio.Event()  # work arrived or a batch finished
        self._room = asyncio.Event()  # the batcher made room for prefetch
        self._inflight_items = 0
        self._batches: dict[str, tuple[int, list[Request]]] = {}  # batch id -> (started ms, requests)
        self._phase = Phase.RECOVERING
        self._reader_running = False  # the batch loop outlives the read loop: it drains what that read last
        self.served = 0
        # with a registry (a memory budget): each batch is counted in flight there, and refused
        # while the model is draining; its entries then stay pending, re-read on the next load
        self.registry = registry
        self.refused = 0
        self.dead_lettered = 0  # entries moved to the dead-letter stream for too many deliveries
        self._running: set[asyncio.Task[None]] = set()  # batch tasks of this model
        self._entry_bytes = 0.0  # recent mean payload size (moving average): bounds a read in bytes

    def apply_profile(self, profile: Profile | None) -> None:
        """Serve with a measured profile: b* (never above max_batch) as the cap, its latency curve."""
        if profile is None:
            return
        self.batcher.latency = latency_model(profile)
        self.batcher.cap = max(1, min(profile.best_batch, self.spec.max_batch))

    @property
    def phase(self) -> Phase:
        """Where this pipeline is in its life; changed only by its own methods."""
        return self._phase

    @property
    def _reading(self) -> bool:
        return self._phase in (Phase.RECOVERING, Phase.READING)

    def wake(self) -> None:
        """Make the batch loop look again (new work, a free slot, or shutdown)."""
        self._wake.set()
        self._room.set()

    @property
    def prefetch_limit(self) -> int:
        """Read only what can be dispatched soon: the batches all slots can hold, plus one, plus
        ``priority_lookahead`` (priorities reorder only what has been read)."""
        slots = max(1, len(self._pool.replicas)) * self._settings.inflight_per_replica
        return self.spec.max_batch * (slots + 1) + self._settings.priority_lookahead

    def held_entries(self, older_than_ms: int = 0) -> list[tuple[int, str]]:
        """(partition, entry id) of the entries this manager holds (buffered or running) read more
        than ``older_than_ms`` ago: the janitor keeps them claimed, so nobody (this manager
        included) reclaims live work."""
        cutoff = now_ms() - older_than_ms
        held = [(r.partition, r.entry_id) for r in self.batcher.pending() if r.read_ms <= cutoff]
        held.extend((r.partition, r.entry_id) for _, batch in self._batches.values() for r in batch
                    if r.read_ms <= cutoff)
        return held

    # -- reading ----------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        for stream in self.streams:
            try:
                await self._redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def find_leftovers(self) -> None:
        """Add the streams of partitions an earlier configuration had and this one has not
        (``partitions`` lowered): producers no longer write them, this manager drains them."""
        if self._leftovers_checked:  # once: a SCAN walks the whole keyspace
            return
        self._leftovers_checked = True
        pattern = keys.requests(f"{self.spec.id}{keys.PARTITION_MARK}*")
        async for key in self._redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
            stream = key.decode() if isinstance(key, bytes) else str(key)
            if stream not in self.streams:
                self.streams.append(stream)  # read, never published: ``tags`` are what producers use
                log.warning("model %s: draining %s, a partition of an earlier configuration", self.spec.id, stream)

    async def read_loop(self) -> None:
        """Own pending entries first (a restart after a crash), then new ones."""
        self._reader_running = True
        try:
            await self._read()
        finally:
            self._reader_running = False
            self._wake.set()  # the batch loop may end now, once it has drained what was read

    async def _read(self) -> None:
        await self.find_leftovers()
        await self.ensure_group()
        partitions = range(len(self.streams))
        for partition in partitions:
            await self._recover_own_pending(partition)
        if self._phase is Phase.RECOVERING:  # not if halted meanwhile
            self._phase = Phase.READING
        if len(self.streams) == 1:
            await self._read_stream(0)
            return
        # one reader a partition; the first to fail stops the others and its error is raised as
        # it is (not in an ExceptionGroup: the caller retries Redis errors by their type)
        readers = [asyncio.create_task(self._read_stream(p), name=f"read-{self.streams[p]}") for p in partitions]
        try:
            done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        for reader in done:
            if not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]

    async def _read_stream(self, partition: int) -> None:
        """Read one partition's stream while reading; each of ``n`` readers takes its share of
        the room for prefetch."""
        consumer = self._settings.consumer
        stream = self.streams[partition]
        readers = len(self.streams)
        while self._reading:
            room = self.prefetch_limit - len(self.batcher) - self._inflight_items
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                entries = await read_group(self._redis, group=keys.GROUP, consumer=consumer, stream=stream,
                                           count=self._read_count(-(-room // readers)),
                                           block_ms=self._settings.block_ms)
            except redis.ResponseError as exc:
                if not _stream_gone(exc):
                    raise
                await self.ensure_group()  # the stream was deleted under us: start it again
                continue
            if entries:  # admitted even if reading just stopped: the drain serves them
                await self.admit(entries, deliveries=1, partition=partition)

    async def _recover_own_pending(self, partition: int) -> None:
        last = "0"
        consumer = self._settings.consumer
        recovered = 0
        while True:
            entries = await read_group(self._redis, group=keys.GROUP, consumer=consumer,
                                       stream=self.streams[partition], count=1000, start=last)
            if not entries:
                break
            last = entries[-1][0].decode()
            recovered += len(entries)
            await self.admit_redelivered(entries, partition)
        if recovered:
            log.info("model %s: recovered %d pending entries of consumer %s from %s", self.spec.id, recovered,
                     consumer, self.streams[partition])

    async def admit_redelivered(self, entries: list[tuple[bytes, dict[bytes, bytes]]], partition: int = 0) -> None:
        """Admit entries read again (this consumer's own pending ones after a restart, or claimed
        from another consumer), each with the delivery count Redis keeps for it; an entry
        delivered more than ``max_deliveries`` times goes to the dead-letter stream with a
        ``dead_letter`` result instead of running again (an input that kills its manager every
        time must not crash-loop it)."""
        held = set(self.held_entries())  # ours already: read again by a reconnect, never admitted twice
        entries = [(eid, fields) for eid, fields in entries if (partition, eid.decode()) not in held]
        if not entries:
            return
        counts = await self._delivery_counts([eid for eid, _ in entries], len(held), partition)
        fresh: dict[int, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        poison: list[tuple[bytes, dict[bytes, bytes], int]] = []
        for entry_id, fields in entries:
            count = counts.get(entry_id, 2)  # not pending any more (acked meanwhile): at least 2
            if count > self._settings.max_deliveries and fields:
                poison.append((entry_id, fields, count))
            else:
                fresh.setdefault(count, []).append((entry_id, fields))
        for count, group in fresh.items():
            await self.admit(group, deliveries=count, partition=partition)
        if poison:
            await self._dead_letter_poison(poison, partition)

    async def _delivery_counts(self, ids: list[bytes], held: int, partition: int) -> dict[bytes, int]:
        """Redis's delivery count of each of ``ids`` (pending for this consumer)."""
        rows: Any = await self._redis.xpending_range(
            self.streams[partition], keys.GROUP, min=ids[0], max=ids[-1], count=len(ids) + held + 16,
            consumername=self._settings.consumer,
        )
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    async def _dead_letter_poison(self, poison: list[tuple[bytes, dict[bytes, bytes], int]], partition: int) -> None:
        """Answer ``dead_letter`` (result first: an entry is acked only once its answer is written),
        then move the entries to the dead-letter stream."""
        model, limit = self.spec.id, self._settings.max_deliveries
        finished = []
        for entry_id, fields, count in poison:
            try:
                request = parse_request(entry_id, fields)
            except BadEntry:
                continue  # the dead-letter stream keeps it; there is nobody to answer
            request.deliveries = count
            request.partition = partition
            finished.append(error(model, request, ErrorCode.DEAD_LETTER,
                                  f"delivered {count} times without completing (limit {limit}); "
                                  f"moved to {keys.dead_letters(model)}"))
        if finished:
            await self.writer.write(finished)
        await self.writer.dead_letter([(eid, fields, f"delivered {count} times") for eid, fields, count in poison],
                                      ErrorCode.DEAD_LETTER, partition)
        self.metrics.dead_letters.labels(model).inc(len(poison))
        self.dead_lettered += len(poison)

    def _read_count(self, room: int) -> int:
        """How many entries to ask for: ``room``, fewer when recent entries were large."""
        if self._entry_bytes <= 0:
            return room
        return max(1, min(room, int(READ_BYTES // self._entry_bytes)))

    async def admit(self, entries: list[tuple[bytes, dict[bytes, bytes]]], *, deliveries: int,
                    partition: int = 0) -> None:
        """Parse entries of one partition's stream: good ones go to the batcher, bad ones get
        their error result now."""
        if deliveries > 1:  # re-read (recovery after a reconnect, a reclaim): skip what is held already
            held = set(self.held_entries())
            entries = [(eid, fields) for eid, fields in entries if (partition, eid.decode()) not in held]
        now = now_ms()
        finished: list[Finished] = []
        dead: list[tuple[bytes, dict[bytes, bytes], str]] = []
        model = self.spec.id
        for entry_id, fields in entries:
            if not fields:  # deleted while pending: nothing to serve
                dead.append((entry_id, {}, ""))
                continue
            try:
                request = parse_request(entry_id, fields)
            except BadEntry as exc:
                if exc.request_id is None:
                    dead.append((entry_id, fields, str(exc)))
                    continue
                request = Request(id=exc.request_id, ct=exc.ct, payload=b"", reply=exc.reply,
                                  ttl_s=exc.ttl_s, entry_id=entry_id.decode(), read_ms=now, partition=partition)
                finished.append(error(model, request, exc.code, str(exc)))
                continue
            request.read_ms = now
            request.deliveries = deliveries
            request.partition = partition
            self._entry_bytes += 0.1 * (len(request.payload) - self._entry_bytes)
            limit = min(self._settings.max_payload_bytes, self._settings.max_batch_bytes)
            if request.method is not None and request.method not in self.spec.methods:
                finished.append(error(model, request, ErrorCode.UNKNOWN_METHOD,
                                      f"model {model!r} has no method {clip(request.method)}; "
                                      f"allowed: {', '.join(self.spec.methods)}"))
            elif len(request.payload) > limit:
                finished.append(error(model, request, ErrorCode.TOO_LARGE,
                                      f"payload of {len(request.payload)} bytes is over the limit of {limit} bytes "
                                      "(max_payload_bytes / max_batch_bytes): send smaller inputs"))
            elif self.batcher.hopeless(request, now):
                finished.append(error(model, request, ErrorCode.DEADLINE_EXCEEDED,
                                      _deadline_message(request, now, self.batcher.latency.predict(1))))
            else:
                self.batcher.add(request)
        if dead:
            await self.writer.dead_letter(dead, ErrorCode.BAD_REQUEST, partition)
        if finished:
            await self.writer.write(finished)
            self._answered_alone(finished)
            for item in finished:
                log.info("model %s request %s: answered %s before batching", model, item.request.id, item.code)
        self._wake.set()

    # -- batching ---------------------------------------------------------------------------

    async def batch_loop(self) -> None:
        """Release batches whenever a slot is free and the batcher says go; once reading has
        stopped, until the read loop has ended and everything it read is released."""
        pool = self._pool
        while True:
            if not self._reading and not self._reader_running and not len(self.batcher):
                return
            now = now_ms()
            expired, expiry_ms = self.batcher.expire(now)
            if expired:  # answered now, even while every replica is busy
                self._room.set()
                self._spawn(self._answer_expired(expired, now), f"expired-{self.spec.id}")
            replica = pool.free()
            reason, wait_ms = None, expiry_ms
            if replica is not None:
                reason, decide_ms = self.batcher.decide(now, idle_replica=pool.idle(),
                                                      draining=self._phase is Phase.DRAINING)
                wait_ms = min(wait_ms, decide_ms)
            if replica is None or reason is None:
                self._wake.clear()  # no await since the decision: nothing can have been missed
                await _wait(self._wake, None if wait_ms == float("inf") else wait_ms / 1000)
                continue
            requests = self.batcher.take(now)
            self._room.set()
            self._inflight_items += len(requests)
            batch_id = f"{self._settings.consumer}:{next(_batch_ids)}"
            self._batches[batch_id] = (now_ms(), requests)
            replica.inflight += 1  # the slot is held until _execute ends
            task = self._spawn(self._execute(batch_id, requests, reason, replica), f"batch-{batch_id}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def hold(self) -> None:
        """Do not read (the model is not loaded here): its entries wait in the stream."""
        self._phase = Phase.HELD

    def resume(self) -> None:
        """Serve again after a (re)load: the caller spawns ``read_loop`` and ``batch_loop``."""
        self._phase = Phase.RECOVERING  # the read loop re-reads this consumer's pending entries first

    def drain(self) -> None:
        """Stop reading; the batch loop releases what was read, then ends."""
        self._phase = Phase.DRAINING
        self.wake()

    async def halt(self) -> None:
        """Drain and wait until the batches already taken have ended (the caller waits for its
        ``read_loop``/``batch_loop`` tasks too)."""
        self.drain()
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def _answer_expired(self, requests: list[Request], now: int) -> None:
        predicted = self.batcher.latency.predict(1)
        finished = [error(self.spec.id, r, ErrorCode.DEADLINE_EXCEEDED, _deadline_message(r, now, predicted))
                    for r in requests]
        await self.writer.write(finished)
        self._answered_alone(finished)

    def _answered_alone(self, finished: list[Finished]) -> None:
        """Count error answers given without running (before batching, or expired while waiting)."""
        self.served += len(finished)
        self.metrics.answered(self.spec.id, 0, (f.code for f in finished if f.code))
        done = now_ms()
        self.stats.answered([done - (f.request.enqueued_ms or f.request.read_ms or done) for f in finished],
                            len(finished))

    async def _execute(self, batch_id: str, requests: list[Request], reason: Reason, replica: Replica) -> None:
        counted = False
        try:
            if self.registry is not None:
                counted = await self.registry.inflight(self.spec.id, +1)
                if not counted:  # draining (being evicted): leave the entries pending, unanswered
                    self.refused += len(requests)
                    log.info("model %s: batch %s of %d not dispatched: the model is draining; its entries "
                             "stay pending", self.spec.id, batch_id, len(requests))
                    return
            finished = await self._run(batch_id, requests, reason, replica)
            await asyncio.shield(self.writer.write(finished))
            self.served += len(finished)
            errors = [f.code for f in finished if f.code]
            self.metrics.answered(self.spec.id, len(finished) - len(errors), errors)
            if errors and log.isEnabledFor(logging.INFO):
                for item in finished:
                    if item.code:
                        log.info("model %s request %s: answered %s (batch %s)", self.spec.id, item.request.id,
                                 item.code, batch_id)
            done = now_ms()
            self.stats.answered([done - (f.request.enqueued_ms or f.request.read_ms) for f in finished], len(errors))
        finally:
            try:
                if counted and self.registry is not None:
                    await asyncio.shield(asyncio.gather(self.registry.inflight(self.spec.id, -1),
                                                        self.registry.touch(self.spec.id, len(requests))))
            finally:
                replica.inflight -= 1
                self._inflight_items -= len(requests)
                self._batches.pop(batch_id, None)
                self._room.set()
                self._wake.set()

    async def _run(self, batch_id: str, requests: list[Request], reason: Reason, replica: Replica) -> list[Finished]:
        model = self.spec.id
        finished, runnable = await self._drop_before_run(requests)
        if not runnable:
            return finished
        info_ms = now_ms()
        method = runnable[0].method or self.spec.methods[0]
        ct = runnable[0].ct
        cts: str | list[str] = ct if all(r.ct == ct for r in runnable) else [r.ct for r in runnable]
        try:
            async with self._pool.dispatch(replica, method, cts, [r.payload for r in runnable]) as output:
                if len(output) != len(runnable):
                    message = f"worker returned {len(output)} results for a batch of {len(runnable)}"
                    return finished + [error(model, r, ErrorCode.OUTPUT_MISMATCH, message) for r in runnable]
                bucket = self.batcher.bucket_of(runnable)  # batch provenance: length bucket, the model's own
                info = BatchInfo(id=batch_id, size=len(runnable), reason=str(reason), dispatched_ms=info_ms,
                                 exec_ms=output.exec_ms,
                                 extra=output.provenance if bucket is None else {"bucket": bucket, **output.provenance})
                failures, not_run = output.failures, output.not_run
                successes = Successes(model, info)
                for index, request in enumerate(runnable):  # envelopes copy the outputs out of the slot
                    failure = failures.get(index)
                    if failure is None:
                        finished.append(successes.envelope(request, output.out(index)))
                    else:  # an input that did not decode never ran: no batch in its envelope (protocol §5)
                        finished.append(error(model, request, failure[0], failure[1],
                                              None if index in not_run else info))
        except (RayError, TimeoutError, ChannelError) as exc:  # the worker cannot run at all: answer
            log.error("model %s: batch %s of %d failed in its worker: %s", model, batch_id, len(runnable), exc)
            message = f"the model's worker failed: {type(exc).__name__}: {str(exc)[:500]}"
            return finished + [error(model, r, ErrorCode.INTERNAL, message) for r in runnable]
        self.batcher.latency.observe(len(runnable), output.exec_ms)
        self.stats.batch(len(runnable))
        self.metrics.batch(model, size=len(runnable), reason=str(reason), exec_ms=output.exec_ms,
                           waits_ms=(info_ms - (r.enqueued_ms or r.read_ms) for r in runnable))
        return finished

    async def _drop_before_run(self, requests: list[Request]) -> tuple[list[Finished], list[Request]]:
        """Answer cancelled, expired and already-answered requests without running them."""
        commands = Commands()
        commands.mget([keys.cancel(r.id).encode() for r in requests] + [keys.result(r.id).encode() for r in requests])
        (found,) = await retrying(lambda: commands.send(self._redis), f"checking batch of model {self.spec.id}",
                                  self.link)
        if isinstance(found, redis.ResponseError):
            raise found
        cancelled, existing = found[: len(requests)], found[len(requests):]
        now = now_ms()
        model = self.spec.id
        finished: list[Finished] = []
        runnable: list[Request] = []
        for request, flag, previous in zip(requests, cancelled, existing, strict=True):
            if previous is not None:  # same id already answered: idempotent, no second run
                finished.append(Finished(request, previous))
            elif flag is not None:
                finished.append(error(model, request, ErrorCode.CANCELLED, "cancelled by the client before it ran"))
            elif request.deadline_ms is not None and now > request.deadline_ms:
                finished.append(error(model, request, ErrorCode.DEADLINE_EXCEEDED,
                                      _deadline_message(request, now, 0.0)))
            else:
                runnable.append(request)
        return finished, runnable


def _stream_gone(exc: redis.ResponseError) -> bool:
    """The stream or its group was deleted (a blocked read is woken with UNBLOCKED)."""
    text = str(exc)
    return "NOGROUP" in text or "UNBLOCKED" in text


def _deadline_message(request: Request, now: int, predicted_ms: float) -> str:
    assert request.deadline_ms is not None
    late = now - request.deadline_ms
    if late >= 0:
        return f"deadline passed {late} ms before the request could run"
    return (f"deadline in {-late} ms cannot be met: running it alone is predicted to take "
            f"{predicted_ms:.1f} ms")


async def _wait(event: asyncio.Event, timeout_s: float | None) -> None:
    """Until ``event`` is set or the timeout passes."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass
