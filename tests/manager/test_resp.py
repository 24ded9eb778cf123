"""Hand-packed command pipelines (manager.resp) against the real Redis: the same effect and
replies as redis-py's own commands, errors in place, large values by reference."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio

from manager.resp import Commands, read_group

pytestmark = pytest.mark.integration


async def test_commands_match_what_redis_py_would_do(redis_db10: redis.asyncio.Redis) -> None:
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
    replies = await commands.send(redis_db10)

    assert replies[:3] == [b"OK", b"OK", None]
    assert all(isinstance(r, bytes) and b"-" in r for r in replies[3:6])  # stream entry ids
    assert replies[6] == 2
    assert replies[7] == [b"v1", None, big]
    assert isinstance(replies[8], redis.ResponseError) and "WRONGTYPE" in str(replies[8])
    assert replies[9] == 1
    notices = await redis_db10.xrange("s")
    assert [fields for _, fields in notices] == [{b"id": b"id-1", b"r": b"envelope"}, {b"id": b"id-2"},
                                                 {b"id": b"id-3", b"r": big}]
    assert await redis_db10.lrange("list", 0, -1) == [b"x", b"7"]
    assert 0 < await redis_db10.ttl("k:big") <= 60


async def test_read_group_returns_entries_and_raises_on_a_missing_group(redis_db10: redis.asyncio.Redis) -> None:
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        await read_group(redis_db10, group="g", consumer="c", stream="st", count=10)
    await redis_db10.xgroup_create("st", "g", id="0", mkstream=True)
    assert await read_group(redis_db10, group="g", consumer="c", stream="st", count=10, block_ms=10) == []
    first = await redis_db10.xadd("st", {"a": b"1", "p": b"\x00\xff"})
    second = await redis_db10.xadd("st", {"b": b"2"})
    assert await read_group(redis_db10, group="g", consumer="c", stream="st", count=10) == [
        (first, {b"a": b"1", b"p": b"\x00\xff"}), (second, {b"b": b"2"})]
    await redis_db10.xdel("st", first)  # deleted while pending: re-read without its fields
    assert await read_group(redis_db10, group="g", consumer="c", stream="st", count=10, start="0") == [
        (first, {}), (second, {b"b": b"2"})]
