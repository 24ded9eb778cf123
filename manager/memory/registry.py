"""The model registry in Redis: where each model lives, what it costs, and who may evict it.

Several managers share one registry; every decision that moves bytes against a device budget
is one Lua script (EVALSHA), so decisions serialize in Redis and the budget holds whatever
the interleaving. Timestamps come from Redis (``TIME``), one clock for every manager.

Lifecycle of a model (``ModelState``)::

    absent/EVICTED/FAILED --reserve--> LOADING --mark_ready--> READY --chosen as a victim--> DRAINING
                                          | fail                 | release                      | release
                                          v                      v                              v
                                        FAILED                EVICTED                        EVICTED

    release_all / reap_dead_owners: LOADING, READY or DRAINING --> EVICTED

LOADING, READY and DRAINING count their bytes against the device's ``used_bytes`` and sit in
its resident set; ``release``/``fail``/``reap_dead_owners`` return them, exactly once.

What the manager calls, and when
--------------------------------
One ``Registry(client, owner=consumer, policy=settings_name)`` per manager process.

- start: ``set_budget(node, device, budget_bytes)`` for each device it places on
  (GPU: total minus a reserve; CPU: the configured RAM budget).
- on demand (requests for a model with no ready replicas here): choose a device (e.g.
  ``placement.first_fit`` over ``devices(node)``), then ``reserve(model, node=, device=,
  nbytes=)``:

  - ``RESERVED``: start the actors; then ``mark_ready(model, replicas, load_ms)`` (raises
    ``ReservationLost``: the reservation was reaped meanwhile, kill the actors) or, if the
    load failed, ``fail(model, error)``;
  - ``ALREADY``: a load is under way or done (``owner``/``node``/``device`` say where): do not
    load; the requests wait in the stream;
  - ``EVICT``: ``victims`` were marked DRAINING; each victim's owner drains and kills it,
    then calls ``release``. Retry ``reserve`` on a ``evicted``/``failed`` event;
  - ``WAIT``: nothing to evict now (``reason``): retry on the next registry event, or
    after a batch ends.
- per batch: ``inflight(model, +1)`` before dispatching; ``False`` means the model is no
  longer READY and ours (it is draining): do not dispatch, leave the entries in the stream.
  After the batch: ``inflight(model, -1)`` and ``touch(model, n_items)`` (one round trip
  each; they may run together under ``asyncio.gather``).
- on a ``draining`` event, or on heartbeat for each model in ``snapshot(owner=me)`` that is
  DRAINING: wait for the local in-flight batches to end (the script only picks idle models,
  and ``inflight(+1)`` refuses from then on), kill the actors, then ``release(model)``.
- on heartbeat (after renewing its own heartbeat key): ``set_backlog({model: depth+pending})``
  for the cost policy, ``reap_dead_owners()``, and kill local actors of any model that
  ``snapshot(owner=me)`` no longer lists as ours and counted (reaped after a stall).
- stop: ``release_all()`` after killing its actors.
- scaling a READY model (autoscaler, ``nosq models scale``): ``resize(model, replicas)`` before
  starting replicas (refused, never evicting, when the budget has no room) and after killing
  them; its bytes are bytes-per-replica x replicas.
- ``record_error(model, message)`` for a non-fatal problem (e.g. compile fallback);
  ``snapshot()`` and ``devices()`` feed ``nosq models``; ``audit()`` checks the invariants;
  ``evictions()`` reads the log of eviction decisions (what was chosen, from what).

Events are published on ``EVENTS_CHANNEL`` as ``"<state> <model>"`` each time a model enters
a state (``parse_event`` reads them), so waiting needs no polling.

Keys (each from its ``nosq.producer.keys.registry_*`` helper)::

    nosq:{registry}:model:<model>               hash: state node device bytes owner replicas
                                              inflight uses load_ms loaded_at last_used backlog
                                              reserved_at draining_at released_at evicted_for
                                              last_error error_at
    nosq:{registry}:device:<node>/<device>      hash: node device budget_bytes used_bytes
    nosq:{registry}:resident:<node>/<device>    set: models counted on the device
    nosq:{registry}:models                      set: every model ever reserved
    nosq:{registry}:devices                     set: every <node>/<device> with a budget
    nosq:{registry}:evictions                   stream: one entry per eviction decision (for, node,
                                              device, policy, need, victims, candidates), the
                                              last ~EVICTIONS_KEPT; ``evictions()`` reads it

Every key a script touches is passed in its ``KEYS``, and they all share the ``{registry}`` hash
tag, so each script is one slot and runs on Redis Cluster too. Where a script's keys follow from
data (a device's resident models, a model's node and device), the caller reads that data first and
the script checks it is unchanged, or replies "retry" having written nothing (see "Lua" below).
The one key outside ``{registry}``, a manager's heartbeat, ``reap_dead_owners`` re-checks inside
its script on a single Redis only: on a cluster it is another slot, checked just before instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.commands.core import AsyncScript

from nosq.manager.memory import eviction
from nosq.manager.memory.eviction import LUA_CHOOSE_VICTIMS, EvictionPolicy, ModelState, Resident
from nosq.manager.runtime.redislink import is_lost
from nosq.producer import keys
from nosq.producer.errors import NosqConnectionError, NosqError

__all__ = [
    "EVENTS_CHANNEL",
    "DeviceAudit",
    "Eviction",
    "ModelState",
    "Outcome",
    "Registry",
    "RegistryError",
    "Reservation",
    "ReservationLost",
    "Resize",
    "Victim",
    "parse_event",
]

EVENTS_CHANNEL = keys.registry_events()
_MODEL = keys.registry_model("")
_DEVICE = keys.registry_device("")
_RESIDENT = keys.registry_resident("")
_MODELS = keys.registry_models()
_DEVICES = keys.registry_devices()
_EVICTIONS = keys.registry_evictions()
EVICTIONS_KEPT = 1000  # the eviction log keeps about this many decisions (XADD MAXLEN ~)

_MODEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$", re.ASCII)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$", re.ASCII)
_COUNTED = frozenset({ModelState.LOADING, ModelState.READY, ModelState.DRAINING})
_STATES = frozenset(state.value for state in ModelState)
_COUNTED_VALUES = frozenset(state.value for state in _COUNTED)


class RegistryError(NosqError):
    """The registry cannot do what was asked (no budget, model larger than the budget, ...)."""


class ReservationLost(RegistryError):
    """A model this manager reserved is no longer its own (reaped, or released elsewhere)."""


class Outcome(enum.StrEnum):
    RESERVED = "reserved"  # bytes counted, state LOADING: start the actors
    ALREADY = "already"    # loading or ready somewhere: do not load again
    EVICT = "evict"        # victims marked DRAINING: retry once they are released
    WAIT = "wait"          # nothing evictable now: retry on the next event


@dataclass(frozen=True, slots=True)
class Victim:
    model: str
    owner: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """What ``reserve`` decided.

    ``reason`` (WAIT): ``"freeing"`` — draining models will free enough, retry after they are
    released; ``"busy"`` — every candidate is loading, has batches in flight or was loaded less
    than ``eviction.MIN_READY_MS`` ago and has served nothing yet; ``"draining"`` —
    this model itself is being evicted, retry after it is released.
    ``owner``/``node``/``device``/``state``: where the model is (ALREADY, WAIT "draining").
    """

    outcome: Outcome
    victims: tuple[Victim, ...] = ()
    reason: str = ""
    owner: str = ""
    node: str = ""
    device: str = ""
    state: ModelState | None = None


@dataclass(frozen=True, slots=True)
class Resize:
    """What ``resize`` did: ``ok`` and the model's bytes now, or ``reason`` it was refused."""

    ok: bool
    nbytes: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Eviction:
    """One eviction decision of ``reserve``, as logged by the script that made it.

    ``candidates`` are the models counted on the device at that instant, with the fields the
    policy read (``evictable`` ones at ``at_ms`` could be chosen); ``victims`` were chosen, in
    order, to free ``need_bytes`` so that ``model`` fits. ``at_ms`` is the script's clock (Redis
    ``TIME``), the time the decision was made at.
    """

    at_ms: int
    model: str
    node: str
    device: str
    policy: str
    need_bytes: int
    victims: tuple[str, ...]
    candidates: tuple[Resident, ...]

    def policy_victims(self) -> tuple[str, ...]:
        """The victims ``nosq.manager.memory.eviction`` chooses from the same candidates: equal to ``victims``
        when the Lua mirror decided as the Python policy does."""
        chosen = eviction.choose_victims(self.candidates, self.need_bytes, eviction.policy(self.policy), self.at_ms)
        return tuple(r.model for r in chosen or ())


