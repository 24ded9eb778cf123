"""What the manager tests share: db 10 of the real Redis, model specs, an in-process manager,
and the any-language way of waiting for a result (GET, BLPOP, GET).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import ray
import redis
import redis.asyncio

from nosq.manager.service import Manager
from nosq.manager.settings import ManagerSettings
from nosq.producer import RedisSettings, keys
from nosq.producer.codec import encode_value
from nosq.producer.wire import Envelope, decode_envelope, request_fields
from nosq.workers.spec import ModelSpec, ServeConfig

REDIS_URL = "redis://127.0.0.1:6379/10"  # db 10: the producer/examples tests use db 9
RAY_CPUS = 4
MODELS = "tests.manager.models"


def redis_settings() -> RedisSettings:
    return RedisSettings(url=REDIS_URL)


def flush_db10() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    finally:
        client.close()


def spec(model_id: str, factory: str, **fields: Any) -> ModelSpec:
    """A spec that fits many actors on 2 cores: a quarter CPU each, one torch thread."""
    fields.setdefault("num_cpus", 0.25)
    fields.setdefault("threads", 1)
    fields.setdefault("device", "cpu")
    if ":" not in factory:
        factory = f"{MODELS}:{factory}"
    return ModelSpec(id=model_id, factory=factory, **fields)


def config(*specs: ModelSpec) -> ServeConfig:
    return ServeConfig(models=specs)


def manager_settings(**overrides: Any) -> ManagerSettings:
    """Settings on db 10 with a consumer name of its own (one per manager). No profiling at
    start: it takes seconds per model, and these tests are about serving, not batch sizes."""
    overrides.setdefault("redis", redis_settings())
    overrides.setdefault("consumer", f"test-{uuid.uuid4().hex[:12]}")
    overrides.setdefault("shutdown_timeout_s", 15.0)
    overrides.setdefault("profile_on_start", False)
    return ManagerSettings(**overrides)


@contextlib.asynccontextmanager
async def locked_db(db: int) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client on ``db`` of the real Redis, flushed before and after, under an exclusive
    file lock on that db (other pytest processes on this machine may use it too)."""
    with (Path(tempfile.gettempdir()) / f"nosq-tests-redis-db{db}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:6379/{db}")
        try:
            await client.flushdb()
            yield client
            await client.flushdb()
        finally:
            await client.aclose()


@contextlib.asynccontextmanager
async def running_manager(serve: ServeConfig, settings: ManagerSettings) -> AsyncIterator[Manager]:
    """A started Manager on the running loop, always stopped. Its background tasks must not
    have failed, start to stop (a task that dies stops the manager, which a test could miss),
    and it leaves the Ray it found (the tests' own) running."""
    manager = Manager(serve, settings)
    ray_was_up = ray.is_initialized()
    try:
        await manager.start()
        yield manager
    finally:
        await manager.stop()
    assert manager.failed is None, f"a manager task failed: {manager.failed!r}"
    assert ray.is_initialized() == ray_was_up, "the manager shut down a Ray instance it did not start"


def entry(model: str, inputs: Any, *, ct: str = "msgpack", request_id: str | None = None,
          **options: Any) -> tuple[str, dict[str, Any]]:
    """(request id, XADD fields) of a well-formed request, as any client would build it."""
    rid = request_id or uuid.uuid4().hex
    return rid, dict(request_fields(request_id=rid, ct=ct, payload=encode_value(ct, inputs), **options))


async def xadd_all(client: redis.asyncio.Redis, model: str, entries: list[Mapping[str, Any]]) -> list[bytes]:
    """XADD raw entries in one MULTI/EXEC, so one read of the manager sees them all."""
    async with client.pipeline(transaction=True) as pipe:
        for fields in entries:
            pipe.xadd(keys.requests(model), dict(fields))
        ids: list[bytes] = await pipe.execute()
    return ids


async def wait_envelope(client: redis.asyncio.Redis, request_id: str, ct: str = "msgpack",
                        timeout_s: float = 20.0) -> Envelope:
    """The wire protocol's wait (GET, BLPOP done, GET), decoded. BLPOP is capped at 1 s: a
    request that names a reply stream gets no token, only its result key."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = await client.get(keys.result(request_id))
        if data is not None:
            return decode_envelope(ct, data)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no result for {request_id!r} within {timeout_s} s")
        await client.blpop([keys.done(request_id)], timeout=max(0.1, min(left, 1.0)))


async def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Until ``predicate()`` (plain or async) is true: for state that another process writes
    (a model's record file, Redis) and that has no event to wait on."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def stream_is_drained(client: redis.asyncio.Redis, model: str) -> tuple[int, int]:
    """(entries left in the model's stream, entries pending in its group)."""
    stream = keys.requests(model)
    length = await client.xlen(stream)
    try:
        pending = await client.xpending(stream, keys.GROUP)
    except redis.ResponseError:  # no group: nothing can be pending
        return length, 0
    return length, int(pending["pending"])


def results(db: redis.Redis, ids: list[str]) -> dict[str, bytes]:
    """The result envelopes that exist for ``ids`` (read 1,000 keys at a time)."""
    found: dict[str, bytes] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        for rid, data in zip(chunk, db.mget([keys.result(r) for r in chunk]), strict=True):
            if data is not None:
                found[rid] = data
    return found
