"""Registry.resize: a READY model's bytes follow its replicas, atomically against the budget."""

from __future__ import annotations

import redis.asyncio

from nosq.manager.memory.registry import Outcome, Registry

MIB = 2**20


async def test_resize_grows_within_the_budget_and_shrinks(any_client: redis.asyncio.Redis) -> None:
    reg = Registry(any_client, owner="m1")
    await reg.set_budget("n1", "cpu", 1000 * MIB)
    assert (await reg.reserve("a", node="n1", device="cpu", nbytes=300 * MIB)).outcome is Outcome.RESERVED
    await reg.mark_ready("a", replicas=1, load_ms=5)

    grown = await reg.resize("a", 3)
    assert grown.ok and grown.nbytes == 900 * MIB
    refused = await reg.resize("a", 4)  # 300 MiB more, 100 MiB free: refused, nothing evicted
    assert not refused.ok and "need 300.0 MiB more, 100.0 MiB free" in refused.reason
    assert (await reg.resize("a", 2)).nbytes == 600 * MIB

    [device] = await reg.devices()
    assert device["used_bytes"] == 600 * MIB
    [row] = await reg.snapshot()
    assert (row["replicas"], row["bytes"]) == (2, 600 * MIB)
    assert all(audit.ok for audit in await reg.audit())


async def test_resize_refuses_a_model_that_is_not_ready_here(any_client: redis.asyncio.Redis) -> None:
    reg, other = Registry(any_client, owner="m1"), Registry(any_client, owner="m2")
    await reg.set_budget("n1", "cpu", 1000)
    await reg.reserve("a", node="n1", device="cpu", nbytes=300)
    assert not (await reg.resize("a", 2)).ok  # still loading
    await reg.mark_ready("a", replicas=1, load_ms=5)
    refused = await other.resize("a", 2)
    assert not refused.ok and "owner m1" in refused.reason
    await reg.release("a")
    assert not (await reg.resize("a", 2)).ok
    [device] = await reg.devices()
    assert device["used_bytes"] == 0
