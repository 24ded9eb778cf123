"""The reserve script's Lua scoring and ``eviction.choose_victims`` choose the same victims.

Random devices full of ties (equal load times, uses, costs; ids that differ only in case) are
written straight into the registry's hashes; for every policy the script's decision must be
the one the Python functions predict, victim for victim and in the same order.
"""

from __future__ import annotations

import random

import pytest
import redis.asyncio

from nosq.manager.memory.eviction import MIB, POLICY_NAMES, ModelState, Resident, choose_victims, policy
from nosq.manager.memory.registry import Outcome, Registry, Reservation, Victim
from nosq.producer import keys

SUFFIXES = ["a", "A", "b", "B", "aa", "Ab", "_x", "-y", ".z", "0", "9", "Z"]
CASES_PER_POLICY = 100


def random_device(rng: random.Random, case: str) -> list[Resident]:
    names = rng.sample(SUFFIXES, rng.randint(0, 9))
    states = [ModelState.READY] * 7 + [ModelState.LOADING] + [ModelState.DRAINING] * 2
    return [
        Resident(model=f"{case}-{name}", state=rng.choice(states),
                 nbytes=rng.choice([0, 1, 50, 100, 100, 128, MIB, 3 * MIB]),
                 loaded_at_ms=rng.randint(1, 4), last_used_ms=rng.randint(1, 4), uses=rng.randint(0, 3),
                 inflight=rng.choice([0, 0, 0, 1]), backlog=rng.randint(0, 2),
                 reload_ms=float(rng.choice([0, 100, 250, 900])))
        for name in names
    ]


async def write_device(client: redis.asyncio.Redis, node: str, residents: list[Resident], budget: int) -> None:
    pipe = client.pipeline(transaction=False)
    for r in residents:
        pipe.hset(keys.registry_model(r.model), mapping={
            "state": r.state.value, "node": node, "device": "gpu", "bytes": r.nbytes, "owner": "o",
            "loaded_at": r.loaded_at_ms, "last_used": r.last_used_ms, "uses": r.uses, "inflight": r.inflight,
            "backlog": r.backlog, "load_ms": int(r.reload_ms)})
        pipe.sadd(keys.registry_resident(f"{node}/gpu"), r.model)
    pipe.hset(keys.registry_device(f"{node}/gpu"), mapping={
        "node": node, "device": "gpu", "budget_bytes": budget, "used_bytes": sum(r.nbytes for r in residents)})
    pipe.sadd(keys.registry_devices(), f"{node}/gpu")
    await pipe.execute()


def expected(residents: list[Resident], budget: int, nbytes: int, policy_name: str) -> Reservation:
    used = sum(r.nbytes for r in residents)
    if used + nbytes <= budget:
        return Reservation(Outcome.RESERVED, owner="o", node="", device="gpu", state=ModelState.LOADING)
    draining = sum(r.nbytes for r in residents if r.state is ModelState.DRAINING)
    need = nbytes - (budget - used) - draining
    if need <= 0:
        return Reservation(Outcome.WAIT, reason="freeing")
    victims = choose_victims(residents, need, policy(policy_name))
    if victims is None:
        return Reservation(Outcome.WAIT, reason="busy")
    return Reservation(Outcome.EVICT, victims=tuple(Victim(v.model, "o", v.nbytes) for v in victims))


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
async def test_lua_and_python_choose_the_same_victims(any_client: redis.asyncio.Redis, policy_name: str) -> None:
    rng = random.Random(f"mirror-{policy_name}")
    reg = Registry(any_client, owner="o", policy=policy_name)
    outcomes: dict[str, int] = {}
    for i in range(CASES_PER_POLICY):
        node = f"c{i}"
        residents = random_device(rng, node)
        budget = sum(r.nbytes for r in residents) + rng.choice([0, 0, 60, 200])
        nbytes = rng.randint(1, max(budget, 1))
        await write_device(any_client, node, residents, max(budget, 1))
        read_back = await reg.residents(node, "gpu")
        assert sorted(read_back, key=lambda r: r.model) == sorted(residents, key=lambda r: r.model)
        want = expected(residents, max(budget, 1), nbytes, policy_name)
        got = await reg.reserve(f"{node}-new", node=node, device="gpu", nbytes=nbytes)
        if want.outcome is Outcome.RESERVED:
            assert got.outcome is Outcome.RESERVED, (i, residents, nbytes)
        else:
            assert got == want, (i, residents, nbytes)
        outcomes[got.outcome.value + got.reason] = outcomes.get(got.outcome.value + got.reason, 0) + 1
        if len(got.victims) > 1:
            outcomes["several victims"] = outcomes.get("several victims", 0) + 1
    # the random cases cover every branch of the decision
    assert set(outcomes) == {"reserved", "evict", "waitfreeing", "waitbusy", "several victims"}, outcomes
