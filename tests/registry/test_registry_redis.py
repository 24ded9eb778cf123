"""The registry's scripts on the real Redis (db 13) and on fakeredis: states, budget, victims."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio

from nosq.manager.memory import registry as registry_module
from nosq.manager.memory.eviction import MIN_READY_MS
from nosq.manager.memory.registry import (
    EVENTS_CHANNEL,
    ModelState,
    Outcome,
    Registry,
    RegistryError,
    Reservation,
    ReservationLost,
    Victim,
    parse_event,
)
from nosq.producer import keys

NODE, GPU = "n1", "cuda:0"
ReadyModel = Callable[..., Awaitable[None]]  # the conftest fixture of that name


async def used(client: redis.asyncio.Redis, device: str = GPU) -> int:
    return int(await client.hget(keys.registry_device(f"{NODE}/{device}"), "used_bytes") or 0)  # type: ignore[misc]


async def state(client: redis.asyncio.Redis, model: str) -> str:
    value = await client.hget(keys.registry_model(model), "state")  # type: ignore[misc]
    return value.decode() if value else ""


async def audit_ok(reg: Registry) -> None:
    for device in await reg.audit():
        assert device.ok, device


def test_public_api() -> None:
    assert set(registry_module.__all__) == {
        "EVENTS_CHANNEL", "DeviceAudit", "Eviction", "ModelState", "Outcome", "Registry", "RegistryError",
        "Reservation", "ReservationLost", "Resize", "Victim", "parse_event",
    }


def test_bad_arguments_are_refused(fake_client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'random'; choose one of: fifo, lru, lfu, cost"):
        Registry(fake_client, owner="m1", policy="random")
    with pytest.raises(ValueError, match="invalid owner"):
        Registry(fake_client, owner="has space")


async def test_reserve_ready_release(any_client: redis.asyncio.Redis) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 1000)
    got = await reg.reserve("m1", node=NODE, device=GPU, nbytes=400)
    assert got == Reservation(Outcome.RESERVED, owner="mgr-a", node=NODE, device=GPU, state=ModelState.LOADING)
    assert await used(any_client) == 400
    assert await state(any_client, "m1") == "loading"
    await reg.mark_ready("m1", replicas=2, load_ms=1234.4)
    await reg.touch("m1", 5)
    [row] = await reg.snapshot()
    assert {k: row[k] for k in ("model", "state", "node", "device", "bytes", "owner", "replicas", "load_ms",
                                 "uses", "inflight")} == {
        "model": "m1", "state": "ready", "node": NODE, "device": GPU, "bytes": 400, "owner": "mgr-a",
        "replicas": 2, "load_ms": 1234, "uses": 5, "inflight": 0}
    assert row["loaded_at"] > 0
    assert row["last_used"] >= row["loaded_at"]
    assert await reg.devices(NODE) == [{"node": NODE, "device": GPU, "budget_bytes": 1000, "used_bytes": 400,
                                        "free_bytes": 600, "models": ["m1"]}]
    await audit_ok(reg)
    assert await reg.release("m1") is True
    assert await reg.release("m1") is False  # idempotent: bytes return once
    assert await used(any_client) == 0
    assert await state(any_client, "m1") == "evicted"
    await audit_ok(reg)


async def test_concurrent_demand_in_one_process_loads_once(any_client: redis.asyncio.Redis) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 1000)
    results = await asyncio.gather(*(reg.reserve("m1", node=NODE, device=GPU, nbytes=300) for _ in range(50)))
    assert [r.outcome for r in results].count(Outcome.RESERVED) == 1
    already = [r for r in results if r.outcome is Outcome.ALREADY]
    assert len(already) == 49
    assert already[0] == Reservation(Outcome.ALREADY, owner="mgr-a", node=NODE, device=GPU,
                                     state=ModelState.LOADING)
    assert await used(any_client) == 300


async def test_concurrent_demand_from_many_clients_loads_once(registry_url: str) -> None:
    clients = [redis.asyncio.Redis.from_url(registry_url) for _ in range(20)]
    try:
        regs = [Registry(c, owner=f"mgr-{i}") for i, c in enumerate(clients)]
        await regs[0].set_budget(NODE, GPU, 1000)
        for _ in range(5):  # five rounds: reserve from 20 connections at once, then release
            results = await asyncio.gather(*(r.reserve("m1", node=NODE, device=GPU, nbytes=300) for r in regs))
            winners = [i for i, r in enumerate(results) if r.outcome is Outcome.RESERVED]
            assert len(winners) == 1
            assert {r.owner for r in results if r.outcome is Outcome.ALREADY} == {f"mgr-{winners[0]}"}
            assert await used(clients[0]) == 300
            assert await regs[winners[0]].release("m1")
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def test_no_budget_and_too_large_say_what_to_do(any_client: redis.asyncio.Redis) -> None:
    reg = Registry(any_client, owner="mgr-a")
    with pytest.raises(RegistryError, match=r"device n1/cuda:0 has no budget: call set_budget"):
        await reg.reserve("m1", node=NODE, device=GPU, nbytes=1)
    await reg.set_budget(NODE, GPU, 100)
    with pytest.raises(RegistryError, match="needs 101 bytes but device n1/cuda:0 has a budget of 100 bytes"):
        await reg.reserve("m1", node=NODE, device=GPU, nbytes=101)
    with pytest.raises(ValueError, match="invalid model id"):
        await reg.reserve("a b", node=NODE, device=GPU, nbytes=1)
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        await reg.set_budget(NODE, GPU, -1)


# the fields that make each policy pick a different model (4 x 100 bytes, budget 400)
FIELDS = {
    "a": {"loaded_at": 1, "last_used": 50, "uses": 5, "load_ms": 1000, "backlog": 0},
    "b": {"loaded_at": 2, "last_used": 10, "uses": 9, "load_ms": 1000, "backlog": 0},
    "c": {"loaded_at": 3, "last_used": 40, "uses": 1, "load_ms": 1000, "backlog": 5},
    "d": {"loaded_at": 4, "last_used": 60, "uses": 7, "load_ms": 0, "backlog": 0},
}


@pytest.mark.parametrize(("policy", "victim"), [("fifo", "a"), ("lru", "b"), ("lfu", "c"), ("cost", "d")])
async def test_each_policy_picks_its_victim(any_client: redis.asyncio.Redis, ready_model: ReadyModel,
                                            policy: str, victim: str) -> None:
    reg = Registry(any_client, owner="mgr-a", policy=policy)
    await reg.set_budget(NODE, GPU, 400)
    for model, fields in FIELDS.items():
        await ready_model(reg, model, 100, **fields)
    got = await reg.reserve("x", node=NODE, device=GPU, nbytes=100)
    assert got == Reservation(Outcome.EVICT, victims=(Victim(victim, "mgr-a", 100),))
    assert await state(any_client, victim) == "draining"
    assert await used(any_client) == 400  # counted until released
    # asking again while the victim drains evicts nothing more
    assert await reg.reserve("x", node=NODE, device=GPU, nbytes=100) == Reservation(Outcome.WAIT, reason="freeing")
    assert await reg.release(victim)
    assert (await reg.reserve("x", node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
    assert await used(any_client) == 400
    await audit_ok(reg)


async def test_victims_accumulate_in_policy_order(any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    reg = Registry(any_client, owner="mgr-a", policy="fifo")
    await reg.set_budget(NODE, GPU, 400)
    for model, fields in FIELDS.items():
        await ready_model(reg, model, 100, **fields)
    got = await reg.reserve("x", node=NODE, device=GPU, nbytes=250)
    assert [v.model for v in got.victims] == ["a", "b", "c"]


async def test_real_clock_orders_fifo_lru_and_lfu(any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    """No fields written by hand: load order, touches and use counts from the scripts' own clock."""
    regs = {name: Registry(any_client, owner="mgr-a", policy=name) for name in ("fifo", "lru", "lfu")}
    reg = regs["fifo"]
    await reg.set_budget(NODE, GPU, 300)
    for model in ("a", "b", "c"):
        await ready_model(reg, model, 100)
        await asyncio.sleep(0.003)
    await reg.touch("a", 10)  # a: used last and most; b: used least recently; c: used least
    await asyncio.sleep(0.003)
    await reg.touch("b", 3)
    await asyncio.sleep(0.003)
    await reg.touch("a", 1)
    await reg.touch("c", 1)
    expected = {"fifo": "a", "lru": "b", "lfu": "c"}
    for name, victim in expected.items():
        got = await regs[name].reserve("x", node=NODE, device=GPU, nbytes=100)
        assert [v.model for v in got.victims] == [victim], name
        # undo the eviction, so the next policy sees the same device
        await any_client.hset(keys.registry_model(victim), "state", "ready")  # type: ignore[misc]


