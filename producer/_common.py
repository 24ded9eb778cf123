"""What the sync and async producers share: handles, submission fields, error translation."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis

from producer import keys
from producer.codec import encode_value
from producer.errors import NosqConnectionError, NosqError, ProtocolError, QueueFull, RemoteError
from producer.wire import DEFAULT_TTL_S, MODEL_ID_RE, Envelope, decode_envelope, now_ms, request_fields

__all__ = [
    "ENQUEUE_LUA",
    "REPLY_BLOCK_MS",
    "REPLY_COUNT",
    "SAFETY_CHECK_AFTER_S",
    "Handle",
    "TensorType",
    "check_enqueued",
    "new_client_id",
    "prepare",
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


@dataclass(frozen=True, slots=True)
class Handle:
    """A submitted request: pass it to ``result``/``cancel``."""

    id: str
    model: str
    ct: str
    deadline_ms: int | None
    ttl_s: int


def new_client_id() -> str:
    return uuid.uuid4().hex


def prepare(
    model: str, inputs: Any, *, ct: str, reply: str | None, method: str | None,
    timeout_s: float | None, deadline_ms: int | None, ttl_s: int | None,
    request_id: str | None, priority: int,
) -> tuple[Handle, list[str], list[Any]]:
    """Validate one request; return its handle, the script keys and the XADD field list."""
    if not MODEL_ID_RE.fullmatch(model):
        raise ProtocolError(f"model id {model!r} must match {MODEL_ID_RE.pattern}")
    if timeout_s is not None and deadline_ms is not None:
        raise ProtocolError("give either timeout_s or deadline_ms, not both")
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ProtocolError(f"timeout_s must be > 0, got {timeout_s}")
        deadline_ms = now_ms() + int(timeout_s * 1000)
    ttl = DEFAULT_TTL_S if ttl_s is None else ttl_s
    rid = request_id or uuid.uuid4().hex
    fields = request_fields(
        request_id=rid, ct=ct, payload=encode_value(ct, inputs), method=method,
        deadline_ms=deadline_ms, ttl_s=ttl, reply=reply, priority=priority,
    )
    argv: list[Any] = []
    for name, value in fields.items():
        argv.extend((name, value))
    handle = Handle(id=rid, model=model, ct=ct, deadline_ms=deadline_ms, ttl_s=ttl)
    return handle, [keys.requests(model), keys.admission(model)], argv


def check_enqueued(handle: Handle, reply: Any) -> None:
    """Raise QueueFull when the enqueue script refused the request."""
    if int(reply[0]) == 1:
        return
    retry_ms = reply[2]
    raise QueueFull(handle.model, int(reply[1]), int(retry_ms) / 1000 if retry_ms else None)


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
    except redis.RedisError as exc:
        raise NosqError(f"{where}: Redis answered an error: {exc}") from exc
