"""Fixtures of the profiling tests: real Redis on db 11 and one private Ray for the directory.

* ``redis_db11``: RedisSettings on db 11, flushed before and after each test, under an
  exclusive file lock (two runs of these tests at once would flush each other's keys).
* ``ray_cluster``: Ray started with ``nosq.manager.runtime.raycluster.connect(None, 4)`` (loopback), shared
  by every test here that needs it and shut down after the last test of this directory, so a
  later directory that starts a Ray of its own finds none.

Test models are imported by Ray workers as ``tests.profiling.models``: the repo root goes on
``sys.path`` here and on ``PYTHONPATH`` for every process started after.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nosq.manager.runtime import raycluster  # noqa: E402
from nosq.producer import RedisSettings  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/11"
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'


class _Ray:
    def __init__(self) -> None:
        self.started = False
        self._saved_pythonpath: str | None = None

    def start(self) -> None:
        if self.started:
            return
        self._saved_pythonpath = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, (self._saved_pythonpath or "").split(
            os.pathsep))])
        if not raycluster.connect(None, 4):
            pytest.fail("Ray was already initialised in this process: the profiling tests need their own")
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        raycluster.disconnect()
        self.started = False
        if self._saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self._saved_pythonpath


_RAY = _Ray()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test of this directory."""
    if nextitem is None or HERE not in Path(str(nextitem.path)).resolve().parents:
        _RAY.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    _RAY.start()
    yield
    _RAY.stop()


@pytest.fixture
def redis_db11() -> Iterator[RedisSettings]:
    settings = RedisSettings(url=REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    lock_path = Path(tempfile.gettempdir()) / "nosq-tests-redis-db11.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            client.flushdb()
        except redis.ConnectionError as exc:
            pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with:\n  {START_REDIS}")
        try:
            yield settings
        finally:
            client.flushdb()
            client.close()
