"""The asyncio producer: submits coalesced per event-loop turn, one reply stream and one reader
task resolve every wait.

Hot path, for N concurrent ``infer`` calls from one process:

* **Coalescing.** A submit only queues its requests (id, payload, own deadline) by model and
  shared options; the first one in an event-loop turn schedules a flush, which sends all of
  them in one ``EVALSHA`` of :data:`~nosq.producer.enqueue.ENQUEUE_BATCH_LUA` per model (several
  models or chunks: one pipeline). The script answers how many it accepted, in order; every
  caller learns its own outcome (``QueueFull`` for a refused one only).
* **One future per wait**, resolved directly by the reader; timeouts are one timer per 10 ms
  slot (not one ``wait_for`` + ``shield`` per wait). ``infer`` does not wait for the enqueue
  acknowledgement at all: a refusal or an error is set on the same future it waits on.
* **Reads** of the reply stream carry the previous read's ``XTRIM`` and the ``MGET`` of the
  id-only notices in the same round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Final

import redis.asyncio

from nosq.producer import keys
from nosq.producer.enqueue import (
    ENQUEUE_BATCH_LUA,
    REPLY_BLOCK_MS,
    REPLY_COUNT,
    SAFETY_CHECK_AFTER_S,
    Call,
    Handle,
    Head,
    Partitions,
    Refusal,
    Shaper,
    TensorType,
    call_outcome,
    is_noscript,
    new_client_id,
    next_entry_id,
    output_of,
    planned_commands,
    queue_full,
    raise_reply_error,
    raw_reply,
    read_notices,
    redis_errors,
    unwrap,
    value_of,
)
from nosq.producer.errors import NosqError, NosqTimeout
from nosq.producer.resp import Commands, get_many
from nosq.producer.settings import RedisSettings
from nosq.producer.wire import Envelope

__all__ = ["AsyncProducer"]

log = logging.getLogger(__name__)
RECONNECT_DELAY_S = 0.5
TIMER_SLOTS_PER_S: Final = 100  # waits time out at most 10 ms late


class _Waiter:
    """One submitted request: the futures of the calls awaiting it (nearly always one), or its
    envelope when it came before anyone awaited it."""

    __slots__ = ("data", "future", "more", "since")

    def __init__(self, since: float, future: asyncio.Future[bytes] | None = None) -> None:
        self.since = since
        self.future = future  # the first awaiting call's
        self.more: list[asyncio.Future[bytes]] | None = None  # calls awaiting the same id at once
        self.data: bytes | None = None

    def add(self, future: asyncio.Future[bytes]) -> None:
        if self.future is None:
            self.future = future
        elif self.more is None:
            self.more = [future]
        else:
            self.more.append(future)

    def discard(self, future: asyncio.Future[bytes]) -> None:
        if self.future is future:
            self.future = self.more.pop(0) if self.more else None
        elif self.more and future in self.more:
            self.more.remove(future)

    def futures(self) -> list[asyncio.Future[bytes]]:
        return ([] if self.future is None else [self.future]) + (self.more or [])


class _TimedOut(Exception):
    """Set by a timer on the future of a wait that ran out; the wait raises NosqTimeout."""


class _Submission:
    """The enqueue outcome of one submit/submit_many call's requests."""

    __slots__ = ("accepted", "future", "left", "refusal")

    def __init__(self, future: asyncio.Future[None], n: int) -> None:
        self.future = future
        self.left = n
        self.accepted = [False] * n
        self.refusal: Refusal | None = None

    def report(self, index: int, accepted: bool, refusal: Refusal | None) -> None:
        if accepted:
            self.accepted[index] = True
        elif self.refusal is None:
            self.refusal = refusal
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)


#: who learns a request's enqueue outcome: an infer call's result future (only a refusal or an
#: error is set on it) or (submission, index)
Sink = asyncio.Future[bytes] | tuple[_Submission, int]


class _Group:
    """Requests of one model and one set of shared options, waiting for the next flush."""

    __slots__ = ("body", "head", "sinks")

    def __init__(self, head: Head) -> None:
        self.head = head
        self.body: list[Any] = []  # id, payload, dl per request
        self.sinks: list[Sink] = []


