"""Writing results: envelope, completion token, reply-stream notice, then XACK + XDEL.

Everything for one batch goes out in one pipeline. The result key is written with NX (first
writer wins), so an entry that runs twice after a crash still has exactly one result.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis
import redis.asyncio

from nosq.manager.runtime.redislink import RedisLink, retrying
from nosq.producer import keys
from nosq.producer.resp import Commands
from nosq.producer.wire import PROTOCOL_VERSION, ErrorCode, Request, clip, encode_envelope, now_ms

__all__ = ["BatchInfo", "Finished", "ResultWriter", "Successes", "error"]

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
    # more of the batch's provenance, after id, size, reason in its ``batch`` map: the length
    # bucket it was formed from, the model's own (a text model's ``tokens``, ``padding``)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finished:
    """One request's outcome, ready to be written."""

    request: Request
    envelope: bytes
    code: ErrorCode | None = None  # None when the request succeeded


class Successes:
    """The envelopes of one batch's successful requests. What they share (version, model,
    exec_ms, batch) is encoded once per content type; each request adds its id, queued and wait
    ms, deliveries and its output, spliced in as encoded (never decoded)."""

    __slots__ = ("_batch", "_model", "_templates")

    def __init__(self, model: str, batch: BatchInfo) -> None:
        self._model = model
        self._batch = batch
        self._templates: dict[str, tuple[bytes, ...]] = {}

    def envelope(self, request: Request, out: bytes | memoryview) -> Finished:
        parts = self._templates.get(request.ct) or self._template(request.ct)
        read_ms = request.read_ms
        queued = max(0, read_ms - request.enqueued_ms) if request.enqueued_ms else 0
        wait = max(0, self._batch.dispatched_ms - read_ms)
        if request.ct == "msgpack":
            pack = msgpack.packb
            body = b"".join((parts[0], pack(request.id), parts[1], pack(queued), parts[2], pack(wait), parts[3],
                             pack(request.deliveries), parts[4], out))
        else:
            body = b"".join((parts[0], request.id.encode(), parts[1], b"%d" % queued, parts[2], b"%d" % wait, parts[3],
                             b"%d" % request.deliveries, parts[4], out, b"}"))
        return Finished(request, body)

    def _template(self, ct: str) -> tuple[bytes, ...]:
        batch = self._batch
        exec_ms = round(batch.exec_ms, 3)
        provenance = {"id": batch.id, "size": batch.size, "reason": batch.reason, **batch.extra}
        if ct == "msgpack":
            pack = msgpack.packb
            parts = (b"\x88" + pack("v") + pack(PROTOCOL_VERSION) + pack("id"),
                     pack("ok") + pack(True) + pack("model") + pack(self._model) + pack("timings") + b"\x83"
                     + pack("queued_ms"),
                     pack("wait_ms"),
                     pack("exec_ms") + pack(exec_ms) + pack("batch") + pack(provenance) + pack("deliveries"),
                     b"\xa3out")
        else:  # json; request ids need no escaping (REQUEST_ID_RE)
            dumps = functools.partial(json.dumps, separators=(",", ":"))
            parts = ((f'{{"v":{PROTOCOL_VERSION},"id":"').encode(),
                     (f'","ok":true,"model":{dumps(self._model)},"timings":{{"queued_ms":').encode(),
                     b',"wait_ms":',
                     (f',"exec_ms":{dumps(exec_ms)}}},"batch":{dumps(provenance)},"deliveries":').encode(),
                     b',"out":')
        self._templates[ct] = parts
        return parts


def error(model: str, request: Request, code: ErrorCode, message: str,
          batch: BatchInfo | None = None) -> Finished:
    header = _header(model, request, batch)
    header["ok"] = False
    header["err"] = {"code": str(code), "message": message}
    return Finished(request, encode_envelope(request.ct, header), code)


