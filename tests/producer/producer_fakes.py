"""A stand-in manager for the producer tests.

No manager exists in these tests: :class:`FakeManager` reads a model's request stream, parses
each entry with ``wire.parse_request`` and answers the way ``nosq serve`` does: ``SET res NX
EX ttl``, ``RPUSH done`` + ``EXPIRE``, and ``XADD`` to the producer's reply stream: the notice
holds ``id`` and the envelope ``r``, or (an envelope over ``inline_limit`` bytes) ``id`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import redis
import redis.asyncio

from nosq.producer import RedisSettings, keys
from nosq.producer.codec import decode_value, encode_value
from nosq.producer.wire import BadEntry, Request, encode_envelope, parse_request

Command = tuple[str, tuple[Any, ...], dict[str, Any]]
Handler = Callable[[Request, Any], Any]


class Failure(Exception):
    """Raised by a handler to answer with an error envelope."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def echo(request: Request, inputs: Any) -> Any:
    return inputs


def result_writes(request_id: str, ttl_s: int, reply: str | None, envelope: bytes,
                  inline_limit: int | None = None) -> list[Command]:
    """The Redis writes that publish one result, in a manager's order."""
    commands: list[Command] = [
        ("set", (keys.result(request_id), envelope), {"nx": True, "ex": ttl_s}),
        ("rpush", (keys.done(request_id), b"1"), {}),
        ("expire", (keys.done(request_id), ttl_s), {}),
    ]
    if reply is not None:
        inline = inline_limit is None or len(envelope) <= inline_limit
        notice = {"id": request_id, "r": envelope} if inline else {"id": request_id}
        commands.append(("xadd", (keys.reply(reply), notice), {}))
    return commands


class FakeManager:
    """Answers every entry of one model's stream with ``handler(request, inputs)``."""

    def __init__(self, model: str = "echo", handler: Handler = echo, inline_limit: int | None = None) -> None:
        self.model = model
        self.handler = handler
        self.inline_limit = inline_limit  # None: every notice carries the envelope
        self.stream = keys.requests(model)
        self.seen: list[Request] = []
        self.fields: dict[str, dict[bytes, bytes]] = {}  # raw entry fields by request id

    def _writes(self, entry_id: bytes, fields: dict[bytes, bytes]) -> list[Command]:
        try:
            request = parse_request(entry_id, fields)
        except BadEntry as exc:
            if exc.request_id is None:
                return []
            header = {"v": 1, "id": exc.request_id, "ok": False,
                      "err": {"code": str(exc.code), "message": str(exc)}}
            return result_writes(exc.request_id, exc.ttl_s, exc.reply, encode_envelope(exc.ct, header),
                                 self.inline_limit)
        self.seen.append(request)
        self.fields[request.id] = fields
        header: dict[str, Any] = {
            "v": 1, "id": request.id, "model": self.model,
            "timings": {"queued_ms": 0.5, "wait_ms": 0.25, "exec_ms": 1.0},
            "batch": {"id": "b1", "size": 1, "reason": "idle"}, "deliveries": 1,
        }
        out: bytes | None = None
        try:
            out = encode_value(request.ct, self.handler(request, decode_value(request.ct, request.payload)))
            header["ok"] = True
        except Failure as exc:
            header["ok"] = False
            header["err"] = {"code": exc.code, "message": exc.message}
        return result_writes(request.id, request.ttl_s, request.reply, encode_envelope(request.ct, header, out),
                             self.inline_limit)

    def _plan(self, entries: list[Any], reverse: bool) -> list[Command]:
        commands: list[Command] = []
        for entry_id, fields in reversed(entries) if reverse else entries:
            commands.extend(self._writes(entry_id, fields))
            commands.append(("xdel", (self.stream, entry_id), {}))
        return commands

    def serve(self, client: redis.Redis, *, reverse: bool = False) -> int:
        """Answer every waiting entry in one pipeline (newest first if ``reverse``)."""
        entries = client.xrange(self.stream)
        pipe = client.pipeline(transaction=False)
        for name, args, kwargs in self._plan(entries, reverse):
            getattr(pipe, name)(*args, **kwargs)
        pipe.execute()
        return len(entries)

    async def aserve(self, client: redis.asyncio.Redis, *, reverse: bool = False) -> int:
        entries = await client.xrange(self.stream)
        async with client.pipeline(transaction=False) as pipe:
            for name, args, kwargs in self._plan(entries, reverse):
                getattr(pipe, name)(*args, **kwargs)
            await pipe.execute()
        return len(entries)

    @contextlib.contextmanager
    def running(self, settings: RedisSettings) -> Iterator[FakeManager]:
        """Serve in a background thread until the block exits (errors re-raised there)."""
        client = settings.client()
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop() -> None:
            last: bytes | str = "0-0"
            try:
                while not stop.is_set():
                    response = client.xread({self.stream: last}, block=50)
                    if response:
                        last = response[0][1][-1][0]
                        self.serve(client)
            except BaseException as exc:  # surfaced in the test's thread below
                errors.append(exc)

        thread = threading.Thread(target=loop, name="fake-manager", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(5)
            client.close()
        if errors:
            raise errors[0]

    @contextlib.asynccontextmanager
    async def arunning(self, settings: RedisSettings) -> AsyncIterator[FakeManager]:
        """Serve in a background task until the block exits."""
        client = settings.async_client()
        stopping = False

        async def loop() -> None:
            last: bytes | str = "0-0"
            while not stopping:  # (a cancelled blocking read may come back as a plain return)
                response = await client.xread({self.stream: last}, block=50)
                if response:
                    last = response[0][1][-1][0]
                    await self.aserve(client)

        task = asyncio.create_task(loop(), name="fake-manager")
        try:
            yield self
        finally:
            stopping = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()
