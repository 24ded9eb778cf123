"""nosq on a real Redis Cluster (3 masters, 3 replicas): the registry's scripts, and a real
manager (``nosq serve``, its own Ray) answering sync and async producers, each id once, a model
on 3 partitions (one per master), its metrics and ``nosq status`` read from the cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from nosq.manager.memory.registry import Outcome, Registry
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import AsyncProducer, Producer, RedisSettings, keys
from nosq.producer.resp import get_many_blocking
from nosq.producer.wire import decode_envelope
from tests.procs import reap_ray_of
from tests.rediscluster.redisnodes import RedisNodes

BASE_PORT = 7100
METRICS_PORT = 9197
NODE, GPU = "n1", "cuda:0"


def test_every_key_of_a_model_or_the_registry_shares_a_slot(nodes: RedisNodes) -> None:
    client = RedisSettings(url=nodes.url).client()
    try:
        slot = client.keyslot  # type: ignore[attr-defined]
        assert {slot(keys.requests("m")), slot(keys.admission("m")), slot(keys.dead_letters("m"))} == {
            slot(keys.requests("m"))}
        registry = [keys.registry_model("m"), keys.registry_models(), keys.registry_device("n/d"),
                    keys.registry_devices(), keys.registry_resident("n/d"), keys.registry_evictions(),
                    keys.registry_served()]
        assert len({slot(key) for key in registry}) == 1
    finally:
        client.close()


async def test_registry_scripts_reserve_evict_release(nodes: RedisNodes) -> None:
    client = RedisSettings(url=nodes.url).async_client()
    try:
        reg = Registry(client, owner="mgr-a", policy="fifo")
        await reg.set_budget(NODE, GPU, 300)
        for n, model in enumerate(("a", "b", "c"), 1):
            got = await reg.reserve(model, node=NODE, device=GPU, nbytes=100)
            assert got.outcome is Outcome.RESERVED, got
            await reg.mark_ready(model, replicas=1, load_ms=10)
            # idle long enough to be a victim (as the registry tier's ready_model does)
            await client.hset(keys.registry_model(model), mapping={"loaded_at": n, "last_used": n, "uses": 1,
                                                                    "backlog": 0})  # type: ignore[misc]
        got = await reg.reserve("x", node=NODE, device=GPU, nbytes=100)
        assert got.outcome is Outcome.EVICT and [v.model for v in got.victims] == ["a"], got
        assert await reg.release("a")
        assert (await reg.reserve("x", node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
        (device,) = await reg.audit()
        assert (device.used_bytes, device.resident_bytes) == (300, 300), device
        assert {r["model"] for r in await reg.snapshot()} >= {"b", "c", "x"}
        assert [e.victims for e in await reg.evictions()] == [("a",)]
        assert sorted(await reg.release_all()) == ["b", "c", "x"]
    finally:
        await client.aclose()


@pytest.mark.timeout(240)
def test_manager_answers_sync_and_async_producers_once(nodes: RedisNodes, serve_config: Path,
                                                       tmp_path: Path) -> None:
    settings = RedisSettings(url=nodes.url)
    rng = np.random.default_rng(0)
    stream = keys.requests("noop")
    with Producer(settings) as producer, (tmp_path / "manager.log").open("wb") as log:
        # entries a consumer read and never answered (a dead manager): the janitor takes them over
        ghost_inputs = [np.full(4, -i, dtype=np.float32) for i in range(1, 101)]
        ghost_handles = producer.submit_many("noop", ghost_inputs)
        admin = settings.client()
        try:
            admin.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            assert len(admin.xreadgroup(keys.GROUP, "ghost", {stream: ">"}, count=1000)[0][1]) == 100
        finally:
            admin.close()
        manager = start_manager(settings, "--config", str(serve_config), "--log-level", "warning",
                                "--min-idle-ms", "1000", "--metrics-port", str(METRICS_PORT), consumer="rc-e2e",
                                log=log)
        try:
            ghost_out = [producer.outcome(h, timeout_s=60) for h in ghost_handles]
            inputs = [rng.standard_normal(4, dtype=np.float32) for _ in range(600)]
            handles = producer.submit_many("noop", inputs)
            sync_out = {h.id: producer.outcome(h, timeout_s=60) for h in handles}

            async def submit_async() -> dict[str, tuple[float, bool]]:
                async with AsyncProducer(settings) as aproducer:
                    hs = [await aproducer.submit("noop", np.full(4, i, dtype=np.float32)) for i in range(300)]
                    hs += await aproducer.submit_many("noop", [np.full(4, i, dtype=np.float32)
                                                               for i in range(300, 600)])
                    outs = await asyncio.gather(*(aproducer.result(h, timeout_s=60) for h in hs))
                    return {h.id: (float(out[0]), True) for h, out in zip(hs, outs, strict=True)}

            async_out = asyncio.run(submit_async())
            hot_handles = producer.submit_many("hot", inputs)  # 3 partitions, on 3 masters
            hot_out = [producer.outcome(h, timeout_s=60) for h in hot_handles]
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as reply:
                metrics = reply.read().decode()
            status = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", settings.url,
                                     "status", "--once", "--json"], check=False, capture_output=True, text=True,
                                    timeout=60)
            models = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", settings.url,
                                     "models"], check=False, capture_output=True, text=True, timeout=60)
        finally:
            assert stop_manager(manager) == 0
            left = reap_ray_of(manager.pid)
            assert not left, f"the manager's Ray left {len(left)} process(es) behind: {left}"
    assert [float(np.asarray(e.out)[0]) for e in ghost_out] == [float(-i) for i in range(1, 101)]
    assert all(env.ok for env in sync_out.values()), [e for e in sync_out.values() if not e.ok][:3]
    for (rid, env), x in zip(sync_out.items(), inputs, strict=True):
        assert env.id == rid
        np.testing.assert_array_equal(np.asarray(env.out), x)
    assert sorted(v for v, _ in async_out.values()) == [float(i) for i in range(600)]
    ids = [h.id for h in ghost_handles] + list(sync_out) + list(async_out)
    assert len(set(ids)) == 1300
    client = settings.client()
    try:
        stored = get_many_blocking(client, [keys.result(rid) for rid in ids])
        assert all(data is not None and decode_envelope("msgpack", data).id == rid
                   for rid, data in zip(ids, stored, strict=True))
        assert client.xpending(keys.requests("noop"), keys.GROUP)["pending"] == 0
    finally:
        client.close()
    assert [np.asarray(e.out).tolist() for e in hot_out] == [x.tolist() for x in inputs]
    tags = keys.partition_tags("hot", 3)
    owners = {tag: nodes.master_of(keys.requests(tag)) for tag in tags}
    assert len(set(owners.values())) == 3, owners  # one partition on each master
    client = settings.client()
    try:
        added = {tag: int(client.xinfo_stream(keys.requests(tag))["entries-added"]) for tag in tags}
        assert client.hget(keys.admission("hot"), "tags") == " ".join(tags).encode()
    finally:
        client.close()
    assert added == dict(Counter(tags[keys.partition_of(h.id, 3)] for h in hot_handles)), added
    assert 'nosq_requests_total{model="hot",outcome="ok"} 600.0' in metrics, metrics[:2000]
    assert 'nosq_requests_total{model="noop",outcome="ok"} 1300.0' in metrics
    assert 'nosq_backlog{model="hot"} 0.0' in metrics
    assert status.returncode == 0, status.stderr
    assert "rc-e2e" in status.stdout, status.stdout
    rows = {row["model"]: row for row in json.loads(status.stdout)["models"]}
    assert rows["hot"]["partitions"] == 3 and rows["hot"]["backlog"] == 0, rows
    assert models.returncode == 0 and "MODEL" in models.stdout, (models.stdout, models.stderr)


def test_plain_redis_client_is_not_a_cluster_client() -> None:
    assert not RedisSettings(url="redis://127.0.0.1:6379/9").cluster
    assert RedisSettings(url="redis+cluster://127.0.0.1:7100").cluster
    assert isinstance(RedisSettings(url="redis://127.0.0.1:6379/9").async_client(), redis.asyncio.Redis)
