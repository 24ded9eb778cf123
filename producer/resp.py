"""Redis commands packed as RESP by hand, for the hot paths of both the producer (its
coalesced enqueue calls) and the manager (stream reads, result writes).

redis-py packs every command in Python and runs a response callback per command; for the
hundreds of commands a batch needs (``SET``/``XADD`` per result, one ``EVALSHA`` with thousands
of arguments), that bookkeeping costs several times what Redis spends on the commands
(``docs/benchmarks.md``, data path). Here commands become one list of buffers (large values by
reference, never re-encoded) written to one pooled connection, and the replies are read back in
order. Errors behave as in redis-py: a reply that is an error is returned in its place (the
others still count); a lost connection raises ``redis.ConnectionError`` and the connection is
dropped (its replies may be half read).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

__all__ = ["Commands", "pack_command", "read_group"]

Arg = bytes | bytearray | memoryview | str | int
_INLINE = 4096  # values up to this size are copied into the command; larger ones are referenced
# the asyncio transport keeps what the socket did not take in one buffer that it shifts after
# every send: quadratic in the size written at once (a 30 MB pipeline of results took seconds),
# so large writes go in pieces of this size, each drained before the next
WRITE_PIECE = 1024 * 1024


class Commands:
    """Commands to send in one round trip: ``add`` each, then ``send``."""

    __slots__ = ("_count", "_parts")

    def __init__(self) -> None:
        self._parts: list[bytes | bytearray | memoryview] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def packed(self) -> bytes:
        """Every command added so far, as the bytes that go on the wire."""
        return b"".join(self._parts)

    def add(self, *args: Arg) -> None:
        """Any command; its arguments as bytes (large ones kept by reference), str or int."""
        small: list[bytes | bytearray | memoryview] = [b"*%d\r\n" % len(args)]
        for arg in args:
            value = arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
            if len(value) <= _INLINE:
                small.append(b"$%d\r\n%s\r\n" % (len(value), value))
            else:  # a large value is written from where it is: no copy into the command
                small.append(b"$%d\r\n" % len(value))
                self._parts.append(b"".join(small))
                self._parts.append(value)
                small = [b"\r\n"]
        self._parts.append(b"".join(small))
        self._count += 1

    def mget(self, keys: list[bytes]) -> None:
        """``MGET key ...``."""
        parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
        parts.extend(b"$%d\r\n%s\r\n" % (len(key), key) for key in keys)
        self._parts.append(b"".join(parts))
        self._count += 1

    def set_nx_ex(self, key: bytes, value: bytes, ttl_s: int) -> None:
        """``SET key value NX EX ttl_s``, the result write: one format for a small value."""
        ttl = b"%d" % ttl_s
        if len(value) <= _INLINE:
            self._parts.append(b"*6\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$2\r\nNX\r\n$2\r\nEX\r\n$%d\r\n%s\r\n"
                               % (len(key), key, len(value), value, len(ttl), ttl))
        else:
            self._parts.append(b"*6\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(value)))
            self._parts.append(value)
            self._parts.append(b"\r\n$2\r\nNX\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl))
        self._count += 1

    def xadd_notice(self, stream: bytes, maxlen: bytes, request_id: bytes, envelope: bytes | None) -> None:
        """``XADD stream MAXLEN ~ maxlen * id <id> [r <envelope>]``, a reply-stream notice."""
        head = (b"*%d\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%s\r\n$1\r\n*\r\n"
                b"$2\r\nid\r\n$%d\r\n%s\r\n" % (8 if envelope is None else 10, len(stream), stream, len(maxlen),
                                                maxlen, len(request_id), request_id))
        if envelope is None:
            self._parts.append(head)
        elif len(envelope) <= _INLINE:
            self._parts.append(head + b"$1\r\nr\r\n$%d\r\n%s\r\n" % (len(envelope), envelope))
        else:
            self._parts.append(head + b"$1\r\nr\r\n$%d\r\n" % len(envelope))
            self._parts.append(envelope)
            self._parts.append(b"\r\n")
        self._count += 1

    def send_blocking(self, client: redis.Redis) -> list[Any]:
        """``send`` for the synchronous client."""
        if not self._count:
            return []
        pool: Any = client.connection_pool
        try:
            connection = pool.get_connection()
        except TypeError:  # redis-py 5: the command name is required (6 and later deprecate it)
            connection = pool.get_connection("_")
        try:
            connection.send_packed_command(self._parts, check_health=False)
            replies: list[Any] = []
            for _ in range(self._count):
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            pool.release(connection)

    async def send(self, client: redis.asyncio.Redis) -> list[Any]:
        """Write every command, read every reply (a ``redis.ResponseError`` in place of an error)."""
        if not self._count:
            return []
        pool = client.connection_pool
        connection = await pool.get_connection()
        try:
            for piece in _pieces(self._parts):
                await connection.send_packed_command(piece, check_health=False)
            replies: list[Any] = []
            for _ in range(self._count):
                try:
                    replies.append(await connection.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await connection.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            await pool.release(connection)


def _pieces(parts: list[bytes | bytearray | memoryview]) -> list[list[bytes | bytearray | memoryview]]:
    """``parts`` in groups of about ``WRITE_PIECE`` bytes (a larger part split by views)."""
    pieces: list[list[bytes | bytearray | memoryview]] = [[]]
    size = 0
    for part in parts:
        if size and size + len(part) > WRITE_PIECE:
            pieces.append([])
            size = 0
        if len(part) <= WRITE_PIECE:
            pieces[-1].append(part)
            size += len(part)
            continue
        view = memoryview(part)
        for start in range(0, len(view), WRITE_PIECE):
            pieces[-1].append(view[start:start + WRITE_PIECE])
            pieces.append([])
        size = 0
    return [piece for piece in pieces if piece]


def pack_command(*args: Arg) -> bytes:
    """One command as RESP bytes."""
    commands = Commands()
    commands.add(*args)
    return commands.packed()


async def read_group(client: redis.asyncio.Redis, *, group: str, consumer: str, stream: str, count: int,
                     block_ms: int | None = None, start: str = ">") -> list[tuple[bytes, dict[bytes, bytes]]]:
    """``XREADGROUP GROUP group consumer COUNT count [BLOCK ms] STREAMS stream start``: the
    entries as (entry id, fields); an entry deleted while pending has no fields. Errors (NOGROUP)
    raise ``redis.ResponseError``."""
    commands = Commands()
    if block_ms is None:
        commands.add(b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count, b"STREAMS", stream, start)
    else:
        commands.add(b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count, b"BLOCK", block_ms, b"STREAMS",
                     stream, start)
    (reply,) = await commands.send(client)
    if isinstance(reply, redis.ResponseError):
        raise reply
    if not reply:
        return []
    return [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {})
            for entry_id, flat in reply[0][1]]
