"""What the sync and async producers share: handles, the enqueue scripts and how to call them,
reply notices, error translation."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import redis
from redis.exceptions import (
    ClusterDownError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)

from nosq.producer import keys
from nosq.producer.codec import decode_envelope_value, encode_value
from nosq.producer.errors import NosqConnectionError, NosqError, ProtocolError, QueueFull, RemoteError
from nosq.producer.resp import Commands, closed_transport
from nosq.producer.wire import (
    DEFAULT_TTL_S,
    MODEL_ID_RE,
    REQUEST_ID_RE,
    Envelope,
    decode_envelope,
    now_ms,
    request_fields,
)

__all__ = [
    "ENQUEUE_BATCH_LUA",
    "ENQUEUE_BATCH_SHA",
    "ENQUEUE_CHUNK",
    "ENQUEUE_CHUNK_BYTES",
    "ENQUEUE_LUA",
    "ENQUEUE_MANY_LUA",
    "PARTITIONS_TTL_S",
    "REPLY_BLOCK_MS",
    "REPLY_COUNT",
    "SAFETY_CHECK_AFTER_S",
    "Call",
    "Handle",
    "Head",
    "Partitions",
    "Refusal",
    "Shaper",
    "TensorType",
    "call_outcome",
    "enqueue_commands",
    "planned_commands",
    "envelope_of",
    "is_noscript",
    "new_client_id",
    "new_request_id",
    "next_entry_id",
    "output_of",
    "plan_calls",
    "queue_full",
    "raise_reply_error",
    "raw_reply",
    "read_notices",
    "redis_errors",
    "refusal_of",
    "unwrap",
    "value_of",
]

REPLY_BLOCK_MS: Final = 1000  # one blocking read of the reply stream
REPLY_COUNT: Final = 4096  # completions taken per read
SAFETY_CHECK_AFTER_S: Final = 2.0  # waits older than this also look at the result key

TensorType = Literal["numpy", "torch"]

#: XADD unless the model's published backlog limit is reached (one round trip, atomic).
ENQUEUE_LUA: Final = """
local limit = redis.call('HGET', KEYS[2], 'max_backlog')
if limit then
  local depth = redis.call('XLEN', KEYS[1])
  if depth >= tonumber(limit) then
    return {0, depth, redis.call('HGET', KEYS[2], 'retry_after_ms') or false}
  end
end
return {1, redis.call('XADD', KEYS[1], '*', unpack(ARGV))}
"""

#: The backlog check of the batch scripts: of ``n`` requests, ``room`` fit under the model's
#: ``max_backlog`` (its admission hash, KEYS[2]) given the stream's ``depth`` (KEYS[1]).
_ADMIT_LUA: Final = """local room, depth, retry = n, 0, false
local limit = redis.call('HGET', KEYS[2], 'max_backlog')
if limit then
  depth = redis.call('XLEN', KEYS[1])
  room = math.max(0, math.min(n, tonumber(limit) - depth))
  if room < n then retry = redis.call('HGET', KEYS[2], 'retry_after_ms') or false end
