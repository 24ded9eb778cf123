"""The client's hot path: coalesced submits, the batch enqueue script, EVALSHA and NOSCRIPT,
reply notices with and without the envelope, XTRIM folded into reads, timers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio
from producer_fakes import FakeManager

from nosq.producer import AsyncProducer, Handle, NosqTimeout, Producer, QueueFull, RedisSettings, keys
from nosq.producer import aio as producer_aio
from nosq.producer import client as producer_client
from nosq.producer import enqueue as producer_enqueue
from nosq.producer.codec import decode_envelope_value, decode_value, encode_value
from nosq.producer.enqueue import (
    ENQUEUE_BATCH_LUA,
    ENQUEUE_BATCH_SHA,
    ENQUEUE_CHUNK,
    ENQUEUE_CHUNK_BYTES,
    ENQUEUE_LUA,
    ENQUEUE_MANY_LUA,
    PLAIN_XADD_BYTES,
    Call,
    Shaper,
    enqueue_commands,
    next_entry_id,
    plan_calls,
    read_notices,
)
from nosq.producer.resp import pack_command
from nosq.producer.wire import encode_envelope, now_ms

REQ = keys.requests("echo")
ADMISSION = keys.admission("echo")


def limit_backlog(client: redis.Redis, model: str, max_backlog: int, retry_after_ms: int) -> None:
    client.hset(keys.admission(model), mapping={"max_backlog": max_backlog, "retry_after_ms": retry_after_ms})


async def spy_round_trips(p: AsyncProducer, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[Any, ...]]]:
    """Every enqueue round trip the producer makes: the list of commands sent in it (the script
    is loaded first, so that no NOSCRIPT retry counts)."""
    await p._client().script_load(ENQUEUE_BATCH_LUA)
    trips: list[list[tuple[Any, ...]]] = []
    real = p._execute

    async def spy(commands: list[tuple[Any, ...]]) -> list[Any]:
        trips.append(commands)
        return await real(commands)

    monkeypatch.setattr(p, "_execute", spy)
    return trips


def commandstats(client: redis.Redis, name: str) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


def _calls_or_none(client: redis.Redis, name: str) -> int | None:
    """``commandstats``, or None on fakeredis (no INFO)."""
    try:
        return commandstats(client, name)
    except redis.ResponseError:
        return None


# -- coalescing ----------------------------------------------------------------------------------


async def test_concurrent_submits_go_in_one_script_call_with_their_own_deadlines(
        settings: RedisSettings, manager: FakeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    async with AsyncProducer(settings) as p:
        trips = await spy_round_trips(p, monkeypatch)
        before = now_ms()
        handles = await asyncio.gather(
            p.submit("echo", 0, timeout_s=1), p.submit("echo", 1, timeout_s=5), p.submit("echo", 2, timeout_s=30),
            p.submit("echo", 3), p.submit("echo", 4, deadline_ms=before + 12_345),
            p.submit_many("echo", [5, 6], timeout_s=2),
        )
        after = now_ms()
        assert len(trips) == 1 and len(trips[0]) == 1  # one round trip, one EVALSHA
        assert trips[0][0][:2] == ("EVALSHA", ENQUEUE_BATCH_SHA)
        flat: list[Handle] = [*handles[:5], *handles[5]]  # type: ignore[list-item]
        await manager.aserve(p._client())
        fields = manager.fields
        for handle, timeout in zip(flat[:3], (1, 5, 30), strict=True):
            dl = int(fields[handle.id][b"dl"])
            assert before + timeout * 1000 <= dl <= after + timeout * 1000
            assert handle.deadline_ms == dl
        assert b"dl" not in fields[flat[3].id] and flat[3].deadline_ms is None
        assert fields[flat[4].id][b"dl"] == str(before + 12_345).encode()
        assert fields[flat[5].id][b"dl"] == fields[flat[6].id][b"dl"]
        assert await p.gather(flat, timeout_s=5) == list(range(7))
    # the entries are in the stream in the callers' order
    assert [r.id for r in manager.seen] == [h.id for h in flat]


async def test_concurrent_infers_keep_their_deadlines(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p, manager.arunning(settings):
        before = now_ms()
        outs = await asyncio.gather(p.infer("echo", "a", timeout_s=2), p.infer("echo", "b", timeout_s=9),
                                    p.infer("echo", "c"))
    assert outs == ["a", "b", "c"]
    by_value = {decode_value(r.ct, r.payload): r for r in manager.seen}
    assert before + 2000 <= (by_value["a"].deadline_ms or 0) < before + 3000
    assert before + 9000 <= (by_value["b"].deadline_ms or 0) < before + 10_000
    assert by_value["c"].deadline_ms is None


async def test_several_models_and_options_in_one_round_trip(settings: RedisSettings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    other = FakeManager("other")
    echo = FakeManager("echo")
    async with AsyncProducer(settings) as p:
        trips = await spy_round_trips(p, monkeypatch)
        a, b, c = await asyncio.gather(p.submit("echo", 1), p.submit("other", 2),
                                       p.submit("echo", 3, ttl_s=30, method="embed", priority=0))
        assert len(trips) == 1 and len(trips[0]) == 3  # three script calls, one pipeline
        await echo.aserve(p._client())
        await other.aserve(p._client())
        assert await p.gather([a, b, c], timeout_s=5) == [1, 2, 3]
    assert echo.fields[c.id][b"ttl"] == b"30" and echo.fields[c.id][b"method"] == b"embed"
    assert echo.fields[c.id][b"prio"] == b"0" and b"ttl" not in echo.fields[a.id]
    assert [r.id for r in other.seen] == [b.id]


async def test_a_script_call_is_bounded(settings: RedisSettings, manager: FakeManager,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_enqueue, "ENQUEUE_CHUNK", 40)
    async with AsyncProducer(settings) as p:
        trips = await spy_round_trips(p, monkeypatch)
        handles = await p.submit_many("echo", range(100))
        assert [len(trip) for trip in trips] == [3]  # 40 + 40 + 20, one pipeline
        await manager.aserve(p._client())
        assert await p.gather(handles, timeout_s=5) == list(range(100))


def _runs(calls: list[Call]) -> list[tuple[int, int]]:
    assert all(isinstance(call.indices, range) and call.tag == "m" for call in calls)
    return [(call.indices[0], call.indices[-1] + 1) for call in calls]


def test_plan_calls_bounds_count_and_bytes() -> None:
    small = [x for i in range(2 * ENQUEUE_CHUNK + 5) for x in (str(i), b"p", b"")]
    assert _runs(plan_calls(small, ["m"])) == [(0, ENQUEUE_CHUNK), (ENQUEUE_CHUNK, 2 * ENQUEUE_CHUNK),
                                               (2 * ENQUEUE_CHUNK, 2 * ENQUEUE_CHUNK + 5)]
    third = b"x" * (ENQUEUE_CHUNK_BYTES // 3 + 1)
    big = [x for i in range(5) for x in (str(i), third, b"")]
    assert _runs(plan_calls(big, ["m"])) == [(0, 2), (2, 4), (4, 5)]
    huge = [x for i in range(2) for x in (str(i), b"x" * (ENQUEUE_CHUNK_BYTES + 1), b"")]
    assert _runs(plan_calls(huge, ["m"])) == [(0, 1), (1, 2)]  # a request larger than the bound goes alone
    assert plan_calls([], ["m"]) == []


def test_plan_calls_spread_requests_over_partitions_by_id() -> None:
    tags = keys.partition_tags("m", 3)
    body = [x for i in range(3000) for x in (f"id{i}", b"p", b"")]
    calls = plan_calls(body, tags)
    seen = sorted(i for call in calls for i in call.indices)
    assert seen == list(range(3000))  # every request in exactly one call
    for call in calls:
        assert len(call.indices) <= ENQUEUE_CHUNK
        assert list(call.indices) == sorted(call.indices)  # in submit order within a partition
        assert {tags[keys.partition_of(body[3 * i], 3)] for i in call.indices} == {call.tag}
    per_tag = {tag: sum(len(c.indices) for c in calls if c.tag == tag) for tag in tags}
    assert min(per_tag.values()) > 800  # an even spread of 3000 random ids: ~1000 each
    (command,) = enqueue_commands(Shaper("msgpack", None).head("m", None, None, 1), body, calls[0])
    assert command[3:5] == (keys.requests(calls[0].tag), keys.admission(calls[0].tag))


def test_partition_tags_land_on_distinct_thirds_of_the_slot_range() -> None:
    from redis.crc import key_slot
    for model in ("mlp", "cnn", "a", "embed-1"):
        tags = keys.partition_tags(model, 3)
        assert tags[0] == model and len(set(tags)) == 3
        assert len({key_slot(t.encode()) * 3 // 16384 for t in tags}) == 3
        assert keys.published_tags(model, " ".join(tags).encode()) == tags
    assert keys.partition_tags("mlp", 1) == ["mlp"]
    assert keys.published_tags("mlp", None) == ["mlp"]
    assert keys.published_tags("mlp", b"other other~1") == ["mlp"]  # not this model's: ignored
    assert keys.partition_of("abc", 1) == 0
    assert keys.model_of_tag("mlp~7") == "mlp"


def test_plain_xadds_only_without_a_limit_and_for_large_payloads() -> None:
    big = b"x" * PLAIN_XADD_BYTES
    body = [x for i in range(4) for x in (f"id{i}", big, b"" if i % 2 else b"123")]
    assert [c.plain for c in plan_calls(body, ["m"], limited=False)] == [True]
    assert [c.plain for c in plan_calls(body, ["m"], limited=True)] == [False]  # the script checks the limit
    small = [x for i in range(4) for x in (f"id{i}", b"p", b"")]
    assert [c.plain for c in plan_calls(small, ["m"], limited=False)] == [False]  # one call beats n XADDs
    head = Shaper("msgpack", "r1").head("m", None, 30, 0)
    commands = enqueue_commands(head, body, plan_calls(body, ["m"], limited=False)[0])
    assert [c[:3] for c in commands] == [("XADD", keys.requests("m"), "*")] * 4
    assert commands[0][3:9] == (b"id", "id0", b"p", big, b"dl", b"123")  # the fields the script writes
    assert commands[1][3:7] == (b"id", "id1", b"p", big) and b"dl" not in commands[1]
    assert commands[0][9:] == tuple(head.argv[1:]) == commands[1][7:]


@pytest.mark.parametrize("limit", [None, 3])
async def test_large_payloads_enqueue_alike_with_or_without_a_limit(
    settings: RedisSettings, client: redis.Redis, manager: FakeManager, limit: int | None,
) -> None:
    """Without a limit large payloads go as plain XADDs, with one through the script (which
    refuses past it); either way the entries are the ones the script writes and are served."""
    if limit is not None:
        limit_backlog(client, "echo", limit, 100)
    large = [np.full(PLAIN_XADD_BYTES // 4, i, dtype=np.float32) for i in range(5)]
    async with AsyncProducer(settings) as p:
        evals = _calls_or_none(client, "evalsha")
        small = await p.submit("echo", 1.5, timeout_s=30)
        try:
            handles = await p.submit_many("echo", large, timeout_s=30)
        except QueueFull as full:
            assert limit is not None and len(full.accepted) == limit - 1
            handles = full.accepted
        else:
            assert limit is None
        fields = [sorted(f) for _, f in client.xrange(REQ)]
        assert fields == [sorted(fields[0])] * len(fields) and b"dl" in fields[0]
        if evals is not None:  # the small request through the script; the large ones too only with a limit
            assert commandstats(client, "evalsha") - evals == (1 if limit is None else 2)
        await manager.aserve(p._client())
        outs = await p.gather([small, *handles], timeout_s=10)
    assert outs[0] == 1.5
    for out, x in zip(outs[1:], large, strict=False):
        np.testing.assert_array_equal(out, x)


# -- QueueFull per request -----------------------------------------------------------------------


async def test_queue_full_for_part_of_a_coalesced_flush(settings: RedisSettings, client: redis.Redis) -> None:
    limit_backlog(client, "echo", 3, 250)
    async with AsyncProducer(settings) as p:
        results = await asyncio.gather(*(p.submit("echo", i) for i in range(5)), return_exceptions=True)
        accepted = [r for r in results if isinstance(r, Handle)]
        refused = [r for r in results if isinstance(r, QueueFull)]
        assert results[:3] == accepted and len(refused) == 2  # in the callers' order
        for exc in refused:
            assert (exc.model, exc.backlog, exc.retry_after_s, exc.accepted) == ("echo", 3, 0.25, [])
        assert set(p._waiters) == {h.id for h in accepted}  # refused requests are not waited for
        client.delete(REQ)
        many, one = await asyncio.gather(p.submit_many("echo", ["a", "b", "c", "d"]), p.submit("echo", "e"),
                                         return_exceptions=True)
        assert isinstance(many, QueueFull) and len(many.accepted) == 3
        assert isinstance(one, QueueFull) and one.accepted == []
    assert [f[b"id"].decode() for _, f in client.xrange(REQ)] == [h.id for h in many.accepted]


async def test_infer_refused_in_a_flush_raises_queue_full_alone(settings: RedisSettings, client: redis.Redis,
                                                                manager: FakeManager) -> None:
    limit_backlog(client, "echo", 2, 100)
    async with AsyncProducer(settings) as p:
        tasks = [asyncio.ensure_future(p.infer("echo", i, timeout_s=5)) for i in range(4)]
        await asyncio.sleep(0.2)
        assert [t.done() for t in tasks] == [False, False, True, True]
        for task in tasks[2:]:
            with pytest.raises(QueueFull) as info:
                task.result()
            assert (info.value.backlog, info.value.retry_after_s) == (2, 0.1)
        await manager.aserve(p._client())
        assert await asyncio.gather(*tasks[:2]) == [0, 1]
        assert not p._waiters


# -- EVALSHA, NOSCRIPT ---------------------------------------------------------------------------


async def test_async_recovers_after_script_flush(redis_db: RedisSettings, manager: FakeManager) -> None:
    client = redis_db.client()
    async with AsyncProducer(redis_db) as p:
        first = await p.submit("echo", 1)
        assert client.script_exists(ENQUEUE_BATCH_SHA) == [True]
        exists = commandstats(client, "script|exists")
        for i in range(5):
            await p.submit("echo", i)
        assert commandstats(client, "script|exists") == exists  # EVALSHA alone, no SCRIPT EXISTS per call
        client.script_flush()
        assert client.script_exists(ENQUEUE_BATCH_SHA) == [False]
        second, other = await asyncio.gather(p.submit("echo", 2), p.submit("other", 3))  # a pipeline of two
        assert client.script_exists(ENQUEUE_BATCH_SHA) == [True]
        client.script_flush()
        task = asyncio.ensure_future(p.infer("echo", 4, timeout_s=5))  # infer's path recovers too
        await asyncio.sleep(0.2)
        assert client.xlen(REQ) == 8
        await manager.aserve(p._client())
        assert await p.gather([first, second], timeout_s=5) == [1, 2]
        assert await task == 4
    assert [f[b"id"].decode() for _, f in client.xrange(keys.requests("other"))] == [other.id]
    client.close()


def test_sync_recovers_after_script_flush(redis_db: RedisSettings, manager: FakeManager) -> None:
    client = redis_db.client()
    with Producer(redis_db) as p:
        first = p.submit("echo", 1)
        exists = commandstats(client, "script|exists")
        client.script_flush()
        second = p.submit_many("echo", [2, 3])
        assert commandstats(client, "script|exists") == exists
        assert client.script_exists(ENQUEUE_BATCH_SHA) == [True]
        manager.serve(client)
        assert p.gather([first, *second], timeout_s=5) == [1, 2, 3]
    client.close()


def test_the_batch_script_and_the_scripts_for_other_clients(settings: RedisSettings, client: redis.Redis) -> None:
    assert client.script_load(ENQUEUE_BATCH_LUA) == ENQUEUE_BATCH_SHA
    reply = client.evalsha(ENQUEUE_BATCH_SHA, 2, REQ, ADMISSION, 2, "v", "1", "ct", "json",
                           "a", "[1]", "", "b", "[2]", "1717171717000")
    assert reply == [2, 2, None]
    entries = {f[b"id"]: f for _, f in client.xrange(REQ)}
    assert entries[b"a"] == {b"id": b"a", b"p": b"[1]", b"v": b"1", b"ct": b"json"}
    assert entries[b"b"][b"dl"] == b"1717171717000"
    with pytest.raises(redis.ResponseError, match="id, payload, dl per request"):
        client.evalsha(ENQUEUE_BATCH_SHA, 2, REQ, ADMISSION, 0, "c", "[3]")
    limit_backlog(client, "echo", 3, 50)
    assert client.evalsha(ENQUEUE_BATCH_SHA, 2, REQ, ADMISSION, 0, "c", "1", "", "d", "1", "") == [1, 3, b"50"]
    # the scripts docs/protocol.md gives other clients still work
    assert client.eval(ENQUEUE_LUA, 2, REQ, ADMISSION, "v", 1, "id", "e", "ct", "json", "p", "1")[0] == 0
    client.delete(REQ)
    assert client.eval(ENQUEUE_LUA, 2, REQ, ADMISSION, "v", 1, "id", "e", "ct", "json", "p", "1")[0] == 1
    assert client.eval(ENQUEUE_MANY_LUA, 2, REQ, ADMISSION, 2, "v", 1, "ct", "json", "f", "1", "g", "2",
                       "h", "3") == [2, 3, b"50"]


# -- reply notices -------------------------------------------------------------------------------


@pytest.mark.parametrize("inline_limit", [0, 400])
async def test_async_id_only_notices_are_read_from_the_result_keys(
        settings: RedisSettings, inline_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """inline_limit 0: every notice is id-only; 400: small results inline, large ones id-only."""
    monkeypatch.setattr(producer_aio, "SAFETY_CHECK_AFTER_S", 60.0)  # only the notices can resolve them
    manager = FakeManager(inline_limit=inline_limit)
    big = np.arange(256, dtype=np.float64)
    async with AsyncProducer(settings) as p, manager.arunning(settings):
        started = time.monotonic()
        outs = await asyncio.gather(*(p.infer("echo", big if i % 2 else i, timeout_s=5) for i in range(20)))
        handle = await p.submit("echo", big)
        np.testing.assert_array_equal(await p.result(handle, timeout_s=5), big)
        assert time.monotonic() - started < 3
    for i, out in enumerate(outs):
        if i % 2:
            np.testing.assert_array_equal(out, big)
        else:
            assert out == i


@pytest.mark.parametrize("inline_limit", [0, 400])
def test_sync_id_only_notices_are_read_from_the_result_keys(
        settings: RedisSettings, client: redis.Redis, inline_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_client, "SAFETY_CHECK_AFTER_S", 60.0)
    manager = FakeManager(inline_limit=inline_limit)
    big = np.arange(256, dtype=np.float64)
    with Producer(settings) as p:
        handles = p.submit_many("echo", [big, 1, big, 2])
        manager.serve(client)
        started = time.monotonic()
        outs = p.gather(handles, timeout_s=5)
        assert time.monotonic() - started < 2
        with manager.running(settings):
            assert p.infer("echo", "x", timeout_s=5) == "x"
    assert outs[1::2] == [1, 2]
    np.testing.assert_array_equal(outs[0], big)


def test_read_notices_forms() -> None:
    entry = [b"1-0", [b"id", b"r1", b"r", b"env"]]
    assert read_notices([[b"s", [entry]]]) == (b"1-0", [("r1", b"env")])
    assert read_notices({b"s": [entry]}) == (b"1-0", [("r1", b"env")])  # RESP3
    assert read_notices([[b"s", [[b"2-5", [b"id", b"r2"]]]]]) == (b"2-5", [("r2", None)])  # id-only
    assert read_notices([[b"s", [[b"3-0", [b"x", b"1", b"r", b"e", b"id", b"r3"]]]]]) == (b"3-0", [("r3", b"e")])
    assert read_notices([[b"s", [[b"4-0", [b"x", b"1"]]]]]) == (b"4-0", [])  # no id: nobody to resolve
    assert read_notices(None) == (None, []) and read_notices([]) == (None, [])
    assert next_entry_id(b"1717-3") == b"1717-4" and next_entry_id(b"5") == b"5-1"


# -- XTRIM folded into the reads ------------------------------------------------------------------


@pytest.mark.integration
async def test_async_reply_stream_is_trimmed_with_the_next_read(redis_db: RedisSettings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis_db.client()
    manager = FakeManager()
    async with AsyncProducer(redis_db) as p:
        redis_client = p._client()

        async def no_own_round_trip(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("XTRIM must travel with the next read, not on its own")

        monkeypatch.setattr(redis_client, "xtrim", no_own_round_trip)
        xtrims = commandstats(client, "xtrim")
        reply = keys.reply(p._client_id)
        for _ in range(3):
            handles = await p.submit_many("echo", range(200))
            await manager.aserve(client=redis_client)
            await p.gather(handles, timeout_s=5)
            await asyncio.sleep(0.05)  # the reader's next read, which carries the trim
            assert client.xlen(reply) == 0
        assert commandstats(client, "xtrim") > xtrims
    assert not client.exists(reply)
    client.close()


def test_sync_reply_stream_is_trimmed_with_the_next_read(redis_db: RedisSettings,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis_db.client()
    manager = FakeManager()
    with Producer(redis_db) as p:
        monkeypatch.setattr(p._client(), "xtrim", lambda *a, **k: pytest.fail("XTRIM on its own"))
        xtrims = commandstats(client, "xtrim")
        for _ in range(3):
            handles = p.submit_many("echo", range(200))
            manager.serve(client)
            p.gather(handles, timeout_s=5)
        reply = keys.reply(p._client_id)
        assert client.xlen(reply) <= 200  # the last read's entries, trimmed by the next read
        assert commandstats(client, "xtrim") >= xtrims + 2
    client.close()


# -- waits: timers and cancellation --------------------------------------------------------------


async def test_concurrent_waits_time_out_each_at_its_own_time(settings: RedisSettings) -> None:
    async with AsyncProducer(settings) as p:
        started = time.monotonic()

        async def timed(limit_s: float) -> float:
            with pytest.raises(NosqTimeout) as info:
                await p.infer("echo", limit_s, timeout_s=limit_s)
            assert info.value.timeout_s == limit_s
            return time.monotonic() - started

        short, long = await asyncio.gather(timed(0.2), timed(0.8))
        assert 0.19 <= short < 0.6 and 0.79 <= long < 1.4
        assert not p._waiters and not any(p._timers.values())


async def test_a_cancelled_wait_leaves_nothing_behind(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p:
        task = asyncio.ensure_future(p.infer("echo", 1, timeout_s=5))
        handle = await p.submit("echo", 2)
        wait = asyncio.ensure_future(p.result(handle, timeout_s=5))
        await asyncio.sleep(0.05)
        task.cancel()
        wait.cancel()
        await asyncio.gather(task, wait, return_exceptions=True)
        assert not p._waiters and not any(p._timers.values())
        await manager.aserve(p._client())  # late completions for nobody are dropped
        assert await p.result(handle, timeout_s=5) == 2  # asked again: read from the result key


async def test_two_waits_on_one_request(settings: RedisSettings, manager: FakeManager) -> None:
    async with AsyncProducer(settings) as p:
        handle = await p.submit("echo", "both")
        first = asyncio.ensure_future(p.result(handle, timeout_s=0.2))
        second = asyncio.ensure_future(p.result(handle, timeout_s=5))
        with pytest.raises(NosqTimeout):
            await first
        await manager.aserve(p._client())
        assert await second == "both"  # the first one's timeout did not end the second wait


# -- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("array", [
    np.arange(512, dtype=np.float32), np.zeros((2, 3, 4), np.int8), np.array(2.5), np.zeros((0, 3)),
    np.ones(70_000, np.uint8), np.arange(6, dtype=np.float64).reshape(2, 3).T,
    np.arange(4, dtype=">i4"), np.array([True, False]), np.arange(3, dtype=np.complex64),
])
def test_array_fast_path_writes_the_bytes_of_the_generic_path(array: np.ndarray) -> None:
    generic = encode_value("msgpack", {"x": array})[3:]  # the same tensor map, inside a map: generic path
    assert encode_value("msgpack", array) == generic
    back = decode_value("msgpack", generic)
    assert back.dtype == array.dtype.newbyteorder("<") and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_envelope_decode_converts_out_only() -> None:
    out = encode_value("msgpack", {"y": np.arange(3, dtype=np.float32), "n": [1, {"k": None}]})
    data = encode_envelope("msgpack", {"v": 1, "id": "r", "ok": True, "timings": {"queued_ms": 1}}, out)
    value = decode_envelope_value("msgpack", data)
    np.testing.assert_array_equal(value["out"]["y"], np.arange(3, dtype=np.float32))
    assert value["out"]["n"] == [1, {"k": None}] and value["timings"] == {"queued_ms": 1}


def test_pack_command_is_resp() -> None:
    from redis.connection import PythonRespSerializer

    args = ("EVALSHA", "ab", 2, "k{x}", b"\x00\r\n", 1717, b"")
    packed = b"".join(PythonRespSerializer(6000, lambda a: a if isinstance(a, bytes) else str(a).encode())
                      .pack(*args))
    assert pack_command(*args) == packed


async def test_producer_alongside_redis_asyncio_pool_limits(redis_db: RedisSettings, manager: FakeManager) -> None:
    """More coalesced flushes in flight than connections: they queue for one, none fails."""
    narrow = redis_db.model_copy(update={"max_connections": 2})
    async with AsyncProducer(narrow) as p, manager.arunning(redis_db):
        outs = await asyncio.gather(*(p.infer("echo", i, timeout_s=10) for i in range(300)))
    assert outs == list(range(300))
