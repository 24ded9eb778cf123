"""The registry's scripts on a real Redis Cluster keep Redis's rule for scripts: every key a
script touches is one it declared in KEYS (read off MONITOR of the master that owns the
``{registry}`` slot), all in that one slot; reaping a dead owner works there (its heartbeat key is
in another slot, so it is checked outside the script); and two managers racing converge."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import redis.asyncio

from nosq.manager.memory.registry import Outcome, Registry
from nosq.producer import RedisSettings, keys
from tests.rediscluster.redisnodes import RedisNodes
from tests.registry.keys_support import NODE, SCRIPTS, SHAS, ScriptRecorder, every_operation

BASE_PORT = 7140  # 7140..7145 (+10000: bus); serving 7100.., failover 7110.., control 7120..
GPU = "cuda:0"


async def _flush(client: redis.asyncio.Redis) -> None:
    for key in await client.keys(keys.registry("*")):
        await client.delete(key)
    for owner in ("mgr-a", "mgr-b"):
        await client.delete(keys.manager_heartbeat(owner))


async def test_every_operation_touches_only_declared_keys_of_one_slot(nodes: RedisNodes) -> None:
    client = RedisSettings(url=nodes.url).async_client()
    recorder = ScriptRecorder(host="127.0.0.1", port=nodes.master_of(keys.registry_models()))
    try:
        await _flush(client)
        with recorder:
            await every_operation(client)  # reap_dead_owners included: it used to need a cross-slot script
        assert {SHAS.get(run.sha) for run in recorder.runs} == set(SCRIPTS)  # all ran on this master
        assert recorder.undeclared() == []
        assert all(k.startswith(keys.registry("")) for run in recorder.runs for k in run.keys)
    finally:
        recorder.close()
        await client.aclose()


async def test_two_managers_racing_on_the_cluster_converge(nodes: RedisNodes) -> None:
    clients = [RedisSettings(url=nodes.url).async_client() for _ in range(2)]
    regs = [Registry(conn, owner=f"mgr-{name}", policy=policy)
            for conn, name, policy in zip(clients, "ab", ("fifo", "lru"), strict=True)]
    stats: Counter[str] = Counter()

    async def manager(reg: Registry, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            for row in await reg.snapshot(owner=reg.owner):
                if row["state"] == "draining":
                    stats["victim released"] += await reg.release(row["model"])
            model = f"{reg.owner}-m{rng.randrange(3)}"
            if rng.random() < 0.7:
                got = await reg.reserve(model, node=NODE, device=GPU, nbytes=rng.choice((60, 100)))
                stats[got.outcome.value] += 1
                if got.outcome is Outcome.RESERVED:
                    await reg.mark_ready(model, replicas=1, load_ms=1)
                    await reg.touch(model)
            else:
                stats["released"] += await reg.release(model)
            assert all(a.ok for a in await reg.audit())

    try:
        await _flush(clients[0])
        await regs[0].set_budget(NODE, GPU, 200)
        async with asyncio.timeout(120):
            await asyncio.gather(manager(regs[0], 1), manager(regs[1], 2))
        for reg in regs:
            await reg.release_all()
        [audit] = await regs[0].audit()
        assert audit.ok and audit.used_bytes == 0, audit
        assert stats["reserved"] > 0 and stats["evict"] > 0, stats
    finally:
        for conn in clients:
            await conn.aclose()
