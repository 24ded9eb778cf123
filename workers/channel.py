"""The fast lane between a manager and a replica on the same host: shared memory and a socket.

Ray starts, places, restarts and kills the replicas; a Ray call per batch, though, costs
milliseconds and copies the batch several times (measured on the 2-core development machine:
1.4 ms for an empty call, 15-20 ms for 3 MB, ~250 MB/s). So a manager that finds a replica on
its own host talks to it directly:

* one Unix socket connection per in-flight slot (abstract namespace: no file to clean up),
  request and answer in turn, each a small msgpack header;
* the batch's payloads in an input segment, a ``memfd`` the manager writes and the replica
  maps; the outputs in an output segment the replica writes and the manager maps. Each side
  sends the other a segment's file descriptor (``SCM_RIGHTS``) once, and again only when it
  has to grow it. Nothing is named in ``/dev/shm``: the memory goes with the last process that
  maps it.
* the first byte of the input segment is the slot's stage (:class:`Stage`), written by the
  replica as it goes: if the replica dies, the manager reads it to tell the batch that was in
  the model (blamed, retried as a suspect) from those decoding, waiting, fetching or encoding
  beside it.

A replica on another host, or a host without ``memfd``, is called through Ray instead
(``nosq.workers.actor.ModelWorker.run``), with the same :class:`~nosq.workers.datapath.BatchInput`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final

import msgpack
import numpy as np

from nosq.producer.errors import NosqError
from nosq.producer.wire import ErrorCode
from nosq.workers.datapath import BatchInput, BatchOutput, pack

__all__ = [
    "ChannelClient",
    "ChannelError",
    "ChannelLost",
    "ChannelServer",
    "Segment",
    "Stage",
    "available",
]

log = logging.getLogger(__name__)
_LENGTH: Final = struct.Struct("<I")
DATA_START: Final = 64  # the input segment's first bytes are the stage; payloads start here
MIN_SEGMENT: Final = 1 << 20
_MAX_FDS: Final = 2


class Stage(enum.IntEnum):
    """Where a replica is with the batch of one slot (byte 0 of its input segment)."""

    SENT = 0  # written by the manager; the replica has not started it
    DECODING = 1
    WAITING = 2  # decoded, waiting for the model (another slot's batch is in it)
    IN_MODEL = 3
    FETCHING = 4  # out of the model (set before its lock is released), outputs being fetched
    ENCODING = 5
    DONE = 6

    @property
    def suspect(self) -> bool:
        """A replica that died at this stage may have been killed by this batch's inputs: only
        in the model (one batch at a time). Decoding and encoding are nosq's own code on
        bytes, which another slot's batch overlaps: its death is not theirs."""
        return self is Stage.IN_MODEL


class ChannelError(NosqError, RuntimeError):
    """The replica could not run the batch (its own error, not a lost connection)."""


class ChannelLost(NosqError, ConnectionError):
    """The connection to the replica broke: the replica process died or is gone."""


