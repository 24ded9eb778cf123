"""A real Manager (in this process, real Ray, real Redis db 11) and its profiles: measured at
start on a replica and stored, reused on the next start, measured again when the spec changes,
and used by the batcher (cap = b*, latency(b) for deadlines)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio

from nosq.manager.profiles.store import load, profile_key, store
from nosq.manager.service import Manager
from nosq.manager.settings import ManagerSettings
from nosq.producer import RedisSettings, keys
from nosq.producer.codec import encode_value
from nosq.producer.wire import Envelope, decode_envelope, now_ms, request_fields
from nosq.workers.profiles.curve import Plan, Point, Stop, assemble, batch_sizes
from nosq.workers.spec import ModelSpec, ServeConfig

pytestmark = pytest.mark.ray

MODELS = "tests.profiling.models"
MAGIC = 666.0


def settings(redis_db11: RedisSettings, **overrides: Any) -> ManagerSettings:
    return ManagerSettings(redis=redis_db11, consumer=f"test-{uuid.uuid4().hex[:10]}", shutdown_timeout_s=15.0,
                           **overrides)


@contextlib.asynccontextmanager
async def running(specs: list[ModelSpec], manager_settings: ManagerSettings) -> AsyncIterator[Manager]:
    manager = Manager(ServeConfig(models=tuple(specs)), manager_settings)
    try:
        await manager.start()
        yield manager
        assert manager.failed is None, f"a manager task failed: {manager.failed!r}"
    finally:
        await manager.stop()


async def stored(client: redis.asyncio.Redis, spec: ModelSpec, signature: str) -> dict[str, Any]:
    data = await client.get(profile_key(spec.id, "cpu", signature))
    assert data is not None, "no profile stored"
    return dict(json.loads(data))


def noop_spec(**changes: Any) -> ModelSpec:
    fields: dict[str, Any] = {"id": "noop", "factory": "nosq.workers.demo:noop", "device": "cpu", "max_batch": 16,
                              "latency_budget_ms": 20.0, "num_cpus": 0.25, "threads": 1}
    return ModelSpec(**(fields | changes))


async def test_profile_is_stored_reused_and_invalidated_by_a_spec_change(ray_cluster: None,
                                                                          redis_db11: RedisSettings) -> None:
    client = redis_db11.async_client()
    try:
        spec = noop_spec()
        async with running([spec], settings(redis_db11)) as manager:
            record = manager.profiles["noop"]
            assert record is not None and record.source == "measured"
            first = await stored(client, spec, "float32[8]")
            assert first["fingerprint"] == spec.fingerprint() and first["device_kind"] == "cpu"
            assert [p["batch"] for p in first["points"]] == [1, 2, 4, 8, 16]
            pipeline = manager.pipelines["noop"]
            assert pipeline.batcher.cap == record.profile.best_batch == first["best_batch"]
            assert pipeline.batcher.latency.curve() == {p["batch"]: p["p50_ms"] for p in first["points"]}

        # a restart (or another manager) reuses it: no second profile
        async with running([spec], settings(redis_db11)) as manager:
            record = manager.profiles["noop"]
            assert record is not None and record.source == "stored"
            assert record.profile.profiled_at == first["profiled_at"]
            assert (await stored(client, spec, "float32[8]"))["profiled_at"] == first["profiled_at"]

        # a changed spec (max_batch) makes it stale: profiled again and replaced
        changed = noop_spec(max_batch=8)
        async with running([changed], settings(redis_db11)) as manager:
            record = manager.profiles["noop"]
            assert record is not None and record.source == "measured"
            again = await stored(client, changed, "float32[8]")
            assert again["fingerprint"] == changed.fingerprint() != first["fingerprint"]
            assert again["profiled_at"] > first["profiled_at"]
            assert [p["batch"] for p in again["points"]] == [1, 2, 4, 8]
            assert manager.pipelines["noop"].batcher.cap <= 8
    finally:
        await client.aclose()


async def test_changed_options_invalidate_and_profile_on_start_off_serves_unprofiled(
        redis_db11: RedisSettings) -> None:
    client = redis_db11.async_client()
    try:
        spec = ModelSpec(id="mlp", factory="nosq.workers.demo:mlp", options={"d_in": 8})
        profile = synthetic_profile(spec, "float32[8]", p50_ms={1: 1.0, 2: 1.5})
        await store(client, profile)
        assert await load(client, spec, "cpu", "float32[8]") == profile
        other = spec.model_copy(update={"options": {"d_in": 8, "d_hidden": 64}})
        assert await load(client, other, "cpu", "float32[8]") is None  # same key, stale fingerprint
        await client.set(profile_key("mlp", "cpu", "float32[8]"), b"{not json")
        assert await load(client, spec, "cpu", "float32[8]") is None
    finally:
        await client.aclose()


def synthetic_profile(spec: ModelSpec, signature: str, *, p50_ms: dict[int, float], tail: float = 1.1) -> Any:
    sizes = batch_sizes(spec.max_batch)
    plan = Plan(model=spec.id, fingerprint=spec.fingerprint(), method=spec.methods[0], device="cpu",
                device_kind="cpu", signature=signature, max_batch=spec.max_batch, sizes=sizes,
                latency_budget_ms=spec.latency_budget_ms, weights_bytes=0, baseline_bytes=0,
                memory_limit_bytes=1 << 30, memory_method="rss_sampled", threads=1, torch_version="test")
    points = [Point(batch=b, p50_ms=ms, p95_ms=ms * tail, items_per_s=b * 1000 / ms, memory_bytes=0, reps=20)
              for b, ms in p50_ms.items()]
    return assemble(plan, points, Stop("cap", sizes[-1], "reached the cap"), profiled_at=time.time(), seconds=0.0)


# -- the batcher with a profile: release reasons under a busy replica ----------------------------


def paced_spec(model_id: str, *, max_wait_ms: float) -> ModelSpec:
    # runs 60 + 40 n ms per batch of n, or holds 1.09 s for an item starting with MAGIC
    return ModelSpec(id=model_id, factory=f"{MODELS}:paced", device="cpu", max_batch=8, latency_budget_ms=600.0,
                     max_wait_ms=max_wait_ms, num_cpus=0.25, threads=1,
                     options={"base_ms": 60.0, "per_item_ms": 40.0, "hold_ms": 1090.0})


async def send(client: redis.asyncio.Redis, model: str, firsts: list[float], *,
               deadline_ms: int | None = None) -> list[str]:
    """XADD one request per first element, all in one MULTI (one read sees them all)."""
    ids = []
    async with client.pipeline(transaction=True) as pipe:
        for first in firsts:
            rid = uuid.uuid4().hex
            ids.append(rid)
            item = np.array([first, 0, 0, 0], dtype=np.float32)
            fields = request_fields(request_id=rid, ct="msgpack", payload=encode_value("msgpack", item),
                                    deadline_ms=deadline_ms)
            pipe.xadd(keys.requests(model), dict(fields))  # type: ignore[arg-type]
        await pipe.execute()
    return ids


async def outcome(client: redis.asyncio.Redis, request_id: str, timeout_s: float = 20.0) -> tuple[Envelope, int]:
    """The result envelope (GET, BLPOP done, GET) and when this test saw it (unix ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = await client.get(keys.result(request_id))
        if data is not None:
            return decode_envelope("msgpack", data), now_ms()
        await client.blpop([keys.done(request_id)], timeout=1)  # type: ignore[misc]
    raise TimeoutError(f"no result for {request_id} within {timeout_s} s")


async def test_release_reasons_with_a_profile_and_a_busy_replica(ray_cluster: None,
                                                                 redis_db11: RedisSettings) -> None:
    client = redis_db11.async_client()
    deadline_model = paced_spec("paced", max_wait_ms=5000.0)
    wait_model = paced_spec("paced_wait", max_wait_ms=150.0)
    # the profile another manager (or `nosq profile --store`) left: p50 = 60 + 40 b as the model runs,
    # a slow tail (p95 = 2 x p50); b=8 (p95 760 ms) misses the 600 ms budget, b=4 (p95 440 ms) fits
    curve = {1: 100.0, 2: 140.0, 4: 220.0, 8: 380.0}
    profile = synthetic_profile(deadline_model, "float32[4]", p50_ms=curve, tail=2.0)
    assert profile.best_batch == 4
    try:
        await store(client, profile)
        async with running([deadline_model, wait_model], settings(redis_db11, profile_on_start=False)) as manager:
            assert manager.profiles["paced"] is not None and manager.profiles["paced"].source == "stored"
            assert manager.profiles["paced_wait"] is None  # nothing stored, and profiling at start is off
            assert manager.pipelines["paced"].batcher.cap == 4
            assert manager.pipelines["paced_wait"].batcher.cap == 8

            # deadline: the replica is busy (a 1.09 s batch), a request due in 1 s arrives 0.3 s into it; with
            # max_wait 5 s it is held only while a batch of 2 at p95 (280 ms) would still fit: released
            # ~0.72 s after it arrived, queued behind the busy batch (which ends at ~0.8 s), it runs 100 ms
            # and is done by ~0.9 s
            [busy] = await send(client, "paced", [MAGIC])
            await asyncio.sleep(0.3)
            due = now_ms() + 1000
            [urgent] = await send(client, "paced", [1.0], deadline_ms=due)
            envelope, seen_ms = await outcome(client, urgent)
            assert envelope.ok, envelope
            assert (envelope.batch["reason"], envelope.batch["size"]) == ("deadline", 1)
            assert seen_ms <= due, f"result {seen_ms - due} ms after its deadline"
            assert (await outcome(client, busy))[0].batch["reason"] == "idle"

            # full: with the replica busy, 4 requests (b* = 4, below max_batch 8) leave at once
            [busy] = await send(client, "paced", [MAGIC])
            await asyncio.sleep(0.2)
            started = time.monotonic()
            many = await send(client, "paced", [2.0, 3.0, 4.0, 5.0])
            results = [(await outcome(client, rid))[0] for rid in many]
            assert [(e.ok, e.batch["reason"], e.batch["size"]) for e in results] == [(True, "full", 4)] * 4
            assert time.monotonic() - started < 2.5  # not held for max_wait (5 s)
            await outcome(client, busy)

            # wait: with the replica busy and no deadline, one request leaves when max_wait (150 ms) elapses
            [busy] = await send(client, "paced_wait", [MAGIC])
            await asyncio.sleep(0.2)
            [lone] = await send(client, "paced_wait", [6.0])
            envelope, _ = await outcome(client, lone)
            assert (envelope.ok, envelope.batch["reason"], envelope.batch["size"]) == (True, "wait", 1)
            await outcome(client, busy)
    finally:
        await client.aclose()
