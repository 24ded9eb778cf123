"""Wire protocol v1: the request entry and the result envelope (docs/protocol.md).

A request is one flat stream entry; a result is one envelope in the request's content type.
The envelope's ``out`` is spliced in as already-encoded bytes, so the server never decodes
and re-encodes a model's output.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import msgpack

from nosq.producer.codec import CONTENT_TYPES, decode_envelope_value
from nosq.producer.errors import ProtocolError

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "MODEL_ID_RE",
    "PROTOCOL_VERSION",
    "REQUEST_ID_RE",
    "BadEntry",
    "Envelope",
    "ErrorCode",
    "Request",
    "clip",
    "decode_envelope",
    "encode_envelope",
    "now_ms",
    "parse_request",
    "request_fields",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_TTL_S: Final = 600
MAX_TTL_S: Final = 7 * 24 * 3600
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
MODEL_ID_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
PRIORITIES: Final = range(0, 3)  # 0 = high, 1 = normal (default), 2 = low


class ErrorCode(StrEnum):
    """The ``err.code`` values of a result envelope."""

    BAD_REQUEST = "bad_request"  # malformed entry or payload
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_METHOD = "unknown_method"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    MODEL_ERROR = "model_error"  # the model raised on this input
    OUTPUT_MISMATCH = "output_mismatch"  # the model returned the wrong number of outputs
    BAD_OUTPUT = "bad_output"  # an output that has no wire encoding
    WORKER_DIED = "worker_died"  # the input killed its worker process every time
    DEAD_LETTER = "dead_letter"  # delivered too many times; moved to the dead-letter stream
    TOO_LARGE = "too_large"
    QUEUE_FULL = "queue_full"
    INTERNAL = "internal"


class BadEntry(ProtocolError):
    """A stream entry that cannot be served; ``request_id`` is set when it can be answered."""

    def __init__(self, message: str, *, request_id: str | None, ct: str = "json",
                 reply: str | None = None, ttl_s: int = DEFAULT_TTL_S,
                 code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.ct = ct
        self.reply = reply
        self.ttl_s = ttl_s
        self.code = code


@dataclass(slots=True)
class Request:
    """One parsed request entry."""

    id: str
    ct: str
    payload: bytes
    method: str | None = None
    deadline_ms: int | None = None
    ttl_s: int = DEFAULT_TTL_S
    reply: str | None = None
    priority: int = 1
    entry_id: str = ""  # the stream entry id
    enqueued_ms: int = 0  # from the stream entry id
    read_ms: int = 0  # when a manager read it (server side)
    deliveries: int = 1  # how many times it was delivered (server side)
    partition: int = 0  # which of its model's streams it was read from (server side)


@dataclass(slots=True)
class Envelope:
    """A decoded result envelope."""

    id: str
    ok: bool
    out: Any = None
    code: str = ""
    message: str = ""
    model: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)
    deliveries: int = 0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def request_fields(
    *, request_id: str, ct: str, payload: bytes, method: str | None = None,
    deadline_ms: int | None = None, ttl_s: int = DEFAULT_TTL_S, reply: str | None = None,
    priority: int = 1,
) -> dict[str, str | bytes | int]:
    """The XADD fields of one request (validated the way the server validates them)."""
    if not REQUEST_ID_RE.fullmatch(request_id):
        raise ProtocolError(f"request id {clip(request_id)} must match {REQUEST_ID_RE.pattern}")
    if ct not in CONTENT_TYPES:
        raise ProtocolError(f"content type {clip(ct)} must be one of {', '.join(CONTENT_TYPES)}")
    if type(ttl_s) is not int or not 1 <= ttl_s <= MAX_TTL_S:
        raise ProtocolError(f"result ttl {ttl_s!r} s must be an integer between 1 and {MAX_TTL_S}")
    if type(priority) is not int or priority not in PRIORITIES:
        raise ProtocolError(f"priority {priority!r} must be 0 (high), 1 (normal) or 2 (low)")
    if deadline_ms is not None and (type(deadline_ms) is not int or deadline_ms < 0):
        raise ProtocolError(f"deadline {deadline_ms!r} must be unix milliseconds (an int >= 0)")
    fields: dict[str, str | bytes | int] = {"v": PROTOCOL_VERSION, "id": request_id, "ct": ct, "p": payload}
    if method is not None:
        fields["method"] = method
    if deadline_ms is not None:
        fields["dl"] = deadline_ms
    if ttl_s != DEFAULT_TTL_S:
        fields["ttl"] = ttl_s
    if reply is not None:
        fields["reply"] = reply
    if priority != 1:
        fields["prio"] = priority
    return fields


_ID_BYTES_RE: Final = re.compile(REQUEST_ID_RE.pattern.encode())
_CONTENT_TYPES_BY_BYTES: Final = {ct.encode(): ct for ct in CONTENT_TYPES}
_PRIORITY_BYTES: Final = {b"0": 0, b"1": 1, b"2": 2}


def parse_request(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Request:
    """Parse one stream entry; raise :class:`BadEntry` saying what is wrong.

    An entry whose every field is plainly valid (what clients send) is taken in a few dict
    lookups; anything else goes through the full check, which words what is wrong."""
    get = fields.get
    raw_id, ct, payload = get(b"id"), _CONTENT_TYPES_BY_BYTES.get(get(b"ct", b"")), get(b"p")
    reply, dl, ttl, prio = get(b"reply"), get(b"dl"), get(b"ttl"), get(b"prio", b"1")
    if (get(b"v") == b"1" and ct is not None and payload is not None and raw_id is not None
            and _ID_BYTES_RE.fullmatch(raw_id) is not None and prio in _PRIORITY_BYTES
            and (dl is None or dl.isdigit()) and (reply is None or _ID_BYTES_RE.fullmatch(reply) is not None)
            and (ttl is None or (ttl.isdigit() and 1 <= int(ttl) <= MAX_TTL_S))):
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        method = get(b"method")
        return Request(
            id=raw_id.decode(), ct=ct, payload=payload, method=method.decode("utf-8", "replace") if method else None,
            deadline_ms=int(dl) or None if dl is not None else None, ttl_s=int(ttl) if ttl else DEFAULT_TTL_S,
            reply=reply.decode() if reply else None, priority=_PRIORITY_BYTES[prio], entry_id=eid,
            enqueued_ms=int(eid.partition("-")[0]) if eid[:1].isdigit() else 0,
        )
    return _parse_checked(entry_id, fields)


def _parse_checked(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Request:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    raw_id = fields.get(b"id")
    request_id = raw_id.decode("utf-8", "replace") if raw_id is not None else None
    if request_id is None or not REQUEST_ID_RE.fullmatch(request_id):
        raise BadEntry(f"entry {eid}: field 'id' {clip(request_id)} must match {REQUEST_ID_RE.pattern}",
                       request_id=None)
    ct = fields.get(b"ct", b"").decode("utf-8", "replace")
    reply = _optional_str(fields, b"reply")
    if reply is not None and not REQUEST_ID_RE.fullmatch(reply):
        reply = None
    ttl_s = _int_field(fields, b"ttl", DEFAULT_TTL_S)
    bad_ttl = ttl_s is None or not 1 <= ttl_s <= MAX_TTL_S

    def bad(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> BadEntry:
        return BadEntry(message, request_id=request_id, ct=ct if ct in CONTENT_TYPES else "json",
                        reply=reply, ttl_s=DEFAULT_TTL_S if bad_ttl or ttl_s is None else ttl_s,
                        code=code)

    version = fields.get(b"v")
    if version != b"1":
        raise bad(f"protocol version {clip(version)} is not supported: send v=1",
                  ErrorCode.UNSUPPORTED_VERSION)
    if ct not in CONTENT_TYPES:
        raise bad(f"field 'ct' {clip(ct)} must be one of {', '.join(CONTENT_TYPES)}")
    if bad_ttl:
        raise bad(f"field 'ttl' must be an integer between 1 and {MAX_TTL_S}")
    payload = fields.get(b"p")
    if payload is None:
        raise bad("field 'p' (the payload) is missing")
    deadline = _int_field(fields, b"dl", 0)
    priority = _int_field(fields, b"prio", 1)
    if deadline is None or deadline < 0:
        raise bad("field 'dl' must be an absolute deadline in unix milliseconds")
    if priority is None or priority not in PRIORITIES:
        raise bad("field 'prio' must be 0, 1 or 2")
    return Request(
        id=request_id, ct=ct, payload=payload, method=_optional_str(fields, b"method"),
        deadline_ms=deadline or None, ttl_s=ttl_s or DEFAULT_TTL_S, reply=reply, priority=priority,
        entry_id=eid, enqueued_ms=int(eid.split("-", 1)[0]) if eid[:1].isdigit() else 0,
    )


def encode_envelope(ct: str, header: dict[str, Any], out: bytes | memoryview | None = None) -> bytes:
    """Encode a result envelope; ``out`` is the output value already encoded in ``ct``."""
    if ct == "msgpack":
        packed: bytes = msgpack.packb(header, use_bin_type=True)
        if out is None:
            return packed
        size = len(header)  # re-head the map with one more entry, then append "out"
        skip = 1 if size < 16 else 3 if size < 1 << 16 else 5
        return _msgpack_map_header(size + 1) + packed[skip:] + b"\xa3out" + out
    body = json.dumps(header, separators=(",", ":")).encode()
    if out is None:
        return body
    return body[:-1] + (b',"out":' if header else b'"out":') + out + b"}"


def decode_envelope(ct: str, data: bytes) -> Envelope:
    """Decode a result envelope written by a manager."""
    obj = decode_envelope_value(ct, data)
    if not isinstance(obj, dict) or "id" not in obj or "ok" not in obj:
        raise ProtocolError(f"result is not a v1 envelope: {data[:80]!r}")
    err, timings, batch = obj.get("err") or {}, obj.get("timings") or {}, obj.get("batch") or {}
    deliveries = obj.get("deliveries", 0)
    if not (isinstance(err, dict) and isinstance(timings, dict) and isinstance(batch, dict)
            and type(deliveries) is int):
        raise ProtocolError(f"result envelope has malformed err/timings/batch/deliveries: {data[:80]!r}")
    return Envelope(
        id=str(obj["id"]), ok=bool(obj["ok"]), out=obj.get("out"), code=str(err.get("code", "")),
        message=str(err.get("message", "")), model=str(obj.get("model", "")),
        timings=timings, batch=batch, deliveries=deliveries,
    )


def clip(value: object, limit: int = 64) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long it was: a client's
    field quoted in an error message or a log line (an id can be a megabyte)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}... ({size} {'characters' if isinstance(value, str) else 'bytes'})"


def _msgpack_map_header(size: int) -> bytes:
    if size < 16:
        return bytes((0x80 | size,))
    if size < 1 << 16:
        return b"\xde" + size.to_bytes(2, "big")
    return b"\xdf" + size.to_bytes(4, "big")


def _optional_str(fields: dict[bytes, bytes], key: bytes) -> str | None:
    raw = fields.get(key)
    return raw.decode("utf-8", "replace") if raw else None


def _int_field(fields: dict[bytes, bytes], key: bytes, default: int) -> int | None:
    raw = fields.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return None