@dataclass(frozen=True, slots=True)
class DeviceAudit:
    """One device, read atomically: ``ok`` iff used == resident sum <= budget and no stray member."""

    node: str
    device: str
    budget_bytes: int
    used_bytes: int
    resident_bytes: int
    models: tuple[str, ...]
    strays: tuple[str, ...]  # members of the resident set whose state does not count

    @property
    def ok(self) -> bool:
        return not self.strays and self.used_bytes == self.resident_bytes <= self.budget_bytes


# -- Lua ----------------------------------------------------------------------------------------
#
# Every key a script touches is one of its ``KEYS`` (Redis's rule: Redis Cluster routes a script by
# the keys it declares), and every one is a ``keys.registry_*`` key (hash tag ``{registry}``: one
# slot). Inside the scripts a key is only ever ``KEYS[i]``; tables map ids to those indexes.
#
# Some scripts need keys that follow from data: the hashes of a set's members (a device's resident
# models, every model) or a model's device keys (its ``node``/``device`` fields). For those the
# caller reads first (``SMEMBERS``, ``HMGET``), passes the keys that follow from what it read in
# ``KEYS`` and what it read in ``ARGV``; the script checks that what it reads now is what was
# passed (same members, same node and device) before it reads any such key, and otherwise replies
# ``RETRY`` having written nothing; the caller reads again (``_optimistic``). A version counter
# (one ``{registry}`` key every membership change INCRs) would work too, but it would make every
# change on any device retry every other device's scripts, put a write in the read-only audit's
# path, and still need the members read to build ``KEYS``; comparing the very members and fields a
# script depends on retries only when those changed, and adds no key.

_RETRY = "?retry"  # a script's reply when its KEYS are not the keys it needs now; no model id has '?'
_TRIES = 20        # optimistic attempts (read, then script) before ``RegistryError``

