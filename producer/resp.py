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

On Redis Cluster (a ``RedisCluster`` client) each command goes to the node that owns its key's
slot: the commands are grouped by node, each group written as above on that node's connection,
the replies put back in order. A command answered ``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN``,
or whose node cannot be reached (a master being failed over), is sent again after the slot map
is refreshed, for up to ``CLUSTER_RETRY_S``. ``MGET`` is sent as one ``GET`` per key there (its
keys are on different slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, TryAgainError

__all__ = ["Commands", "closed_transport", "get_many", "get_many_blocking", "pack_command", "read_group"]

Arg = bytes | bytearray | memoryview | str | int
_INLINE = 4096  # values up to this size are copied into the command; larger ones are referenced
# the asyncio transport keeps what the socket did not take in one buffer that it shifts after
# every send: quadratic in the size written at once (a 30 MB pipeline of results took seconds),
# so large writes go in pieces of this size, each drained before the next
WRITE_PIECE = 1024 * 1024
#: on Redis Cluster, how long commands are sent again while their slot has no reachable master
#: (a failover takes about the cluster's ``cluster-node-timeout`` and a vote)
CLUSTER_RETRY_S = 20.0
_CLUSTER_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)
_REDIRECTS = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


class Commands:
    """Commands to send in one round trip: ``add`` each, then ``send``."""

    __slots__ = ("_args", "_count", "_parts", "_starts")

    def __init__(self) -> None:
        self._parts: list[bytes | bytearray | memoryview] = []
        self._count = 0
        # per command: where its parts start and its name and key arguments, for cluster routing
        self._starts: list[int] = []
        self._args: list[Sequence[Arg]] = []

    def __len__(self) -> int:
        return self._count

    def packed(self) -> bytes:
        """Every command added so far, as the bytes that go on the wire."""
        return b"".join(self._parts)

    def add(self, *args: Arg) -> None:
        """Any command; its arguments as bytes (large ones kept by reference), str or int."""
        self._starts.append(len(self._parts))
        self._args.append(args)
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
        self._starts.append(len(self._parts))
        self._args.append((b"MGET", *keys))
        parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
        parts.extend(b"$%d\r\n%s\r\n" % (len(key), key) for key in keys)
        self._parts.append(b"".join(parts))
        self._count += 1

    def set_nx_ex(self, key: bytes, value: bytes, ttl_s: int) -> None:
        """``SET key value NX EX ttl_s``, the result write: one format for a small value."""
        self._starts.append(len(self._parts))
        self._args.append((b"SET", key))
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
        self._starts.append(len(self._parts))
        self._args.append((b"XADD", stream))
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
        if isinstance(client, redis.cluster.RedisCluster):
            return _ClusterPlan(self).send_blocking(client)
        return _send_blocking(client, self._parts, self._count)

    async def send(self, client: redis.asyncio.Redis) -> list[Any]:
        """Write every command, read every reply (a ``redis.ResponseError`` in place of an error)."""
        if not self._count:
            return []
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            return await _ClusterPlan(self).send(client)
        pool = client.connection_pool
        connection = await pool.get_connection()
        try:
            return await _exchange(connection, self._parts, self._count)
        except BaseException:
            await connection.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            await pool.release(connection)

    def _command(self, index: int) -> list[bytes | bytearray | memoryview]:
        end = self._starts[index + 1] if index + 1 < len(self._starts) else len(self._parts)
        return self._parts[self._starts[index]:end]


def _send_blocking(client: redis.Redis, parts: list[bytes | bytearray | memoryview], count: int) -> list[Any]:
    pool: Any = client.connection_pool
    try:
        connection = pool.get_connection()
    except TypeError:  # redis-py 5: the command name is required (6 and later deprecate it)
        connection = pool.get_connection("_")
    try:
        connection.send_packed_command(parts, check_health=False)
        replies: list[Any] = []
        for _ in range(count):
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


def closed_transport(exc: BaseException) -> bool:
    """A write on a connection the server has closed, as uvloop reports it (``RuntimeError:
    unable to perform operation on <TCPTransport closed=True ...>; the handler is closed``);
    asyncio's own loop raises ``ConnectionResetError`` there, which redis-py translates. A pooled
    connection to a master that was killed fails so on its next write."""
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


async def _exchange(connection: Any, parts: list[bytes | bytearray | memoryview], count: int) -> list[Any]:
    try:
        for piece in _pieces(parts):
            await connection.send_packed_command(piece, check_health=False)
    except RuntimeError as exc:  # redis-py has dropped the connection already
        if not closed_transport(exc):
            raise
        raise redis.ConnectionError(f"connection closed by the server: {exc}") from exc
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies


