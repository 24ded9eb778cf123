"""Answer requests for model ids that no manager serves, instead of leaving clients to time out."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import redis.asyncio

from manager.results import ResultWriter, error
from manager.settings import ManagerSettings
from producer import keys
from producer.wire import BadEntry, ErrorCode, Request, now_ms, parse_request

__all__ = ["UnknownModels"]

log = logging.getLogger(__name__)
_MODEL_OF = re.compile(rb"^" + re.escape(keys.PREFIX.encode()) + rb":\{(.*)\}:req$")
READ_COUNT = 500


class UnknownModels:
    """Scans for request streams of unconfigured models and answers them ``unknown_model``."""

    def __init__(self, client: redis.asyncio.Redis, settings: ManagerSettings, served: set[str]) -> None:
        self._redis = client
        self._settings = settings
        self._served = served
        self.answered = 0

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
            model = match.group(1).decode("utf-8", "replace") if match else ""
            if not model or model in self._served:
                continue
            if served_elsewhere is None:  # models other live managers serve (their heartbeats)
                served_elsewhere = await self._redis.hgetall(keys.registry("served"))  # type: ignore[misc]
            expires = served_elsewhere.get(model.encode())
            if expires is None or int(expires) < now_ms():
                answered += await self._answer(key.decode(), model)
        self.answered += answered
        return answered

    async def _answer(self, stream: str, model: str) -> int:
        try:
            await self._redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        response: Any = await self._redis.xreadgroup(
            keys.GROUP, self._settings.consumer, {stream: ">"}, count=READ_COUNT
        )
        entries = response[0][1] if response else []
        if not entries:
            return 0
        served = ", ".join(sorted(self._served)) or "none"
        message = f"model {model!r} is not served here; served models: {served}"
        finished = []
        orphans: list[str] = []
        for entry_id, fields in entries:
            try:
                request = parse_request(entry_id, fields)
            except BadEntry as exc:
                if exc.request_id is None:
                    orphans.append(entry_id.decode())
                    continue
                request = Request(id=exc.request_id, ct=exc.ct, payload=b"", reply=exc.reply,
                                  ttl_s=exc.ttl_s, entry_id=entry_id.decode())
            finished.append(error(model, request, ErrorCode.UNKNOWN_MODEL, message))
        writer = ResultWriter(self._redis, model=model, reply_maxlen=self._settings.reply_maxlen)
        await writer.write(finished, extra_acks=orphans)
        log.warning("answered %d request(s) for unknown model %r", len(finished), model)
        return len(finished)