end
"""

#: Many requests that share every field but id and payload: ARGV = k, k shared field/value
#: pairs, then (id, payload) per request. Accepts what fits under the limit, in order,
#: atomically. (For other clients; the Python producers send ENQUEUE_BATCH_LUA.)
ENQUEUE_MANY_LUA: Final = """
local k = tonumber(ARGV[1])
local first = 2 * k + 2
local n = (#ARGV - first + 1) / 2
""" + _ADMIT_LUA + """local fields = {'id', '', 'p', ''}
for j = 2, 2 * k + 1 do fields[#fields + 1] = ARGV[j] end
for i = 0, room - 1 do
  fields[2] = ARGV[first + 2 * i]
  fields[4] = ARGV[first + 2 * i + 1]
  redis.call('XADD', KEYS[1], '*', unpack(fields))
end
return {room, depth + room, retry}
"""

#: What the Python producers send: the requests of many callers of one model in one call, each
#: with its own deadline. KEYS = the model's request stream and admission hash (both tagged
#: ``{model}``). ARGV = k, k shared field/value pairs (v, ct, and method/ttl/reply/prio when
#: set), then per request: id, payload, dl (unix ms; '' = no deadline, no field written).
#: Accepts what fits under the backlog limit, in order, atomically; returns
#: {accepted, backlog after, retry_after_ms or nil}: request i (from 0) was enqueued iff
#: i < accepted.
ENQUEUE_BATCH_LUA: Final = """
local k = tonumber(ARGV[1])
local first = 2 * k + 2
if (#ARGV - first + 1) % 3 ~= 0 then
  return redis.error_reply('ERR nosq enqueue: ARGV must be k, k field/value pairs, then id, payload, dl per request')
end
local n = (#ARGV - first + 1) / 3
""" + _ADMIT_LUA + """local shared = {}
for j = 2, 2 * k + 1 do shared[#shared + 1] = ARGV[j] end
local plain = {'id', '', 'p', '', unpack(shared)}
local timed = {'id', '', 'p', '', 'dl', '', unpack(shared)}
for i = 0, room - 1 do
  local at = first + 3 * i
  local dl = ARGV[at + 2]
  if dl == '' then
    plain[2], plain[4] = ARGV[at], ARGV[at + 1]
    redis.call('XADD', KEYS[1], '*', unpack(plain))
  else
    timed[2], timed[4], timed[6] = ARGV[at], ARGV[at + 1], dl
    redis.call('XADD', KEYS[1], '*', unpack(timed))
  end
end
return {room, depth + room, retry}
"""
#: EVALSHA needs no round trip to learn it: SCRIPT LOAD only after a NOSCRIPT error
ENQUEUE_BATCH_SHA: Final = hashlib.sha1(ENQUEUE_BATCH_LUA.encode()).hexdigest()
#: requests per script call, and payload bytes per call (at least one request): bounds how long
#: one call holds Redis
ENQUEUE_CHUNK: Final = 1000
ENQUEUE_CHUNK_BYTES: Final = 8 << 20
NO_DEADLINE: Final = b""
PARTITIONS_TTL_S: Final = 5.0  # how long a producer trusts the partition tags it read
PLAIN_XADD_BYTES: Final = 8192  # mean payload from which a call without a backlog limit is plain XADDs


@dataclass(frozen=True, slots=True)
class Handle:
    """A submitted request: pass it to ``result``/``cancel``."""

    id: str
    model: str
    ct: str
    deadline_ms: int | None
    ttl_s: int


class Head(NamedTuple):
    """What the requests of one script call share."""

    key: tuple[str, str | None, int, int]  # model, method, ttl, priority
    argv: list[Any]  # k, then the k shared field/value pairs
    ttl_s: int


class Refusal(NamedTuple):
    """Why a script call refused its requests from ``accepted`` on."""

    backlog: int
    retry_after_s: float | None


def new_client_id() -> str:
    return os.urandom(16).hex()


def new_request_id() -> str:
    return os.urandom(16).hex()  # 128 random bits, like a UUID4, four times cheaper


class Shaper:
    """Validates submit arguments and builds the enqueue script's arguments; what repeats from
    call to call (a model id, the shared fields of one set of options) is checked once."""

    def __init__(self, ct: str, reply: str | None) -> None:
        self.ct = ct
        self.reply = reply
        self._models: set[str] = set()
        self._heads: dict[tuple[str, str | None, int, int], Head] = {}

    def head(self, model: str, method: str | None, ttl_s: int | None, priority: int) -> Head:
        ttl = DEFAULT_TTL_S if ttl_s is None else ttl_s
        key = (model, method, ttl, priority)
        if type(ttl) is int and type(priority) is int:  # True == 1 must not hit 1's entry
            head = self._heads.get(key)
            if head is not None:
                return head
        if model not in self._models and not MODEL_ID_RE.fullmatch(model):
            raise ProtocolError(f"model id {model!r} must match {MODEL_ID_RE.pattern}")
        shared = request_fields(request_id="x", ct=self.ct, payload=b"", method=method, ttl_s=ttl,
                                reply=self.reply, priority=priority)
        del shared["id"], shared["p"]
        argv: list[Any] = [len(shared)]
        for name, value in shared.items():
            argv.extend((name.encode(), value if isinstance(value, bytes) else str(value).encode()))
        head = Head(key, argv, ttl)
        if len(self._heads) < 1024:
            self._models.add(model)
            self._heads[key] = head
        return head

    @staticmethod
    def deadline(timeout_s: float | None, deadline_ms: int | None) -> int | None:
        if timeout_s is not None:
            if deadline_ms is not None:
                raise ProtocolError("give either timeout_s or deadline_ms, not both")
            if not timeout_s > 0:
                raise ProtocolError(f"timeout_s must be > 0, got {timeout_s}")
            return now_ms() + int(timeout_s * 1000)
        if deadline_ms is not None and (type(deadline_ms) is not int or deadline_ms < 0):
            raise ProtocolError(f"deadline {deadline_ms!r} must be unix milliseconds (an int >= 0)")
        return deadline_ms

    def requests(
        self, head: Head, inputs: Iterable[Any], deadline_ms: int | None, request_ids: Sequence[str] | None,
    ) -> tuple[list[Handle], list[Any]]:
        """Handles and the per-request script arguments (id, payload, dl) of requests that share
        their options."""
        ct = self.ct
        payloads = [encode_value(ct, item) for item in inputs]
        if request_ids is None:
            ids = [new_request_id() for _ in payloads]
        else:
            if len(request_ids) != len(payloads):
                raise ProtocolError(f"{len(request_ids)} request ids for {len(payloads)} inputs")
            ids = list(request_ids)
            for rid in ids:
                if not isinstance(rid, str) or not REQUEST_ID_RE.fullmatch(rid):
                    raise ProtocolError(f"request id {rid!r} must match {REQUEST_ID_RE.pattern}")
        dl = NO_DEADLINE if deadline_ms is None else b"%d" % deadline_ms
        model, ttl = head.key[0], head.ttl_s
        handles = [Handle(rid, model, ct, deadline_ms, ttl) for rid in ids]
        body: list[Any] = []
        for rid, payload in zip(ids, payloads, strict=True):
            body += (rid, payload, dl)
        return handles, body


    def one(self, inputs: Any, deadline_ms: int | None, request_id: str | None) -> tuple[str, Any]:
        """:meth:`requests` for one request, without a handle: its id and (id, payload, dl)."""
        payload = encode_value(self.ct, inputs)
        if request_id is None:
            rid = os.urandom(16).hex()
        elif not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id):
            raise ProtocolError(f"request id {request_id!r} must match {REQUEST_ID_RE.pattern}")
        else:
            rid = request_id
        return rid, (rid, payload, NO_DEADLINE if deadline_ms is None else b"%d" % deadline_ms)


class Call(NamedTuple):
    """One script call (or, ``plain``, one XADD a request): the requests (indexes into a body) it
    enqueues on one partition's stream."""

    tag: str  # the partition's hash tag: the model id, or ``<model>~<k>``
    indices: range | list[int]
    plain: bool = False


def plan_calls(body: Sequence[Any], tags: Sequence[str], *, limited: bool = True) -> list[Call]:
    """The script calls for ``body`` (3 arguments a request) on a model whose partitions have
    ``tags`` (``[model]`` for one stream): each request on its partition (``keys.partition_of``),
    at most ENQUEUE_CHUNK requests and, past the first, ENQUEUE_CHUNK_BYTES of payload a call.

    A model without a backlog limit (``limited`` False) has nothing for the script to check:
    calls whose requests carry ``PLAIN_XADD_BYTES`` or more each on average are sent as plain
    XADDs, which Redis takes without copying each payload into Lua and back (at 48 KiB the
    script costs Redis more than the XADD itself)."""
    n = len(body) // 3
    if len(tags) > 1:
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(keys.partition_of(body[3 * i], len(tags)), []).append(i)
        calls = [Call(tags[p], [group[i] for i in part]) for p, group in sorted(groups.items())
                 for part in _chunks(body, group)]
    else:
        calls = [Call(tags[0], part) for part in _chunks(body, range(n))]
    if limited:
        return calls
    return [call._replace(plain=True)
            if sum(len(body[3 * i + 1]) for i in call.indices) >= PLAIN_XADD_BYTES * len(call.indices) else call
            for call in calls]


def _chunks(body: Sequence[Any], indices: Sequence[int]) -> list[range]:
    """``indices`` cut in runs (ranges of positions in ``indices``) within the call bounds."""
    n = len(indices)
    if n <= ENQUEUE_CHUNK and n * 4096 <= ENQUEUE_CHUNK_BYTES:
        size = sum(len(body[3 * i + 1]) for i in indices)
        if size <= ENQUEUE_CHUNK_BYTES:
            return [range(n)] if n else []
    runs: list[range] = []
    first, size = 0, 0
    for at, i in enumerate(indices):
        payload_size = len(body[3 * i + 1])
        if at > first and (at - first >= ENQUEUE_CHUNK or size + payload_size > ENQUEUE_CHUNK_BYTES):
            runs.append(range(first, at))
            first, size = at, 0
        size += payload_size
    if n > first:
        runs.append(range(first, n))
    return runs


def enqueue_commands(head: Head, body: Sequence[Any], call: Call) -> list[tuple[Any, ...]]:
    """The EVALSHA command of the requests of ``call``, or their XADDs (``call.plain``): the same
    entries the script writes."""
    indices = call.indices
    if call.plain:
        stream, shared = keys.requests(call.tag), head.argv[1:]
        commands = []
        for i in indices:
            rid, payload, dl = body[3 * i : 3 * i + 3]
            deadline = () if dl == NO_DEADLINE else (b"dl", dl)
            commands.append(("XADD", stream, "*", b"id", rid, b"p", payload, *deadline, *shared))
        return commands
    if isinstance(indices, range):
        args = body[3 * indices.start : 3 * indices.stop]
    else:
        args = [arg for i in indices for arg in body[3 * i : 3 * i + 3]]
    return [("EVALSHA", ENQUEUE_BATCH_SHA, 2, keys.requests(call.tag), keys.admission(call.tag), *head.argv, *args)]


def planned_commands(head: Head, body: Sequence[Any], calls: Sequence[Call]) -> tuple[list[tuple[Any, ...]], list[int]]:
    """Every command of ``calls``, and where each call's replies start among their replies."""
    commands: list[tuple[Any, ...]] = []
    starts = []
    for call in calls:
        starts.append(len(commands))
        commands += enqueue_commands(head, body, call)
    return commands, starts


def call_outcome(call: Call, replies: Sequence[Any], start: int) -> tuple[int, Refusal | None]:
    """How many of ``call``'s requests were enqueued (its first ones), and why the rest were
    refused; its replies begin at ``start`` (error replies were raised before)."""
    if call.plain:
        return len(call.indices), None
    reply = replies[start]
    count = int(reply[0])
    return count, (refusal_of(reply) if count < len(call.indices) else None)


class Partitions:
    """Each model's partition tags as its managers publish them (``keys.published_tags``), and
    whether it has a backlog limit, looked up again every ``PARTITIONS_TTL_S``: a model
    partitioned (or limited) later is followed within that."""

    # what ``learn`` reads of the model's admission hash: one HGET each (the producer's ACL
    # allows HGET there, docs/operations.md), sent together
    FIELDS: Final = (b"tags", b"max_backlog")

    def __init__(self) -> None:
        self._tags: dict[str, tuple[list[str], float, bool]] = {}

    def stale(self, model: str) -> bool:
        known = self._tags.get(model)
        return known is None or known[1] <= time.monotonic()

    def learn(self, model: str, values: Sequence[Any]) -> None:
        """Remember the values of ``FIELDS`` read from the model's admission hash (replies of
        ``ask``: an error reply is raised)."""
        for value in values:
            raise_reply_error(value)
        tags, limit = values
        if len(self._tags) >= 4096:
            self._tags.clear()
        self._tags[model] = (keys.published_tags(model, tags), time.monotonic() + PARTITIONS_TTL_S, limit is not None)

    def tags(self, model: str) -> list[str]:
        known = self._tags.get(model)
        return [model] if known is None else known[0]

    @staticmethod
    def ask(commands: Commands, model: str) -> None:
        """Add the reads ``learn`` takes the answers of."""
        for name in Partitions.FIELDS:
            commands.add(b"HGET", keys.admission(model), name)

    def limited(self, model: str) -> bool:
        """Whether the model has a backlog limit (not known yet: as if it had)."""
        known = self._tags.get(model)
        return known is None or known[2]

    def plan(self, model: str, body: Sequence[Any]) -> list[Call]:
        """``plan_calls`` for ``body`` on this model as last learnt."""
        return plan_calls(body, self.tags(model), limited=self.limited(model))


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError)


def refusal_of(reply: Any) -> Refusal:
    retry_ms = reply[2]
    return Refusal(int(reply[1]), int(retry_ms) / 1000 if retry_ms else None)


def raw_reply(response: Any, **options: Any) -> Any:
    """A response callback that keeps Redis's reply as it is (set for XREAD: the notices are
    read straight from the nested lists, not through one dict per entry)."""
    return response


def read_notices(response: Any) -> tuple[bytes | None, list[tuple[str, bytes | None]]]:
    """The last entry id of a raw XREAD reply of the reply stream, and its notices: (request id,
    envelope), the envelope None for an id-only notice (the result key holds it)."""
    if not response:
        return None, []
    entries = response[0][1] if isinstance(response, list) else next(iter(response.values()))  # RESP2, RESP3
    notices: list[tuple[str, bytes | None]] = []
    for _, fields in entries:
        if fields and len(fields) == 4 and fields[0] == b"id" and fields[2] == b"r":  # what managers write
            notices.append((fields[1].decode(), fields[3]))
            continue
        if isinstance(fields, dict):  # a cluster client's nodes parse entries into dicts
            found = fields
        else:
            found = dict(zip(fields[::2], fields[1::2], strict=False)) if fields else {}
        rid = found.get(b"id")
        if rid is not None:
            notices.append((rid.decode(), found.get(b"r")))
    return entries[-1][0] if entries else None, notices


def next_entry_id(entry_id: bytes) -> bytes:
    """The smallest stream id after ``entry_id``: ``XTRIM MINID`` to it drops that entry too."""
    ms, _, seq = entry_id.partition(b"-")
    return b"%s-%d" % (ms, int(seq or b"0") + 1)


def unwrap(handle: Handle, envelope_bytes: bytes, tensors: TensorType) -> Envelope:
    """Decode a result envelope, converting tensors to torch if asked."""
    return envelope_of(handle.id, handle.ct, envelope_bytes, tensors)


def envelope_of(request_id: str, ct: str, envelope_bytes: bytes, tensors: TensorType) -> Envelope:
    envelope = decode_envelope(ct, envelope_bytes)
    if envelope.id != request_id:
        raise ProtocolError(f"result for {envelope.id!r} arrived for request {request_id!r}")
    if tensors == "torch" and envelope.ok:
        envelope.out = _to_torch(envelope.out)
    return envelope


def value_of(handle: Handle, envelope: Envelope) -> Any:
    if not envelope.ok:
        raise RemoteError(handle.id, envelope.code, envelope.message)
    return envelope.out


def output_of(request_id: str, ct: str, envelope_bytes: bytes, tensors: TensorType) -> Any:
    """The output in a result envelope, without building an :class:`Envelope` (infer's path: only
    ``id``, ``ok``, ``out`` and ``err`` are read); an error envelope raises RemoteError."""
    obj = decode_envelope_value(ct, envelope_bytes)
    if type(obj) is not dict or "id" not in obj or "ok" not in obj:
        raise ProtocolError(f"result is not a v1 envelope: {envelope_bytes[:80]!r}")
    if obj["id"] != request_id:
        raise ProtocolError(f"result for {obj['id']!r} arrived for request {request_id!r}")
    if obj["ok"]:
        out = obj.get("out")
        return _to_torch(out) if tensors == "torch" else out
    err = obj.get("err") or {}
    if not isinstance(err, dict):
        raise ProtocolError(f"result envelope has a malformed err: {envelope_bytes[:80]!r}")
    raise RemoteError(request_id, str(err.get("code", "")), str(err.get("message", "")))


def queue_full(model: str, refusal: Refusal, accepted: list[Handle] | None = None) -> QueueFull:
    return QueueFull(model, refusal.backlog, refusal.retry_after_s, accepted)


def _to_torch(value: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, list):
        return [_to_torch(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def redis_errors(where: str) -> Iterator[None]:
    """Translate redis-py errors into the nosq tree at the boundary."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise NosqConnectionError(f"{where}: Redis refused the credentials: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError,
            RedisClusterException) as exc:  # the last three: a cluster's master failing over
        raise NosqConnectionError(f"{where}: cannot reach Redis: {exc}") from exc
    except RuntimeError as exc:
        if not closed_transport(exc):  # under uvloop: a write on a connection the server closed
            raise
        raise NosqConnectionError(f"{where}: cannot reach Redis: the connection was closed ({exc})") from exc
    except NoPermissionError as exc:
        raise NosqError(f"{where}: the Redis ACL user may not do this: {_reason(exc)} "
                        "(see docs/operations.md, Security)") from exc
    except redis.RedisError as exc:
        raise NosqError(f"{where}: Redis answered an error: {_reason(exc)}") from exc


def raise_reply_error(reply: Any) -> None:
    """A pipeline run with ``raise_on_error=False`` returns errors as values: raise one."""
    if isinstance(reply, Exception):
        raise reply


def _reason(exc: BaseException) -> str:
    """redis-py's message without a pipeline's echo of the failed command (its arguments hold
    payloads, request ids and the reply-stream id), cut to a readable length."""
    text = str(exc)
    head, sep, tail = text.rpartition(" of pipeline caused error: ")
    if sep and head.startswith("Command # "):
        text = tail
    return text if len(text) <= 300 else text[:300] + "..."
