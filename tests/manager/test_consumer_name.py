"""A manager refuses a consumer name that a live manager holds, and takes back the name of a
dead one, including a predecessor that had its own pid (a container restarted as pid 1)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from nosq.manager.service import Manager
from nosq.producer import keys
from nosq.producer.errors import NosqError
from tests.conftest import FakeRedisSettings
from tests.manager.harness import config, manager_settings, spec


async def claim(fake_settings: FakeRedisSettings, holder: dict[str, object] | None) -> None:
    settings = manager_settings(redis=fake_settings, consumer="m")
    manager = Manager(config(spec("noop", "nosq.workers.demo:noop")), settings)
    client = fake_settings.async_client()
    if holder is not None:
        await client.set(keys.manager_heartbeat("m"), json.dumps(holder))
    manager._redis = client
    try:
        await manager._claim_consumer_name()
        assert json.loads(await client.get(keys.manager_heartbeat("m")))["pid"] == os.getpid()
    finally:
        await client.aclose()


async def test_a_free_or_dead_name_is_taken(fake_settings: FakeRedisSettings) -> None:
    await claim(fake_settings, None)
    await claim(fake_settings, {"host": socket.gethostname(), "pid": 999_999_999})  # no such process


async def test_its_own_pid_is_a_predecessor_not_a_rival(fake_settings: FakeRedisSettings) -> None:
    await claim(fake_settings, {"host": socket.gethostname(), "pid": os.getpid()})


@pytest.mark.parametrize("holder", [
    {"host": socket.gethostname(), "pid": os.getppid()},  # a live process on this host
    {"host": "elsewhere", "pid": 1},  # another host: its liveness cannot be checked from here
])
async def test_a_live_holder_is_refused(fake_settings: FakeRedisSettings, holder: dict[str, object]) -> None:
    with pytest.raises(NosqError, match="in use by a live manager"):
        await claim(fake_settings, holder)
