"""Redis outages against a running manager: each one is waited out on its own, /healthz says
so meanwhile, and only an outage longer than ``redis_outage_limit_s`` stops the manager, with
the reason. Redis here is a private AOF ``redis-server`` that the test kills and restarts.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from nosq.manager.runtime.redislink import RedisOutage
from nosq.manager.service import Manager, State
from nosq.producer import RedisSettings
from tests.chaos.chaos_support import AofRedis
from tests.manager.harness import (
    config,
    entry,
    manager_settings,
    running_manager,
    spec,
    wait_envelope,
    xadd_all,
)

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


@pytest.fixture
def aof(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def served(client: redis.asyncio.Redis, value: float) -> None:
    rid, fields = entry("noop", np.full(4, value, np.float32))
    await xadd_all(client, "noop", [fields])
    envelope = await wait_envelope(client, rid, timeout_s=30)
    assert envelope.ok, envelope


async def outage(aof: AofRedis, seconds: float, port: int) -> None:
    """Redis killed -9 for ``seconds`` (the AOF keeps what it acknowledged), then restarted."""
    aof.kill9()
    await asyncio.sleep(seconds / 2)
    status, body = await asyncio.to_thread(health, port)
    assert status == 503 and "unreachable" in body, (status, body)
    await asyncio.sleep(seconds / 2)
    await asyncio.to_thread(aof.start)


@pytest.mark.timeout(120)
async def test_repeated_outages_each_under_the_limit_are_survived(aof: AofRedis) -> None:
    """Two outages of 4 s with 2 s of service between them, under a 6 s limit: together they
    last longer than the limit, but each is timed on its own (the time Redis was first lost is
    reset once it answers again)."""
    settings = manager_settings(redis=RedisSettings(url=aof.url), redis_outage_limit_s=6.0, metrics_port=0,
                                janitor_interval_s=0.5)
    client = redis.asyncio.Redis.from_url(aof.url)
    try:
        async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), settings) as manager:
            assert manager.metrics_server is not None
            port = manager.metrics_server.port
            await served(client, 1.0)
            assert await asyncio.to_thread(health, port) == (200, "ok\n")
            await outage(aof, 4.0, port)
            await served(client, 2.0)
            await asyncio.sleep(2.0)
            await outage(aof, 4.0, port)
            await served(client, 3.0)
            assert manager.state is State.RUNNING and manager.failed is None
            assert manager.link.outages >= 2
            assert await asyncio.to_thread(health, port) == (200, "ok\n")
    finally:
        await client.aclose()


@pytest.mark.timeout(120)
async def test_an_outage_past_the_limit_stops_the_manager_with_the_reason(aof: AofRedis) -> None:
    settings = manager_settings(redis=RedisSettings(url=aof.url), redis_outage_limit_s=3.0)
    manager = Manager(config(spec("noop", "nosq.workers.demo:noop")), settings)
    run = asyncio.create_task(manager.run())
    try:
        client = redis.asyncio.Redis.from_url(aof.url)
        for _ in range(600):  # started: its heartbeat is written once it serves
            if manager.state is State.RUNNING:
                break
            await asyncio.sleep(0.05)
        await served(client, 1.0)
        await client.aclose()
        aof.kill9()
        started = time.monotonic()
        await asyncio.wait_for(run, 60)
        stopped_after = time.monotonic() - started
    finally:
        if not run.done():
            manager.request_stop()
            await asyncio.gather(run, return_exceptions=True)
    assert isinstance(manager.failed, RedisOutage), manager.failed
    assert "over the limit of 3 s" in str(manager.failed) and "--redis-outage-limit-s" in str(manager.failed)
    assert 3.0 <= stopped_after < 30.0, stopped_after
    assert manager.state is State.STOPPED
