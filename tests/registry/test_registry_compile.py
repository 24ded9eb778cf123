"""A model that cannot be traced serves eagerly, and the registry (`nosq models`) says why."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis.asyncio

from nosq.manager.service import Manager
from nosq.manager.settings import ManagerSettings
from nosq.producer import RedisSettings
from nosq.workers.spec import ModelSpec, ServeConfig
from tests.manager.harness import entry, wait_envelope, xadd_all
from tests.registry.test_registry_manager import nosq_models_json

pytestmark = [pytest.mark.integration, pytest.mark.ray]


async def test_compile_fallback_is_recorded_and_shown(ray_repo: None, registry_url: str) -> None:
    spec = ModelSpec(id="branchy", factory="tests.compile.test_compile_fallback:branchy", device="cpu",
                     max_batch=4, num_cpus=0.25, threads=1, compile="trace")
    settings = ManagerSettings(redis=RedisSettings(url=registry_url), consumer=f"cmp-{uuid.uuid4().hex[:8]}",
                               shutdown_timeout_s=15.0, profile_on_start=False, cpu_budget_bytes=512 * 2**20,
                               load_poll_ms=100, node="testnode")
    manager = Manager(ServeConfig(models=(spec,)), settings)
    client = redis.asyncio.Redis.from_url(registry_url)
    try:
        await manager.start()
        rid, fields = entry("branchy", np.ones(4, dtype=np.float32))
        await xadd_all(client, "branchy", [fields])
        envelope = await wait_envelope(client, rid, timeout_s=60.0)
        assert envelope.ok, envelope.message  # served, eagerly: ones sum > 0 -> doubled
        np.testing.assert_array_equal(np.asarray(envelope.out), np.full(4, 2.0, dtype=np.float32))
        for _ in range(40):  # the heartbeat looks at compile status every few seconds
            (row,) = [r for r in nosq_models_json(registry_url)["models"] if r["model"] == "branchy"]
            if row["last_error"]:
                break
            await asyncio.sleep(0.5)
        assert "compile trace -> eager" in str(row["last_error"]), row
    finally:
        await manager.stop()
        await client.aclose()
    assert manager.failed is None
