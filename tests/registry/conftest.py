"""Fixtures of the registry tests: db 13 of the real Redis (flushed per test) and fakeredis.

* ``registry_url``: db 13, flushed before and after the test, under an exclusive file lock so
  a neighbour's run cannot flush it mid-test.
* ``client``: an asyncio client on db 13; ``fake_client``: one on a fresh fakeredis (with Lua).
* ``any_client``: both, as two parametrized runs.
* ``ready_model``: reserve + mark_ready + overwrite the fields a policy reads.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import redis.asyncio

from nosq.manager.memory.registry import Outcome, Registry
from nosq.producer import keys

REGISTRY_DB = 13

ReadyModel = Callable[..., Awaitable[None]]


@pytest.fixture
def registry_url(redis_url: str) -> Iterator[str]:
    url = f"{redis_url}/{REGISTRY_DB}"
    lock_path = Path(tempfile.gettempdir()) / f"nosq-tests-redis-db{REGISTRY_DB}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        sync = redis.Redis.from_url(url)
        try:
            sync.flushdb()
            yield url
            sync.flushdb()
        finally:
            sync.close()


@pytest.fixture
async def client(registry_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    conn = redis.asyncio.Redis.from_url(registry_url)
    yield conn
    await conn.aclose()


@pytest.fixture
async def fake_client() -> AsyncIterator[redis.asyncio.Redis]:
    conn = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield conn
    await conn.aclose()


@pytest.fixture(params=["real", "fake"])
def any_client(request: pytest.FixtureRequest) -> redis.asyncio.Redis:
    name = "client" if request.param == "real" else "fake_client"
    conn: redis.asyncio.Redis = request.getfixturevalue(name)
    return conn


@pytest.fixture
def ready_model(any_client: redis.asyncio.Redis) -> ReadyModel:
    """``await ready_model(registry, model, nbytes, node=, device=, **fields)``: a READY model
    whose policy fields (``loaded_at``, ``last_used``, ``uses``, ``backlog``, ``load_ms``,
    ``inflight``) are then set to the given values."""

    async def make(reg: Registry, model: str, nbytes: int, *, node: str = "n1", device: str = "cuda:0",
                   **fields: int) -> None:
        reservation = await reg.reserve(model, node=node, device=device, nbytes=nbytes)
        assert reservation.outcome is Outcome.RESERVED, reservation
        await reg.mark_ready(model, replicas=1, load_ms=fields.pop("load_ms", 0))
        if fields:
            await any_client.hset(keys.registry_model(model),
                                  mapping={k: str(v) for k, v in fields.items()})  # type: ignore[misc]

    return make
