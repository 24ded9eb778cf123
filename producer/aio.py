"""The asyncio producer: one reply stream and one reader task resolve every wait."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import redis.asyncio

from producer import keys
from producer._common import (
    ENQUEUE_MANY_LUA,
    REPLY_BLOCK_MS,
    REPLY_COUNT,
    SAFETY_CHECK_AFTER_S,
    Handle,
    TensorType,
    check_enqueued,
    chunks,
    new_client_id,
    prepare_many,
    redis_errors,
    unwrap,
    value_of,
)
from producer.errors import NosqError, NosqTimeout, QueueFull
from producer.settings import RedisSettings
from producer.wire import Envelope

__all__ = ["AsyncProducer"]

log = logging.getLogger(__name__)
RECONNECT_DELAY_S = 0.5


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
        self._redis: redis.asyncio.Redis | None = None
        self._enqueue: Any = None
        self._waiters: dict[str, tuple[asyncio.Future[bytes], float]] = {}
        self._reader: asyncio.Task[None] | None = None

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
        self._redis = client
        self._enqueue = client.register_script(ENQUEUE_MANY_LUA)
        self._reader = asyncio.create_task(self._read_replies(), name=f"nosq-replies-{self._client_id}")
        self._reader.add_done_callback(_surface)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._fail_all(NosqError("the producer was closed before the result arrived"))
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
        """Enqueue one request; return its handle at once."""
        handles = await self.submit_many(
            model, [inputs], method=method, timeout_s=timeout_s, deadline_ms=deadline_ms, ttl_s=ttl_s,
            request_ids=[request_id] if request_id else None, priority=priority,
        )
        return handles[0]

    async def submit_many(
        self, model: str, inputs: Iterable[Any], *, method: str | None = None,
        timeout_s: float | None = None, deadline_ms: int | None = None, ttl_s: int | None = None,
        request_ids: Sequence[str] | None = None, priority: int = 1,
    ) -> list[Handle]:
        """Enqueue many requests that share their options, pipelined; QueueFull carries the
        handles that were ``accepted`` before the model's backlog limit was reached."""
        handles, script_keys, argv = prepare_many(
            model, inputs, ct=self._ct, reply=self._client_id, method=method, timeout_s=timeout_s,
            deadline_ms=deadline_ms, ttl_s=ttl_s, request_ids=request_ids, priority=priority,
        )
        parts = chunks(handles, argv)
        client = self._client()
        for handle in handles:
            self._watch(handle)
        try:
            with redis_errors(f"submitting to model {model!r}"):
                if len(parts) == 1:
                    replies = [await self._enqueue(keys=script_keys, args=parts[0][1])]
                else:
                    async with client.pipeline(transaction=False) as pipe:
                        for _, part_argv in parts:
                            await self._enqueue(keys=script_keys, args=part_argv, client=pipe)
                        replies = await pipe.execute()
            return check_enqueued(model, parts, replies)
        except QueueFull as exc:
            refused = {h.id for h in handles} - {h.id for h in exc.accepted}
            for handle in handles:
                if handle.id in refused:
                    self._forget(handle)
            raise
        except BaseException:
            for handle in handles:
                self._forget(handle)
            raise

    async def cancel(self, handle: Handle) -> None:
        """Ask the manager not to run the request; it answers ``cancelled`` if it had not run."""
        with redis_errors(f"cancelling {handle.id!r}"):
            await self._client().set(keys.cancel(handle.id), b"1", ex=handle.ttl_s)

    # -- waiting ----------------------------------------------------------------------------

    async def outcome(self, handle: Handle, timeout_s: float | None = None) -> Envelope:
        """The full result envelope (``ok``, ``out`` or error, timings, batch)."""
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        known = handle.id in self._waiters
        future = self._watch(handle)
        if not known:  # a handle from elsewhere, or asked again after a timeout
            await self._check_result_key(handle)
        try:
            data = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise NosqTimeout(handle.id, timeout) from None
        finally:
            self._forget(handle)  # asked again later, it re-reads the result key
        return unwrap(handle, data, self._tensors)

    async def result(self, handle: Handle, timeout_s: float | None = None) -> Any:
        """The output value; a server-side error raises RemoteError."""
        return value_of(handle, await self.outcome(handle, timeout_s))

    async def infer(self, model: str, inputs: Any, *, timeout_s: float | None = None, **options: Any) -> Any:
        """Submit and wait; ``timeout_s`` is both the request's deadline and the wait."""
        handle = await self.submit(model, inputs, timeout_s=timeout_s, **options)
        return await self.result(handle, timeout_s)

    async def gather(self, handles: Sequence[Handle], timeout_s: float | None = None) -> list[Any]:
        """Every output, in order; the first error raises."""
        return list(await asyncio.gather(*(self.result(h, timeout_s) for h in handles)))

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

    # -- internals --------------------------------------------------------------------------

    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise NosqError("AsyncProducer is not started: use `async with AsyncProducer(...)`")
        return self._redis

    def _watch(self, handle: Handle) -> asyncio.Future[bytes]:
        self._client()
        entry = self._waiters.get(handle.id)
        if entry is None:
            entry = (asyncio.get_running_loop().create_future(), time.monotonic())
            self._waiters[handle.id] = entry
        return entry[0]

    def _forget(self, handle: Handle) -> None:
        self._waiters.pop(handle.id, None)

    @staticmethod
    def _by_id(handles: Sequence[Handle], request_id: str) -> Handle:
        return next(h for h in handles if h.id == request_id)

    async def _check_result_key(self, handle: Handle) -> None:
        with redis_errors(f"reading the result of {handle.id!r}"):
            data = await self._client().get(keys.result(handle.id))
        if data is not None:
            self._resolve(handle.id, data)

    def _resolve(self, request_id: str, data: bytes) -> None:
        entry = self._waiters.get(request_id)
        if entry is not None and not entry[0].done():
            entry[0].set_result(data)

    async def _read_replies(self) -> None:
        client = self._client()
        last_id = b"0-0"
        last_check = time.monotonic()
        while True:
            try:
                with redis_errors("reading replies"):
                    response = await client.xread(
                        {self._reply: last_id}, count=REPLY_COUNT, block=REPLY_BLOCK_MS
                    )
                    for entry_id, fields in response[0][1] if response else ():
                        last_id = entry_id
                        rid, data = fields.get(b"id"), fields.get(b"r")
                        if rid is not None and data is not None:
                            self._resolve(rid.decode(), data)
                    if response:
                        await client.xtrim(self._reply, minid=last_id)
                    if time.monotonic() - last_check >= SAFETY_CHECK_AFTER_S:
                        last_check = time.monotonic()
                        await self._safety_check()
            except NosqError as exc:
                self._fail_all(exc)  # callers may ask again: result() re-reads the result key
                await asyncio.sleep(RECONNECT_DELAY_S)

    def _fail_all(self, exc: NosqError) -> None:
        for future, _ in self._waiters.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # nobody may be waiting: do not log it as unretrieved
        self._waiters.clear()

    async def _safety_check(self) -> None:
        """A completion can be trimmed away by a stalled reader: look at the result keys."""
        cutoff = time.monotonic() - SAFETY_CHECK_AFTER_S
        stale = [rid for rid, (f, t) in self._waiters.items() if t < cutoff and not f.done()][:512]
        if not stale:
            return
        with redis_errors("reading results"):
            values = await self._client().mget([keys.result(rid) for rid in stale])
        for rid, data in zip(stale, values, strict=True):
            if data is not None:
                self._resolve(rid, data)


def _surface(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("nosq reply reader stopped: %s", task.exception())
