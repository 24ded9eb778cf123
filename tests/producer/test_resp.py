"""Hand-packed command pipelines (nosq.producer.resp) against the real Redis: the same effect and
replies as redis-py's own commands, errors in place, large values by reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio

from nosq.producer import NosqConnectionError, resp
from nosq.producer.enqueue import redis_errors
from nosq.producer.resp import Commands, read_group
from nosq.producer.settings import RedisSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(redis_db: RedisSettings) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client on the producer tests' db of the real Redis (flushed, locked)."""
    client = redis_db.async_client()
    yield client
    await client.aclose()


async def test_commands_match_what_redis_py_would_do(db: redis.asyncio.Redis) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: sent by reference, not copied into the command
    commands = Commands()
    commands.set_nx_ex(b"k:small", b"v1", 60)
    commands.set_nx_ex(b"k:big", big, 60)
    commands.set_nx_ex(b"k:small", b"second writer", 60)  # NX: the first writer wins
    commands.xadd_notice(b"s", b"1000", b"id-1", b"envelope")
    commands.xadd_notice(b"s", b"1000", b"id-2", None)
    commands.xadd_notice(b"s", b"1000", b"id-3", big)
    commands.add(b"RPUSH", "list", b"x", 7)
    commands.mget([b"k:small", b"k:missing", b"k:big"])
    commands.add(b"INCR", b"list")  # WRONGTYPE: an error in its place, the rest still counts
    commands.add(b"EXPIRE", b"list", 30)
    assert len(commands) == 10
    replies = await commands.send(db)

    assert replies[:3] == [b"OK", b"OK", None]
    assert all(isinstance(r, bytes) and b"-" in r for r in replies[3:6])  # stream entry ids
    assert replies[6] == 2
    assert replies[7] == [b"v1", None, big]
    assert isinstance(replies[8], redis.ResponseError) and "WRONGTYPE" in str(replies[8])
    assert replies[9] == 1
    notices = await db.xrange("s")
    assert [fields for _, fields in notices] == [{b"id": b"id-1", b"r": b"envelope"}, {b"id": b"id-2"},
                                                 {b"id": b"id-3", b"r": big}]
    assert await db.lrange("list", 0, -1) == [b"x", b"7"]
    assert 0 < await db.ttl("k:big") <= 60


async def test_read_group_returns_entries_and_raises_on_a_missing_group(db: redis.asyncio.Redis) -> None:
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        await read_group(db, group="g", consumer="c", stream="st", count=10)
    await db.xgroup_create("st", "g", id="0", mkstream=True)
    assert await read_group(db, group="g", consumer="c", stream="st", count=10, block_ms=10) == []
    first = await db.xadd("st", {"a": b"1", "p": b"\x00\xff"})
    second = await db.xadd("st", {"b": b"2"})
    assert await read_group(db, group="g", consumer="c", stream="st", count=10) == [
        (first, {b"a": b"1", b"p": b"\x00\xff"}), (second, {b"b": b"2"})]
    await db.xdel("st", first)  # deleted while pending: re-read without its fields
    assert await read_group(db, group="g", consumer="c", stream="st", count=10, start="0") == [
        (first, {}), (second, {b"b": b"2"})]


def test_the_blocking_client_sends_the_same_way(redis_db: RedisSettings) -> None:
    client = redis_db.client()
    try:
        commands = Commands()
        commands.set_nx_ex(b"k", b"v", 60)
        commands.add(b"HSET", b"k", b"f", b"1")  # WRONGTYPE in its place
        commands.add(b"GET", b"k")
        first, error, value = commands.send_blocking(client)
        assert (first, value) == (b"OK", b"v") and isinstance(error, redis.ResponseError)
        assert client.ping()  # the connection went back to the pool in a usable state
    finally:
        client.close()


def test_pieces_keep_every_byte_in_order_and_bound_each_write() -> None:
    parts: list[bytes | bytearray | memoryview] = [b"a" * 10, b"b" * (3 * resp.WRITE_PIECE + 7), b"c" * 5,
                                                   b"d" * (resp.WRITE_PIECE - 3), b"e" * 4]
    pieces = resp._pieces(parts)
    assert b"".join(bytes(p) for piece in pieces for p in piece) == b"".join(parts)
    assert all(sum(len(p) for p in piece) <= resp.WRITE_PIECE for piece in pieces)
    assert resp._pieces([b"x", b"y"]) == [[b"x", b"y"]]


async def test_a_pipeline_larger_than_a_piece_arrives_whole(db: redis.asyncio.Redis) -> None:
    values = [bytes([i]) * (resp.WRITE_PIECE + 1000 * i) for i in range(1, 4)]
    commands = Commands()
    for i, value in enumerate(values):
        commands.set_nx_ex(b"big:%d" % i, value, 60)
    assert await commands.send(db) == [b"OK", b"OK", b"OK"]
    assert await db.mget([b"big:0", b"big:1", b"big:2"]) == values


def test_a_write_on_a_connection_the_server_closed_is_a_connection_error_under_uvloop(redis_db: RedisSettings) -> None:
    """The manager runs on uvloop, which raises ``RuntimeError: ... the handler is closed`` for a
    write on a closed transport (asyncio's loop raises ConnectionResetError, which redis-py
    translates). A cluster node's pooled connection to a killed master failed so, and the
    manager stopped instead of waiting out the failover (CI, 2026-12-07)."""
    import uvloop

    async def scenario() -> tuple[BaseException, list[Any]]:
        client = redis_db.async_client()
        try:
            connection = await client.connection_pool.get_connection()
            connection._writer.transport.close()  # as the loop does after the peer's reset
            await asyncio.sleep(0.01)  # the loop closes the handle
            with pytest.raises(redis.ConnectionError) as lost:
                await resp._exchange(connection, [resp.pack_command(b"PING")], 1)
            again = await resp._exchange(connection, [resp.pack_command(b"PING")], 1)  # reconnects
            await client.connection_pool.release(connection)
            return lost.value, again
        finally:
            await client.aclose()

    error, again = uvloop.run(scenario())
    assert error.__cause__ is not None and resp.closed_transport(error.__cause__), \
        f"not uvloop's closed-transport error: {error!r} from {error.__cause__!r}"
    assert again == [b"PONG"]
    assert not resp.closed_transport(RuntimeError("something else"))
    with pytest.raises(NosqConnectionError, match="submit: cannot reach Redis"), redis_errors("submit"):
        raise error.__cause__  # what a redis-py command of the producer would raise