def _header(model: str, request: Request, batch: BatchInfo | None) -> dict[str, Any]:
    read_ms = request.read_ms or now_ms()
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request.id, "ok": True, "model": model}
    queued = max(0, read_ms - request.enqueued_ms) if request.enqueued_ms else 0
    if batch is None:
        header["timings"] = {"queued_ms": queued, "wait_ms": max(0, now_ms() - read_ms), "exec_ms": 0}
    else:
        header["timings"] = {"queued_ms": queued, "wait_ms": max(0, batch.dispatched_ms - read_ms),
                             "exec_ms": round(batch.exec_ms, 3)}
        header["batch"] = {"id": batch.id, "size": batch.size, "reason": batch.reason, **batch.extra}
    header["deliveries"] = request.deliveries
    return header


class ResultWriter:
    """Writes the results of one model's requests and acknowledges their entries."""

    def __init__(self, client: redis.asyncio.Redis, *, model: str, consumer: str, reply_maxlen: int,
                 link: RedisLink, dead_letter_ttl_s: int | None = None, streams: list[str] | None = None,
                 reply_inline_bytes: int = 4096) -> None:
        self._redis = client
        self._model = model
        self._consumer = consumer.encode()
        self._dead_letter_ttl_s = dead_letter_ttl_s  # None: the dead-letter stream keeps no TTL
        # the model's request streams by partition (a pipeline's own list: it may grow)
        self._streams = streams if streams is not None else [keys.requests(model)]
        self._reply_maxlen = reply_maxlen
        self._reply_inline_bytes = reply_inline_bytes
        self._link = link  # a write is idempotent (SET NX, XACK, XDEL): retried once Redis is back

    async def write(self, finished: list[Finished]) -> None:
        """Write every result, then ack and delete the entries: one round trip
        (``manager.resp``). The envelope goes to Redis once, to its result key; the reply-stream
        notice carries it too only when it is small (``reply_inline_bytes``)."""
        if not finished:
            return
        commands = Commands()
        replies: dict[str, int] = {}
        inline, maxlen = self._reply_inline_bytes, self._reply_maxlen
        maxlen_arg = b"%d" % maxlen
        for item in finished:
            req = item.request
            ttl = req.ttl_s
            rid = req.id.encode()
            commands.set_nx_ex(keys.result(req.id).encode(), item.envelope, ttl)
            if req.reply is None:  # a waiter on BLPOP
                done = keys.done(req.id)
                commands.add(b"RPUSH", done, b"1")
                commands.add(b"EXPIRE", done, ttl)
                continue
            stream = keys.reply(req.reply)  # a multiplexing client: its reply stream replaces the token
            notice = item.envelope if len(item.envelope) <= inline else None  # large: only in its key
            commands.xadd_notice(stream.encode(), maxlen_arg, rid, notice)
            if replies.get(stream, 0) < ttl:
                replies[stream] = ttl
        for stream, ttl in replies.items():
            commands.add(b"EXPIRE", stream, ttl)
        acks: dict[int, list[str]] = {}
        for item in finished:
            if item.request.entry_id:
                acks.setdefault(item.request.partition, []).append(item.request.entry_id)
        for partition, ack_ids in acks.items():
            stream = self._streams[partition]
            commands.add(b"XACK", stream, keys.GROUP, *ack_ids)
            commands.add(b"XDEL", stream, *ack_ids)
        answers = await retrying(lambda: commands.send(self._redis),
                                 f"writing {len(finished)} result(s) of model {clip(self._model)}", self._link)
        for answer in answers:
            if isinstance(answer, redis.ResponseError):
                raise answer

    async def dead_letter(self, entries: list[tuple[bytes, dict[bytes, bytes], str]], code: ErrorCode,
                          partition: int = 0) -> None:
        """Move entries (id, fields, reason) of one partition's stream to the model's dead-letter
        stream (one a model) with their reason, then ack and delete them. An entry without
        fields (deleted while pending) is only acked."""
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
        stream = self._streams[partition]
        pipe.xack(stream, keys.GROUP, *ids)
        pipe.xdel(stream, *ids)
        await retrying(pipe.execute, f"dead-lettering {len(ids)} entries of model {clip(self._model)}", self._link)
