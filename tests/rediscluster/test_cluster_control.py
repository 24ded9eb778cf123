"""The control plane (arq jobs) on a real Redis Cluster: every key arq builds for nosq's jobs is in
one slot, arq's plain connection goes to that slot's master, found again after a redirect or a
failover; ``nosq models scale`` changes a real manager's replicas through the cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from arq import constants
from redis.crc import key_slot

from nosq.manager.ops.control import (
    CLUSTER_CONTROL_QUEUE,
    CONTROL_QUEUE,
    ControlWorker,
    SlotOwner,
    control_job_id,
    control_queue,
    request,
)
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import RedisSettings
from tests.procs import reap_ray_of
from tests.rediscluster.redisnodes import RedisNodes

BASE_PORT = 7120  # 7120..7125 (+10000: bus); serving has 7100.., failover 7110..; the last test kills a master
PLAIN = RedisSettings(url="redis://127.0.0.1:6379/9")
# arq keeps a job's result for KEEP_RESULT_S under its id, and the same request (same id) made again
# meanwhile gets that result: each test here asks with arguments of its own.


def arq_keys(queue: str, job_id: str) -> list[str]:
    """Every key arq 0.28 builds for one job on ``queue`` (connections.py, worker.py, jobs.py)."""
    return [queue, queue + constants.health_check_key_suffix, constants.abort_jobs_ss,
            *(prefix + job_id for prefix in (constants.job_key_prefix, constants.in_progress_key_prefix,
                                             constants.result_key_prefix, constants.retry_key_prefix))]


def test_every_arq_key_of_a_cluster_job_shares_one_slot() -> None:
    cluster = RedisSettings(url="redis+cluster://127.0.0.1:7120")
    queue = control_queue(cluster)
    for operation, args in (("load", ("mlp",)), ("scale", ("noop", 2)), ("unload", ("a:b",)), ("profile", ("x",))):
        job_id = control_job_id(cluster, operation, *args)
        slots = {key: key_slot(key.encode()) for key in arq_keys(queue, job_id)}
        assert len(set(slots.values())) == 1, slots
    # plain Redis: the names of before, unchanged
    assert (control_queue(PLAIN), control_job_id(PLAIN, "load", "mlp")) == (CONTROL_QUEUE, "load:mlp")
    assert control_job_id(PLAIN, "scale", "noop", 2) == "scale:noop:2"
    assert (queue, control_job_id(cluster, "load", "mlp")) == (CLUSTER_CONTROL_QUEUE, "{arq:abort}load:mlp")


@dataclass
class FakeManager:
    """A ``Controllable`` with no Ray: records what it was asked."""

    redis_settings: RedisSettings
    consumer: str = "fake"
    served: Collection[str] = ("noop",)
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def load_model(self, model: str) -> dict[str, Any]:
        self.calls.append(("load", model, 0))
        return {"model": model, "loaded": True}

    async def unload_model(self, model: str) -> dict[str, Any]:
        self.calls.append(("unload", model, 0))
        return {"model": model, "loaded": False}

    async def scale_model(self, model: str, replicas: int) -> dict[str, Any]:
        self.calls.append(("scale", model, replicas))
        return {"model": model, "replicas": replicas}

    async def reprofile_model(self, model: str) -> dict[str, Any]:
        self.calls.append(("profile", model, 0))
        return {"model": model}


async def test_owner_is_the_master_of_the_queue_slot(nodes: RedisNodes) -> None:
    host, port = await SlotOwner(RedisSettings(url=nodes.url)).find()
    assert (host, port) == ("127.0.0.1", nodes.master_of(CLUSTER_CONTROL_QUEUE))


def _other_master(nodes: RedisNodes) -> int:
    owner = nodes.master_of(CLUSTER_CONTROL_QUEUE)
    others = {nodes.master_of(f"{{{n}}}") for n in range(64)} - {owner}
    return min(others)


async def test_a_moved_reply_means_a_fresh_lookup_for_worker_and_request(nodes: RedisNodes,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RedisSettings(url=nodes.url)
    wrong = ("127.0.0.1", _other_master(nodes))
    real, lookups = SlotOwner.find, Counter[int]()

    async def misdirected(self: SlotOwner) -> tuple[str, int]:  # the first answer is stale (a slot migrated)
        lookups[id(self)] += 1
        return wrong if lookups[id(self)] == 1 else await real(self)

    monkeypatch.setattr(SlotOwner, "find", misdirected)
    manager = FakeManager(settings)
    worker = ControlWorker(manager)
    task = asyncio.create_task(worker.run())
    try:
        assert await request(settings, "scale", "noop", 3, timeout_s=30) == {"model": "noop", "replicas": 3}
        assert manager.calls == [("scale", "noop", 3)]
        assert sorted(lookups.values()) == [2, 2]  # the worker's and the request's: each redirected once
        with pytest.raises(Exception, match="not served by manager fake"):
            await request(settings, "load", "nope-fake", timeout_s=30)
    finally:
        await worker.aclose()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(240)
def test_nosq_models_scale_reaches_a_manager_on_the_cluster(nodes: RedisNodes, serve_config: Path,
                                                            tmp_path: Path) -> None:
    settings = RedisSettings(url=nodes.url)

    def nosq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", settings.url,
                               "--log-level", "warning", *args], check=False, capture_output=True, text=True,
                              timeout=180)

    def noop_replicas() -> int | None:
        status = nosq("status", "--json")
        assert status.returncode == 0, status.stderr
        rows = [row for row in json.loads(status.stdout)["models"] if row["model"] == "noop"]
        return rows[0].get("replicas") if rows else None

    with (tmp_path / "manager.log").open("wb") as log:
        manager = start_manager(settings, "--config", str(serve_config), "--log-level", "warning",
                                "--metrics-port", "-1", consumer="rc-control", log=log)
        try:
            assert noop_replicas() == 1
            scaled = nosq("models", "--timeout", "120", "scale", "noop", "2")
            deadline = time.monotonic() + 30
            replicas = noop_replicas()
            while replicas != 2 and time.monotonic() < deadline:
                time.sleep(0.5)  # the heartbeat is written right after a scaling decision: a short wait
                replicas = noop_replicas()
            loaded = nosq("models", "--timeout", "120", "load", "noop")
            unknown = nosq("models", "--timeout", "60", "load", "nope")
        finally:
            assert stop_manager(manager) == 0
            left = reap_ray_of(manager.pid)
            assert not left, f"the manager's Ray left {len(left)} process(es) behind: {left}"
    manager_log = (tmp_path / "manager.log").read_text(errors="replace")
    assert scaled.returncode == 0, (scaled.stderr, manager_log[-3000:])
    assert json.loads(scaled.stdout) | {"batch_cap": 0} == {
        "model": "noop", "manager": "rc-control", "loaded": True, "replicas": 2, "batch_cap": 0}
    assert replicas == 2
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["replicas"] == 2, loaded.stderr
    assert unknown.returncode == 1 and "not served by manager rc-control" in unknown.stderr, unknown.stderr


@pytest.mark.timeout(120)
async def test_after_a_failover_worker_and_request_find_the_promoted_master(nodes: RedisNodes) -> None:
    """Last in this module: it kills the master of the queue's slot."""
    settings = RedisSettings(url=nodes.url)
    old = nodes.master_of(CLUSTER_CONTROL_QUEUE)
    assert old != nodes.ports[0], "the URL's node must survive (RedisNodes.master_of asks it)"
    manager = FakeManager(settings)
    worker = ControlWorker(manager)
    task = asyncio.create_task(worker.run())
    try:
        assert await request(settings, "scale", "noop", 5, timeout_s=30) == {"model": "noop", "replicas": 5}
        await asyncio.get_running_loop().run_in_executor(None, nodes.kill, old)
        started = time.monotonic()
        assert await request(settings, "scale", "noop", 6, timeout_s=60) == {"model": "noop", "replicas": 6}
        took = time.monotonic() - started
        new = nodes.master_of(CLUSTER_CONTROL_QUEUE)
        assert new != old and new in nodes.ports
        assert manager.calls == [("scale", "noop", 5), ("scale", "noop", 6)]
        print(f"control plane answered {took:.1f} s after the kill of :{old} (promoted: :{new})")
    finally:
        await worker.aclose()
        await asyncio.gather(task, return_exceptions=True)