def _key_of(args: Sequence[Arg]) -> Arg | None:
    """The key a command is routed by on Redis Cluster (None: any node)."""
    name = args[0].upper() if isinstance(args[0], str | bytes) else b""
    name = name.encode() if isinstance(name, str) else name
    if name in (b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO", b"FCALL"):
        return args[3] if int(args[2]) > 0 else None
    if name in (b"XREADGROUP", b"XREAD"):
        for at, arg in enumerate(args):
            if isinstance(arg, str | bytes) and arg.upper() in (b"STREAMS", "STREAMS"):
                return args[at + 1]
    return args[1] if len(args) > 1 else None


class _ClusterPlan:
    """The commands of one ``Commands`` as units routed by key (an ``MGET`` split in ``GET``s)."""

    def __init__(self, commands: Commands) -> None:
        self.units: list[tuple[Arg | None, list[bytes | bytearray | memoryview]]] = []
        self.shape: list[int | None] = []  # per command: None (one unit) or how many GETs it became
        for index, args in enumerate(commands._args):
            if args[0] == b"MGET":
                for key in args[1:]:
                    self.units.append((key, [pack_command(b"GET", key)]))
                self.shape.append(len(args) - 1)
            else:
                self.units.append((_key_of(args), commands._command(index)))
                self.shape.append(None)

    def _replies(self, unit_replies: list[Any]) -> list[Any]:
        replies: list[Any] = []
        at = 0
        for shape in self.shape:
            if shape is None:
                replies.append(unit_replies[at])
                at += 1
            else:
                replies.append(unit_replies[at:at + shape])
                at += shape
        return replies

    def _groups(self, client: Any, todo: list[int]) -> dict[str, tuple[Any, list[int]]]:
        groups: dict[str, tuple[Any, list[int]]] = {}
        for index in todo:
            key = self.units[index][0]
            node = client.get_node_from_key(key) if key is not None else client.get_default_node()
            groups.setdefault(node.name, (node, []))[1].append(index)
        return groups

    def _parts(self, indices: list[int]) -> list[bytes | bytearray | memoryview]:
        return [part for index in indices for part in self.units[index][1]]

    def send_blocking(self, client: Any) -> list[Any]:  # a redis.cluster.RedisCluster (untyped)
        replies: list[Any] = [None] * len(self.units)
        todo = list(range(len(self.units)))
        deadline = time.monotonic() + CLUSTER_RETRY_S
        for attempt in range(1_000_000):
            again: list[int] = []
            failure: BaseException | None = None
            for node, indices in self._groups(client, todo).values():
                try:
                    answers = _send_blocking(client.get_redis_connection(node), self._parts(indices), len(indices))
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    failure = exc
                    again.extend(indices)
                    continue
                failure = _place(indices, answers, replies, again) or failure
            if not again:
                break
            if time.monotonic() > deadline:
                raise redis.ConnectionError(f"Redis Cluster: no master answered for {CLUSTER_RETRY_S} s") from failure
            time.sleep(_CLUSTER_BACKOFF_S[min(attempt, len(_CLUSTER_BACKOFF_S) - 1)])
            with contextlib.suppress(redis.RedisError, RedisClusterException):
                client.nodes_manager.initialize()
            todo = sorted(again)
        return self._replies(replies)

    async def send(self, client: redis.asyncio.cluster.RedisCluster) -> list[Any]:
        await client.initialize()
        replies: list[Any] = [None] * len(self.units)
        todo = list(range(len(self.units)))
        deadline = time.monotonic() + CLUSTER_RETRY_S
        for attempt in range(1_000_000):
            groups = list(self._groups(client, todo).values())
            outcomes = await asyncio.gather(*(self._send_node(node, indices) for node, indices in groups),
                                            return_exceptions=True)
            again: list[int] = []
            failure: BaseException | None = None
            for (_, indices), outcome in zip(groups, outcomes, strict=True):
                if isinstance(outcome, redis.ConnectionError | redis.TimeoutError):
                    failure = outcome
                    again.extend(indices)
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                failure = _place(indices, outcome, replies, again) or failure
            if not again:
                break
            if time.monotonic() > deadline:
                raise redis.ConnectionError(f"Redis Cluster: no master answered for {CLUSTER_RETRY_S} s") from failure
            await asyncio.sleep(_CLUSTER_BACKOFF_S[min(attempt, len(_CLUSTER_BACKOFF_S) - 1)])
            # no node answered yet, or redis-py refreshing the same map at once (RuntimeError: its
            # startup-node dict changed under it): either way the next round tries again
            with contextlib.suppress(redis.RedisError, RedisClusterException, RuntimeError):
                await client.nodes_manager.initialize()
            todo = sorted(again)
        return self._replies(replies)

    async def _send_node(self, node: Any, indices: list[int]) -> list[Any]:
        connection = node.acquire_connection()
        try:
            answers = await _exchange(connection, self._parts(indices), len(indices))
        except BaseException:
            await connection.disconnect()
            raise
        node._free.append(connection)  # redis-py's own release of a cluster node's connection
        return answers


def _place(indices: list[int], answers: list[Any], replies: list[Any], again: list[int]) -> BaseException | None:
    """One node's ``answers`` into ``replies`` (at ``indices``); a redirect or a cluster that is
    failing over sends its command to ``again`` instead. Returns the last such reply, or None."""
    failure: BaseException | None = None
    for index, answer in zip(indices, answers, strict=True):
        if isinstance(answer, _REDIRECTS):
            failure = answer
            again.append(index)
        else:
            replies[index] = answer
    return failure


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


def get_many_blocking(client: redis.Redis, keys: list[str]) -> list[bytes | None]:
    """``MGET keys``: on Redis Cluster, one ``GET`` per key, routed by slot."""
    commands = Commands()
    commands.mget([key.encode() for key in keys])
    (values,) = commands.send_blocking(client)
    if isinstance(values, redis.ResponseError):
        raise values
    return list(values)


async def get_many(client: redis.asyncio.Redis, keys: list[str]) -> list[bytes | None]:
    """``get_many_blocking`` for the asyncio client."""
    commands = Commands()
    commands.mget([key.encode() for key in keys])
    (values,) = await commands.send(client)
    if isinstance(values, redis.ResponseError):
        raise values
    return list(values)
