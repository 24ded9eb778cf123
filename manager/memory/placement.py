"""Fractional GPU placement: how much of a GPU each actor asks Ray for, and which GPU it goes on.

Pure functions, no Ray and no Redis.

- ``gpu_fraction(nbytes, device_bytes)`` → the ``num_gpus`` of one actor: its measured bytes
  over the device's total bytes, rounded UP to ``1 / steps`` (0.01 by default), never 0
  (a tiny model still takes a slice, so Ray cannot stack unbounded actors on a GPU) and at
  most 1.
- ``pack(items, gpu_bytes, budget_bytes=...)`` → first-fit decreasing by measured bytes over
  the GPUs of one node: each GPU holds items while both their bytes fit its budget and their
  rounded fractions sum to at most 1 (Ray's own accounting: three thirds of a GPU round up to
  0.34 each and do not fit together). Returns each item's GPU index and ``num_gpus``, and the
  items that fit nowhere.
- ``first_fit(nbytes, free_bytes)`` → the first device with room for one more model (on
  demand, over ``Registry.devices(node)``), or ``None``.

The manager places one item per actor: a model with ``replicas=2`` is two items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["STEPS_PER_GPU", "Packing", "first_fit", "gpu_fraction", "gpu_steps", "pack", "shared_fraction"]

STEPS_PER_GPU = 100  # num_gpus granularity: 0.01 of a GPU
_MAX_STEPS = 10_000  # Ray keeps 4 decimals of a resource


def gpu_steps(nbytes: int, device_bytes: int, *, steps: int = STEPS_PER_GPU) -> int:
    """``ceil(nbytes / device_bytes * steps)`` in exact integers, clamped to ``[1, steps]``."""
    if not 1 <= steps <= _MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {_MAX_STEPS} (Ray keeps 4 decimals), got {steps}")
    if device_bytes <= 0:
        raise ValueError(f"device_bytes must be > 0, got {device_bytes}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0 (the model's measured bytes), got {nbytes}")
    return min(max(-(-nbytes * steps // device_bytes), 1), steps)


def gpu_fraction(nbytes: int, device_bytes: int, *, steps: int = STEPS_PER_GPU) -> float:
    """The ``num_gpus`` of an actor holding ``nbytes`` on a GPU of ``device_bytes``: (0, 1]."""
    return gpu_steps(nbytes, device_bytes, steps=steps) / steps


def shared_fraction(replicas: int, gpus: float, *, steps: int = STEPS_PER_GPU) -> float:
    """The ``num_gpus`` of each of ``replicas`` actors sharing ``gpus`` GPUs equally (no budget, so
    no measured bytes: every GPU replica the config can start gets a place): (0, 1]."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    share = int(gpus * steps) // replicas
    return min(max(share, 1), steps) / steps


@dataclass(frozen=True, slots=True)
class Packing:
    """Where each item goes: ``gpu[item]`` is its GPU index, ``num_gpus[item]`` its fraction."""

    gpu: dict[str, int] = field(default_factory=dict)
    num_gpus: dict[str, float] = field(default_factory=dict)
    unplaced: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not self.unplaced


def pack(items: Mapping[str, int], gpu_bytes: Sequence[int], *,
         budget_bytes: Sequence[int] | None = None, steps: int = STEPS_PER_GPU) -> Packing:
    """First-fit decreasing of ``items`` (name → measured bytes) over the GPUs of one node.

    ``gpu_bytes[i]`` is GPU ``i``'s total memory (fractions are of it); ``budget_bytes[i]`` the
    bytes the items may use there (total minus a reserve, or what is still free); it defaults
    to ``gpu_bytes``. Larger items go first; equal ones by name, so the result is deterministic.
    """
    budgets = list(gpu_bytes if budget_bytes is None else budget_bytes)
    if len(budgets) != len(gpu_bytes):
        raise ValueError(f"budget_bytes has {len(budgets)} entries but gpu_bytes has {len(gpu_bytes)}: "
                         "give one budget per GPU")
    free_steps = [steps] * len(gpu_bytes)
    gpu: dict[str, int] = {}
    fractions: dict[str, float] = {}
    unplaced: list[str] = []
    for name, nbytes in sorted(items.items(), key=lambda kv: (-kv[1], kv[0])):
        for i, total in enumerate(gpu_bytes):
            need = gpu_steps(nbytes, total, steps=steps)
            if nbytes <= budgets[i] and need <= free_steps[i]:
                budgets[i] -= nbytes
                free_steps[i] -= need
                gpu[name] = i
                fractions[name] = need / steps
                break
        else:
            unplaced.append(name)
    return Packing(gpu=gpu, num_gpus=fractions, unplaced=tuple(unplaced))


def first_fit(nbytes: int, free_bytes: Sequence[int]) -> int | None:
    """Index of the first device with at least ``nbytes`` free, or ``None`` if none has room."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return next((i for i, free in enumerate(free_bytes) if free >= nbytes), None)
