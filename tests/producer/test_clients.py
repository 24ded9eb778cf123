"""Producer and AsyncProducer against a stand-in manager, on fakeredis and on the real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
import redis
import torch
from producer_fakes import Failure, FakeManager, result_writes
from pydantic import ValidationError

from nosq.producer import (
    AsyncProducer,
    Envelope,
    Handle,
    NosqConnectionError,
    NosqError,
    NosqTimeout,
    Producer,
    ProtocolError,
    QueueFull,
    RedisSettings,
    RemoteError,
    keys,
)
from nosq.producer import aio as producer_aio
from nosq.producer import client as producer_client
from nosq.producer.wire import DEFAULT_TTL_S, encode_envelope, now_ms

UNREACHABLE = RedisSettings(url="redis://127.0.0.1:1/0", connect_timeout_s=1)


def failing(request: Any, inputs: Any) -> Any:
    raise Failure("model_error", f"cannot run on {inputs!r}")


def write_result_only(client: redis.Redis, handle: Handle, out: Any) -> None:
    """A result key with no completion on any reply stream (trimmed, or another producer's)."""
    envelope = encode_envelope(handle.ct, {"v": 1, "id": handle.id, "ok": True, "out": out})
    client.set(keys.result(handle.id), envelope, ex=60)


def limit_backlog(client: redis.Redis, model: str, max_backlog: int, retry_after_ms: int | None) -> None:
    mapping: dict[str, int] = {"max_backlog": max_backlog}
    if retry_after_ms is not None:
        mapping["retry_after_ms"] = retry_after_ms
    client.hset(keys.admission(model), mapping=mapping)


# -- Producer (sync) -----------------------------------------------------------------------------


def test_sync_submit_result(settings: RedisSettings, client: redis.Redis, manager: FakeManager) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with Producer(settings) as p:
        handle = p.submit("echo", {"x": x, "k": 3})
        assert client.xlen(keys.requests("echo")) == 1
        assert manager.serve(client) == 1
        out = p.result(handle, timeout_s=5)
    np.testing.assert_array_equal(out["x"], x)
    assert out["x"].dtype == np.float32
    assert out["k"] == 3


def test_sync_infer_and_outcome(settings: RedisSettings, manager: FakeManager) -> None:
    with Producer(settings, content_type="json") as p, manager.running(settings):
        assert p.infer("echo", [1, "two", None], timeout_s=5) == [1, "two", None]
        handle = p.submit("echo", {"a": 1})
        envelope = p.outcome(handle, timeout_s=5)
    assert isinstance(envelope, Envelope)
    assert (envelope.id, envelope.ok, envelope.out) == (handle.id, True, {"a": 1})
    assert envelope.model == "echo"
    assert envelope.timings["exec_ms"] == 1.0
    assert envelope.batch == {"id": "b1", "size": 1, "reason": "idle"}
    assert envelope.deliveries == 1


def test_sync_submit_many_gather(settings: RedisSettings, client: redis.Redis, manager: FakeManager) -> None:
    with Producer(settings) as p:
        handles = p.submit_many("echo", ({"i": i} for i in range(50)))
        assert len({h.id for h in handles}) == 50
        manager.serve(client, reverse=True)
        outs = p.gather(handles, timeout_s=5)
    assert outs == [{"i": i} for i in range(50)]


def test_sync_as_completed_any_order(settings: RedisSettings, client: redis.Redis, manager: FakeManager) -> None:
    with Producer(settings) as p:
        handles = p.submit_many("echo", range(10))
        manager.serve(client, reverse=True)
        got = list(p.as_completed(handles, timeout_s=5))
    assert sorted(h.id for h, _ in got) == sorted(h.id for h in handles)
    for handle, envelope in got:
        assert envelope.id == handle.id
        assert envelope.out == handles.index(handle)


def test_sync_error_envelope(settings: RedisSettings, client: redis.Redis) -> None:
    manager = FakeManager(handler=failing)
    with Producer(settings) as p:
        first, second = p.submit_many("echo", [7, 8])
        manager.serve(client)
        envelope = p.outcome(first, timeout_s=5)
        assert (envelope.ok, envelope.code, envelope.message) == (False, "model_error", "cannot run on 7")
        assert envelope.out is None
        with pytest.raises(RemoteError) as info:
            p.result(second, timeout_s=5)
    assert (info.value.request_id, info.value.code, info.value.message) == (second.id, "model_error",
                                                                            "cannot run on 8")
    assert isinstance(info.value, NosqError)


def test_sync_gather_raises_first_error(settings: RedisSettings, client: redis.Redis) -> None:
    manager = FakeManager(handler=lambda r, x: failing(r, x) if x == 3 else x)
    with Producer(settings) as p:
        handles = p.submit_many("echo", range(5))
        manager.serve(client)
        with pytest.raises(RemoteError, match="cannot run on 3"):
            p.gather(handles, timeout_s=5)


def test_sync_timeout(settings: RedisSettings) -> None:
    with Producer(settings) as p:
        handle = p.submit("echo", 1)
        started = time.monotonic()
        with pytest.raises(NosqTimeout) as info:
            p.result(handle, timeout_s=0.3)
        assert 0.25 <= time.monotonic() - started < 1.5
        with pytest.raises(NosqTimeout):
            list(p.as_completed([handle], timeout_s=0.1))
    assert (info.value.request_id, info.value.timeout_s) == (handle.id, 0.3)
    assert "0.3 s" in str(info.value)


def test_sync_cancel(settings: RedisSettings, client: redis.Redis) -> None:
    with Producer(settings) as p:
        handle = p.submit("echo", 1, ttl_s=120)
        p.cancel(handle)
    assert client.get(keys.cancel(handle.id)) == b"1"
    assert 0 < client.ttl(keys.cancel(handle.id)) <= 120


def test_sync_request_fields(settings: RedisSettings, client: redis.Redis, manager: FakeManager) -> None:
    with Producer(settings) as p:
        plain = p.submit("echo", 1)
        named = p.submit("echo", 1, request_id="order-42:item.7")
        before = now_ms()
        timed = p.submit("echo", 1, timeout_s=5, ttl_s=30, method="embed", priority=0)
        dated = p.submit("echo", 1, deadline_ms=before + 60_000)
        manager.serve(client)
        p.gather([plain, named, timed, dated], timeout_s=5)
    fields = manager.fields
    assert named.id == "order-42:item.7"
    assert set(fields[plain.id]) == {b"v", b"id", b"ct", b"p", b"reply"}
    assert fields[plain.id][b"v"] == b"1"
    assert fields[plain.id][b"ct"] == b"msgpack"
    assert plain.ttl_s == DEFAULT_TTL_S and plain.deadline_ms is None
    assert before + 5000 <= int(fields[timed.id][b"dl"]) <= now_ms() + 5000
    assert timed.deadline_ms == int(fields[timed.id][b"dl"])
    assert fields[timed.id][b"ttl"] == b"30" and timed.ttl_s == 30
    assert fields[timed.id][b"method"] == b"embed"
    assert fields[timed.id][b"prio"] == b"0"
    assert fields[dated.id][b"dl"] == str(before + 60_000).encode()
    # every request of one producer names the same reply stream
    assert len({f[b"reply"] for f in fields.values()}) == 1


def test_sync_rejects_bad_arguments(settings: RedisSettings) -> None:
    with Producer(settings) as p:
        with pytest.raises(ProtocolError, match="either timeout_s or deadline_ms"):
            p.submit("echo", 1, timeout_s=1, deadline_ms=now_ms())
        with pytest.raises(ProtocolError, match="timeout_s must be > 0"):
            p.submit("echo", 1, timeout_s=0)
        with pytest.raises(ProtocolError, match="model id"):
            p.submit("no/such{model}", 1)
        with pytest.raises(ProtocolError, match="request id"):
            p.submit("echo", 1, request_id="has space")
        with pytest.raises(ProtocolError, match="cannot encode"):
            p.submit("echo", object())


def test_sync_torch(settings: RedisSettings, client: redis.Redis, manager: FakeManager) -> None:
    x = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    with Producer(settings, tensors="torch") as p:
        handle = p.submit("echo", {"x": x, "xs": [x.float()]})
        manager.serve(client)
        out = p.result(handle, timeout_s=5)
    assert isinstance(out["x"], torch.Tensor) and isinstance(out["xs"][0], torch.Tensor)
    assert torch.equal(out["x"], x)
    assert torch.equal(out["xs"][0], x.float())
    out["x"] += 1  # a writable tensor that owns its memory


def test_sync_queue_full(settings: RedisSettings, client: redis.Redis) -> None:
    limit_backlog(client, "echo", 2, 250)
    with Producer(settings) as p:
        p.submit_many("echo", [1, 2])
        with pytest.raises(QueueFull) as info:
            p.submit("echo", 3)
        assert (info.value.model, info.value.backlog, info.value.retry_after_s) == ("echo", 2, 0.25)
        assert "retry after 0.25 s" in str(info.value)
        client.delete(keys.requests("echo"))
        with pytest.raises(QueueFull) as many:
            p.submit_many("echo", [1, 2, 3, 4])
        client.hdel(keys.admission("echo"), "retry_after_ms")
        with pytest.raises(QueueFull) as no_hint:
            p.submit("echo", 5)
    assert [h.id for h in many.value.accepted] == [  # type: ignore[attr-defined]
        fields[b"id"].decode() for _, fields in client.xrange(keys.requests("echo"))
    ]
    assert len(many.value.accepted) == 2  # type: ignore[attr-defined]
    assert no_hint.value.retry_after_s is None
    assert client.xlen(keys.requests("echo")) == 2


def test_sync_result_key_without_completion(settings: RedisSettings, client: redis.Redis,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety check finds results whose completion never reached the reply stream."""
    assert producer_client.SAFETY_CHECK_AFTER_S == 2.0
    monkeypatch.setattr(producer_client, "SAFETY_CHECK_AFTER_S", 0.3)
    monkeypatch.setattr(producer_client, "REPLY_BLOCK_MS", 100)
    with Producer(settings) as p:
        handle = p.submit("echo", 1)
        write_result_only(client, handle, "late")
        started = time.monotonic()
        assert p.result(handle, timeout_s=5) == "late"
        assert 0.3 <= time.monotonic() - started < 1.5
        other = Handle(id="made-elsewhere", model="echo", ct="msgpack", deadline_ms=None, ttl_s=60)
        write_result_only(client, other, "theirs")
        assert p.result(other, timeout_s=5) == "theirs"


def test_sync_stored_result_is_read_at_once(fake_settings: RedisSettings,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_client, "SAFETY_CHECK_AFTER_S", 1.0)
    client = fake_settings.client()
    other = Handle(id="made-elsewhere", model="echo", ct="msgpack", deadline_ms=None, ttl_s=60)
    write_result_only(client, other, "theirs")
    with Producer(fake_settings) as p:
        started = time.monotonic()
        assert p.result(other, timeout_s=5) == "theirs"
    assert time.monotonic() - started < 0.5


@pytest.mark.integration
def test_sync_reply_stream_is_trimmed_and_deleted(redis_db: RedisSettings, manager: FakeManager) -> None:
    client = redis_db.client()
    with Producer(redis_db) as p:
        for _ in range(3):
            handles = p.submit_many("echo", range(200))
            manager.serve(client)
            p.gather(handles, timeout_s=5)
        reply = keys.reply(manager.seen[0].reply or "")
        assert client.xlen(reply) <= 200  # MINID ~ trims whole nodes, so some stay
    assert not client.exists(reply)
    client.close()


def test_sync_connection_refused() -> None:
    producer = Producer(UNREACHABLE)
    with pytest.raises(NosqConnectionError, match=r"127\.0\.0\.1:1"):
        producer.start()
    with pytest.raises(NosqConnectionError), Producer(UNREACHABLE):
        pass


def test_sync_lifecycle_misuse(settings: RedisSettings) -> None:
    producer = Producer(settings)
    with pytest.raises(NosqError, match="not started"):
        producer.submit("echo", 1)
    producer.start()
    with pytest.raises(NosqError, match="called twice"):
        producer.start()
    producer.close()
    producer.close()  # closing twice is harmless
    with pytest.raises(NosqError, match="not started"):
        producer.submit("echo", 1)


def test_sync_threads_share_one_producer(settings: RedisSettings, manager: FakeManager) -> None:
    results: dict[int, Any] = {}

    def work(p: Producer, n: int) -> None:
        results[n] = p.infer("echo", n, timeout_s=10)

    with Producer(settings) as p, manager.running(settings):
        threads = [threading.Thread(target=work, args=(p, n)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    assert results == {n: n for n in range(4)}


@pytest.mark.integration
def test_sync_threads_completed_in_one_batch_wake_at_once(redis_db: RedisSettings,
                                                          manager: FakeManager) -> None:
    client = redis_db.client()
    latency: dict[str, float] = {}
    with Producer(redis_db) as p:
        handles = p.submit_many("echo", range(3))

        def wait(handle: Handle) -> None:
            p.result(handle, timeout_s=5)
            latency[handle.id] = time.monotonic()

        threads = [threading.Thread(target=wait, args=(h,)) for h in handles]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # every thread is waiting
        served = time.monotonic()
        manager.serve(client)  # one pipeline, like a manager writing a batch
        for thread in threads:
            thread.join(10)
    client.close()
    assert max(latency.values()) - served < 0.5


def test_sync_start_can_be_retried() -> None:
    producer = Producer(UNREACHABLE)
    for _ in range(2):
        with pytest.raises(NosqConnectionError):
            producer.start()


# -- AsyncProducer -------------------------------------------------------------------------------


async def test_async_submit_result(settings: RedisSettings, manager: FakeManager) -> None:
    x = np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 4)
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", {"x": x})
        await manager.aserve(p._client())
        out = await p.result(handle, timeout_s=5)
    np.testing.assert_array_equal(out["x"], x)


async def test_async_infer_and_outcome(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings, content_type="json") as p, manager.arunning(settings):
        assert await p.infer("echo", {"q": [1.5, None]}, timeout_s=5) == {"q": [1.5, None]}
        outs = await asyncio.gather(*(p.infer("echo", i, timeout_s=5) for i in range(20)))
        handle = await p.submit("echo", "hi")
        envelope = await p.outcome(handle, timeout_s=5)
    assert outs == list(range(20))
    assert (envelope.id, envelope.ok, envelope.out, envelope.model) == (handle.id, True, "hi", "echo")
    assert envelope.timings["queued_ms"] == 0.5


async def test_async_more_callers_than_connections_wait(redis_db: RedisSettings, manager: FakeManager) -> None:
    """200 coroutines through a pool of 2 connections: each waits for one, none fails."""
    narrow = redis_db.model_copy(update={"max_connections": 2})
    async with AsyncProducer(narrow) as p, manager.arunning(redis_db):
        outs = await asyncio.gather(*(p.infer("echo", i, timeout_s=10) for i in range(200)))
    assert outs == list(range(200))


def test_sync_more_threads_than_connections_wait(redis_db: RedisSettings) -> None:
    """16 threads on a pool of 1 connection: calls queue for it instead of failing."""
    narrow = redis_db.model_copy(update={"max_connections": 1})
    with Producer(narrow) as p:
        threads = [threading.Thread(target=lambda: [p.submit("echo", i) for i in range(20)]) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert redis_db.client().xlen(keys.requests("echo")) == 16 * 20


async def test_async_submit_many_gather(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p:
        handles = await p.submit_many("echo", ([i, str(i)] for i in range(50)))
        await manager.aserve(p._client(), reverse=True)
        outs = await p.gather(handles, timeout_s=5)
    assert outs == [[i, str(i)] for i in range(50)]


async def test_async_as_completed_any_order(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p:
        handles = await p.submit_many("echo", range(10))
        await manager.aserve(p._client(), reverse=True)
        got = [pair async for pair in p.as_completed(handles, timeout_s=5)]
    assert sorted(h.id for h, _ in got) == sorted(h.id for h in handles)
    for handle, envelope in got:
        assert envelope.id == handle.id
        assert envelope.out == handles.index(handle)


async def test_async_error_envelope(settings: RedisSettings) -> None:
    manager = FakeManager(handler=failing)
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", "bad")
        await manager.aserve(p._client())
        envelope = await p.outcome(handle, timeout_s=5)
        assert (envelope.ok, envelope.code, envelope.message) == (False, "model_error", "cannot run on 'bad'")
        with pytest.raises(RemoteError) as info:
            await p.result(handle, timeout_s=5)
    assert (info.value.request_id, info.value.code) == (handle.id, "model_error")
    assert info.value.message == "cannot run on 'bad'"


async def test_async_timeout(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", 1)
        started = time.monotonic()
        with pytest.raises(NosqTimeout) as info:
            await p.result(handle, timeout_s=0.3)
        assert 0.25 <= time.monotonic() - started < 1.5
        assert (info.value.request_id, info.value.timeout_s) == (handle.id, 0.3)
        with pytest.raises(NosqTimeout):
            [pair async for pair in p.as_completed([handle], timeout_s=0.1)]
        # the request is still awaitable after a timeout
        await manager.aserve(p._client())
        assert await p.result(handle, timeout_s=5) == 1


async def test_async_cancel(settings: RedisSettings, client: redis.Redis) -> None:
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", 1, ttl_s=90)
        await p.cancel(handle)
    assert client.get(keys.cancel(handle.id)) == b"1"
    assert 0 < client.ttl(keys.cancel(handle.id)) <= 90


async def test_async_request_fields(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p:
        named = await p.submit("echo", 1, request_id="job-1")
        before = now_ms()
        timed = await p.submit("echo", 1, timeout_s=2.5, ttl_s=45, method="score", priority=2)
        dated = (await p.submit_many("echo", [1], deadline_ms=before + 1000, request_ids=["many-1"]))[0]
        await manager.aserve(p._client())
        await p.gather([named, timed, dated], timeout_s=5)
    fields = manager.fields
    assert named.id == "job-1" and dated.id == "many-1"
    assert b"dl" not in fields["job-1"] and b"ttl" not in fields["job-1"]
    assert before + 2500 <= int(fields[timed.id][b"dl"]) <= now_ms() + 2500
    assert fields[timed.id][b"ttl"] == b"45"
    assert fields[timed.id][b"method"] == b"score"
    assert fields[timed.id][b"prio"] == b"2"
    assert fields["many-1"][b"dl"] == str(before + 1000).encode()
    with pytest.raises(ProtocolError, match="either timeout_s or deadline_ms"):
        await p.submit("echo", 1, timeout_s=1, deadline_ms=before)


async def test_async_torch(settings: RedisSettings, manager: FakeManager) -> None:
    x = torch.rand(4, 5)
    async with AsyncProducer(settings, tensors="torch") as p:
        handle = await p.submit("echo", [x, {"mask": x > 0.5}])
        await manager.aserve(p._client())
        out = await p.result(handle, timeout_s=5)
    assert torch.equal(out[0], x)
    assert out[1]["mask"].dtype == torch.bool and torch.equal(out[1]["mask"], x > 0.5)


async def test_async_queue_full(settings: RedisSettings, client: redis.Redis) -> None:
    limit_backlog(client, "echo", 2, 250)
    async with AsyncProducer(settings) as p:
        await p.submit("echo", 1)
        await p.submit("echo", 2)
        with pytest.raises(QueueFull) as info:
            await p.submit("echo", 3)
        assert (info.value.backlog, info.value.retry_after_s) == (2, 0.25)
        client.delete(keys.requests("echo"))
        with pytest.raises(QueueFull) as many:
            await p.submit_many("echo", [1, 2, 3, 4])
        accepted = many.value.accepted  # type: ignore[attr-defined]
        assert len(accepted) == 2
        assert set(p._waiters) >= {h.id for h in accepted}
        assert len(p._waiters) == 4  # the two refused requests are not waited for
    assert [h.id for h in accepted] == [f[b"id"].decode() for _, f in client.xrange(keys.requests("echo"))]


async def test_async_result_key_without_completion(settings: RedisSettings, client: redis.Redis,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert (producer_aio.SAFETY_CHECK_AFTER_S, producer_aio.REPLY_BLOCK_MS) == (2.0, 1000)
    monkeypatch.setattr(producer_aio, "SAFETY_CHECK_AFTER_S", 0.3)
    monkeypatch.setattr(producer_aio, "REPLY_BLOCK_MS", 100)  # the check runs after an idle read
    async with AsyncProducer(settings) as p:
        other = Handle(id="made-elsewhere", model="echo", ct="msgpack", deadline_ms=None, ttl_s=60)
        write_result_only(client, other, "theirs")
        started = time.monotonic()
        assert await p.result(other, timeout_s=5) == "theirs"  # unknown handle: read at once
        assert time.monotonic() - started < 0.5
        handle = await p.submit("echo", 1)
        write_result_only(client, handle, "late")
        assert await p.result(handle, timeout_s=5) == "late"  # known handle: the safety check


@pytest.mark.integration
async def test_async_many_waits_few_connections(redis_db: RedisSettings, manager: FakeManager) -> None:
    client = redis_db.client()

    def connections() -> int:
        return sum(1 for c in client.client_list() if c["db"] == "9")

    async with AsyncProducer(redis_db) as p:
        handles = await p.submit_many("echo", range(500))
        waits = [asyncio.ensure_future(p.result(h, timeout_s=10)) for h in handles]
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in waits)
        in_flight = connections()
        async with manager.arunning(redis_db):
            outs = await asyncio.gather(*waits)
            results = await asyncio.gather(*(p.infer("echo", i, timeout_s=10) for i in range(500)))
    assert in_flight < 10
    assert outs == list(range(500)) and results == list(range(500))
    client.close()


async def test_async_connection_refused() -> None:
    producer = AsyncProducer(UNREACHABLE)
    with pytest.raises(NosqConnectionError, match=r"127\.0\.0\.1:1"):
        await producer.start()
    await producer.aclose()


async def test_async_lifecycle_misuse(settings: RedisSettings) -> None:
    producer = AsyncProducer(settings)
    with pytest.raises(NosqError, match="not started"):
        await producer.submit("echo", 1)
    await producer.start()
    with pytest.raises(NosqError, match="called twice"):
        await producer.start()
    await producer.aclose()
    await producer.aclose()


async def test_async_aclose_ends_pending_waits(settings: RedisSettings) -> None:
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", 1)
        wait = asyncio.ensure_future(p.result(handle, timeout_s=10))
        await asyncio.sleep(0.05)
    with pytest.raises(NosqError, match="closed before the result arrived"):
        await wait
    assert wait.done()


async def test_async_reader_survives_connection_error(settings: RedisSettings, manager: FakeManager,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_aio, "RECONNECT_DELAY_S", 0.01)
    async with AsyncProducer(settings) as p:
        redis_client = p._client()
        real_pipeline = redis_client.pipeline
        calls = 0

        def flaky_pipeline(*args: Any, **kwargs: Any) -> Any:  # the read that carries the XTRIM
            pipe = real_pipeline(*args, **kwargs)
            real_execute = pipe.execute

            async def execute(*a: Any, **k: Any) -> Any:
                nonlocal calls
                if any(args[0] == "XREAD" for args, _ in pipe.command_stack):
                    calls += 1
                    if calls == 1:
                        raise redis.ConnectionError("connection dropped")
                return await real_execute(*a, **k)

            pipe.execute = execute  # type: ignore[method-assign]
            return pipe

        monkeypatch.setattr(redis_client, "pipeline", flaky_pipeline)
        first = await p.submit("echo", 1)
        await manager.aserve(redis_client)
        assert await p.result(first, timeout_s=5) == 1
        second = await p.submit("echo", 2)
        await manager.aserve(redis_client)
        assert await p.result(second, timeout_s=1) == 2
    assert calls >= 2  # the failed read was retried


async def test_async_safety_check_runs_under_load(settings: RedisSettings, client: redis.Redis,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_aio, "SAFETY_CHECK_AFTER_S", 0.2)
    monkeypatch.setattr(producer_aio, "REPLY_BLOCK_MS", 300)
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", 1)
        write_result_only(client, handle, "lost completion")
        other = Handle(id="other", model="echo", ct="msgpack", deadline_ms=None, ttl_s=60)
        envelope = encode_envelope("msgpack", {"v": 1, "id": "other", "ok": True})

        async def traffic() -> None:  # completions of other requests keep arriving
            while True:
                pipe = p._client().pipeline(transaction=False)
                for name, args, kwargs in result_writes(other.id, 60, p._client_id, envelope):
                    getattr(pipe, name)(*args, **kwargs)
                await pipe.execute()
                await asyncio.sleep(0.05)

        task = asyncio.create_task(traffic())
        try:
            assert await p.result(handle, timeout_s=1.5) == "lost completion"
        finally:
            task.cancel()


# -- settings ------------------------------------------------------------------------------------


def test_settings_url_scheme() -> None:
    with pytest.raises(ValidationError, match=r"redis://, rediss://, unix://, redis\+cluster:// or rediss\+cluster://"):
        RedisSettings(url="http://127.0.0.1:6379")
    with pytest.raises(ValidationError):
        RedisSettings(url="127.0.0.1:6379")
    with pytest.raises(ValidationError):
        RedisSettings(unknown_option=1)  # type: ignore[call-arg]
    tls = RedisSettings(url="rediss://cache.example:6380/0", ssl_ca_file="/etc/ca.pem")
    assert tls.tls and not RedisSettings().tls
    pool = tls.client().connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert RedisSettings(url="unix:///run/redis.sock").describe() == "unix:///run/redis.sock"


def test_settings_describe_hides_password() -> None:
    settings = RedisSettings(url="redis://app:hunter2@cache.example:6380/3", password="s3cret")
    assert settings.describe() == "redis://cache.example:6380"
    assert "hunter2" not in settings.describe()
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert settings.client().connection_pool.connection_kwargs["db"] == 3


def test_settings_db_applies_without_url_db() -> None:
    settings = RedisSettings(url="redis://127.0.0.1:6379", db=9, username="u", password="p")
    kwargs = settings.client().connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (9, "u", "p")


def test_settings_db_overrides_url() -> None:
    settings = RedisSettings(db=9, password="kw")  # the default URL ends in /0
    assert settings.client().connection_pool.connection_kwargs["db"] == 9
    assert settings.async_client().connection_pool.connection_kwargs["db"] == 9
