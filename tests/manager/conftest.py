"""Fixtures of the manager's integration tier: real Redis (db 10), real Ray, real managers.

* ``redis_db10``: db 10 flushed before and after each test, and a client on it.
* ``ray_cluster``: one private Ray on 127.0.0.1 for the whole directory, started with
  ``nosq.manager.runtime.raycluster.connect`` (so in-process managers join it and leave it running). It is
  shut down as soon as the last test of this directory has run, so a later directory (e.g.
  ``tests/workers``, which starts a Ray of its own) finds none.
* An exclusive lock on db 10 for as long as these tests run: two runs of them at once would
  flush and serve each other's streams.

Test models are imported by the Ray workers as ``tests.manager.models``: the repo root goes on
``sys.path`` here and on ``PYTHONPATH`` for every process started after (Ray workers, managers).
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import pytest
import redis
import redis.asyncio

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nosq.manager.runtime import raycluster  # noqa: E402
from tests.manager.harness import RAY_CPUS, REDIS_URL, flush_db10, redis_settings  # noqa: E402

START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'


class _Resources:
    """What this directory's tests hold while they run: the db 10 lock and one Ray."""

    def __init__(self) -> None:
        self._lock: IO[str] | None = None
        self._saved_pythonpath: str | None = None
        self.ray_started = False

    def lock_db(self) -> None:
        if self._lock is None:
            self._lock = (Path(tempfile.gettempdir()) / "nosq-tests-redis-db10.lock").open("a")
            fcntl.flock(self._lock, fcntl.LOCK_EX)  # waits for a neighbour's run to end

    def start_ray(self) -> None:
        if self.ray_started:
            return
        self._saved_pythonpath = os.environ.get("PYTHONPATH")
        paths = [str(ROOT), *filter(None, (self._saved_pythonpath or "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        if not raycluster.connect(None, RAY_CPUS):
            pytest.fail("Ray was already initialised in this process: the manager tests need their own")
        self.ray_started = True

    def close(self) -> None:
        if self.ray_started:
            raycluster.disconnect()
            self.ray_started = False
            if self._saved_pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = self._saved_pythonpath
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


_RESOURCES = _Resources()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test of this directory (its fixtures are torn down by then)."""
    if nextitem is None or HERE not in Path(str(nextitem.path)).resolve().parents:
        _RESOURCES.close()


@pytest.fixture(scope="session")
def db10_lock() -> Iterator[None]:
    _RESOURCES.lock_db()
    yield
    _RESOURCES.close()


@pytest.fixture(scope="session")
def ray_cluster(db10_lock: None) -> Iterator[None]:
    """One local Ray (loopback, 4 logical CPUs) for every in-process manager."""
    _RESOURCES.start_ray()
    yield
    _RESOURCES.close()


def _flush() -> None:
    try:
        flush_db10()
    except redis.ConnectionError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with:\n  {START_REDIS}")


@pytest.fixture(scope="module")
def module_db10(db10_lock: None) -> Iterator[None]:
    """db 10 flushed before and after a module: for a manager that serves a whole module."""
    _flush()
    yield
    _flush()


@pytest.fixture
async def redis_db10(request: pytest.FixtureRequest, db10_lock: None) -> AsyncIterator[redis.asyncio.Redis]:
    """A client on db 10, flushed before and after the test.

    In a module that sets ``SHARED_MANAGER = True`` (one manager serves all its tests) every
    key but the request streams is deleted instead, and the streams are emptied: deleting a
    stream under a running manager stops it (test_manager_survives_its_stream_being_deleted).
    """
    keep_streams = getattr(request.module, "SHARED_MANAGER", False)
    client = redis_settings().async_client()
    try:
        await _clean(client, keep_streams)
        yield client
        await _clean(client, keep_streams)
    finally:
        await client.aclose()


async def _clean(client: redis.asyncio.Redis, keep_streams: bool) -> None:
    if not keep_streams:
        try:
            await client.flushdb()
        except redis.ConnectionError as exc:
            pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with:\n  {START_REDIS}")
        return
    async for key in client.scan_iter(count=1000):
        if _REQUEST_STREAM.match(key):
            await client.xtrim(key, maxlen=0)
        else:
            await client.delete(key)


_REQUEST_STREAM = re.compile(rb"^nosq:\{[^}]*\}:req$")


@pytest.fixture
def tmp_record(tmp_path: Path) -> Path:
    """A file the test models append one line per call to."""
    return tmp_path / "calls.jsonl"