async def test_models_in_flight_are_skipped_then_wait(any_client: redis.asyncio.Redis,
                                                      ready_model: ReadyModel) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 300)
    for i, model in enumerate(("a", "b", "c")):
        await ready_model(reg, model, 100, loaded_at=i + 1)
    assert await reg.inflight("a", +1)  # the FIFO victim is busy: the next one goes
    got = await reg.reserve("x", node=NODE, device=GPU, nbytes=100)
    assert got.victims == (Victim("b", "mgr-a", 100),)
    assert not await reg.inflight("b", +1)  # draining: no new batch
    assert await reg.inflight("c", +1)
    # b frees 100 soon; y needs 100 more, from a or c, both busy: wait, and mark nothing
    assert await reg.reserve("y", node=NODE, device=GPU, nbytes=200) == Reservation(Outcome.WAIT, reason="busy")
    assert [await state(any_client, m) for m in "abc"] == ["ready", "draining", "ready"]
    assert await reg.inflight("a", -1)
    got = await reg.reserve("y", node=NODE, device=GPU, nbytes=200)
    assert got.victims == (Victim("a", "mgr-a", 100),)
    assert await used(any_client) == 300


async def test_each_eviction_decision_is_logged_with_what_it_was_made_from(
        any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 300)
    for i, model in enumerate(("a", "b", "c")):
        await ready_model(reg, model, 100, loaded_at=i + 1, last_used=10 - i, uses=i)
    assert await reg.inflight("a", +1)  # the FIFO victim is busy: b goes
    await reg.reserve("x", node=NODE, device=GPU, nbytes=150)
    assert await reg.reserve("x", node=NODE, device=GPU, nbytes=150) == Reservation(Outcome.WAIT, reason="freeing")
    [logged] = await reg.evictions()  # a WAIT decides nothing: one entry
    assert (logged.model, logged.node, logged.device, logged.policy) == ("x", NODE, GPU, "fifo")
    assert logged.need_bytes == 150 and logged.victims == ("b", "c") == logged.policy_victims()
    by_model = {c.model: c for c in logged.candidates}
    assert sorted(by_model) == ["a", "b", "c"]
    assert by_model["a"].inflight == 1 and by_model["b"].loaded_at_ms == 2 and by_model["c"].last_used_ms == 8
    assert by_model["c"].uses == 2 and by_model["b"].state is ModelState.READY and by_model["b"].nbytes == 100
    assert logged.at_ms > 0