def available() -> bool:
    """This host can share memory this way (Linux: memfd, SCM_RIGHTS, abstract sockets)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "AF_UNIX") and hasattr(socket, "SCM_RIGHTS")


class Segment:
    """A shared-memory segment (``memfd``) mapped into this process; grows by replacement."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, size: int, name: str) -> Segment:
        size = max(MIN_SEGMENT, 1 << max(0, size - 1).bit_length())
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    @classmethod
    def adopt(cls, fd: int) -> Segment:
        return cls(fd, os.fstat(fd).st_size)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still held: the mapping goes with it
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _frame(header: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(header, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds


# -- the replica's side: blocking sockets, one thread per connection ------------------------------


#: ``handler(batch, stage, alloc)``: runs the batch, reporting its progress with ``stage`` and
#: encoding the outputs into ``alloc(size)`` (a writable uint8 array: the output segment here)
Handler = Callable[[BatchInput, Callable[[Stage], None], Callable[[int], Any]], BatchOutput]


class ChannelServer:
    """Listens on an abstract Unix socket; runs each request through ``handler``."""

    def __init__(self, handler: Handler, *, name: str = "nosq") -> None:
        self._handler = handler
        self.address = f"{name}-{os.getpid()}-{secrets.token_hex(6)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.address)
        self._listener.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="nosq-channel", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="nosq-channel-slot", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        state = _SlotState()
        try:
            while True:
                request = self._receive(conn, state)
                if request is None:
                    return
                conn.sendmsg(*self._answer(request, state))
        except OSError:
            pass  # the manager went away
        finally:
            state.close()
            conn.close()

    def _receive(self, conn: socket.socket, state: _SlotState) -> dict[str, Any] | None:
        head, fds = _recv_exact(conn, _LENGTH.size)
        if head is None:
            return None
        body, more = _recv_exact(conn, _LENGTH.unpack(head)[0])
        if body is None:
            return None
        for fd in fds + more:  # a new input segment
            if state.input is not None:
                state.input.close()
            state.input = Segment.adopt(fd)
        request: dict[str, Any] = msgpack.unpackb(body, raw=False)
        return request

    def _answer(self, request: dict[str, Any], state: _SlotState) -> tuple[list[bytes], list[Any]]:
        segment = state.input
        try:
            if segment is None:
                raise ChannelError("no input segment was sent")
            offsets = np.frombuffer(request["o"], dtype=np.int64)
            cts = request["c"] if isinstance(request["c"], str) else tuple(request["c"])
            buffer = np.frombuffer(segment.map, dtype=np.uint8, count=int(offsets[-1]), offset=DATA_START)
            stage_byte = segment.map

            def stage(value: Stage) -> None:
                stage_byte[0] = int(value)

            state.new_fds.clear()
            output = self._handler(BatchInput(request["m"], cts, buffer, offsets), stage, state.alloc)
            header, fds = state.answer(output)
            stage(Stage.DONE)
        except Exception as exc:  # the replica's own failure: the manager answers the batch `internal`
            log.exception("channel: batch failed")
            return [_frame({"e": f"{type(exc).__name__}: {exc}"[:2000]})], []
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        return [_frame(header)], ancillary


class _SlotState:
    """One connection's segments on the replica's side."""

    def __init__(self) -> None:
        self.input: Segment | None = None
        self.output: Segment | None = None
        self.new_fds: list[int] = []  # output segments made for this answer: the manager maps them

    def alloc(self, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """``size`` writable bytes at the start of the output segment (grown if needed)."""
        if self.output is None or self.output.size < size:
            if self.output is not None:
                self.output.close()
            self.output = Segment.create(size, "nosq-out")
            self.new_fds[:] = [self.output.fd]
        return np.frombuffer(self.output.map, dtype=np.uint8, count=size)

    def answer(self, output: BatchOutput) -> tuple[dict[str, Any], list[int]]:
        """The answer's header (the outputs are in the output segment already) and new fds."""
        header = {"o": np.ascontiguousarray(output.offsets, dtype=np.int64).tobytes(), "x": output.exec_ms,
                  "s": output.stages, "f": [[i, code, message] for i, (code, message) in output.failures.items()],
                  "n": sorted(output.not_run), "p": output.provenance}
        return header, list(self.new_fds)

    def close(self) -> None:
        for segment in (self.input, self.output):
            if segment is not None:
                segment.close()


def _recv_exact(conn: socket.socket, size: int) -> tuple[bytes | None, list[int]]:
    chunks: list[bytes] = []
    fds: list[int] = []
    left = size
    while left:
        data, ancillary, _, _ = conn.recvmsg(left, socket.CMSG_SPACE(_MAX_FDS * 4))
        fds.extend(_fds(ancillary))
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks), fds


# -- the manager's side: one asyncio connection per slot ------------------------------------------


class ChannelClient:
    """One slot's connection to a replica: send a batch, await its outputs."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._input: Segment | None = None
        self._output: Segment | None = None

    @classmethod
    async def connect(cls, address: str) -> ChannelClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, "\0" + address)
        except OSError as exc:
            sock.close()
            raise ChannelLost(f"cannot connect to replica channel {address}: {exc}") from exc
        return cls(sock)

    @property
    def stage(self) -> Stage:
        """The replica's stage with the last batch sent (readable after it died)."""
        if self._input is None:
            return Stage.SENT
        return Stage(self._input.map[0]) if self._input.map[0] <= Stage.DONE else Stage.SENT

    async def run(self, method: str, cts: str | list[str], payloads: list[bytes]) -> BatchOutput:
        """Run one batch; the answer's ``buffer`` is valid until the next ``run`` on this slot."""
        total = sum(len(p) for p in payloads)
        fds: list[int] = []
        if self._input is None or self._input.size < DATA_START + total:
            if self._input is not None:
                self._input.close()
            self._input = Segment.create(DATA_START + total, "nosq-in")
            fds.append(self._input.fd)
        self._input.map[0] = int(Stage.SENT)
        offsets = pack(payloads, into=self._input.map, start=DATA_START)
        header = {"m": method, "c": cts, "o": offsets.tobytes()}
        try:
            await self._send(_frame(header), fds)
            answer, new_fds = await self._receive()
        except OSError as exc:
            raise ChannelLost(f"replica channel broke: {exc}") from exc
        for fd in new_fds:
            if self._output is not None:
                self._output.close()
            self._output = Segment.adopt(fd)
        if "e" in answer:
            raise ChannelError(answer["e"])
        if self._output is None and answer["o"] and np.frombuffer(answer["o"], np.int64)[-1] > 0:
            raise ChannelError("the replica answered without an output segment")
        out_offsets = np.frombuffer(answer["o"], dtype=np.int64)
        buffer: Any = memoryview(self._output.map)[: int(out_offsets[-1])] if self._output is not None else b""
        return BatchOutput(buffer=buffer, offsets=out_offsets,
                           failures={int(i): (ErrorCode(code), message) for i, code, message in answer["f"]},
                           not_run=frozenset(answer["n"]), exec_ms=float(answer["x"]), stages=answer["s"],
                           provenance=answer.get("p") or {})

    def close(self) -> None:
        self._sock.close()
        for segment in (self._input, self._output):
            if segment is not None:
                segment.close()
        self._input = self._output = None

    async def _send(self, data: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.sendmsg([view], ancillary)
            except BlockingIOError:
                await _ready(loop, self._sock, write=True)
                continue
            ancillary = []
            view = view[sent:]

    async def _receive(self) -> tuple[dict[str, Any], list[int]]:
        loop = asyncio.get_running_loop()
        head, fds = await self._recv_exact(loop, _LENGTH.size)
        body, more = await self._recv_exact(loop, _LENGTH.unpack(head)[0])
        answer: dict[str, Any] = msgpack.unpackb(body, raw=False)
        return answer, fds + more

    async def _recv_exact(self, loop: asyncio.AbstractEventLoop, size: int) -> tuple[bytes, list[int]]:
        chunks: list[bytes] = []
        fds: list[int] = []
        left = size
        while left:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(left, socket.CMSG_SPACE(_MAX_FDS * 4))
            except BlockingIOError:
                await _ready(loop, self._sock, write=False)
                continue
            fds.extend(_fds(ancillary))
            if not data:
                raise ChannelLost("the replica closed the channel")
            chunks.append(data)
            left -= len(data)
        return b"".join(chunks), fds


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def done() -> None:
        if not future.done():
            future.set_result(None)

    if write:
        loop.add_writer(fd, done)
    else:
        loop.add_reader(fd, done)
    try:
        await future
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