class AsyncProducer:
    """Submit requests and await results without one connection per wait.

    Use as ``async with AsyncProducer(settings) as producer: ...``.
    """

    def __init__(
        self, settings: RedisSettings | None = None, *, content_type: str = "msgpack",
        tensors: TensorType = "numpy", default_timeout_s: float = 30.0,
    ) -> None:
        self._settings = settings or RedisSettings()
        self._ct = content_type
        self._tensors: TensorType = tensors
        self._default_timeout_s = default_timeout_s
        self._client_id = new_client_id()
        self._reply = keys.reply(self._client_id)
        self._shaper = Shaper(content_type, self._client_id)
        self._partitions = Partitions()
        self._redis: redis.asyncio.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._pending: dict[tuple[str, str | None, int, int], _Group] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._timers: dict[int, set[asyncio.Future[bytes]]] = {}
        self._timer_calls: dict[int, asyncio.TimerHandle] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> AsyncProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._redis is not None:
            raise NosqError("AsyncProducer.start() called twice")
        client = self._settings.async_client()
        with redis_errors(f"connecting to {self._settings.describe()}"):
            await client.ping()
        client.set_response_callback("XREAD", raw_reply)
        self._redis = client
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._reader = asyncio.create_task(self._read_replies(), name=f"nosq-replies-{self._client_id}")
        self._reader.add_done_callback(_surface)

    async def aclose(self) -> None:
        if self._pending and self._redis is not None:
            self._flush()
        if self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)
        if self._reader is not None:
            self._closing = True  # a client that turns the cancellation into an error must not loop on
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._fail_all(NosqError("the producer was closed before the result arrived"))
        for call in self._timer_calls.values():
            call.cancel()
        self._timer_calls.clear()
        self._timers.clear()
        if self._redis is not None:
            try:
                await self._redis.delete(self._reply)
            except redis.RedisError:
                log.debug("could not delete reply stream %s", self._reply)
            await self._redis.aclose()
            self._redis = None

    # -- submitting -------------------------------------------------------------------------

    async def submit(
        self, model: str, inputs: Any, *, method: str | None = None, timeout_s: float | None = None,
        deadline_ms: int | None = None, ttl_s: int | None = None, request_id: str | None = None,
        priority: int = 1,
    ) -> Handle:
        """Enqueue one request; return its handle once Redis has it (QueueFull if refused)."""
        handles = await self._submit(model, (inputs,), method=method, timeout_s=timeout_s, deadline_ms=deadline_ms,
                                     ttl_s=ttl_s, request_ids=None if request_id is None else (request_id,),
                                     priority=priority)
        return handles[0]

    async def submit_many(
        self, model: str, inputs: Iterable[Any], *, method: str | None = None,
        timeout_s: float | None = None, deadline_ms: int | None = None, ttl_s: int | None = None,
        request_ids: Sequence[str] | None = None, priority: int = 1,
    ) -> list[Handle]:
        """Enqueue many requests that share their options; QueueFull carries the handles that
        were ``accepted`` before the model's backlog limit was reached."""
        return await self._submit(model, inputs, method=method, timeout_s=timeout_s, deadline_ms=deadline_ms,
                                  ttl_s=ttl_s, request_ids=request_ids, priority=priority)

    async def cancel(self, handle: Handle) -> None:
        """Ask the manager not to run the request; it answers ``cancelled`` if it had not run."""
        with redis_errors(f"cancelling {handle.id!r}"):
            await self._client().set(keys.cancel(handle.id), b"1", ex=handle.ttl_s)

    # -- waiting ----------------------------------------------------------------------------

    async def outcome(self, handle: Handle, timeout_s: float | None = None) -> Envelope:
        """The full result envelope (``ok``, ``out`` or error, timings, batch)."""
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        loop = self._started()
        rid = handle.id
        waiters = self._waiters
        if rid not in waiters:  # a handle from elsewhere, or asked again after a timeout
            waiters[rid] = _Waiter(loop.time())
            data = await self._get_result(handle)
            if data is not None:
                self._resolve(rid, data)
                self._drop_unawaited(rid)
                return unwrap(handle, data, self._tensors)
        waiter = waiters.get(rid)
        if waiter is None:  # failed (connection lost) while reading the result key
            waiter = waiters[rid] = _Waiter(loop.time())
        if waiter.data is not None:
            del waiters[rid]
            return unwrap(handle, waiter.data, self._tensors)
        future: asyncio.Future[bytes] = loop.create_future()
        waiter.add(future)
        slot = self._arm(future, timeout)
        try:
            data = await future
        except _TimedOut:
            raise NosqTimeout(rid, timeout) from None
        finally:
            self._settle(rid, future, slot)  # asked again later, it re-reads the result key
        return unwrap(handle, data, self._tensors)

    async def result(self, handle: Handle, timeout_s: float | None = None) -> Any:
        """The output value; a server-side error raises RemoteError."""
        return value_of(handle, await self.outcome(handle, timeout_s))

    async def infer(
        self, model: str, inputs: Any, *, timeout_s: float | None = None, method: str | None = None,
        ttl_s: int | None = None, request_id: str | None = None, priority: int = 1,
        deadline_ms: int | None = None,
    ) -> Any:
        """Submit and wait; ``timeout_s`` is both the request's deadline and the wait."""
        shaper = self._shaper
        head = shaper.head(model, method, ttl_s, priority)
        rid, body = shaper.one(inputs, shaper.deadline(timeout_s, deadline_ms), request_id)
        loop = self._started()
        future: asyncio.Future[bytes] = loop.create_future()
        waiter = self._waiters.get(rid)
        if waiter is None:
            self._waiters[rid] = _Waiter(loop.time(), future)
        else:  # the same id again (a retry): this call waits too
            waiter.add(future)
        self._queue_one(head, body, future)
        wait = self._default_timeout_s if timeout_s is None else timeout_s
        slot = self._arm(future, wait)
        try:
            data = await future
        except _TimedOut:
            raise NosqTimeout(rid, wait) from None
        finally:
            self._settle(rid, future, slot)
        return output_of(rid, self._ct, data, self._tensors)

    async def gather(self, handles: Sequence[Handle], timeout_s: float | None = None) -> list[Any]:
        """Every output, in order; the first error raises. Handles submitted by this producer
        wait on one future each (no task per request, as ``asyncio.gather`` of ``result`` calls
        would make)."""
        if any(h.id not in self._waiters for h in handles):  # from elsewhere: each reads its result key
            return list(await asyncio.gather(*(self.result(h, timeout_s) for h in handles)))
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        loop = self._started()
        arrived: list[bytes | None] = []
        armed: list[tuple[int, asyncio.Future[bytes], int]] = []
        for index, handle in enumerate(handles):
            waiter = self._waiters[handle.id]
            if waiter.data is not None:
                arrived.append(waiter.data)
                self._waiters.pop(handle.id, None)
                continue
            arrived.append(None)
            future: asyncio.Future[bytes] = loop.create_future()
            waiter.add(future)
            armed.append((index, future, self._arm(future, timeout)))
        try:
            for index, future, _ in armed:
                arrived[index] = await future
        except _TimedOut:
            raise NosqTimeout(next(handles[i].id for i, f, _ in armed if not f.done() or f.exception()),
                              timeout) from None
        finally:
            for index, future, slot in armed:
                self._settle(handles[index].id, future, slot)
        return [output_of(handle.id, handle.ct, data, self._tensors)
                for handle, data in zip(handles, arrived, strict=True) if data is not None]

    async def as_completed(
        self, handles: Sequence[Handle], timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[Handle, Envelope]]:
        """Yield (handle, envelope) as results arrive; NosqTimeout once ``timeout_s`` is spent."""
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        tasks = {asyncio.ensure_future(self.outcome(h, timeout)): h for h in handles}
        try:
            for next_done in asyncio.as_completed(tasks):
                envelope = await next_done
                yield self._by_id(handles, envelope.id), envelope
        finally:
            for task in tasks:
                task.cancel()

    # -- internals: submitting ---------------------------------------------------------------

    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise NosqError("AsyncProducer is not started: use `async with AsyncProducer(...)`")
        return self._redis

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._redis is None or self._loop is None:
            raise NosqError("AsyncProducer is not started: use `async with AsyncProducer(...)`")
        return self._loop

    async def _submit(
        self, model: str, inputs: Iterable[Any], *, method: str | None, timeout_s: float | None,
        deadline_ms: int | None, ttl_s: int | None, request_ids: Sequence[str] | None, priority: int,
    ) -> list[Handle]:
        shaper = self._shaper
        head = shaper.head(model, method, ttl_s, priority)
        handles, body = shaper.requests(head, inputs, shaper.deadline(timeout_s, deadline_ms), request_ids)
        loop = self._started()
        if not handles:
            return handles
        submission = _Submission(loop.create_future(), len(handles))
        since = loop.time()
        waiters = self._waiters
        for handle in handles:  # before the send: a result may come before the acknowledgement
            if handle.id not in waiters:
                waiters[handle.id] = _Waiter(since)
        self._queue(head, body, [(submission, i) for i in range(len(handles))])
        try:
            await submission.future
        except BaseException:
            for handle in handles:
                self._drop_unawaited(handle.id)
            raise
        if submission.refusal is None:
            return handles
        accepted = []
        for handle, ok in zip(handles, submission.accepted, strict=True):
            if ok:
                accepted.append(handle)
            else:
                self._drop_unawaited(handle.id)
        raise queue_full(model, submission.refusal, accepted)

    def _queue(self, head: Head, body: Iterable[Any], sinks: Iterable[Sink]) -> None:
        """Add requests to the next flush (scheduled by the first request of a turn)."""
        group = self._pending.get(head.key)
        if group is None:
            if not self._pending:
                self._started().call_soon(self._flush)
            group = self._pending[head.key] = _Group(head)
        group.body += body
        group.sinks += sinks

    def _queue_one(self, head: Head, body: tuple[Any, ...], sink: asyncio.Future[bytes]) -> None:
        group = self._pending.get(head.key)
        if group is None:
            if not self._pending:
                self._started().call_soon(self._flush)
            group = self._pending[head.key] = _Group(head)
        group.body += body
        group.sinks.append(sink)

    def _flush(self) -> None:
        groups = list(self._pending.values())
        self._pending = {}
        if groups:
            task = self._started().create_task(self._send(groups))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, groups: list[_Group]) -> None:
        """One round trip for every request queued in one turn; each sink learns its outcome."""
        try:
            with redis_errors(f"submitting to model {groups[0].head.key[0]!r}"
                              + (f" and {len(groups) - 1} more" if len(groups) > 1 else "")):
                await self._learn({group.head.key[0] for group in groups})
                calls: list[tuple[_Group, Call, int]] = []
                commands: list[tuple[Any, ...]] = []
                for group in groups:
                    planned = self._partitions.plan(group.head.key[0], group.body)
                    group_commands, starts = planned_commands(group.head, group.body, planned)
                    calls += ((group, call, len(commands) + start) for call, start in zip(planned, starts, strict=True))
                    commands += group_commands
                replies = await self._run_scripts(commands)
        except BaseException as exc:
            error = exc if isinstance(exc, NosqError) else NosqError(f"the submit was interrupted: {exc!r}")
            for group in groups:
                for sink in group.sinks:
                    _fail_sink(sink, error)
            if not isinstance(exc, NosqError):
                raise
            return
        for group, call, start in calls:
            accepted, refusal = call_outcome(call, replies, start)
            sinks = group.sinks
            for position, i in enumerate(call.indices):
                sink = sinks[i]
                if isinstance(sink, tuple):
                    sink[0].report(sink[1], position < accepted, refusal)
                elif position >= accepted and refusal is not None and not sink.done():
                    sink.set_exception(queue_full(group.head.key[0], refusal))

    async def _learn(self, models: set[str]) -> None:
        """Read the partitions and limit of the models whose are stale from their admission
        hashes (one round trip for all of them)."""
        partitions = self._partitions
        stale = [model for model in models if partitions.stale(model)]
        if stale:
            batch = Commands()
            for model in stale:
                Partitions.ask(batch, model)
            values = await batch.send(self._client())
            width = len(Partitions.FIELDS)
            for n, model in enumerate(stale):
                partitions.learn(model, values[width * n : width * (n + 1)])

    async def _run_scripts(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """EVALSHA each command; after a NOSCRIPT (a restarted or flushed server), SCRIPT LOAD
        and send again what was refused (no SCRIPT EXISTS per call)."""
        replies = await self._execute(commands)
        missing = [i for i, reply in enumerate(replies) if is_noscript(reply)]
        if missing:
            client: Any = self._client()
            await client.script_load(ENQUEUE_BATCH_LUA)  # every master on a cluster
            again = await self._execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            raise_reply_error(reply)
        return replies

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands on one pooled connection in one write (packed here: redis-py's
        packer costs more than twice as much a request) and read their replies (an error reply
        is returned as its exception)."""
        batch = Commands()
        for command in commands:
            batch.add(*command)
        return await batch.send(self._client())

    # -- internals: waiting ------------------------------------------------------------------

    def _arm(self, future: asyncio.Future[bytes], timeout_s: float) -> int:
        """_TimedOut on ``future`` after ``timeout_s``: one timer per 10 ms slot, not one per wait."""
        loop = self._started()
        slot = int((loop.time() + timeout_s) * TIMER_SLOTS_PER_S) + 1
        bucket = self._timers.get(slot)
        if bucket is None:
            bucket = self._timers[slot] = set()
            self._timer_calls[slot] = loop.call_at(slot / TIMER_SLOTS_PER_S, self._expire, slot)
        bucket.add(future)
        return slot

    def _expire(self, slot: int) -> None:
        self._timer_calls.pop(slot, None)
        for future in self._timers.pop(slot, ()):
            if not future.done():
                future.set_exception(_TimedOut)

    def _settle(self, rid: str, future: asyncio.Future[bytes], slot: int) -> None:
        """A wait is over: drop its timer and, when nobody else waits, the request's waiter."""
        bucket = self._timers.get(slot)
        if bucket is not None:
            bucket.discard(future)
        waiter = self._waiters.get(rid)
        if waiter is not None:
            waiter.discard(future)
            if waiter.future is None:
                del self._waiters[rid]

    def _drop_unawaited(self, rid: str) -> None:
        waiter = self._waiters.get(rid)
        if waiter is not None and waiter.future is None:
            del self._waiters[rid]

    @staticmethod
    def _by_id(handles: Sequence[Handle], request_id: str) -> Handle:
        return next(h for h in handles if h.id == request_id)

    async def _get_result(self, handle: Handle) -> bytes | None:
        try:
            with redis_errors(f"reading the result of {handle.id!r}"):
                data: bytes | None = await self._client().get(keys.result(handle.id))
        except BaseException:
            self._drop_unawaited(handle.id)
            raise
        return data

    def _resolve(self, request_id: str, data: bytes) -> None:
        waiter = self._waiters.get(request_id)
        if waiter is None:
            return
        future = waiter.future
        if future is None:
            waiter.data = data
            return
        del self._waiters[request_id]
        if not future.done():
            future.set_result(data)
        for other in waiter.more or ():
            if not other.done():
                other.set_result(data)

    async def _read_replies(self) -> None:
        client = self._client()
        last_id = b"0-0"
        trim_to: bytes | None = None  # the previous read's XTRIM, sent with the next read
        fetch: list[str] = []  # id-only notices: MGET their result keys with the next read
        cluster = self._settings.cluster
        last_check = time.monotonic()
        while not self._closing:
            try:
                with redis_errors("reading replies"):
                    if fetch and cluster:  # keys on many slots: not in the pipeline
                        for rid, data in zip(fetch, await get_many(client, [keys.result(r) for r in fetch]),
                                             strict=True):
                            if data is not None:
                                self._resolve(rid, data)
                        fetch = []
                    if trim_to is None and not fetch:
                        response = await client.xread({self._reply: last_id}, count=REPLY_COUNT,
                                                      block=REPLY_BLOCK_MS)
                    else:
                        async with client.pipeline(transaction=False) as pipe:
                            if trim_to is not None:
                                pipe.xtrim(self._reply, minid=trim_to, approximate=False)
                            if fetch:
                                pipe.mget([keys.result(rid) for rid in fetch])
                            # with results to hand over, the read must not block
                            pipe.xread({self._reply: last_id}, count=REPLY_COUNT,
                                       block=None if fetch else REPLY_BLOCK_MS)
                            replies = await pipe.execute()
                        trim_to = None
                        if fetch:
                            for rid, data in zip(fetch, replies[-2], strict=True):
                                if data is not None:
                                    self._resolve(rid, data)
                            fetch = []
                        response = replies[-1]
                    last, notices = read_notices(response)
                    if last is not None:
                        last_id = last
                        trim_to = next_entry_id(last)
                        waiters = self._waiters
                        resolve = self._resolve
                        for rid, data in notices:
                            if data is not None:
                                resolve(rid, data)
                            elif rid in waiters:
                                fetch.append(rid)
                    if time.monotonic() - last_check >= SAFETY_CHECK_AFTER_S:
                        last_check = time.monotonic()
                        await self._safety_check()
            except NosqError as exc:
                if self._closing:
                    return
                fetch = []
                self._fail_all(exc)  # callers may ask again: result() re-reads the result key
                await asyncio.sleep(RECONNECT_DELAY_S)

    def _fail_all(self, exc: NosqError) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            for future in waiter.futures():
                if not future.done():
                    future.set_exception(exc)

    async def _safety_check(self) -> None:
        """A completion can be trimmed away by a stalled reader: look at the result keys."""
        cutoff = self._started().time() - SAFETY_CHECK_AFTER_S
        stale = [rid for rid, w in self._waiters.items() if w.since < cutoff and w.data is None][:512]
        if not stale:
            return
        with redis_errors("reading results"):
            values = await get_many(self._client(), [keys.result(rid) for rid in stale])
        for rid, data in zip(stale, values, strict=True):
            if data is not None:
                self._resolve(rid, data)


def _fail_sink(sink: Sink, error: BaseException) -> None:
    if isinstance(sink, tuple):
        future: asyncio.Future[Any] = sink[0].future
    else:
        future = sink
    if not future.done():
        future.set_exception(error)


def _surface(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("nosq reply reader stopped: %s", task.exception())
