"""Fixtures of the cluster tier: a real multi-node Ray on loopback, and db 1 of the real Redis.

* ``db1``: db 1 flushed before and after each test, under an exclusive file lock (one run of
  this tier at a time: they would flush each other's streams).
* ``cluster``: a ``LocalCluster`` (``cluster_support``), closed after the test; the test fails
  if any process of it outlives ``close()``.

Test models (``tests.manager.models``) are imported by Ray workers: the repo root goes on
``sys.path`` here and on ``PYTHONPATH`` of every node and manager started by these tests.
"""

from __future__ import annotations

import fcntl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cluster.cluster_support import LocalCluster  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/1"  # db 1: this tier's own
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'


@pytest.fixture
def db1() -> Iterator[redis.Redis]:
    lock_path = Path(tempfile.gettempdir()) / "nosq-tests-redis-db1.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        try:
            client.flushdb()
        except redis.ConnectionError as exc:
            pytest.fail(f"no Redis at {REDIS_URL} ({exc}); start one with:\n  {START_REDIS}")
        try:
            yield client
        finally:
            client.flushdb()
            client.close()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster()
    try:
        yield local
    finally:
        left = local.close()
    assert not left, f"processes of the test cluster outlived it: {left}"
