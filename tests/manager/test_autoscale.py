"""Autoscaling on real Ray and real Redis (db 8, this module's own; flushed per test).

A slow echo model (``tests.manager.models:slow``: 0.2 s a batch, batches of one, so one replica
drains 5 requests/s) gets a burst. The manager's autoscaler must add replicas (up to max), then
retire them once the stream is empty (down to min), or unload the model at min_replicas = 0 and
load it again when requests wait. Every decision is logged and shown by ``nosq models --json``,
the memory budget holds, and every request is answered exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio

from nosq.manager.service import Manager
from nosq.manager.settings import ManagerSettings
from nosq.producer import RedisSettings
from nosq.producer.errors import NosqError
from nosq.workers.spec import ModelSpec
from tests.manager.harness import config, entry, locked_db, running_manager, spec, wait_envelope, wait_for, xadd_all
from tests.manager.models import read_record

pytestmark = [pytest.mark.integration, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/8"  # db 8: this module's own (db 10 is the rest of tests/manager)
MIB = 1024 * 1024
DELAY_S = 0.2  # per batch of one: 5 requests/s per replica


@pytest.fixture
async def db8() -> AsyncIterator[redis.asyncio.Redis]:
    async with locked_db(8) as client:
        yield client


def scaled_spec(model: str, record: Path, **fields: Any) -> ModelSpec:
    fields = {"replicas": 1, "min_replicas": 1, "max_replicas": 3, "scale_up_delay_s": 0.3,
              "scale_down_delay_s": 1.0, "scale_target_wait_s": 1.0, **fields}
    return spec(model, "slow", options={"delay_s": DELAY_S, "record": str(record)}, max_batch=1, **fields)


def settings(**overrides: Any) -> ManagerSettings:
    overrides = {"redis": RedisSettings(url=REDIS_URL), "consumer": f"auto-{uuid.uuid4().hex[:10]}",
                 "shutdown_timeout_s": 15.0, "profile_on_start": False, "autoscale_interval_s": 0.1,
                 "load_poll_ms": 100, "node": "testnode", **overrides}
    return ManagerSettings(**overrides)


async def burst(client: redis.asyncio.Redis, model: str, firsts: range) -> list[tuple[str, float]]:
    """XADD one request per first element (in one MULTI), return (request id, first element)."""
    built = [(entry(model, np.array([float(i), 1.0], dtype=np.float32)), float(i)) for i in firsts]
    await xadd_all(client, model, [fields for (_, fields), _ in built])
    return [(rid, first) for (rid, _), first in built]


async def answered(client: redis.asyncio.Redis, sent: list[tuple[str, float]]) -> None:
    for rid, first in sent:
        envelope = await wait_envelope(client, rid, timeout_s=60.0)
        assert envelope.ok, f"{rid}: {envelope.code}: {envelope.message}"
        assert float(np.asarray(envelope.out)[0]) == first


def ran_once(record: Path, firsts: range) -> None:
    """Each request ran in exactly one batch (the model records every call)."""
    runs = Counter(first for call in read_record(record) for first in call["firsts"])  # type: ignore[attr-defined]
    assert runs == Counter(float(i) for i in firsts), f"ran more or less than once: {runs}"


def replicas(manager: Manager, model: str) -> int:
    assert manager.scaling is not None
    view = manager.scaling.view(model)
    assert view is not None
    return int(view["replicas"])


async def nosq_models(*args: str) -> dict[str, Any]:
    """``nosq models --json`` in its own process, as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nosq.manager.ops.cli", "--log-level", "warning", "models", "--json",
        "--redis-url", REDIS_URL, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def autoscale_row(view: dict[str, Any], model: str) -> dict[str, Any]:
    [row] = [r for r in view["autoscale"] if r["model"] == model]
    return row


def scale_lines(caplog: pytest.LogCaptureFixture, model: str) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == "nosq.manager.scaling.loop"]
    return [m for m in messages if m.startswith(f"model {model}:")]


