"""The eviction policies as pure functions: each picks what its definition says."""

from __future__ import annotations

import pytest

from nosq.manager.memory import eviction
from nosq.manager.memory.eviction import (
    MIB,
    MIN_READY_MS,
    POLICY_NAMES,
    CostAware,
    Fifo,
    Lfu,
    Lru,
    ModelState,
    Resident,
    choose_victims,
    cost_score,
    policy,
)


def ready(model: str, nbytes: int = 100, **fields: int | float) -> Resident:
    return Resident(model=model, state=ModelState.READY, nbytes=nbytes, **fields)  # type: ignore[arg-type]


def ids(victims: list[Resident] | None) -> list[str] | None:
    return None if victims is None else [v.model for v in victims]


def test_public_api() -> None:
    assert set(eviction.__all__) == {
        "LUA_CHOOSE_VICTIMS", "MIB", "MIN_READY_MS", "POLICY_NAMES", "RELOAD_FLOOR_MS", "CostAware", "EvictionPolicy",
        "Fifo", "Lfu", "Lru", "ModelState", "Resident", "choose_victims", "cost_score", "evictable", "policy",
    }


def test_policy_by_name() -> None:
    assert POLICY_NAMES == ("fifo", "lru", "lfu", "cost")
    assert [type(policy(n)) for n in POLICY_NAMES] == [Fifo, Lru, Lfu, CostAware]
    for name in POLICY_NAMES:  # every name can be chosen and used: no member that raises
        assert choose_victims([ready("a")], 1, policy(name)) is not None


def test_unknown_policy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown eviction policy 'mru'; choose one of: fifo, lru, lfu, cost"):
        policy("mru")


def test_fifo_evicts_the_oldest_loaded() -> None:
    residents = [ready("b", loaded_at_ms=20, last_used_ms=1), ready("a", loaded_at_ms=10, last_used_ms=99),
                 ready("c", loaded_at_ms=30, uses=0)]
    assert ids(choose_victims(residents, 100, Fifo())) == ["a"]
    assert ids(choose_victims(residents, 150, Fifo())) == ["a", "b"]


def test_lru_evicts_the_least_recently_used() -> None:
    residents = [ready("a", loaded_at_ms=1, last_used_ms=50), ready("b", loaded_at_ms=2, last_used_ms=10),
                 ready("c", loaded_at_ms=3, last_used_ms=30)]
    assert ids(choose_victims(residents, 200, Lru())) == ["b", "c"]


def test_lfu_evicts_the_least_used_ties_to_the_oldest_loaded() -> None:
    residents = [ready("a", loaded_at_ms=5, uses=3), ready("b", loaded_at_ms=9, uses=1),
                 ready("c", loaded_at_ms=2, uses=1), ready("d", loaded_at_ms=1, uses=7)]
    assert ids(choose_victims(residents, 300, Lfu())) == ["c", "b", "a"]


def test_ties_go_to_the_smaller_id_in_byte_order() -> None:
    residents = [ready("b"), ready("B"), ready("a"), ready("A")]
    assert ids(choose_victims(residents, 400, Fifo())) == ["A", "B", "a", "b"]


def test_cost_formula() -> None:
    r = ready("m", 4 * MIB, reload_ms=300.0, backlog=2)
    assert cost_score(r) == (300.0 + 100.0) * 3 / 4.0
    assert cost_score(ready("z", 0)) == 100.0 * MIB  # bytes floored at 1: never divides by 0


def test_cost_prefers_bytes_freed_then_fast_reload_then_no_backlog() -> None:
    big = ready("big", 8 * MIB, reload_ms=400.0)
    small = ready("small", 1 * MIB, reload_ms=400.0)
    assert ids(choose_victims([small, big], 1, CostAware())) == ["big"]  # more bytes per reload ms
    slow = ready("slow", MIB, reload_ms=5000.0)
    fast = ready("fast", MIB, reload_ms=50.0)
    assert ids(choose_victims([slow, fast], 1, CostAware())) == ["fast"]
    busy = ready("queued", MIB, reload_ms=50.0, backlog=10)
    idle = ready("idle", MIB, reload_ms=200.0, backlog=0)
    assert ids(choose_victims([busy, idle], 1, CostAware())) == ["idle"]  # 300 < 150 * 11


def test_busy_loading_draining_and_empty_models_are_never_victims() -> None:
    residents = [
        ready("busy", loaded_at_ms=1, inflight=1),
        Resident("loading", ModelState.LOADING, 100, loaded_at_ms=2),
        Resident("draining", ModelState.DRAINING, 100, loaded_at_ms=3),
        ready("empty", 0, loaded_at_ms=4),
        ready("idle", loaded_at_ms=5),
    ]
    for name in POLICY_NAMES:
        assert ids(choose_victims(residents, 100, policy(name))) == ["idle"]
        assert choose_victims(residents, 101, policy(name)) is None  # never a partial eviction


def test_nothing_needed_means_no_victims() -> None:
    assert choose_victims([ready("a")], 0, Fifo()) == []
    assert choose_victims([], -5, Fifo()) == []
    assert choose_victims([], 1, Fifo()) is None


def test_a_model_that_served_nothing_is_kept_for_min_ready_ms_after_its_load() -> None:
    fresh = ready("fresh", loaded_at_ms=10_000, uses=0)
    used = ready("used", loaded_at_ms=10_000, uses=1)
    for name in POLICY_NAMES:
        at = 10_000 + MIN_READY_MS - 1
        assert ids(choose_victims([fresh, used], 100, policy(name), at)) == ["used"]
        assert choose_victims([fresh, used], 101, policy(name), at) is None  # wait: do not take the fresh one
        assert ids(choose_victims([fresh], 100, policy(name), 10_000 + MIN_READY_MS)) == ["fresh"]
        assert ids(choose_victims([fresh], 100, policy(name))) == ["fresh"]  # no time given: no such rule
