"""Profiling one model outside a manager: a Ray actor of its own, driven one size at a time.

``nosq profile`` and the benchmark use it. The actor is a ``ModelWorker`` like a replica's (same
device choice, threads and resources), so the figures are those a manager would measure; the
sweep runs here, one ``profile_one`` call per batch size, so progress can be shown between sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from nosq.manager.runtime import raycluster
from nosq.producer.errors import NosqError
from nosq.workers.actor import ModelWorker
from nosq.workers.profiles.curve import (
    Measurement,
    Plan,
    Profile,
    ProfileOptions,
    assemble,
    measurement_from_dict,
    sweep,
)
from nosq.workers.spec import ModelSpec

__all__ = ["profile_in_actor"]

READY_TIMEOUT_S = 300.0
SIZE_TIMEOUT_S = 600.0  # one batch size: warm-up, memory and timed runs


def profile_in_actor(
    spec: ModelSpec,
    *,
    device: str | None = None,
    max_batch: int | None = None,
    ray_address: str | None = None,
    options: ProfileOptions | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_result: Callable[[int, int, Measurement], None] | None = None,
) -> Profile:
    """Profile ``spec`` in a new actor (Ray joined at ``ray_address`` or started on loopback).

    ``device`` overrides the spec's device preference. Ray started here is stopped here."""
    owns_ray = raycluster.connect(ray_address, None)
    actor: Any = None
    try:
        actor = _start(spec, device)
        _get(actor.ready.remote(), READY_TIMEOUT_S, spec, "starting its worker")
        started, clock = time.time(), time.perf_counter()
        plan = Plan.from_dict(_get(actor.profile_plan.remote(max_batch, options), READY_TIMEOUT_S, spec, "planning"))
        if on_plan is not None:
            on_plan(plan)

        def measure(batch: int) -> Measurement:
            raw = _get(actor.profile_one.remote(batch, options), SIZE_TIMEOUT_S, spec, f"measuring b={batch}")
            return measurement_from_dict(raw)

        points, stop = sweep(plan, measure, on_result=on_result)
        return assemble(plan, points, stop, profiled_at=started, seconds=time.perf_counter() - clock)
    finally:
        if actor is not None:
            ray.kill(actor)
        if owns_ray:
            raycluster.disconnect()


def _start(spec: ModelSpec, device: str | None) -> Any:
    preference = device or spec.device
    gpus: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    if preference == "cuda" and gpus.get("GPU", 0.0) < 1:
        raise NosqError(f"model {spec.id!r}: --device cuda, but the Ray cluster has no GPU: "
                        "run on a machine with one, or use --device cpu")
    wants_gpu = preference == "cuda" or (preference == "auto" and gpus.get("GPU", 0.0) >= 1)
    cls = ray.remote(ModelWorker)
    return cls.options(num_cpus=spec.num_cpus, num_gpus=1 if wants_gpu else 0, max_restarts=0,
                       max_concurrency=1).remote(spec, device=device)


def _get(ref: Any, timeout_s: float, spec: ModelSpec, what: str) -> Any:
    """``ray.get`` with the worker's errors translated (a CLI has no event loop to block)."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError as exc:
        raise NosqError(f"model {spec.id!r}: {what} took over {timeout_s:.0f} s") from exc
    except RayError as exc:
        lines = str(exc).strip().splitlines()
        raise NosqError(f"model {spec.id!r}: {what} failed: {lines[-1] if lines else type(exc).__name__}") from exc