_LUA_COMMON = """
local RETRY = 'RETRY_MARK'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(n) return string.format('%d', n) end
local function num(v) return tonumber(v) or 0 end
local COUNTED = {loading = true, ready = true, draining = true}
-- the members of the set KEYS[k], or nil unless they are exactly the n ids of `at` (what the
-- caller read; `at` maps each to the KEYS index of its key): the set changed since then
local function members_as_read(k, at, n)
  local members = redis.call('SMEMBERS', KEYS[k])
  if #members ~= n then return nil end
  for _, m in ipairs(members) do
    if not at[m] then return nil end
  end
  return members
end
-- return a counted model's bytes to its device; final is 'evicted' or 'failed'. mk, dk, rk: the
-- KEYS indexes of the model's hash, its device's hash and resident set (the caller checked that
-- they are the keys of the model's node and device)
local function release(model, mk, dk, rk, final, channel, err)
  local f = redis.call('HMGET', KEYS[mk], 'state', 'bytes')
  if not COUNTED[f[1]] then return false end
  local now = int(now_ms())
  redis.call('HINCRBY', KEYS[dk], 'used_bytes', int(-num(f[2])))
  redis.call('SREM', KEYS[rk], model)
  redis.call('HSET', KEYS[mk], 'state', final, 'inflight', '0', 'released_at', now)
  if err ~= '' then redis.call('HSET', KEYS[mk], 'last_error', err, 'error_at', now) end
  redis.call('PUBLISH', channel, final .. ' ' .. model)
  return true
end
""".replace("RETRY_MARK", _RETRY)

# KEYS: model hash, device hash, resident set, models set, evictions stream, then the hash of each
#       member of the resident set as the caller read it (in ARGV's order)
# ARGV: model, node, device, nbytes, owner, policy, channel, then the resident set's members as read
# Replies RETRY, having written nothing, when it must choose victims and the resident set is no
# longer what the caller read.
_RESERVE = _LUA_COMMON + LUA_CHOOSE_VICTIMS + """
local model, node, device, owner, policy = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]
local nbytes, channel = tonumber(ARGV[4]), ARGV[7]

local cur = redis.call('HMGET', KEYS[1], 'state', 'owner', 'node', 'device')
if cur[1] == 'loading' or cur[1] == 'ready' then
  return {'already', '', cur[1], cur[2] or '', cur[3] or '', cur[4] or ''}
end
if cur[1] == 'draining' then
  return {'wait', 'draining', cur[1], cur[2] or '', cur[3] or '', cur[4] or ''}
end
local dev = redis.call('HMGET', KEYS[2], 'budget_bytes', 'used_bytes')
if not dev[1] then return {'no_budget'} end
local budget, used = tonumber(dev[1]), num(dev[2])
if nbytes > budget then return {'too_large', dev[1]} end
if used + nbytes <= budget then
  local now = int(now_ms())
  redis.call('HSET', KEYS[1], 'state', 'loading', 'node', node, 'device', device, 'bytes', int(nbytes),
             'owner', owner, 'reserved_at', now, 'loaded_at', '0', 'uses', '0', 'inflight', '0',
             'replicas', '0')
  redis.call('HINCRBY', KEYS[2], 'used_bytes', int(nbytes))
  redis.call('SADD', KEYS[3], model)
  redis.call('SADD', KEYS[4], model)
  redis.call('PUBLISH', channel, 'loading ' .. model)
  return {'reserved'}
end

-- does not fit: what is draining frees soon; choose victims among the rest (manager/memory/eviction.py)
local at, n = {}, #ARGV - 7  -- resident model -> KEYS index of its hash
for i = 8, #ARGV do at[ARGV[i]] = i - 2 end
local members = members_as_read(3, at, n)
if not members then return {RETRY} end
local draining, cands = 0, {}
for _, m in ipairs(members) do
  local f = redis.call('HMGET', KEYS[at[m]], 'state', 'bytes', 'loaded_at', 'last_used', 'uses',
                       'inflight', 'backlog', 'load_ms', 'owner')
  local c = {id = m, state = f[1], bytes = num(f[2]), loaded_at = num(f[3]), last_used = num(f[4]),
             uses = num(f[5]), inflight = num(f[6]), backlog = num(f[7]), reload_ms = num(f[8]),
             owner = f[9] or ''}
  if c.state == 'draining' then draining = draining + c.bytes end
  cands[#cands + 1] = c
end
local need = nbytes - (budget - used) - draining
if need <= 0 then return {'wait', 'freeing'} end
local clock = now_ms()
local victims = choose_victims(cands, need, policy, clock)
if not victims then return {'wait', 'busy'} end
local now = int(clock)
local out, chosen, seen = {'evict'}, {}, {}
for _, c in ipairs(victims) do
  redis.call('HSET', KEYS[at[c.id]], 'state', 'draining', 'draining_at', now, 'evicted_for', model)
  redis.call('PUBLISH', channel, 'draining ' .. c.id)
  out[#out + 1] = c.id
  out[#out + 1] = c.owner
  out[#out + 1] = int(c.bytes)
  chosen[#chosen + 1] = c.id
end
-- the decision and what it was made from, for audits of the policy (Registry.evictions)
for _, c in ipairs(cands) do
  seen[#seen + 1] = table.concat({c.id, c.state or 'absent', int(c.bytes), int(c.loaded_at), int(c.last_used),
                                  int(c.uses), int(c.inflight), int(c.backlog), int(c.reload_ms)}, ' ')
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', EVICTIONS_KEPT, '*', 'for', model, 'node', node, 'device', device,
           'policy', policy, 'at', now, 'need', int(need), 'victims', table.concat(chosen, ','),
           'candidates', table.concat(seen, ','))
return out
""".replace("EVICTIONS_KEPT", f"'{EVICTIONS_KEPT}'")

