"""Writing results: envelope, completion token, reply-stream notice, then XACK + XDEL.

Everything for one batch goes out in one pipeline. The result key is written with NX (first
writer wins), so an entry that runs twice after a crash still has exactly one result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from manager.resilience import RedisLink, retrying
from producer import keys
from producer.wire import PROTOCOL_VERSION, ErrorCode, Request, clip, encode_envelope, now_ms

__all__ = ["BatchInfo", "Finished", "ResultWriter", "error", "success"]

log = logging.getLogger(__name__)
DEAD_LETTER_MAXLEN = 100_000  # entries a dead-letter stream keeps (approximately)


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Provenance of the batch a request ran in."""

    id: str
    size: int
    reason: str
    dispatched_ms: int
    exec_ms: float


@dataclass(frozen=True, slots=True)
class Finished:
    """One request's outcome, ready to be written."""

    request: Request
    envelope: bytes
    code: str = ""  # the error code; "" when the request succeeded


def success(model: str, request: Request, out: bytes, batch: BatchInfo) -> Finished:
    header = _header(model, request, batch)
    header["ok"] = True
    return Finished(request, encode_envelope(request.ct, header, out))


def error(model: str, request: Request, code: ErrorCode | str, message: str,
          batch: BatchInfo | None = None) -> Finished:
    header = _header(model, request, batch)
    header["ok"] = False
    header["err"] = {"code": str(code), "message": message}
    return Finished(request, encode_envelope(request.ct, header), str(code))


def _header(model: str, request: Request, batch: BatchInfo | None) -> dict[str, Any]:
    read_ms = request.read_ms or now_ms()
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request.id, "ok": True, "model": model}
    queued = max(0, read_ms - request.enqueued_ms) if request.enqueued_ms else 0
    if batch is None:
        header["timings"] = {"queued_ms": queued, "wait_ms": max(0, now_ms() - read_ms), "exec_ms": 0}
    else:
        header["timings"] = {"queued_ms": queued, "wait_ms": max(0, batch.dispatched_ms - read_ms),
                             "exec_ms": round(batch.exec_ms, 3)}
        header["batch"] = {"id": batch.id, "size": batch.size, "reason": batch.reason}
    header["deliveries"] = request.deliveries
    return header


class ResultWriter:
    """Writes the results of one model's requests and acknowledges their entries."""

    def __init__(self, client: redis.asyncio.Redis, *, model: str, consumer: str, reply_maxlen: int,
                 link: RedisLink, dead_letter_ttl_s: int | None = None, stream: str | None = None) -> None:
        self._redis = client
        self._model = model
        self._consumer = consumer.encode()
        self._dead_letter_ttl_s = dead_letter_ttl_s  # None: the dead-letter stream keeps no TTL
        self._stream = stream or keys.requests(model)
        self._reply_maxlen = reply_maxlen
        self._link = link  # a write is idempotent (SET NX, XACK, XDEL): retried once Redis is back

    async def write(self, finished: list[Finished], extra_acks: list[str] | None = None) -> None:
        """Write every result, then ack and delete the entries (and ``extra_acks``)."""
        if not finished and not extra_acks:
            return
        pipe = self._redis.pipeline(transaction=False)
        replies: dict[str, int] = {}
        for item in finished:
            req = item.request
            pipe.set(keys.result(req.id), item.envelope, nx=True, ex=req.ttl_s)
            if req.reply is None:  # a waiter on BLPOP
                done = keys.done(req.id)
                pipe.rpush(done, b"1")
                pipe.expire(done, req.ttl_s)
            else:  # a multiplexing client: its reply stream replaces the token
                stream = keys.reply(req.reply)
                pipe.xadd(stream, {"id": req.id, "r": item.envelope},
                          maxlen=self._reply_maxlen, approximate=True)
                replies[stream] = max(replies.get(stream, 0), req.ttl_s)
        for stream, ttl in replies.items():
            pipe.expire(stream, ttl)
        ack_ids = [item.request.entry_id for item in finished if item.request.entry_id]
        ack_ids.extend(extra_acks or ())
        if ack_ids:
            pipe.xack(self._stream, keys.GROUP, *ack_ids)
            pipe.xdel(self._stream, *ack_ids)
        await retrying(pipe.execute, f"writing {len(finished)} result(s) of model {clip(self._model)}", self._link)

    async def dead_letter(self, entries: list[tuple[bytes, dict[bytes, bytes], str]], code: ErrorCode) -> None:
        """Move entries (id, fields, reason) to the model's dead-letter stream with their reason,
        then ack and delete them. An entry without fields (deleted while pending) is only acked."""
        if not entries:
            return
        pipe = self._redis.pipeline(transaction=False)
        letters = keys.dead_letters(self._model)
        ids = []
        moved = False
        for entry_id, fields, reason in entries:
            ids.append(entry_id)
            if fields:
                record: dict[Any, Any] = dict(fields)
                record.update({b"reason": reason.encode(), b"code": str(code).encode(),
                               b"entry": entry_id, b"consumer": self._consumer})
                pipe.xadd(letters, record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
                moved = True
                log.warning("model %s: entry %s dead-lettered: %s", clip(self._model), entry_id.decode(), reason)
        if moved and self._dead_letter_ttl_s is not None:
            pipe.expire(letters, self._dead_letter_ttl_s)
        pipe.xack(self._stream, keys.GROUP, *ids)
        pipe.xdel(self._stream, *ids)
        await retrying(pipe.execute, f"dead-lettering {len(ids)} entries of model {clip(self._model)}", self._link)
