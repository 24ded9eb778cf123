"""Eviction policies: which resident models to evict, in order, so that a new one fits.

Pure functions over plain records; no Redis. ``LUA_CHOOSE_VICTIMS`` is the same
code in Lua, kept here beside it: the registry's reserve script (``manager/memory/registry.py``) runs
it so that several managers decide atomically; ``tests/registry`` checks that both choose the
same victims.

API the manager uses
--------------------
- ``policy(name)`` → the ``EvictionPolicy`` named in config: ``"fifo"`` (default), ``"lru"``,
  ``"lfu"`` or ``"cost"``; any other name raises ``ValueError`` listing these.
- ``choose_victims(residents, need_bytes, policy, now_ms)`` → the victims in eviction order, or
  ``None`` when not enough can be freed now.
- ``LUA_CHOOSE_VICTIMS`` defines ``evictable(c, now)`` and ``choose_victims(cands, need, policy,
  now)`` for scripts; a candidate is a table ``{id, state, bytes, loaded_at, last_used, uses,
  inflight, backlog, reload_ms}``.

Policies
--------
Every policy orders the *evictable* residents by a key, smallest first; ties go to the oldest
``loaded_at_ms``, then to the smaller model id (byte order), so the order is total and the Lua
mirror can reproduce it exactly.

- FIFO: ``loaded_at_ms`` (the model loaded first leaves first).
- LRU: ``last_used_ms`` (the model idle longest leaves first).
- LFU: ``uses`` since it was loaded (the least used leaves first).
- cost: ``cost_score(r)``, the cheapest eviction first::

      cost = (reload_ms + RELOAD_FLOOR_MS) * (1 + backlog) / (max(nbytes, 1) / MIB)

  i.e. the milliseconds of reload work paid per MiB freed, multiplied by the work waiting for
  the model (``backlog`` = stream depth + pending entries): a big model that reloads fast and
  has nothing queued is the cheapest; a model with requests waiting costs ``1 + backlog`` times
  more, because evicting it means reloading it at once. ``RELOAD_FLOOR_MS`` keeps a model with
  an unknown (0) load time from looking free.

Safety
------
Only a ``READY`` model with no batch in flight (``inflight == 0``) and ``nbytes > 0`` is ever
chosen: a loading model has nothing to free yet, a draining one is already on its way out, one
with batches in flight must drain first, and one of 0 bytes frees nothing. Nor, when the
decision's time is given (the reserve script always gives it), a model that has served nothing
since it became READY less than ``MIN_READY_MS`` ago: in the instant between its load and its
first batch it is idle, and the loads waiting for room retry every ``load_poll_ms``; without
this rule one could take it then, whatever the policy, wasting its load before the requests it
was loaded for ran (``tests/registry/test_registry_managers.py`` saw 1 of 13 decisions in a run
take a model that had just loaded and served nothing).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "LUA_CHOOSE_VICTIMS",
    "MIB",
    "MIN_READY_MS",
    "POLICY_NAMES",
    "RELOAD_FLOOR_MS",
    "CostAware",
    "EvictionPolicy",
    "Fifo",
    "Lfu",
    "Lru",
    "ModelState",
    "Resident",
    "choose_victims",
    "cost_score",
    "evictable",
    "policy",
]

MIB = 1024 * 1024
RELOAD_FLOOR_MS = 100.0
MIN_READY_MS = 1000  # a model that has served nothing is not evictable this long after its load


class ModelState(enum.StrEnum):
    """A model's state in the registry; the first three count against the device budget."""

    LOADING = "loading"    # reserved: bytes counted, actors starting
    READY = "ready"        # serving
    DRAINING = "draining"  # chosen as a victim: no new batches; bytes counted until release
    EVICTED = "evicted"    # released: actors gone, bytes returned
    FAILED = "failed"      # its load failed: bytes returned, ``last_error`` says why


@dataclass(frozen=True, slots=True)
class Resident:
    """What a policy knows about one model counted on a device."""

    model: str
    state: ModelState
    nbytes: int
    loaded_at_ms: int = 0
    last_used_ms: int = 0
    uses: int = 0
    inflight: int = 0
    backlog: int = 0
    reload_ms: float = 0.0


SortKey = tuple[float, int, bytes]


class EvictionPolicy(Protocol):
    """Orders evictable residents: the smallest key is evicted first."""

    @property
    def name(self) -> str: ...

    def key(self, resident: Resident) -> SortKey: ...


def _tie(resident: Resident) -> tuple[int, bytes]:
    return resident.loaded_at_ms, resident.model.encode()


class Fifo:
    """Oldest ``loaded_at`` first."""

    name = "fifo"

    def key(self, resident: Resident) -> SortKey:
        return (resident.loaded_at_ms, *_tie(resident))