async def test_a_burst_scales_up_and_idle_scales_back_down(
        ray_repo: None, db8: redis.asyncio.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nosq.manager.scaling.loop")
    record = tmp_path / "calls.jsonl"
    firsts = range(40)  # 8 s of work for one replica; the target is 1 s
    async with running_manager(config(scaled_spec("burst", record)), settings()) as manager:
        assert replicas(manager, "burst") == 1
        sent = await burst(db8, "burst", firsts)
        await wait_for(lambda: replicas(manager, "burst") > 1, 30, "scaled up under the burst")
        up = await nosq_models()  # while the burst drains (the heartbeat is written at each decision)
        row = autoscale_row(up, "burst")
        assert (row["min_replicas"], row["max_replicas"]) == (1, 3)
        assert row["last"]["from"] == 1 and row["last"]["to"] > 1 and row["last"]["applied"]
        assert "over the target" in row["last"]["reason"] and row["last"]["backlog"] > 0
        assert up["models"] == [], "no registry without a memory budget: the heartbeat carries the decisions"
        await answered(db8, sent)

        await wait_for(lambda: replicas(manager, "burst") == 1, 30, "back to min_replicas once idle")
        await wait_for(lambda: manager.scaling is not None and manager.scaling.decisions["burst"]["to"] == 1, 5,
                       "the scale-down recorded")
        down = autoscale_row(await nosq_models(), "burst")
        assert (down["replicas"], down["last"]["to"], down["last"]["reason"]) == (1, 1, "idle: no request waiting")
        # an operator's scale goes through the same place, recorded too; below 1 is refused
        await manager.scale_model("burst", 2)
        assert manager.scaling is not None
        assert manager.scaling.decisions["burst"]["reason"] == "operator: nosq models scale"
        with pytest.raises(NosqError, match="at least 1 replica"):
            await manager.scale_model("burst", 0)
    ran_once(record, firsts)
    lines = scale_lines(caplog, "burst")
    assert any("autoscale 1 -> " in line and "backlog" in line and "predicted drain" in line for line in lines), lines
    assert any(" -> 1: idle: no request waiting" in line for line in lines), lines


async def test_scale_to_zero_unloads_and_a_request_brings_it_back_within_the_budget(
        ray_repo: None, db8: redis.asyncio.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nosq.manager.scaling.loop")
    record = tmp_path / "calls.jsonl"
    model = scaled_spec("zero", record, min_replicas=0)
    # 100 MiB a replica (no stored profile), a 250 MiB budget: 2 replicas fit, the third does not
    budget = settings(cpu_budget_bytes=250 * MIB, default_model_bytes=100 * MIB)
    async with running_manager(config(model), budget) as manager:
        assert manager.loader is not None
        sent = await burst(db8, "zero", range(50))  # 10 s of work for one replica
        await wait_for(lambda: replicas(manager, "zero") == 2, 30, "scaled up as far as the budget allows")
        # the third replica does not fit: whoever asks (the autoscaler may, if the backlog outlasts a
        # replica's start; an operator here) is refused with the budget as the reason, and it is logged
        with pytest.raises(NosqError, match="refused: budget: 3 replica"):
            await manager.scale_model("zero", 3)
        view = await nosq_models()
        [registered] = view["models"]
        assert (registered["replicas"], registered["bytes"]) == (2, 200 * MIB)
        assert view["devices"][0]["used_bytes"] == 200 * MIB
        last = autoscale_row(view, "zero")["last"]
        assert last["wanted"] == 3 and "budget" in last["refused"] and not last["applied"], last
        await answered(db8, sent)
        assert replicas(manager, "zero") <= 2

        await wait_for(lambda: "zero" not in manager.loader.resident if manager.loader else False, 30,
                       "unloaded once idle (min_replicas = 0)")
        view = await nosq_models()
        [registered] = view["models"]
        assert registered["state"] == "evicted"
        assert view["devices"][0]["used_bytes"] == 0, "scale to zero gives the bytes back"
        row = autoscale_row(view, "zero")
        assert (row["replicas"], row["last"]["to"], row["last"]["reason"]) == (0, 0, "idle: no request waiting")

        again = await burst(db8, "zero", range(50, 53))  # they wait in the stream, then are served
        await answered(db8, again)
        assert manager.loader.loads == ["zero", "zero"]
        await wait_for(lambda: manager.scaling is not None and manager.scaling.decisions["zero"]["from"] == 0, 5,
                       "the load on demand recorded")
    ran_once(record, range(53))
    lines = scale_lines(caplog, "zero")
    assert any("autoscale 2 -> 3 refused: budget" in line for line in lines), lines
    assert any("autoscale 2 -> 0: idle" in line for line in lines), lines
    assert any("autoscale 0 -> 1: requests waited at zero replicas" in line for line in lines), lines


async def test_scale_to_zero_without_a_budget_is_refused_at_start(tmp_path: Path) -> None:
    manager = Manager(config(scaled_spec("nobudget", tmp_path / "r", min_replicas=0)), settings())
    with pytest.raises(NosqError, match="needs on-demand loading"):
        await manager.start()
    await manager.stop()
