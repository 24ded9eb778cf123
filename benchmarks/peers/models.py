"""The models under test: the spec every system serves, its batch cap b*, and its input items.

Every system gets the same demo model (``workers/demo.toml``) with the device and torch
threads of the run, the same batch cap and the same max wait. b* is what nosq would serve
with: a valid stored profile of that spec in the benchmark's Redis db, else a profile measured
here by ``ModelWorker.profile`` (the code the serving actor runs) and stored, so the manager
started next reuses it instead of profiling again.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from nosq import workers
from nosq.workers.profiles.curve import EXAMPLE_OPTION
from nosq.workers.spec import ModelSpec, load_config

if TYPE_CHECKING:
    import torch

__all__ = ["QUICK_PROFILE", "Target", "build_model", "input_items", "resolve"]

# a profile in seconds rather than tens of seconds: for --quick smoke runs
QUICK_PROFILE = {"rounds": 1, "warmup": 1, "min_reps": 3, "max_reps": 20, "min_time_s": 0.01, "max_time_s": 0.1}
# nosq.workers.demo.demo_config_path(), without importing torch (load processes never need it)
DEMO_CONFIG = Path(workers.__file__).with_name("demo.toml")
N_ITEMS = 16  # distinct input items each client cycles through


@dataclass(frozen=True, slots=True)
class Target:
    """One model as every system serves it in this run."""

    spec: ModelSpec  # device and threads of the run; max_batch is the profile's cap, not b*
    batch: int  # b*: the cap of every system's batches
    batch_source: str  # where b* came from, in words
    shape: tuple[int, ...]  # one input item
    profile_key: str  # the stored profile nosq serves with
    temporary: bool  # a short or made-up profile (--quick, --batch): undone after the run
    replaced: bytes | None = None  # what was stored under profile_key before a temporary one

    @property
    def id(self) -> str:
        return self.spec.id

    def describe(self) -> dict[str, Any]:
        return {"batch": self.batch, "batch_source": self.batch_source, "max_wait_ms": self.spec.max_wait_ms,
                "threads": self.spec.threads, "device": self.spec.device, "item_shape": list(self.shape),
                "spec_max_batch": self.spec.max_batch}


def served_spec(model_id: str, *, device: str, threads: int | None, max_batch: int | None) -> ModelSpec:
    """The demo spec of ``model_id`` on ``device`` (cpu or cuda) with the run's overrides."""
    spec = load_config(DEMO_CONFIG).model(model_id)
    update: dict[str, Any] = {"device": device}
    if threads is not None:
        update["threads"] = threads
    if max_batch is not None:
        update["max_batch"] = max_batch
    return ModelSpec.model_validate({**spec.model_dump(), **update})


def build_model(spec: ModelSpec, device: str) -> torch.nn.Module:  # torch is imported where a model runs
    """The model of ``spec`` on ``device``, eval mode, as a peer system hosts it."""
    module_name, _, name = spec.factory.partition(":")
    factory = getattr(importlib.import_module(module_name), name)
    kwargs = {k: v for k, v in spec.options.items() if k != EXAMPLE_OPTION}
    model: torch.nn.Module = factory(**kwargs)
    return model.to(device).eval()


def input_items(shape: tuple[int, ...], n: int = N_ITEMS, seed: int = 0) -> list[np.ndarray]:
    """The same ``n`` float32 items for every system and every client."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(n)]


def resolve(model_id: str, *, device: str, threads: int | None, max_batch: int | None, given_batch: int | None,
            client: redis.Redis, quick: bool) -> Target:
    """The target for ``model_id``: b* from ``given_batch``, a stored profile, or a profile taken now."""
    from nosq.manager.profiles.store import decode, profile_key, store_sync
    from nosq.workers.actor import ModelWorker
    from nosq.workers.profiles.curve import Profile, ProfileError
    from nosq.workers.profiles.measure import ProfileOptions, device_kind, input_signature

    spec = served_spec(model_id, device=device, threads=threads, max_batch=given_batch or max_batch)
    # sets this process's torch threads to the spec's, as the actor does
    worker = ModelWorker(spec, local_channel=False)
    example = worker.example()
    shape = tuple(int(d) for d in example.shape)
    key = profile_key(spec.id, device_kind(worker.runtime.device), input_signature(example))
    data: Any = client.get(key)
    if given_batch is None:
        stored = None
        if data is not None:
            try:
                stored = decode(data)
            except ProfileError:
                stored = None
        if stored is not None and stored.fingerprint == spec.fingerprint():
            return Target(spec, stored.best_batch, f"stored profile ({stored.reason})", shape, key, False)
    options = ProfileOptions(**QUICK_PROFILE) if quick or given_batch else None  # type: ignore[arg-type]
    profile = Profile.from_dict(worker.profile(None, options))
    if given_batch is not None:  # the manager serves a stored profile's b*: make it the given one
        profile = dataclasses.replace(profile, best_batch=given_batch, reason=f"b*={given_batch} set by --batch")
        store_sync(client, profile)
        return Target(spec, given_batch, "--batch", shape, key, True, data)
    store_sync(client, profile)
    return Target(spec, profile.best_batch, f"profiled now in {profile.seconds:.1f} s ({profile.reason})", shape,
                  key, quick, data)
