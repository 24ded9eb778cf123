"""Stored profiles: one per (model, device kind, input signature), shared through Redis.

A profile is measured once (on a replica, in the process that serves the model) and stored as
JSON under ``nosq:{registry}:profile:<model>:<device kind>:<signature>``; a restart and every
other manager that serves the model on the same kind of device reuse it. It carries the spec's
fingerprint: a stored profile whose fingerprint differs from the spec being served (its
max_batch, options, budget... changed), or of another format version, is ignored and measured
again, and the new one replaces it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from ray.exceptions import RayActorError, RayError

from nosq.manager.serving.batcher import LatencyModel
from nosq.manager.serving.replicas import ReplicaPool
from nosq.producer import keys
from nosq.producer.errors import NosqError
from nosq.workers.profiles.curve import Profile, ProfileError, ProfileOptions
from nosq.workers.spec import ModelSpec

__all__ = [
    "ProfileRecord",
    "decode",
    "encode",
    "ensure_profile",
    "latency_model",
    "load",
    "profile_key",
    "store",
    "store_sync",
]

log = logging.getLogger(__name__)
PROFILE_TIMEOUT_S = 900.0


def profile_key(model: str, device_kind: str, signature: str) -> str:
    """Where the profile of ``model`` on ``device_kind`` for ``signature`` inputs is stored."""
    return keys.registry_profile(model, device_kind, signature)


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """The profile a manager serves a model with, and where it came from."""

    profile: Profile
    source: str  # "stored" (reused) or "measured" (profiled at this start)
    key: str


def encode(profile: Profile) -> str:
    return json.dumps(profile.to_dict(), separators=(",", ":"))


def decode(data: bytes | str) -> Profile:
    """The profile in ``data``; ``ProfileError`` if it is not one of this format."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"stored profile is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"stored profile is a JSON {type(raw).__name__}, not an object")
    return Profile.from_dict(raw)


async def load(client: redis.asyncio.Redis, spec: ModelSpec, device_kind: str, signature: str) -> Profile | None:
    """The stored profile for ``spec`` if there is a valid one for its current fingerprint."""
    key = profile_key(spec.id, device_kind, signature)
    data = await client.get(key)
    if data is None:
        return None
    try:
        profile = decode(data)
    except ProfileError as exc:
        log.warning("model %s: ignoring the stored profile at %s: %s", spec.id, key, exc)
        return None
    if profile.fingerprint != spec.fingerprint():
        log.info("model %s: stored profile is for spec %s, not %s: profiling again", spec.id,
                 profile.fingerprint, spec.fingerprint())
        return None
    return profile


async def store(client: redis.asyncio.Redis, profile: Profile) -> str:
    """Save ``profile`` under its key (replacing any older one); returns the key."""
    key = profile_key(profile.plan.model, profile.plan.device_kind, profile.plan.signature)
    await client.set(key, encode(profile))
    return key


def store_sync(client: redis.Redis, profile: Profile) -> str:
    """``store`` for synchronous callers (the CLI)."""
    key = profile_key(profile.plan.model, profile.plan.device_kind, profile.plan.signature)
    client.set(key, encode(profile))
    return key


async def ensure_profile(client: redis.asyncio.Redis, spec: ModelSpec, pool: ReplicaPool, *, measure: bool,
                         options: ProfileOptions | None = None) -> ProfileRecord | None:
    """The stored profile for ``spec`` on its pool's device, or (``measure``) a new one measured
    on the first replica with ``options`` and stored. None when there is none to use: the model
    has no example input, ``measure`` is off and nothing valid is stored, or its worker died
    while profiling (logged). A model whose profiling raises is a ``NosqError``."""
    info: dict[str, Any] = (pool.replicas[0].info or {}) if pool.replicas else {}
    device_kind, signature = info.get("device_kind"), info.get("signature")
    if not device_kind or not signature:
        log.warning("model %s: no example input to profile with; serving with max_batch %d and no latency "
                    "curve (give the model example_input() or set options.example)", spec.id, spec.max_batch)
        return None
    key = profile_key(spec.id, device_kind, signature)
    stored = await load(client, spec, device_kind, signature)
    if stored is not None:
        log.info("model %s: reusing its profile from %s: b*=%d", spec.id, key, stored.best_batch)
        return ProfileRecord(stored, "stored", key)
    if not measure:
        log.info("model %s: no valid stored profile and profile_on_start is off; serving with max_batch %d",
                 spec.id, spec.max_batch)
        return None
    log.info("model %s: profiling on %s for %s inputs ...", spec.id, device_kind, signature)
    try:
        raw: dict[str, Any] = await asyncio.wait_for(pool.replicas[0].actor.profile.remote(None, options),
                                                     PROFILE_TIMEOUT_S)
        profile = Profile.from_dict(raw)
    except RayActorError as exc:  # the worker died (killed for memory, say): Ray restarts it for serving
        log.error("model %s: its worker died while profiling (%s); serving with max_batch %d and no latency "
                  "curve", spec.id, type(exc).__name__, spec.max_batch)
        return None
    except (RayError, ProfileError, TimeoutError) as exc:
        raise NosqError(f"model {spec.id!r}: profiling failed: {_cause(exc)}; fix the model or its "
                        "example input, or start with profile_on_start off") from exc
    await store(client, profile)
    log.info("model %s: profiled in %.1f s, stored at %s: %s", spec.id, profile.seconds, key, profile.reason)
    return ProfileRecord(profile, "measured", key)


def latency_model(profile: Profile) -> LatencyModel:
    """The batcher's latency(b): the profile's p50 curve, its p95 as the tail."""
    return LatencyModel(curve=profile.latency_curve(), tail=profile.tail_curve())


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:300] if text else ''}"
