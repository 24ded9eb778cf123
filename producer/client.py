"""The synchronous producer: waits read the process's reply stream in the caller's thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis

from nosq.producer import keys
from nosq.producer.enqueue import (
    ENQUEUE_BATCH_LUA,
    REPLY_BLOCK_MS,
    REPLY_COUNT,
    SAFETY_CHECK_AFTER_S,
    Call,
    Handle,
    Partitions,
    Refusal,
    Shaper,
    TensorType,
    call_outcome,
    is_noscript,
    new_client_id,
    next_entry_id,
    planned_commands,
    queue_full,
    raise_reply_error,
    raw_reply,
    read_notices,
    redis_errors,
    unwrap,
    value_of,
)
from nosq.producer.errors import NosqError, NosqTimeout
from nosq.producer.resp import Commands, get_many_blocking
from nosq.producer.settings import RedisSettings
from nosq.producer.wire import Envelope

__all__ = ["Producer"]


class Producer:
    """Submit requests and wait for results from plain (threaded or not) Python code.

    Use as ``with Producer(settings) as producer: producer.infer("mlp", x)``.
    """

    def __init__(
        self, settings: RedisSettings | None = None, *, content_type: str = "msgpack",
        tensors: TensorType = "numpy", default_timeout_s: float = 30.0,
    ) -> None:
        self._settings = settings or RedisSettings()
        self._ct = content_type
        self._tensors: TensorType = tensors
        self._default_timeout_s = default_timeout_s
        self._client_id = new_client_id()
        self._reply = keys.reply(self._client_id)
        self._shaper = Shaper(content_type, self._client_id)
        self._partitions = Partitions()
        self._redis: redis.Redis | None = None
        self._arrived: dict[str, bytes] = {}  # results read but not yet claimed
        self._mine: set[str] = set()  # ids submitted here whose results were not yet claimed
        self._last_id = b"0-0"
        self._trim_to: bytes | None = None  # the last read's XTRIM, sent with the next read
        self._fetch: list[str] = []  # id-only notices: MGET their result keys with the next read
        self._lock = threading.Lock()

    def __enter__(self) -> Producer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._redis is not None:
            raise NosqError("Producer.start() called twice")
        client = self._settings.client()
        with redis_errors(f"connecting to {self._settings.describe()}"):
            client.ping()
        client.set_response_callback("XREAD", raw_reply)
        self._redis = client

    def close(self) -> None:
        if self._redis is None:
            return
        with contextlib.suppress(redis.RedisError):  # the reply stream expires on its own
            self._redis.delete(self._reply)
        self._redis.close()
        self._redis = None

    def submit(
        self, model: str, inputs: Any, *, method: str | None = None, timeout_s: float | None = None,
        deadline_ms: int | None = None, ttl_s: int | None = None, request_id: str | None = None,
        priority: int = 1,
    ) -> Handle:
        """Enqueue one request; return its handle at once."""
        return self.submit_many(
            model, [inputs], method=method, timeout_s=timeout_s, deadline_ms=deadline_ms,
            ttl_s=ttl_s, request_ids=[request_id] if request_id else None, priority=priority,
        )[0]

    def submit_many(
        self, model: str, inputs: Iterable[Any], *, method: str | None = None,
        timeout_s: float | None = None, deadline_ms: int | None = None, ttl_s: int | None = None,
        request_ids: Sequence[str] | None = None, priority: int = 1,
    ) -> list[Handle]:
        """Enqueue many requests that share their options, pipelined; QueueFull carries the
        handles that were ``accepted`` before the model's backlog limit was reached."""
        shaper = self._shaper
        head = shaper.head(model, method, ttl_s, priority)
        handles, body = shaper.requests(head, inputs, shaper.deadline(timeout_s, deadline_ms), request_ids)
        if not body:
            return handles
        with redis_errors(f"submitting to model {model!r}"):
            calls = self._plan(model, body)
            commands, starts = planned_commands(head, body, calls)
            replies = self._run_scripts(commands)
        taken: list[int] = []
        refusal: Refusal | None = None
        for call, start in zip(calls, starts, strict=True):
            count, refused = call_outcome(call, replies, start)
            taken += call.indices[:count]
            refusal = refusal or refused
        accepted = [handles[i] for i in sorted(taken)]
        with self._lock:
            self._mine.update(h.id for h in accepted)
        if refusal is not None:
            raise queue_full(model, refusal, accepted)
        return handles

    def _plan(self, model: str, body: list[Any]) -> list[Call]:
        """The enqueue calls of ``body``, after reading the model's partitions and limit again
        from its admission hash when stale."""
        partitions = self._partitions
        if partitions.stale(model):
            reads = Commands()
            Partitions.ask(reads, model)
            partitions.learn(model, reads.send_blocking(self._client()))
        return partitions.plan(model, body)

    def _run_scripts(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """EVALSHA each command; after a NOSCRIPT (a restarted or flushed server), SCRIPT LOAD
        and send again what was refused (no SCRIPT EXISTS per call)."""
        replies = self._execute(commands)
        missing = [i for i, reply in enumerate(replies) if is_noscript(reply)]
        if missing:
            client: Any = self._client()
            client.script_load(ENQUEUE_BATCH_LUA)  # every master on a cluster
            again = self._execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            raise_reply_error(reply)
        return replies

    def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands on one pooled connection in one write (packed here: redis-py's
        packer, hiredis's included, costs more a request) and read their replies (an error
        reply is returned as its exception)."""
        batch = Commands()
        for command in commands:
            batch.add(*command)
        return batch.send_blocking(self._client())

    def cancel(self, handle: Handle) -> None:
        """Ask the manager not to run the request; it answers ``cancelled`` if it had not run."""
        with redis_errors(f"cancelling {handle.id!r}"):
            self._client().set(keys.cancel(handle.id), b"1", ex=handle.ttl_s)

    def outcome(self, handle: Handle, timeout_s: float | None = None) -> Envelope:
        """The full result envelope (``ok``, ``out`` or error, timings, batch)."""
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        for _, envelope in self._completions([handle], timeout):
            return envelope
        raise NosqTimeout(handle.id, timeout)  # pragma: no cover - _completions raises first

    def result(self, handle: Handle, timeout_s: float | None = None) -> Any:
        """The output value; a server-side error raises RemoteError."""
        return value_of(handle, self.outcome(handle, timeout_s))

    def infer(self, model: str, inputs: Any, *, timeout_s: float | None = None, **options: Any) -> Any:
        """Submit and wait; ``timeout_s`` is both the request's deadline and the wait."""
        return self.result(self.submit(model, inputs, timeout_s=timeout_s, **options), timeout_s)

    def gather(self, handles: Sequence[Handle], timeout_s: float | None = None) -> list[Any]:
        """Every output, in order; the first error raises."""
        by_id = dict(self.as_completed(handles, timeout_s))
        return [value_of(h, by_id[h]) for h in handles]

    def as_completed(
        self, handles: Sequence[Handle], timeout_s: float | None = None,
    ) -> Iterator[tuple[Handle, Envelope]]:
        """Yield (handle, envelope) as results arrive; NosqTimeout once ``timeout_s`` is spent."""
        timeout = self._default_timeout_s if timeout_s is None else timeout_s
        return self._completions(handles, timeout)

    def _completions(self, handles: Sequence[Handle], timeout_s: float) -> Iterator[tuple[Handle, Envelope]]:
        waiting = {h.id: h for h in handles}
        deadline = time.monotonic() + timeout_s
        last_check = time.monotonic()
        foreign = [rid for rid in waiting if rid not in self._mine and rid not in self._arrived]
        if foreign:  # submitted elsewhere: its completion never comes to this reply stream
            self._check_result_keys(foreign)
        while waiting:
            for rid in [rid for rid in waiting if rid in self._arrived]:
                handle = waiting.pop(rid)
                self._mine.discard(rid)
                yield handle, unwrap(handle, self._arrived.pop(rid), self._tensors)
            if not waiting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NosqTimeout(next(iter(waiting)), timeout_s)
            if time.monotonic() - last_check >= SAFETY_CHECK_AFTER_S:
                self._check_result_keys(list(waiting))
                last_check = time.monotonic()
                continue
            self._read_replies(set(waiting), min(REPLY_BLOCK_MS, max(1, int(remaining * 1000))))

    def _check_result_keys(self, request_ids: list[str]) -> None:
        """Results whose completions were trimmed, or that came before this producer asked."""
        with redis_errors("reading results"):
            ids = [keys.result(rid) for rid in request_ids[:512]]
            values = get_many_blocking(self._client(), ids)
        for rid, data in zip(request_ids, values, strict=False):
            if data is not None:
                self._arrived[rid] = data

    def _read_replies(self, wanted: set[str], block_ms: int) -> None:
        with self._lock, redis_errors("reading replies"):
            if not wanted.isdisjoint(self._arrived):
                return  # another thread read it while this one waited for the lock
            client = self._client()
            if self._fetch and self._settings.cluster:  # keys on many slots: not in the pipeline
                for rid, data in zip(self._fetch, get_many_blocking(client, [keys.result(r) for r in self._fetch]),
                                     strict=True):
                    if data is not None:
                        self._arrived[rid] = data
                self._fetch = []
            fetch, trim_to = self._fetch, self._trim_to
            if trim_to is None and not fetch:
                response: Any = client.xread({self._reply: self._last_id}, count=REPLY_COUNT, block=block_ms)
            else:
                pipe = client.pipeline(transaction=False)
                if trim_to is not None:
                    pipe.xtrim(self._reply, minid=trim_to, approximate=False)
                if fetch:
                    pipe.mget([keys.result(rid) for rid in fetch])
                # with results to hand over, the read must not block
                pipe.xread({self._reply: self._last_id}, count=REPLY_COUNT, block=None if fetch else block_ms)
                replies = pipe.execute()
                self._trim_to, self._fetch = None, []
                for rid, data in zip(fetch, replies[-2] if fetch else (), strict=True):
                    if data is not None:
                        self._arrived[rid] = data
                response = replies[-1]
            last, notices = read_notices(response)
            if last is None:
                return
            self._last_id = last
            self._trim_to = next_entry_id(last)
            for rid, data in notices:
                if data is not None:
                    self._arrived[rid] = data
                elif rid in self._mine:
                    self._fetch.append(rid)

    def _client(self) -> redis.Redis:
        if self._redis is None:
            raise NosqError("Producer is not started: use `with Producer(...) as producer:`")
        return self._redis
