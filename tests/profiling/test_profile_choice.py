"""The choice of b*, the sweep's stops, the stored format, and the batcher's use of the curve:
pure, on synthetic curves (no torch runs, no Ray, no Redis)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import pytest

from nosq.manager.profiles.store import decode, encode, latency_model, profile_key
from nosq.manager.serving.batcher import DEADLINE_MARGIN_MS, Batcher, LatencyModel, Reason
from nosq.producer.wire import Request
from nosq.workers.profiles.curve import (
    OutOfMemory,
    Plan,
    Point,
    Profile,
    ProfileError,
    Stop,
    assemble,
    batch_sizes,
    choose,
    merge,
    sweep,
)
from nosq.workers.spec import ModelSpec

MIB = 1024 * 1024


def point(b: int, p50: float, p95: float | None = None, mem_mib: float = 0.0) -> Point:
    return Point(batch=b, p50_ms=p50, p95_ms=p95 if p95 is not None else p50 * 1.1,
                 items_per_s=b * 1000.0 / p50, memory_bytes=int(mem_mib * MIB), reps=20)


def plan(*, cap: int = 64, budget_ms: float = 100.0, limit_mib: float = 1024.0, stop_over_budget: bool = True) -> Plan:
    return Plan(model="m", fingerprint="f" * 16, method="forward", device="cpu", device_kind="cpu",
                signature="float32[4]", max_batch=cap, sizes=batch_sizes(cap), latency_budget_ms=budget_ms,
                weights_bytes=1000, baseline_bytes=0, memory_limit_bytes=int(limit_mib * MIB),
                memory_method="rss_sampled", threads=1, torch_version="x", stop_over_budget=stop_over_budget)


PUBLIC = {
    "nosq.workers.profiles.curve": [
        "EXAMPLE_OPTION", "MIB", "PROFILE_VERSION", "Measurement", "OutOfMemory", "Plan", "Point", "Profile",
        "ProfileError", "ProfileOptions", "Stop", "assemble", "batch_sizes", "choose", "measurement_from_dict",
        "merge", "sweep"],
    "nosq.workers.profiles.measure": [
        "ProfileOptions", "Profiler", "device_kind", "example_from_options", "input_signature", "is_out_of_memory",
        "weights_bytes"],
    "nosq.manager.profiles.store": [
        "ProfileRecord", "decode", "encode", "ensure_profile", "latency_model", "load", "profile_key", "store",
        "store_sync"],
    "nosq.manager.profiles.standalone": ["profile_in_actor"],
    "nosq.manager.profiles.report": ["ProgressBar", "format_table", "write_plot"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_public_api(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in module.__all__:
        assert hasattr(module, name), name


def test_batch_sizes_are_powers_of_two_then_the_cap() -> None:
    assert batch_sizes(1) == (1,)
    assert batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    with pytest.raises(ProfileError, match="at least 1"):
        batch_sizes(0)


def test_choice_is_best_throughput_within_budget() -> None:
    # throughput rises to b=128 (p95 90 ms), b=256 has more but p95 130 ms > 100 ms
    points = [point(1, 1.0), point(32, 8.0), point(64, 12.0, 14.0), point(128, 13.0, 90.0), point(256, 24.0, 130.0)]
    best, reason = choose(points, budget_ms=100.0, memory_limit_bytes=10**12)
    assert best == 128
    assert reason.startswith("b=128: best throughput (9,846/s) within the 100 ms budget")
    assert "b=256 p95 130.0 ms > the 100 ms budget" in reason


def test_choice_prefers_the_smaller_of_equal_throughputs() -> None:
    points = [point(1, 10.0), point(2, 10.0), point(4, 20.0), point(8, 80.0)]  # 100, 200, 200, 100 items/s
    best, reason = choose(points, budget_ms=1000.0, memory_limit_bytes=10**12)
    assert best == 2
    assert reason == "b=2: best throughput (200/s) within the 1000 ms budget; b=4 gives no more (200/s)"


def test_memory_limit_cuts_the_choice() -> None:
    points = [point(1, 1.0, mem_mib=1), point(2, 1.5, mem_mib=2), point(4, 2.0, mem_mib=40), point(8, 3.0, mem_mib=80)]
    best, reason = choose(points, budget_ms=100.0, memory_limit_bytes=50 * MIB)
    assert best == 4
    assert "b=8 needs 80.0 MiB > the 50.0 MiB memory limit" in reason


def test_b1_fallback_when_even_b1_misses_the_budget() -> None:
    points = [point(1, 150.0, 180.0), point(2, 250.0, 300.0)]
    best, reason = choose(points, budget_ms=100.0, memory_limit_bytes=10**12)
    assert best == 1
    assert "even the smallest batch misses" in reason and "b=1 p95 180.0 ms > the 100 ms budget" in reason


def test_b1_fallback_when_nothing_could_be_measured() -> None:
    stop = Stop("out_of_memory", 1, "b=1 ran out of memory: OutOfMemoryError: CUDA out of memory")
    best, reason = choose([], budget_ms=100.0, memory_limit_bytes=10**12, stop=stop)
    assert best == 1
    assert "no batch size could be measured" in reason and "out of memory" in reason


def fake_measure(points: dict[int, Point], oom_at: int | None = None) -> tuple[list[int], object]:
    calls: list[int] = []

    def measure(b: int) -> Point | OutOfMemory:
        calls.append(b)
        if oom_at is not None and b >= oom_at:
            return OutOfMemory(b, "OutOfMemoryError: CUDA out of memory")
        return points[b]

    return calls, measure


def test_sweep_stops_cleanly_at_out_of_memory_and_records_where() -> None:
    p = plan(cap=256)
    curve_points = {b: point(b, 1.0 + b / 10) for b in p.sizes}
    calls, measure = fake_measure(curve_points, oom_at=64)
    progress: list[tuple[int, int]] = []
    points, stop = sweep(p, measure, on_result=lambda i, n, _: progress.append((i, n)))  # type: ignore[arg-type]
    assert calls == [1, 2, 4, 8, 16, 32, 64]
    assert [pt.batch for pt in points] == [1, 2, 4, 8, 16, 32]
    assert stop.reason == "out_of_memory" and stop.batch == 64 and "out of memory" in stop.message
    assert progress[-1] == (7, 9)
    profile = assemble(p, points, stop, profiled_at=1.0, seconds=0.5)
    assert profile.best_batch == 32
    assert "b=64 ran out of memory" in profile.reason


def test_sweep_stops_after_the_first_size_over_budget_or_over_memory() -> None:
    p = plan(cap=64, budget_ms=10.0)
    calls, measure = fake_measure({b: point(b, 2.0 + b / 2) for b in p.sizes})
    points, stop = sweep(p, measure)  # type: ignore[arg-type]
    assert calls == [1, 2, 4, 8, 16, 32]  # b=32: p50 18 ms > 10 ms, so 64 cannot fit
    assert stop.reason == "over_budget" and stop.batch == 32
    best, reason = choose(points, budget_ms=10.0, memory_limit_bytes=p.memory_limit_bytes, stop=stop)
    assert best == 8 and "b=16 p95 11.0 ms > the 10 ms budget" in reason

    p = plan(cap=64, limit_mib=3)
    calls, measure = fake_measure({b: point(b, 1.0, mem_mib=b / 4) for b in p.sizes})
    points, stop = sweep(p, measure)  # type: ignore[arg-type]
    assert calls == [1, 2, 4, 8, 16] and stop.reason == "over_memory"
    assert choose(points, budget_ms=100.0, memory_limit_bytes=p.memory_limit_bytes, stop=stop)[0] == 8

    p = plan(cap=8)
    calls, measure = fake_measure({b: point(b, 1.0) for b in p.sizes})
    points, stop = sweep(p, measure)  # type: ignore[arg-type]
    assert stop == Stop("cap", 8, "reached the cap b=8") and len(points) == 4


def test_sweep_rounds_interleave_sizes_and_keep_the_least_disturbed_figures() -> None:
    p = dataclasses.replace(plan(cap=8), rounds=3)
    calls: list[int] = []
    slow_calls = {2, 7}  # b=2 in rounds 1 and 2 ran beside another process's burst; round 3 did not

    def measure(b: int) -> Point:
        calls.append(b)
        return point(b, (2.0 + b) * (3 if len(calls) in slow_calls else 1), mem_mib=len(calls))

    progress: list[tuple[int, int]] = []
    points, stop = sweep(p, measure, on_result=lambda i, n, _: progress.append((i, n)))
    assert calls == [1, 2, 4, 8, 8, 4, 2, 1, 8, 4, 2, 1]  # the later rounds largest first
    assert progress[0] == (1, 12) and progress[-1] == (12, 12)
    assert stop.reason == "cap"
    by_size = {pt.batch: pt for pt in points}
    assert by_size[2].p50_ms == 4.0 and by_size[2].items_per_s == pytest.approx(500.0)  # the burst is gone
    assert by_size[2].memory_bytes == 11 * MIB  # memory: the largest seen
    assert by_size[2].reps == 60
    assert merge([point(4, 5.0, 9.0), point(4, 6.0, 7.0)]) == Point(4, 5.0, 7.0, 800.0, 0, 40)


def test_a_later_round_out_of_memory_keeps_the_sizes_below() -> None:
    p = dataclasses.replace(plan(cap=8), rounds=2)
    calls: list[int] = []

    def measure(b: int) -> Point | OutOfMemory:
        calls.append(b)
        return OutOfMemory(b, "out of memory") if len(calls) == 6 else point(b, 1.0 + b)

    points, stop = sweep(p, measure)
    assert calls == [1, 2, 4, 8, 8, 4]
    assert [pt.batch for pt in points] == [1, 2] and stop.reason == "out_of_memory" and stop.batch == 4


def test_profile_round_trips_through_json_and_refuses_other_versions() -> None:
    p = plan(cap=4)
    profile = assemble(p, [point(1, 1.0), point(2, 1.5), point(4, 2.5)], Stop("cap", 4, "reached the cap b=4"),
                       profiled_at=1234.5, seconds=0.25)
    assert decode(encode(profile)) == profile
    raw = json.loads(encode(profile))
    assert raw["fingerprint"] == "f" * 16 and raw["best_batch"] == 4 and raw["v"] == 1
    with pytest.raises(ProfileError, match="v2"):
        Profile.from_dict({**raw, "v": 2})
    with pytest.raises(ProfileError, match="malformed"):
        Profile.from_dict({k: v for k, v in raw.items() if k != "points"})
    with pytest.raises(ProfileError, match="not JSON"):
        decode(b"{nope")


def test_profile_key_is_per_model_device_kind_and_signature() -> None:
    assert profile_key("mlp", "cuda:NVIDIA H100", "float32[512]") == \
        "nosq:{registry}:profile:mlp:cuda:NVIDIA H100:float32[512]"


def test_spec_accepts_and_checks_an_example_option() -> None:
    spec = ModelSpec(id="m", factory="a.b:c", options={"example": {"dtype": "float32", "shape": [3, 8]}})
    assert spec.options["example"]["shape"] == [3, 8]
    ModelSpec(id="m", factory="a.b:c", options={"example": [1.0, 2.0]})
    with pytest.raises(ValueError, match="describes one input item"):
        ModelSpec(id="m", factory="a.b:c", options={"example": {"shape": "3x8"}})
    assert spec.fingerprint() != ModelSpec(id="m", factory="a.b:c", options={"example": [1.0]}).fingerprint()


# -- the batcher with a profile's curve ------------------------------------------------------


def request(i: int, read_ms: int, deadline_ms: int | None = None) -> Request:
    return Request(id=f"r{i}", ct="msgpack", payload=b"", entry_id=f"{i}-0", read_ms=read_ms, deadline_ms=deadline_ms)


def test_latency_model_from_a_profile_predicts_p50_and_a_p95_tail() -> None:
    p = plan(cap=8)
    profile = assemble(p, [point(1, 10.0, 20.0), point(2, 12.0, 18.0), point(4, 16.0, 16.0), point(8, 30.0, 45.0)],
                       Stop("cap", 8, ""), profiled_at=0.0, seconds=0.0)
    model = latency_model(profile)
    assert model.curve() == {1: 10.0, 2: 12.0, 4: 16.0, 8: 30.0}
    assert model.predict(3) == pytest.approx(14.0)
    assert model.predict_tail(1) == pytest.approx(20.0)  # x2
    assert model.predict_tail(4) == pytest.approx(16.0)  # x1
    assert model.predict_tail(16) == pytest.approx(60.0 * 1.5)  # linear beyond, last ratio
    assert LatencyModel({1: 5.0}).predict_tail(1) == 5.0  # no tail: the typical figure


def test_release_reasons_full_wait_and_deadline_with_a_busy_replica() -> None:
    latency = LatencyModel({1: 10.0, 2: 12.0, 4: 16.0}, tail={1: 20.0, 2: 24.0, 4: 32.0})
    batcher = Batcher(cap=4, max_wait_ms=50.0, latency=latency)
    for i in range(4):
        batcher.add(request(i, read_ms=1000))
    assert batcher.decide(1000, idle_replica=False) == (Reason.FULL, 0.0)
    assert len(batcher.take()) == 4

    batcher.add(request(5, read_ms=1000))
    reason, wait = batcher.decide(1010, idle_replica=False)
    assert reason is None and wait == pytest.approx(40.0)
    assert batcher.decide(1050, idle_replica=False) == (Reason.WAIT, 0.0)
    assert batcher.decide(1010, idle_replica=True) == (Reason.IDLE, 0.0)
    batcher.take()

    # deadline in 40 ms, max wait 50 ms: held only while a batch of 2 at p95 (24 ms) still fits
    batcher.add(request(6, read_ms=1000, deadline_ms=1040))
    reason, wait = batcher.decide(1000, idle_replica=False)
    assert reason is None and wait == pytest.approx(40 - 24 - DEADLINE_MARGIN_MS)
    assert batcher.decide(1015, idle_replica=False) == (Reason.DEADLINE, 0.0)  # p50 (12 ms) would still hold it
    assert math.isclose(latency.predict(2), 12.0)