class Lru:
    """Oldest ``last_used`` first."""

    name = "lru"

    def key(self, resident: Resident) -> SortKey:
        return (resident.last_used_ms, *_tie(resident))


class Lfu:
    """Fewest ``uses`` first; ties to the oldest loaded."""

    name = "lfu"

    def key(self, resident: Resident) -> SortKey:
        return (resident.uses, *_tie(resident))


def cost_score(resident: Resident) -> float:
    """Reload milliseconds per MiB freed, times ``1 + backlog`` (see the module docstring).

    The Lua mirror evaluates the same operations in the same order, so both give the same double.
    """
    return (resident.reload_ms + RELOAD_FLOOR_MS) * (1 + resident.backlog) / (max(resident.nbytes, 1) / MIB)


class CostAware:
    """Cheapest eviction first: ``cost_score``."""

    name = "cost"

    def key(self, resident: Resident) -> SortKey:
        return (cost_score(resident), *_tie(resident))


_POLICIES: Mapping[str, EvictionPolicy] = {p.name: p for p in (Fifo(), Lru(), Lfu(), CostAware())}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def policy(name: str) -> EvictionPolicy:
    """The policy called ``name`` in config; ``ValueError`` naming the valid ones otherwise."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}"
        ) from None


def evictable(resident: Resident, now_ms: int | None = None) -> bool:
    """Ready, idle and holding bytes: loading models have nothing to free yet, busy ones must
    drain first, and evicting a model of 0 bytes frees nothing. With ``now_ms`` (the decision's
    time, Redis's clock), also not fresh: one that has served nothing (``uses == 0``) is kept
    until ``MIN_READY_MS`` after its load (see the module docstring)."""
    if resident.state is not ModelState.READY or resident.inflight > 0 or resident.nbytes <= 0:
        return False
    return now_ms is None or resident.uses > 0 or now_ms - resident.loaded_at_ms >= MIN_READY_MS


def choose_victims(residents: Iterable[Resident], need_bytes: int,
                   policy: EvictionPolicy, now_ms: int | None = None) -> list[Resident] | None:
    """Victims in eviction order until at least ``need_bytes`` are freed; ``None`` if impossible now.

    ``need_bytes`` is what must still be freed: the new model's bytes minus the free bytes
    (and minus what draining models will free soon); ``<= 0`` needs no victim. ``None`` means
    every candidate is loading, draining, busy or fresh (``evictable`` at ``now_ms``): wait for
    one to finish, do not evict part.
    """
    if need_bytes <= 0:
        return []
    victims: list[Resident] = []
    freed = 0
    for resident in sorted((r for r in residents if evictable(r, now_ms)), key=policy.key):
        victims.append(resident)
        freed += resident.nbytes
        if freed >= need_bytes:
            return victims
    return None


# The mirror of ``evictable``, the policies' keys and ``choose_victims``, for the reserve script.
# Lua numbers are doubles, like the Python keys (integers below 2**53 compare exactly), and the
# cost key runs the same operations in the same order. Ids compare byte by byte, as Python
# compares str, never with Lua's locale-dependent ``<``.
LUA_CHOOSE_VICTIMS = """
local function evictable(c, now)
  return c.state == 'ready' and c.inflight <= 0 and c.bytes > 0
         and (c.uses > 0 or now - c.loaded_at >= MIN_READY_MS)
end
local function policy_key(c, policy)
  if policy == 'fifo' then return c.loaded_at end
  if policy == 'lru' then return c.last_used end
  if policy == 'lfu' then return c.uses end
  if policy == 'cost' then
    return (c.reload_ms + RELOAD_FLOOR_MS) * (1 + c.backlog) / (math.max(c.bytes, 1) / MIB)
  end
  error('unknown eviction policy ' .. tostring(policy))
end
local function id_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function choose_victims(cands, need, policy, now)
  local pool = {}
  for _, c in ipairs(cands) do
    if evictable(c, now) then
      c.k = policy_key(c, policy)
      pool[#pool + 1] = c
    end
  end
  if need <= 0 then return {} end
  table.sort(pool, function(a, b)
    if a.k ~= b.k then return a.k < b.k end
    if a.loaded_at ~= b.loaded_at then return a.loaded_at < b.loaded_at end
    return id_less(a.id, b.id)
  end)
  local victims, freed = {}, 0
  for _, c in ipairs(pool) do
    victims[#victims + 1] = c
    freed = freed + c.bytes
    if freed >= need then return victims end
  end
  return nil
end
""".replace("RELOAD_FLOOR_MS", repr(RELOAD_FLOOR_MS)).replace("MIN_READY_MS", str(MIN_READY_MS)).replace(
    "MIB", str(MIB))
