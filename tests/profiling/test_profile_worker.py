"""Profiles of real models, measured by ModelWorker in this process and in a Ray actor."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest
import ray

from nosq.workers.actor import ModelWorker
from nosq.workers.demo import demo_config_path
from nosq.workers.profiles.curve import Profile, ProfileError
from nosq.workers.profiles.measure import weights_bytes
from nosq.workers.spec import ModelSpec, load_config

MODELS = "tests.profiling.models"


def demo_spec(model: str, **changes: Any) -> ModelSpec:
    return load_config(demo_config_path()).model(model).model_copy(update=changes)


def model_bytes(spec: ModelSpec) -> int:
    """The bytes of parameters and buffers of the model ``spec`` builds, built here."""
    module_name, _, name = spec.factory.partition(":")
    options = {k: v for k, v in spec.options.items() if k != "example"}
    return weights_bytes(getattr(importlib.import_module(module_name), name)(**options))


def check_curve(profile: Profile, spec: ModelSpec) -> None:
    """What every profile must satisfy."""
    sizes = [p.batch for p in profile.points]
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert all(b & (b - 1) == 0 or b == spec.max_batch for b in sizes)  # powers of two, then the cap
    for p in profile.points:
        assert 0 < p.p50_ms <= p.p95_ms
        assert p.items_per_s == pytest.approx(p.batch * 1000.0 / p.p50_ms)
        # measured above the baseline, and past the limit only where the sweep stopped for it
        assert isinstance(p.memory_bytes, int) and p.memory_bytes >= 0
        assert p.memory_bytes <= profile.plan.memory_limit_bytes or (
            profile.stop.reason == "over_memory" and p.batch == profile.stop.batch), (p, profile.stop)
        assert p.reps >= 3
    assert profile.plan.fingerprint == spec.fingerprint()
    assert profile.plan.weights_bytes == model_bytes(spec)
    assert profile.plan.memory_limit_bytes > 0
    assert profile.plan.memory_method in ("rss_sampled", "cuda_max_reserved")
    chosen = profile.point(profile.best_batch)
    assert chosen is not None and 1 <= profile.best_batch <= spec.max_batch
    assert chosen.p95_ms <= spec.latency_budget_ms
    assert profile.reason.startswith(f"b={profile.best_batch}: ")
    fitting = [p for p in profile.points if p.p95_ms <= spec.latency_budget_ms]
    assert chosen.items_per_s == max(p.items_per_s for p in fitting)


def test_mlp_profile_in_process() -> None:
    spec = demo_spec("mlp", max_batch=64)
    worker = ModelWorker(spec)
    profile = Profile.from_dict(worker.profile())
    check_curve(profile, spec)
    plan = profile.plan
    assert (plan.device, plan.device_kind, plan.signature, plan.method) == ("cpu", "cpu", "float32[512]", "forward")
    assert plan.weights_bytes == 4 * (512 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 512 + 512)
    assert plan.threads == 1 and plan.sizes == (1, 2, 4, 8, 16, 32, 64)
    assert profile.stop.reason == "cap" and len(profile.points) == 7
    by_size = {p.batch: p for p in profile.points}
    # a batch of 64 holds at least one (64, 2048) float32 activation: 512 KiB
    assert by_size[64].memory_bytes >= 64 * 2048 * 4 > by_size[1].memory_bytes
    assert profile.seconds > 0


def test_plan_and_one_size_at_a_time() -> None:
    spec = demo_spec("noop", max_batch=8)
    worker = ModelWorker(spec)
    plan = worker.profile_plan(4)
    assert plan["sizes"] == [1, 2, 4] and plan["max_batch"] == 4 and plan["signature"] == "float32[8]"
    point = worker.profile_one(4)
    assert point["batch"] == 4 and point["p50_ms"] > 0 and point["reps"] >= 20
    with pytest.raises(ProfileError, match=r"max_batch 16 is outside 1\.\.8"):
        worker.profile(16)


@pytest.mark.parametrize("error", ["cuda", "cpu", "memory"])
def test_sweep_stops_cleanly_at_out_of_memory(error: str) -> None:
    spec = ModelSpec(id="fat", factory=f"{MODELS}:exhausting", device="cpu", max_batch=64,
                     options={"limit": 8, "error": error})
    worker = ModelWorker(spec)
    profile = Profile.from_dict(worker.profile())
    assert [p.batch for p in profile.points] == [1, 2, 4, 8]
    assert profile.stop.reason == "out_of_memory" and profile.stop.batch == 16
    assert profile.best_batch <= 8
    # the worker still serves afterwards
    assert worker.profile_one(2)["batch"] == 2


def test_a_model_without_an_example_says_how_to_give_one() -> None:
    spec = ModelSpec(id="plain", factory=f"{MODELS}:no_example", device="cpu", max_batch=4)
    worker = ModelWorker(spec)
    assert worker.ready()["signature"] is None
    with pytest.raises(ProfileError, match=r"has no example input.*example_input\(\).*options\.example"):
        worker.profile()


def test_an_example_in_the_spec_options_is_used_and_not_passed_to_the_factory() -> None:
    spec = ModelSpec(id="plain", factory=f"{MODELS}:no_example", device="cpu", max_batch=4,
                     latency_budget_ms=50.0, options={"example": {"dtype": "float32", "shape": [2, 3]}})
    worker = ModelWorker(spec)  # no_example() takes no arguments: "example" must not reach it
    assert worker.ready()["signature"] == "float32[2,3]"
    profile = Profile.from_dict(worker.profile())
    check_curve(profile, spec)
    assert profile.plan.signature == "float32[2,3]"


def test_device_override_keeps_the_spec_fingerprint() -> None:
    spec = demo_spec("noop", device="cuda", max_batch=2)
    worker = ModelWorker(spec, device="cpu")
    profile = Profile.from_dict(worker.profile())
    assert profile.plan.device == "cpu" and profile.fingerprint == spec.fingerprint()


@pytest.mark.ray
def test_cnn_profile_in_a_ray_actor(ray_cluster: None) -> None:
    spec = demo_spec("cnn", max_batch=16, device="cpu")
    actor: Any = ray.remote(ModelWorker).options(num_cpus=0.25).remote(spec)
    try:
        info = ray.get(actor.ready.remote(), timeout=120)
        assert info["pid"] != os.getpid()
        assert (info["device_kind"], info["signature"]) == ("cpu", "float32[3,64,64]")
        profile = Profile.from_dict(ray.get(actor.profile.remote(), timeout=120))
    finally:
        ray.kill(actor)
    check_curve(profile, spec)
    by_size = {p.batch: p for p in profile.points}
    # the first conv's output alone is b x 16 x 64 x 64 float32: 4 MiB at b=16
    assert by_size[16].memory_bytes >= 16 * 16 * 64 * 64 * 4 > by_size[1].memory_bytes
