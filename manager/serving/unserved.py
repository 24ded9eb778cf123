"""Answer requests for model ids that no manager serves, instead of leaving clients to time out.

A stream of an unknown model (a typo, a model not deployed yet, a hostile client) is answered
``unknown_model`` entry by entry; entries with no usable request id go to its dead-letter
stream, which expires after ``DEAD_LETTER_TTL_S``. Once answered, the stream is deleted if
nothing new arrived meanwhile (atomically, in Lua), with its consumer group: unknown names
leave no keys behind but results and dead letters, each with a TTL.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Final

import redis.asyncio

from nosq.manager.runtime.redislink import RedisLink
from nosq.manager.serving.results import ResultWriter, error
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys
from nosq.producer.wire import MODEL_ID_RE, BadEntry, ErrorCode, Request, clip, now_ms, parse_request

__all__ = ["UnknownModels"]

log = logging.getLogger(__name__)
_MODEL_OF = re.compile(rb"^" + re.escape(keys.PREFIX.encode()) + rb":\{(.*)\}:req$", re.DOTALL)
READ_COUNT = 500
DEAD_LETTER_TTL_S: Final = 24 * 3600  # dead letters of an unknown model: kept a day for operators
#: delete the stream only if it is empty (a client may have added an entry since it was read)
_DELETE_IF_EMPTY: Final = """
if redis.call('XLEN', KEYS[1]) == 0 then return redis.call('DEL', KEYS[1]) end
return 0
"""


class UnknownModels:
    """Scans for request streams of unconfigured models and answers them ``unknown_model``."""

    def __init__(self, client: redis.asyncio.Redis, settings: ManagerSettings, served: set[str],
                 link: RedisLink) -> None:
        self._redis = client
        self._link = link
        self._settings = settings
        self._served = served
        self._delete_if_empty = client.register_script(_DELETE_IF_EMPTY)
        self.answered = 0
        self.deleted = 0  # streams removed once answered

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sweep()
            try:
                async with asyncio.timeout(self._settings.unknown_scan_interval_s):
                    await stop.wait()
            except TimeoutError:
                pass

    async def sweep(self) -> int:
        answered = 0
        served_elsewhere: dict[bytes, bytes] | None = None
        async for key in self._redis.scan_iter(match=keys.stream_pattern(), count=1000, _type="STREAM"):
            match = _MODEL_OF.match(key)
            if match is None:
                continue
            model = keys.model_of_tag(match.group(1).decode("utf-8", "replace"))  # a partition's too
            if model in self._served:
                continue
            if served_elsewhere is None:  # models other live managers serve (their heartbeats)
                served_elsewhere = await self._redis.hgetall(keys.registry_served())  # type: ignore[misc]
            expires = served_elsewhere.get(model.encode())
            if expires is None or int(expires) < now_ms():
                answered += await self._answer(key, model)
        self.answered += answered
        return answered

    async def _answer(self, stream: bytes, model: str) -> int:
        """Answer every entry of one unknown model's stream, then delete the stream if empty."""
        try:
            await self._redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        label = model if MODEL_ID_RE.fullmatch(model) else clip(model)  # the envelopes' "model"
        writer = ResultWriter(self._redis, model=model, consumer=self._settings.consumer,
                              reply_maxlen=self._settings.reply_maxlen, link=self._link,
                              reply_inline_bytes=self._settings.reply_inline_bytes,
                              dead_letter_ttl_s=DEAD_LETTER_TTL_S, streams=[stream.decode("utf-8", "replace")])
        if label == model:
            served = ", ".join(sorted(self._served)) or "none"
            message = f"model {model!r} is not served here; served models: {served}"
        else:
            message = f"model id {clip(model)} is not a valid model id: it must match {MODEL_ID_RE.pattern}"
        total = 0
        while True:
            response: Any = await self._redis.xreadgroup(
                keys.GROUP, self._settings.consumer, {stream: ">"}, count=READ_COUNT
            )
            entries = response[0][1] if response else []
            if not entries:
                break
            total += await self._answer_entries(writer, label, entries, message)
        if await self._delete_if_empty(keys=[stream]):
            self.deleted += 1
        return total

    async def _answer_entries(self, writer: ResultWriter, model: str, entries: list[Any], message: str) -> int:
        finished = []
        dead: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            try:
                request = parse_request(entry_id, fields)
            except BadEntry as exc:
                if exc.request_id is None:  # nobody to answer: an operator may look at it
                    dead.append((entry_id, fields, str(exc)))
                    continue
                request = Request(id=exc.request_id, ct=exc.ct, payload=b"", reply=exc.reply,
                                  ttl_s=exc.ttl_s, entry_id=entry_id.decode())
            finished.append(error(model, request, ErrorCode.UNKNOWN_MODEL, message))
        await writer.write(finished)
        await writer.dead_letter(dead, ErrorCode.BAD_REQUEST)
        log.warning("answered %d request(s) for unknown model %s%s", len(finished), clip(model),
                    f"; {len(dead)} without a usable id dead-lettered" if dead else "")
        return len(finished)