# KEYS: model hash.  ARGV: model, owner, replicas, load_ms, channel
_MARK_READY = _LUA_COMMON + """
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
if f[1] ~= 'loading' or f[2] ~= ARGV[2] then return {f[1] or '', f[2] or ''} end
local now = int(now_ms())
redis.call('HSET', KEYS[1], 'state', 'ready', 'replicas', ARGV[3], 'load_ms', ARGV[4],
           'loaded_at', now, 'last_used', now)
redis.call('PUBLISH', ARGV[5], 'ready ' .. ARGV[1])
return {'ok'}
"""

# KEYS: model hash.  ARGV: owner, delta.  Returns the new count, or -1 when refused.
_INFLIGHT = """
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
if f[2] ~= ARGV[1] then return -1 end
local delta = tonumber(ARGV[2])
if delta > 0 and f[1] ~= 'ready' then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'inflight', ARGV[2])
if n < 0 then
  redis.call('HSET', KEYS[1], 'inflight', '0')
  n = 0
end
return n
"""

# KEYS: model hash.  ARGV: uses to add
_TOUCH = _LUA_COMMON + """
if not COUNTED[redis.call('HGET', KEYS[1], 'state')] then return 0 end
redis.call('HSET', KEYS[1], 'last_used', int(now_ms()))
redis.call('HINCRBY', KEYS[1], 'uses', ARGV[1])
return 1
"""

# KEYS: model hash, then its device hash and resident set: those of the node and device the caller
#       read in the model hash (none when it read none)
# ARGV: model, owner, final state, channel, error, node, device (as read)
# Replies {1} released, {0} not ours or not counted, RETRY (nothing written) when the model's node
# or device is not what the caller read.
_RELEASE = _LUA_COMMON + """
local f = redis.call('HMGET', KEYS[1], 'owner', 'state', 'node', 'device')
if f[1] ~= ARGV[2] or not COUNTED[f[2]] then return {0} end
if not KEYS[3] or f[3] ~= ARGV[6] or f[4] ~= ARGV[7] then return {RETRY} end
release(ARGV[1], 1, 2, 3, ARGV[3], ARGV[4], ARGV[5])
return {1}
"""

# KEYS: models set, the hash of each model the caller read in it (in ARGV's order), the device hash
#       and resident set of each label the caller read among the owner's counted models (in ARGV's
#       order), then optionally the owner's heartbeat key (release only if it is gone)
# ARGV: owner, channel, error, n, the n models as read, then the labels ('<node>/<device>') as read
# Replies the models released, or RETRY (nothing written) when the models set is not what the
# caller read or one of the owner's counted models is on a device whose keys were not passed.
_RELEASE_OWNER = _LUA_COMMON + """
local owner, channel, err, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local labels = #ARGV - 4 - n
local heartbeat = 2 + n + 2 * labels
if KEYS[heartbeat] and redis.call('EXISTS', KEYS[heartbeat]) == 1 then return {} end
local at, where = {}, {}  -- model -> KEYS index of its hash; label -> of its device hash (+1: resident set)
for i = 1, n do at[ARGV[4 + i]] = 1 + i end
for j = 1, labels do where[ARGV[4 + n + j]] = n + 2 * j end
local members = members_as_read(1, at, n)
if not members then return {RETRY} end
-- every key checked before the first write: a retry leaves everything as it was
local mine = {}
for _, m in ipairs(members) do
  local f = redis.call('HMGET', KEYS[at[m]], 'owner', 'state', 'node', 'device')
  if f[1] == owner and COUNTED[f[2]] then
    local d = where[tostring(f[3]) .. '/' .. tostring(f[4])]
    if not d then return {RETRY} end
    mine[#mine + 1] = {m, d}
  end
end
local out = {}
for _, c in ipairs(mine) do
  if release(c[1], at[c[1]], c[2], c[2] + 1, 'evicted', channel, err) then out[#out + 1] = c[1] end
end
return out
"""

# KEYS: model hash.  ARGV: message
_RECORD_ERROR = _LUA_COMMON + """
redis.call('HSET', KEYS[1], 'last_error', ARGV[1], 'error_at', int(now_ms()))
return 1
"""

# KEYS: model hash, then the device hash of the node and device the caller read in it (none if none)
# ARGV: owner, replicas, node, device (as read)
# a READY model of ``owner`` counts bytes/replicas per replica; growing must fit the device's budget.
# Replies RETRY (nothing written) when the model's node or device is not what the caller read.
_RESIZE = _LUA_COMMON + """
local f = redis.call('HMGET', KEYS[1], 'state', 'owner', 'node', 'device', 'bytes', 'replicas')
if f[1] ~= 'ready' or f[2] ~= ARGV[1] then return {'not_ready', f[1] or 'absent', f[2] or ''} end
if not KEYS[2] or f[3] ~= ARGV[3] or f[4] ~= ARGV[4] then return {RETRY} end
local old, n = num(f[5]), tonumber(ARGV[2])
local new = math.floor(old / math.max(1, num(f[6]))) * n
local d = redis.call('HMGET', KEYS[2], 'budget_bytes', 'used_bytes')
local free = num(d[1]) - num(d[2])
if new > old and new - old > free then return {'no_room', int(new - old), int(free)} end
redis.call('HINCRBY', KEYS[2], 'used_bytes', int(new - old))
redis.call('HSET', KEYS[1], 'bytes', int(new), 'replicas', ARGV[2])
return {'ok', int(new)}
"""

