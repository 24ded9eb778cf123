"""The manager on the registry: on-demand loading under a CPU budget, eviction by policy.

Real Redis (db 13, flushed before and after each test), real Ray (loopback, started here for
this module), an in-process ``Manager``. Three echo models whose bytes come from profiles stored
by hand (40 MiB each) share a 100 MiB CPU budget: two fit, the third evicts one. Requests go to
the models in turn; every one must be answered ok, the registry's used bytes are sampled
throughout and must never exceed the budget, and the evictions must follow the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from nosq.manager.memory.registry import Registry
from nosq.manager.profiles.store import store
from nosq.manager.service import Manager
from nosq.manager.settings import ManagerSettings
from nosq.producer import RedisSettings
from nosq.workers.profiles.curve import Plan, Point, Profile, Stop
from nosq.workers.spec import ModelSpec, ServeConfig
from tests.manager.harness import config, entry, spec, wait_envelope, xadd_all

pytestmark = [pytest.mark.integration, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
MODEL_BYTES = 40 * MIB  # weights 30 MiB + 10 MiB at b*, per the stored profiles
BUDGET = 100 * MIB  # two models fit, three do not
REQUESTS = 12


def models() -> ServeConfig:
    return config(*(spec(name, "slow", options={"delay_s": 0.01}, max_batch=8) for name in ("ma", "mb", "mc")))


def handmade_profile(model: ModelSpec) -> Profile:
    """A stored profile for ``model`` on CPU: 30 MiB of weights, 10 MiB for a batch of 8 (b*)."""
    plan = Plan(model=model.id, fingerprint=model.fingerprint(), method="forward", device="cpu", device_kind="cpu",
                signature="handmade", max_batch=8, sizes=(1, 8), latency_budget_ms=100.0,
                weights_bytes=30 * MIB, baseline_bytes=0, memory_limit_bytes=1024 * MIB, memory_method="none",
                threads=1, torch_version="handmade")
    points = (Point(1, 1.0, 1.5, 1000.0, 2 * MIB, 3), Point(8, 2.0, 3.0, 4000.0, 10 * MIB, 3))
    return Profile(plan=plan, points=points, stop=Stop("cap", 8, "cap"), best_batch=8, reason="handmade",
                   profiled_at=0.0, seconds=0.0)


def settings(url: str, policy: str) -> ManagerSettings:
    return ManagerSettings(redis=RedisSettings(url=url), consumer=f"reg-{uuid.uuid4().hex[:10]}",
                           shutdown_timeout_s=15.0, profile_on_start=False, cpu_budget_bytes=BUDGET,
                           eviction_policy=policy, load_poll_ms=100, node="testnode")  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def budget_manager(url: str, policy: str) -> AsyncIterator[tuple[Manager, list[int]]]:
    """A manager with the 100 MiB budget, and the registry's used bytes sampled every 10 ms."""
    serve = models()
    client = redis.asyncio.Redis.from_url(url)
    for model in serve.models:
        await store(client, handmade_profile(model))
    samples: list[int] = []
    bad: list[str] = []

    async def sample(reg: Registry) -> None:
        while True:
            for device in await reg.audit():
                samples.append(device.used_bytes)
                if not device.ok:
                    bad.append(repr(device))
            await asyncio.sleep(0.01)

    manager = Manager(serve, settings(url, policy))
    sampler = asyncio.create_task(sample(Registry(client, owner="sampler")))
    try:
        await manager.start()
        yield manager, samples
    finally:
        await manager.stop()
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await client.aclose()
    assert manager.failed is None, f"a manager task failed: {manager.failed!r}"
    assert not bad, f"registry audit failed: {bad[:3]}"
    assert samples and max(samples) <= BUDGET, f"used bytes went over the budget: {max(samples)} > {BUDGET}"


async def serve_burst(client: redis.asyncio.Redis, model: str, tag: float) -> None:
    """REQUESTS echo requests to ``model`` at once; every one answered ok with its own input."""
    items = [np.array([tag, float(i), 2.0, 3.0], dtype=np.float32) for i in range(REQUESTS)]
    built = [entry(model, item) for item in items]
    await xadd_all(client, model, [fields for _, fields in built])
    for (rid, _), item in zip(built, items, strict=True):
        envelope = await wait_envelope(client, rid, timeout_s=60.0)
        assert envelope.ok, f"{model}: {envelope.code}: {envelope.message}"
        np.testing.assert_array_equal(np.asarray(envelope.out, dtype=np.float32), item)


def nosq_models_json(url: str) -> dict[str, list[dict[str, object]]]:
    done = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--log-level", "warning", "models", "--json",
                           "--redis-url", url], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    parsed: dict[str, list[dict[str, object]]] = json.loads(done.stdout)
    return parsed


async def test_fifo_loads_on_demand_and_evicts_the_first_loaded(ray_repo: None, registry_url: str) -> None:
    client = redis.asyncio.Redis.from_url(registry_url)
    try:
        async with budget_manager(registry_url, "fifo") as (manager, samples):
            assert manager.loader is not None
            assert manager.loader.resident == set(), "nothing loads before requests arrive"
            for n, model in enumerate(("ma", "mb", "mc", "ma")):
                await serve_burst(client, model, float(n))
            assert manager.loader.loads == ["ma", "mb", "mc", "ma"]
            # mc needed room: ma (loaded first) left; ma again: mb (loaded before mc) left
            assert manager.loader.evictions == ["ma", "mb"]
            assert manager.loader.resident == {"mc", "ma"}
            snapshot = await asyncio.to_thread(nosq_models_json, registry_url)
            states = {row["model"]: row["state"] for row in snapshot["models"]}
            assert states == {"ma": "ready", "mb": "evicted", "mc": "ready"}
            by_model = {row["model"]: row for row in snapshot["models"]}
            assert by_model["ma"]["bytes"] == MODEL_BYTES and by_model["ma"]["owner"] == manager.settings.consumer
            assert by_model["mb"]["evicted_for"] == "ma"
            assert snapshot["devices"][0]["used_bytes"] == 2 * MODEL_BYTES
            assert snapshot["devices"][0]["budget_bytes"] == BUDGET
            alive = {m: len(pool.replicas) for m, pool in manager._pools.items()}
            assert alive == {"ma": 1, "mb": 0, "mc": 1}, "an evicted model's actors are killed"
            assert len(samples) > 10
        rows = await Registry(client, owner="check").snapshot()
        assert {r["state"] for r in rows} == {"evicted"}, "stop releases every model"
        devices = await Registry(client, owner="check").devices()
        assert devices[0]["used_bytes"] == 0
    finally:
        await client.aclose()


async def test_lru_evicts_the_least_recently_used(ray_repo: None, registry_url: str) -> None:
    client = redis.asyncio.Redis.from_url(registry_url)
    try:
        async with budget_manager(registry_url, "lru") as (manager, _):
            assert manager.loader is not None
            for n, model in enumerate(("ma", "mb", "ma", "mc", "mb")):
                await serve_burst(client, model, float(n))
            assert manager.loader.loads == ["ma", "mb", "mc", "mb"]
            # mc: mb was used less recently than ma (FIFO would take ma); mb again: ma is now the oldest used
            assert manager.loader.evictions == ["mb", "ma"]
    finally:
        await client.aclose()