async def test_a_fresh_model_that_served_nothing_is_no_victim_yet(any_client: redis.asyncio.Redis,
                                                                 ready_model: ReadyModel) -> None:
    """The registry's own clock: READY just now, no batch yet: kept (the load it just paid for
    would be wasted); after one batch, or MIN_READY_MS after its load, it may go."""
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 200)
    await ready_model(reg, "a", 100)
    await ready_model(reg, "b", 100)
    assert await reg.reserve("x", node=NODE, device=GPU, nbytes=100) == Reservation(Outcome.WAIT, reason="busy")
    await reg.touch("b", 1)  # b served a batch: it may go, a (older by FIFO) still may not
    assert (await reg.reserve("x", node=NODE, device=GPU, nbytes=100)).victims == (Victim("b", "mgr-a", 100),)
    now_ms = int((await any_client.time())[0]) * 1000
    await any_client.hset(keys.registry_model("a"), "loaded_at", str(now_ms - MIN_READY_MS))  # type: ignore[misc]
    assert (await reg.reserve("y", node=NODE, device=GPU, nbytes=200)).victims == (Victim("a", "mgr-a", 100),)
    logged = await reg.evictions()
    assert [e.victims for e in logged] == [("b",), ("a",)]
    assert all(e.victims == e.policy_victims() for e in logged)  # the log replays with its decision time