# KEYS: device hash, devices set.  ARGV: node, device, budget, label.  (A script, not MULTI: redis-py's
# cluster pipeline has no transactions; one slot, so it runs on Redis Cluster too.)
_SET_BUDGET = """
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'device', ARGV[2], 'budget_bytes', ARGV[3])
redis.call('HSETNX', KEYS[1], 'used_bytes', '0')
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""

# KEYS: devices set, then for each device the caller read in it (in ARGV's order): its device hash,
#       its resident set and the hash of each member of that set as the caller read it
# ARGV: the number of devices, then for each: its label, the number of its resident models as read
#       and those models
# Read-only. Replies RETRY when the devices set or a resident set is not what the caller read.
_AUDIT = _LUA_COMMON + """
local devices, sections = {}, {}
local a, k = 2, 2  -- the next ARGV and KEYS index
for i = 1, tonumber(ARGV[1]) do
  local count = tonumber(ARGV[a + 1])
  local s = {d = k, r = k + 1, count = count, at = {}}  -- at: model -> KEYS index of its hash
  for j = 1, count do s.at[ARGV[a + 1 + j]] = k + 1 + j end
  devices[ARGV[a]] = true
  sections[i] = s
  a, k = a + 2 + count, k + 2 + count
end
if not members_as_read(1, devices, #sections) then return {RETRY} end
for _, s in ipairs(sections) do
  s.members = members_as_read(s.r, s.at, s.count)
  if not s.members then return {RETRY} end
end
local out = {}
for _, s in ipairs(sections) do
  local d = redis.call('HMGET', KEYS[s.d], 'node', 'device', 'budget_bytes', 'used_bytes')
  local sum, models, strays = 0, {}, {}
  for _, m in ipairs(s.members) do
    local f = redis.call('HMGET', KEYS[s.at[m]], 'state', 'bytes')
    if COUNTED[f[1]] then
      sum = sum + num(f[2])
      models[#models + 1] = m
    else
      strays[#strays + 1] = m
    end
  end
  out[#out + 1] = {d[1] or '', d[2] or '', d[3] or '0', d[4] or '0', int(sum), models, strays}
end
return out
"""

# -- the registry -------------------------------------------------------------------------------

class Registry:
    """One manager's handle on the shared registry (see the module docstring for the protocol).

    ``owner`` is the manager's consumer name: its heartbeat key says it is alive. ``policy``
    names the eviction policy (``eviction.POLICY_NAMES``); unknown names raise ``ValueError``.
    """

    def __init__(self, client: redis.asyncio.Redis, *, owner: str, policy: str = "fifo") -> None:
        _check(_NAME_RE, owner, "owner (the manager's consumer name)")
        self.owner = owner
        self.policy: EvictionPolicy = eviction.policy(policy)
        self._redis = client
        # the heartbeat key is in another slot than the registry's: a cluster refuses it in a script
        self._cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._reserve = client.register_script(_RESERVE)
        self._mark_ready = client.register_script(_MARK_READY)
        self._inflight = client.register_script(_INFLIGHT)
        self._touch = client.register_script(_TOUCH)
        self._release = client.register_script(_RELEASE)
        self._release_owner = client.register_script(_RELEASE_OWNER)
        self._record_error = client.register_script(_RECORD_ERROR)
        self._audit = client.register_script(_AUDIT)
        self._resize = client.register_script(_RESIZE)
        self._set_budget = client.register_script(_SET_BUDGET)

    # -- budget and reservation -----------------------------------------------------------------

    async def set_budget(self, node: str, device: str, budget_bytes: int) -> None:
        """Set a device's budget; lowering it below ``used_bytes`` evicts nothing by itself."""
        label = _label(node, device)
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes} for device {label}")
        await _run(self._set_budget, [_DEVICE + label, _DEVICES], [node, device, budget_bytes, label])

    async def reserve(self, model: str, *, node: str, device: str, nbytes: int) -> Reservation:
        """Atomically reserve ``nbytes`` (all replicas) for ``model`` on one device, or say why not.

        See ``Outcome``; raises ``RegistryError`` when the device has no budget or the model is
        larger than the whole budget (it can never fit there).
        """
        _check(_MODEL_RE, model, "model id")
        label = _label(node, device)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes} for model {model!r}")

        async def attempt() -> Any:
            residents = await self._members(_RESIDENT + label)  # the victims' hashes, if it must evict
            return await _run(
                self._reserve,
                [_MODEL + model, _DEVICE + label, _RESIDENT + label, _MODELS, _EVICTIONS,
                 *(_MODEL + m for m in residents)],
                [model, node, device, nbytes, self.owner, self.policy.name, EVENTS_CHANNEL, *residents],
            )

        reply = await _optimistic(f"reserve {model!r} on {label}", attempt)
        tag, rest = _s(reply[0]), [_s(v) for v in reply[1:]]
        if tag == "reserved":
            return Reservation(Outcome.RESERVED, owner=self.owner, node=node, device=device,
                               state=ModelState.LOADING)
        if tag == "evict":
            victims = tuple(Victim(rest[i], rest[i + 1], int(rest[i + 2])) for i in range(0, len(rest), 3))
            return Reservation(Outcome.EVICT, victims=victims)
        if tag in ("already", "wait") and len(rest) == 5:
            reason, state, owner, where_node, where_device = rest
            return Reservation(Outcome(tag), reason=reason, owner=owner, node=where_node,
                               device=where_device, state=ModelState(state))
        if tag == "wait":
            return Reservation(Outcome.WAIT, reason=rest[0])
        if tag == "no_budget":
            raise RegistryError(f"device {label} has no budget: call set_budget({node!r}, {device!r}, bytes) "
                                "before reserving models on it")
        if tag == "too_large":
            raise RegistryError(f"model {model!r} needs {nbytes} bytes but device {label} has a budget of "
                                f"{rest[0]} bytes: place it on a larger device or raise the budget")
        raise RegistryError(f"unexpected reply from the reserve script: {reply!r}")

    async def mark_ready(self, model: str, replicas: int, load_ms: float) -> None:
        """LOADING → READY once the actors answered; ``ReservationLost`` if it is not ours anymore."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas} for model {model!r}")
        reply = await _run(self._mark_ready, [_MODEL + model],
                           [model, self.owner, replicas, max(0, round(load_ms)), EVENTS_CHANNEL])
        if _s(reply[0]) != "ok":
            state, owner = _s(reply[0]) or "absent", _s(reply[1]) or "nobody"
            raise ReservationLost(f"model {model!r} is {state} and owned by {owner}, not loading for "
                                  f"{self.owner}: kill the actors just started and reserve again")

    async def fail(self, model: str, error: str) -> bool:
        """The load failed: bytes returned, state FAILED, ``error`` kept. ``False`` if not ours/counted."""
        return await self._release_one(model, ModelState.FAILED, error or "load failed")

    async def release(self, model: str) -> bool:
        """After the actors are really killed: bytes returned, state EVICTED.

        Idempotent; ``False`` when the model is not counted or not ours (e.g. already reaped).
        """
        return await self._release_one(model, ModelState.EVICTED, "")

    async def release_all(self) -> list[str]:
        """On shutdown, after killing every actor: release all this manager's models."""
        return await self._release_owner_models(self.owner, "", heartbeat=None)

    async def reap_dead_owners(self) -> list[str]:
        """Release the models of managers whose heartbeat key is gone; returns those models.

        Each owner's release is one script that re-checks the heartbeat first, so a manager that
        renews it in between keeps its models (on a single Redis; on Redis Cluster the heartbeat
        is in another slot than the registry, so only the check just before the script is made).
        """
        records = await self._records()
        owners = {r["owner"] for r in records if ModelState(r["state"]) in _COUNTED and r["owner"]}
        if not owners:
            return []
        ordered = sorted(owners)
        with _translate():
            pipe = self._redis.pipeline(transaction=False)
            for owner in ordered:
                pipe.exists(keys.manager_heartbeat(owner))
            alive = await pipe.execute()
        reaped: list[str] = []
        for owner, exists in zip(ordered, alive, strict=True):
            if not exists:
                heartbeat = None if self._cluster else keys.manager_heartbeat(owner)
                reaped.extend(await self._release_owner_models(
                    owner, f"released: owner {owner} stopped heartbeating", heartbeat=heartbeat))
        return sorted(reaped)

    # -- per batch ------------------------------------------------------------------------------

    async def inflight(self, model: str, delta: int) -> bool:
        """Count batches in flight. ``+1`` is refused (``False``) unless the model is READY and ours:
        do not dispatch then (it is draining). ``-1`` after the batch; never below 0."""
        if delta == 0:
            raise ValueError(f"inflight delta must be non-zero for model {model!r}")
        reply = await _run(self._inflight, [_MODEL + model], [self.owner, delta])
        return int(reply) >= 0

    async def touch(self, model: str, n: int = 1) -> None:
        """One batch of ``n`` items used ``model``: last_used = now, uses += n (one round trip)."""
        if n < 0:
            raise ValueError(f"uses must be >= 0, got {n} for model {model!r}")
        await _run(self._touch, [_MODEL + model], [n])

    async def set_backlog(self, backlogs: Mapping[str, int]) -> None:
        """Stream depth + pending per model, for the cost policy (on heartbeat)."""
        if not backlogs:
            return
        with _translate():
            pipe = self._redis.pipeline(transaction=False)
            for model, backlog in backlogs.items():
                pipe.hset(_MODEL + model, "backlog", str(max(0, int(backlog))))
            await pipe.execute()

    async def resize(self, model: str, replicas: int) -> Resize:
        """A READY model of ours now has ``replicas``: its bytes become bytes-per-replica x
        ``replicas``, atomically against the device's budget. Growing is refused (``ok`` False,
        ``reason`` says why) when the budget has no room: it never evicts; shrink after the
        actors are killed, grow before starting them."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas} for model {model!r}: release it instead")

        async def attempt() -> Any:
            node, device = await self._where(model)
            device_key = [_DEVICE + f"{node}/{device}"] if node and device else []
            return await _run(self._resize, [_MODEL + model, *device_key], [self.owner, replicas, node, device])

        reply = await _optimistic(f"resize {model!r}", attempt)
        tag, rest = _s(reply[0]), [_s(v) for v in reply[1:]]
        if tag == "ok":
            return Resize(ok=True, nbytes=int(rest[0]))
        if tag == "no_room":
            return Resize(ok=False, nbytes=0, reason=f"budget: {replicas} replica(s) need {int(rest[0]) / 2**20:.1f} "
                                                     f"MiB more, {int(rest[1]) / 2**20:.1f} MiB free on the device")
        return Resize(ok=False, nbytes=0, reason=f"model is {rest[0]} (owner {rest[1] or 'nobody'}), not ready here")

    async def record_error(self, model: str, message: str) -> None:
        """Keep a non-fatal problem (e.g. a compile fallback) for ``nosq models``."""
        await _run(self._record_error, [_MODEL + model], [message])

    # -- reading --------------------------------------------------------------------------------

    async def snapshot(self, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Every registered model (or only ``owner``'s), JSON-ready, by node, device and id."""
        rows = [r for r in await self._records() if owner is None or r["owner"] == owner]
        return sorted(rows, key=lambda r: (r["node"], r["device"], r["model"]))

    async def devices(self, node: str | None = None) -> list[dict[str, Any]]:
        """Budget, used and free bytes and the resident models of each device (of ``node``)."""
        with _translate():
            labels = sorted(_s(v) for v in await self._redis.smembers(_DEVICES))  # type: ignore[misc]
            pipe = self._redis.pipeline(transaction=False)
            for label in labels:
                pipe.hgetall(_DEVICE + label)
                pipe.smembers(_RESIDENT + label)
            replies = await pipe.execute()
        out = []
        for i in range(len(labels)):
            fields = {_s(k): _s(v) for k, v in replies[2 * i].items()}
            if node is not None and fields.get("node") != node:
                continue
            budget, used = int(fields.get("budget_bytes", 0)), int(fields.get("used_bytes", 0))
            out.append({"node": fields.get("node", ""), "device": fields.get("device", ""),
                        "budget_bytes": budget, "used_bytes": used, "free_bytes": budget - used,
                        "models": sorted(_s(m) for m in replies[2 * i + 1])})
        return out

    async def residents(self, node: str, device: str) -> list[Resident]:
        """The models counted on one device, as the eviction policies see them."""
        label = _label(node, device)
        with _translate():
            members = sorted(_s(m) for m in await self._redis.smembers(_RESIDENT + label))  # type: ignore[misc]
        records = await self._records(members)
        return [_resident(r) for r in records if ModelState(r["state"]) in _COUNTED]

    async def evictions(self, count: int = EVICTIONS_KEPT) -> list[Eviction]:
        """The last ``count`` eviction decisions, oldest first (see ``Eviction``)."""
        with _translate():
            entries = await self._redis.xrevrange(_EVICTIONS, count=count)
        return [_eviction(entry_id, fields) for entry_id, fields in reversed(entries)]

    async def audit(self) -> list[DeviceAudit]:
        """Every device's budget, used bytes and resident sum, read in one atomic script."""

        async def attempt() -> Any:
            labels = await self._members(_DEVICES)
            with _translate():
                pipe = self._redis.pipeline(transaction=False)
                for label in labels:
                    pipe.smembers(_RESIDENT + label)
                residents = await pipe.execute()
            keys_: list[str] = [_DEVICES]
            args: list[Any] = [len(labels)]
            for label, raw in zip(labels, residents, strict=True):
                members = sorted(_s(m) for m in raw)
                keys_ += [_DEVICE + label, _RESIDENT + label, *(_MODEL + m for m in members)]
                args += [label, len(members), *members]
            return await _run(self._audit, keys_, args)

        reply = await _optimistic("audit", attempt)
        return [
            DeviceAudit(node=_s(r[0]), device=_s(r[1]), budget_bytes=int(r[2]), used_bytes=int(r[3]),
                        resident_bytes=int(r[4]), models=tuple(sorted(_s(m) for m in r[5])),
                        strays=tuple(sorted(_s(m) for m in r[6])))
            for r in reply
        ]

    # -- internals ------------------------------------------------------------------------------

    async def _release_one(self, model: str, final: ModelState, error: str) -> bool:
        async def attempt() -> Any:
            node, device = await self._where(model)
            label = f"{node}/{device}"
            device_keys = [_DEVICE + label, _RESIDENT + label] if node and device else []
            return await _run(self._release, [_MODEL + model, *device_keys],
                              [model, self.owner, final.value, EVENTS_CHANNEL, error, node, device])

        reply = await _optimistic(f"release {model!r}", attempt)
        return int(reply[0]) == 1

    async def _release_owner_models(self, owner: str, error: str, *, heartbeat: str | None) -> list[str]:
        """Release every counted model of ``owner`` (only if ``heartbeat`` is gone, when given)."""

        async def attempt() -> Any:
            models = await self._members(_MODELS)
            with _translate():
                pipe = self._redis.pipeline(transaction=False)
                for model in models:
                    pipe.hmget(_MODEL + model, ["owner", "state", "node", "device"])
                rows = [[_s(v) if v is not None else "" for v in row] for row in await pipe.execute()]
            labels = sorted({f"{node}/{device}" for who, state, node, device in rows
                             if who == owner and state in _COUNTED_VALUES and node and device})
            keys_ = [_MODELS, *(_MODEL + m for m in models),
                     *(key for label in labels for key in (_DEVICE + label, _RESIDENT + label))]
            return await _run(self._release_owner, keys_ + ([heartbeat] if heartbeat else []),
                              [owner, EVENTS_CHANNEL, error, len(models), *models, *labels])

        reply = await _optimistic(f"release the models of {owner}", attempt)
        return sorted(_s(m) for m in reply)

    async def _members(self, key: str) -> list[str]:
        """A set's members, sorted: what a script then checks it still holds."""
        with _translate():
            return sorted(_s(m) for m in await self._redis.smembers(key))  # type: ignore[misc]

    async def _where(self, model: str) -> tuple[str, str]:
        """A model's node and device ("" if unset): its device keys, which a script then checks."""
        with _translate():
            node, device = await self._redis.hmget(_MODEL + model, ["node", "device"])  # type: ignore[misc]
        return (_s(node) if node is not None else "", _s(device) if device is not None else "")

    async def _records(self, models: list[str] | None = None) -> list[dict[str, Any]]:
        with _translate():
            if models is None:
                models = sorted(_s(m) for m in await self._redis.smembers(_MODELS))  # type: ignore[misc]
            pipe = self._redis.pipeline(transaction=False)
            for model in models:
                pipe.hgetall(_MODEL + model)
            replies = await pipe.execute()
        return [_record(model, raw) for model, raw in zip(models, replies, strict=True) if raw]


_INT_FIELDS = ("bytes", "replicas", "inflight", "uses", "backlog", "load_ms", "loaded_at",
               "last_used", "reserved_at", "draining_at", "released_at", "error_at")


def _record(model: str, raw: Mapping[Any, Any]) -> dict[str, Any]:
    """A model hash as a JSON-ready row: every field present, integers parsed."""
    fields = {_s(k): _s(v) for k, v in raw.items()}
    row: dict[str, Any] = {
        "model": model,
        "state": fields.get("state", ModelState.EVICTED.value),
        "node": fields.get("node", ""),
        "device": fields.get("device", ""),
        "owner": fields.get("owner", ""),
        "last_error": fields.get("last_error", ""),
        "evicted_for": fields.get("evicted_for", ""),
    }
    for name in _INT_FIELDS:
        row[name] = int(fields.get(name) or 0)
    return row


def _resident(row: Mapping[str, Any]) -> Resident:
    return Resident(model=row["model"], state=ModelState(row["state"]), nbytes=row["bytes"],
                    loaded_at_ms=row["loaded_at"], last_used_ms=row["last_used"], uses=row["uses"],
                    inflight=row["inflight"], backlog=row["backlog"], reload_ms=float(row["load_ms"]))


def _eviction(entry_id: Any, raw: Mapping[Any, Any]) -> Eviction:
    fields = {_s(k): _s(v) for k, v in raw.items()}
    candidates = []
    for row in filter(None, fields.get("candidates", "").split(",")):
        model, state, nbytes, loaded_at, last_used, uses, inflight, backlog, reload_ms = row.split(" ")
        candidates.append(Resident(
            model=model, state=ModelState(state) if state in _STATES else ModelState.EVICTED, nbytes=int(nbytes),
            loaded_at_ms=int(loaded_at), last_used_ms=int(last_used), uses=int(uses), inflight=int(inflight),
            backlog=int(backlog), reload_ms=float(reload_ms)))
    at_ms = int(fields.get("at") or _s(entry_id).partition("-")[0])
    return Eviction(at_ms=at_ms, model=fields.get("for", ""),
                    node=fields.get("node", ""), device=fields.get("device", ""), policy=fields.get("policy", ""),
                    need_bytes=int(fields.get("need", 0)),
                    victims=tuple(filter(None, fields.get("victims", "").split(","))),
                    candidates=tuple(candidates))


def parse_event(message: bytes | str) -> tuple[ModelState, str]:
    """``b"draining m1"`` → ``(ModelState.DRAINING, "m1")``: a message of ``EVENTS_CHANNEL``."""
    state, _, model = _s(message).partition(" ")
    return ModelState(state), model


def _label(node: str, device: str) -> str:
    _check(_NAME_RE, node, "node")
    _check(_NAME_RE, device, "device")
    return f"{node}/{device}"


def _check(pattern: re.Pattern[str], value: str, what: str) -> None:
    if not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: it must match {pattern.pattern}")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    """Redis errors become nosq errors, with the cause kept."""
    try:
        yield
    except Exception as exc:
        if is_lost(exc):  # a cluster's master failing over (CLUSTERDOWN, TRYAGAIN) included
            raise NosqConnectionError(f"registry: Redis unreachable: {exc}; is Redis running?") from exc
        if isinstance(exc, redis.ResponseError):
            raise RegistryError(f"registry script failed: {exc}") from exc
        raise


async def _run(script: AsyncScript, keys_: list[str], args: list[Any]) -> Any:
    with _translate():
        return await script(keys=keys_, args=args)


def _is_retry(reply: Any) -> bool:
    return isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], bytes | str) and _s(reply[0]) == _RETRY


async def _optimistic(what: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``attempt`` (read what a script's keys follow from, then run it) until the script does
    not reply ``_RETRY``, i.e. what was read was still true when it ran; at most ``_TRIES`` times.
    After a few lost races, a short random pause lets the concurrent writers through."""
    for n in range(_TRIES):
        reply = await attempt()
        if not _is_retry(reply):
            return reply
        if n >= 2:
            await asyncio.sleep(random.uniform(0, 0.001 * n))
    raise RegistryError(f"registry: {what} failed: the keys it reads changed under it {_TRIES} times in a row "
                        "(many concurrent registry changes); try again")
