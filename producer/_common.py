"""What the sync and async producers share: handles, submission fields, error translation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis
from redis.exceptions import NoPermissionError

from producer import keys
from producer.codec import encode_value
from producer.errors import NosqConnectionError, NosqError, ProtocolError, QueueFull, RemoteError
from producer.wire import (
    DEFAULT_TTL_S,
    MODEL_ID_RE,
    REQUEST_ID_RE,
    Envelope,
    decode_envelope,
    now_ms,
    request_fields,
)

__all__ = [
    "ENQUEUE_CHUNK",
    "ENQUEUE_LUA",
    "ENQUEUE_MANY_LUA",
    "REPLY_BLOCK_MS",
    "REPLY_COUNT",
    "SAFETY_CHECK_AFTER_S",
    "Handle",
    "TensorType",
    "check_enqueued",
    "chunks",
    "new_client_id",
    "new_request_id",
    "prepare_many",
    "redis_errors",
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

#: The batched form the Python producers use: ARGV = k, k shared field/value pairs, then
#: (id, payload) per request. Accepts what fits under the limit, in order, atomically.
ENQUEUE_MANY_LUA: Final = """
local k = tonumber(ARGV[1])
local first = 2 * k + 2
local n = (#ARGV - first + 1) / 2
local room, depth, retry = n, 0, false
local limit = redis.call('HGET', KEYS[2], 'max_backlog')
if limit then
  depth = redis.call('XLEN', KEYS[1])
  room = math.max(0, math.min(n, tonumber(limit) - depth))
  if room < n then retry = redis.call('HGET', KEYS[2], 'retry_after_ms') or false end
end
local fields = {'id', '', 'p', ''}
for j = 2, 2 * k + 1 do fields[#fields + 1] = ARGV[j] end
for i = 0, room - 1 do
  fields[2] = ARGV[first + 2 * i]
  fields[4] = ARGV[first + 2 * i + 1]
  redis.call('XADD', KEYS[1], '*', unpack(fields))
end
return {room, depth + room, retry}
"""
#: requests per script call: bounds how long one call holds Redis
ENQUEUE_CHUNK: Final = 1000


@dataclass(frozen=True, slots=True)
class Handle:
    """A submitted request: pass it to ``result``/``cancel``."""

    id: str
    model: str
    ct: str
    deadline_ms: int | None
    ttl_s: int


def new_client_id() -> str:
    return os.urandom(16).hex()


def new_request_id() -> str:
    return os.urandom(16).hex()  # 128 random bits, like a UUID4, four times cheaper


def prepare_many(
    model: str, inputs: Iterable[Any], *, ct: str, reply: str | None, method: str | None,
    timeout_s: float | None, deadline_ms: int | None, ttl_s: int | None,
    request_ids: Sequence[str] | None, priority: int,
) -> tuple[list[Handle], list[str], list[Any]]:
    """Validate requests that share their options; return handles, script keys and argv for
    :data:`ENQUEUE_MANY_LUA` (the shared fields once, then each request's id and payload)."""
    if not MODEL_ID_RE.fullmatch(model):
        raise ProtocolError(f"model id {model!r} must match {MODEL_ID_RE.pattern}")
    if timeout_s is not None and deadline_ms is not None:
        raise ProtocolError("give either timeout_s or deadline_ms, not both")
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ProtocolError(f"timeout_s must be > 0, got {timeout_s}")
        deadline_ms = now_ms() + int(timeout_s * 1000)
    ttl = DEFAULT_TTL_S if ttl_s is None else ttl_s
    payloads = [encode_value(ct, item) for item in inputs]
    if request_ids is not None and len(request_ids) != len(payloads):
        raise ProtocolError(f"{len(request_ids)} request ids for {len(payloads)} inputs")
    ids = list(request_ids) if request_ids is not None else [new_request_id() for _ in payloads]
    shared = request_fields(
        request_id=ids[0] if ids else "x", ct=ct, payload=b"", method=method, deadline_ms=deadline_ms,
        ttl_s=ttl, reply=reply, priority=priority,
    )
    del shared["id"], shared["p"]
    argv: list[Any] = [len(shared)]
    for name, value in shared.items():
        argv.extend((name, value))
    for rid, payload in zip(ids, payloads, strict=True):
        if not REQUEST_ID_RE.fullmatch(rid):
            raise ProtocolError(f"request id {rid!r} must match {REQUEST_ID_RE.pattern}")
        argv.extend((rid, payload))
    handles = [Handle(id=rid, model=model, ct=ct, deadline_ms=deadline_ms, ttl_s=ttl) for rid in ids]
    return handles, [keys.requests(model), keys.admission(model)], argv


def chunks(handles: list[Handle], argv: list[Any]) -> list[tuple[list[Handle], list[Any]]]:
    """Split one prepared submission into script calls of at most ENQUEUE_CHUNK requests."""
    head = argv[: 1 + 2 * int(argv[0])]
    body = argv[len(head):]
    return [
        (handles[i : i + ENQUEUE_CHUNK], head + body[2 * i : 2 * (i + ENQUEUE_CHUNK)])
        for i in range(0, len(handles), ENQUEUE_CHUNK)
    ]


def check_enqueued(model: str, parts: list[tuple[list[Handle], list[Any]]], replies: list[Any]) -> list[Handle]:
    """The accepted handles; QueueFull (carrying every accepted one) when some were refused."""
    accepted: list[Handle] = []
    refusal: Any = None
    for (handles, _), reply in zip(parts, replies, strict=True):
        count = int(reply[0])
        accepted.extend(handles[:count])
        if count < len(handles) and refusal is None:
            refusal = reply
    if refusal is None:
        return accepted
    retry_ms = refusal[2]
    raise QueueFull(model, int(refusal[1]), int(retry_ms) / 1000 if retry_ms else None, accepted)


def unwrap(handle: Handle, envelope_bytes: bytes, tensors: TensorType) -> Envelope:
    """Decode a result envelope, converting tensors to torch if asked."""
    envelope = decode_envelope(handle.ct, envelope_bytes)
    if envelope.id != handle.id:
        raise ProtocolError(f"result for {envelope.id!r} arrived for request {handle.id!r}")
    if tensors == "torch" and envelope.ok:
        envelope.out = _to_torch(envelope.out)
    return envelope


def value_of(handle: Handle, envelope: Envelope) -> Any:
    if not envelope.ok:
        raise RemoteError(handle.id, envelope.code, envelope.message)
    return envelope.out


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
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise NosqConnectionError(f"{where}: cannot reach Redis: {exc}") from exc
    except NoPermissionError as exc:
        raise NosqError(f"{where}: the Redis ACL user may not do this: {_reason(exc)} "
                        "(see docs/operations.md, Security)") from exc
    except redis.RedisError as exc:
        raise NosqError(f"{where}: Redis answered an error: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """redis-py's message without a pipeline's echo of the failed command (its arguments hold
    payloads, request ids and the reply-stream id), cut to a readable length."""
    text = str(exc)
    head, sep, tail = text.rpartition(" of pipeline caused error: ")
    if sep and head.startswith("Command # "):
        text = tail
    return text if len(text) <= 300 else text[:300] + "..."