async def test_loading_models_are_never_victims(any_client: redis.asyncio.Redis) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 200)
    for model in ("a", "b"):
        assert (await reg.reserve(model, node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
    assert await reg.reserve("x", node=NODE, device=GPU, nbytes=100) == Reservation(Outcome.WAIT, reason="busy")


async def test_a_draining_model_is_not_reloaded_until_released(any_client: redis.asyncio.Redis,
                                                               ready_model: ReadyModel) -> None:
    owner_a, owner_b = Registry(any_client, owner="mgr-a"), Registry(any_client, owner="mgr-b")
    await owner_a.set_budget(NODE, GPU, 100)
    await ready_model(owner_a, "a", 100, uses=1)
    assert (await owner_b.reserve("b", node=NODE, device=GPU, nbytes=100)).victims == (Victim("a", "mgr-a", 100),)
    got = await owner_b.reserve("a", node=NODE, device=GPU, nbytes=100)
    assert (got.outcome, got.reason, got.owner) == (Outcome.WAIT, "draining", "mgr-a")
    assert not await owner_b.release("a")  # only its owner releases it
    assert [r["model"] for r in await owner_a.snapshot(owner="mgr-a")] == ["a"]
    assert await owner_a.release("a")
    assert (await owner_b.reserve("b", node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED


async def test_inflight_and_mark_ready_belong_to_the_owner(any_client: redis.asyncio.Redis) -> None:
    mine, other = Registry(any_client, owner="mgr-a"), Registry(any_client, owner="mgr-b")
    await mine.set_budget(NODE, GPU, 100)
    await mine.reserve("a", node=NODE, device=GPU, nbytes=100)
    assert not await mine.inflight("a", +1)  # still loading
    with pytest.raises(ReservationLost, match="model 'a' is loading and owned by mgr-a, not loading for mgr-b"):
        await other.mark_ready("a", replicas=1, load_ms=5)
    await mine.mark_ready("a", replicas=1, load_ms=5)
    assert not await other.inflight("a", +1)
    assert await mine.inflight("a", +1)
    assert await mine.inflight("a", -1)
    assert await mine.inflight("a", -1)  # never below 0
    assert (await mine.snapshot())[0]["inflight"] == 0
    with pytest.raises(ValueError, match="inflight delta must be non-zero"):
        await mine.inflight("a", 0)


async def test_fail_frees_the_bytes_and_keeps_the_error(any_client: redis.asyncio.Redis) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 100)
    await reg.reserve("a", node=NODE, device=GPU, nbytes=100)
    assert await reg.fail("a", "CUDA out of memory")
    [row] = await reg.snapshot()
    assert (row["state"], row["last_error"], await used(any_client)) == ("failed", "CUDA out of memory", 0)
    assert row["error_at"] > 0
    with pytest.raises(ReservationLost):
        await reg.mark_ready("a", replicas=1, load_ms=1)
    assert (await reg.reserve("a", node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED  # retry
    await reg.record_error("a", "torch.compile failed; running eager")
    [row] = await reg.snapshot()
    assert (row["state"], row["last_error"]) == ("loading", "torch.compile failed; running eager")


async def test_reap_dead_owners_frees_their_bytes(any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    alive, dead = Registry(any_client, owner="alive"), Registry(any_client, owner="dead")
    await any_client.set(keys.manager_heartbeat("alive"), "{}", ex=60)
    await any_client.set(keys.manager_heartbeat("dead"), "{}", ex=60)
    await alive.set_budget(NODE, GPU, 1000)
    await alive.set_budget(NODE, "cpu", 1000)
    await ready_model(alive, "a1", 100)
    await ready_model(dead, "d1", 200)
    await ready_model(dead, "d2", 300, device="cpu")
    await dead.reserve("d3", node=NODE, device=GPU, nbytes=50)  # loading when it died
    assert await alive.reap_dead_owners() == []  # both alive
    await any_client.delete(keys.manager_heartbeat("dead"))  # SIGKILL: the heartbeat expires
    assert await alive.reap_dead_owners() == ["d1", "d2", "d3"]
    assert (await used(any_client), await used(any_client, "cpu")) == (100, 0)
    rows = {r["model"]: r for r in await alive.snapshot()}
    assert rows["d1"]["state"] == "evicted"
    assert rows["d1"]["last_error"] == "released: owner dead stopped heartbeating"
    assert rows["a1"]["state"] == "ready"
    assert await alive.reap_dead_owners() == []
    with pytest.raises(ReservationLost):  # the dead manager's late mark_ready is refused
        await dead.mark_ready("d3", replicas=1, load_ms=1)
    await audit_ok(alive)


async def test_release_all_on_shutdown(any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    mine, other = Registry(any_client, owner="mgr-a"), Registry(any_client, owner="mgr-b")
    await mine.set_budget(NODE, GPU, 1000)
    await ready_model(mine, "a", 100)
    await mine.reserve("b", node=NODE, device=GPU, nbytes=100)
    await ready_model(other, "c", 100)
    assert await mine.release_all() == ["a", "b"]
    assert await used(any_client) == 100
    await audit_ok(mine)


async def test_events_announce_each_state(any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 100)
    async with any_client.pubsub() as pubsub:
        await pubsub.subscribe(EVENTS_CHANNEL)
        confirmation = await pubsub.get_message(timeout=2.0)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"
        await ready_model(reg, "a", 100, uses=1)
        await reg.reserve("b", node=NODE, device=GPU, nbytes=100)
        await reg.release("a")
        await reg.reserve("b", node=NODE, device=GPU, nbytes=100)
        await reg.fail("b", "boom")
        seen: list[tuple[ModelState, str]] = []
        while len(seen) < 6:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
            assert message is not None, seen
            seen.append(parse_event(message["data"]))
    assert seen == [(ModelState.LOADING, "a"), (ModelState.READY, "a"), (ModelState.DRAINING, "a"),
                    (ModelState.EVICTED, "a"), (ModelState.LOADING, "b"), (ModelState.FAILED, "b")]


async def test_set_backlog_feeds_the_cost_policy(any_client: redis.asyncio.Redis, ready_model: ReadyModel) -> None:
    reg = Registry(any_client, owner="mgr-a", policy="cost")
    await reg.set_budget(NODE, GPU, 200)
    await ready_model(reg, "a", 100, load_ms=100, uses=1)
    await ready_model(reg, "b", 100, load_ms=150, uses=1)
    await reg.set_backlog({"a": 3, "b": 0})  # a: 200 * 4 = 800 > b: 250
    got = await reg.reserve("x", node=NODE, device=GPU, nbytes=100)
    assert [v.model for v in got.victims] == ["b"]
    residents = {r.model: r for r in await reg.residents(NODE, GPU)}
    assert (residents["a"].backlog, residents["a"].reload_ms, residents["b"].state) == (3, 100.0, ModelState.DRAINING)


async def test_lowering_the_budget_makes_the_next_reserve_evict(any_client: redis.asyncio.Redis,
                                                                ready_model: ReadyModel) -> None:
    reg = Registry(any_client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 300)
    await ready_model(reg, "a", 100, loaded_at=1)
    await ready_model(reg, "b", 100, loaded_at=2)
    await reg.set_budget(NODE, GPU, 150)
    got = await reg.reserve("x", node=NODE, device=GPU, nbytes=100)  # must free 150: a and b
    assert [v.model for v in got.victims] == ["a", "b"]
