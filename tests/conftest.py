"""Fixtures every test tier shares: the real Redis (db 9, flushed per test) and a fakeredis seam."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import redis.asyncio
from pydantic import PrivateAttr

from nosq.producer import RedisSettings

ROOT = Path(__file__).resolve().parents[1]

REDIS_URL = "redis://127.0.0.1:6379"
TEST_DB = 9  # tests never touch db 0
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'


class FakeRedisSettings(RedisSettings):
    """RedisSettings whose clients talk to one in-process fakeredis server (the unit-test seam)."""

    _server: fakeredis.FakeServer = PrivateAttr(default_factory=fakeredis.FakeServer)

    def client(self) -> redis.Redis:
        return fakeredis.FakeRedis(server=self._server)

    def async_client(self) -> redis.asyncio.Redis:
        return fakeredis.FakeAsyncRedis(server=self._server)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for the real Redis is an integration test, marked or not."""
    for item in items:
        if {"redis_url", "redis_db"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis the integration tier needs; fails with how to start it."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis answers PING at {REDIS_URL} ({exc}); start one with:\n  {START_REDIS}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[RedisSettings]:
    """Settings for db 9 of the real Redis, flushed before and after the test.

    Several pytest processes on this machine share that db (other checkouts, reruns), so each
    test holds an exclusive file lock on it: a neighbour's FLUSHDB cannot land mid-test.
    """
    # The db goes in the URL: redis-py lets the URL's path override a `db=` keyword.
    settings = RedisSettings(url=f"{redis_url}/{TEST_DB}")
    lock_path = Path(tempfile.gettempdir()) / f"nosq-tests-redis-db{TEST_DB}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = settings.client()
        try:
            client.flushdb()
            yield settings
            client.flushdb()
        finally:
            client.close()


@pytest.fixture
def fake_settings() -> FakeRedisSettings:
    """Settings whose sync and async clients share one fresh fakeredis server."""
    return FakeRedisSettings()


@pytest.fixture(scope="module")
def ray_repo() -> Iterator[None]:
    """A private Ray on loopback for one module, whose workers can import the test models (the
    repository root goes on their PYTHONPATH)."""
    from nosq.manager.runtime import raycluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, (saved or "").split(os.pathsep))])
    started = raycluster.connect(None, 4)
    try:
        yield
    finally:
        if started:
            raycluster.disconnect()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
