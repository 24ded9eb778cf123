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
    ENQUEUE_LUA,
    REPLY_BLOCK_MS,
    REPLY_COUNT,
    SAFETY_CHECK_AFTER_S,
    Handle,
    TensorType,
    check_enqueued,
    new_client_id,
    prepare,
    redis_errors,
    unwrap,
    value_of,
)
from producer.errors import NosqConnectionError, NosqError, NosqTimeout
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
        self._redis = self._settings.async_client()
        self._enqueue = self._redis.register_script(ENQUEUE_LUA)
        with redis_errors(f"connecting to {self._settings.describe()}"):
            await self._redis.ping()
        self._reader = asyncio.create_task(self._read_replies(), name=f"nosq-replies-{self._client_id}")
        self._reader.add_done_callback(_surface)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for future, _ in self._waiters.values():
            future.cancel()
        self._waiters.clear()
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
        handle, script_keys, argv = prepare(
            model, inputs, ct=self._ct, reply=self._client_id, method=method, timeout_s=timeout_s,
            deadline_ms=deadline_ms, ttl_s=ttl_s, request_id=request_id, priority=priority,
        )
        self._watch(handle)
        try:
            with redis_errors(f"submitting to model {model!r}"):
                reply = await self._enqueue(keys=script_keys, args=argv)
            check_enqueued(handle, reply)
        except BaseException:
            self._forget(handle)
            raise
        return handle

    async def submit_many(
        self, model: str, inputs: Iterable[Any], *, method: str | None = None,
        timeout_s: float | None = None, deadline_ms: int | None = None, ttl_s: int | None = None,
        request_ids: Sequence[str] | None = None, priority: int = 1,
    ) -> list[Handle]:
        """Enqueue many requests in one pipeline. A full queue raises QueueFull after the
        requests before it were accepted (their handles are on the exception as ``accepted``)."""
        prepared = [
            prepare(model, item, ct=self._ct, reply=self._client_id, method=method,
                    timeout_s=timeout_s, deadline_ms=deadline_ms, ttl_s=ttl_s,
                    request_id=request_ids[i] if request_ids else None, priority=priority)
            for i, item in enumerate(inputs)
        ]
        redis_client = self._client()
        for handle, _, _ in prepared:
            self._watch(handle)
        try:
            with redis_errors(f"submitting to model {model!r}"):
                async with redis_client.pipeline(transaction=False) as pipe:
                    for _, script_keys, argv in prepared:
                        await self._enqueue(keys=script_keys, args=argv, client=pipe)
                    replies = await pipe.execute()
        except BaseException:
            for handle, _, _ in prepared:
                self._forget(handle)
            raise
        return _accepted([h for h, _, _ in prepared], replies, self._forget)

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
            if future.done():
                self._forget(handle)
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
        while True:
            try:
                with redis_errors("reading replies"):
                    response = await client.xread(
                        {self._reply: last_id}, count=REPLY_COUNT, block=REPLY_BLOCK_MS
                    )
            except NosqConnectionError as exc:
                self._fail_all(exc)  # callers may ask again: result() re-reads the result key
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            if not response:
                await self._safety_check()
                continue
            for entry_id, fields in response[0][1]:
                last_id = entry_id
                rid, data = fields.get(b"id"), fields.get(b"r")
                if rid is not None and data is not None:
                    self._resolve(rid.decode(), data)
            with redis_errors("trimming replies"):
                await client.xtrim(self._reply, minid=last_id)

    def _fail_all(self, exc: NosqError) -> None:
        for future, _ in self._waiters.values():
            if not future.done():
                future.set_exception(exc)
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


def _accepted(handles: list[Handle], replies: list[Any], forget: Any) -> list[Handle]:
    for index, (handle, reply) in enumerate(zip(handles, replies, strict=True)):
        try:
            check_enqueued(handle, reply)
        except NosqError as exc:
            for refused in handles[index:]:
                forget(refused)
            exc.accepted = handles[:index]  # type: ignore[attr-defined]
            raise
    return handles


def _surface(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("nosq reply reader stopped: %s", task.exception())
