"""Where a batch's bytes go, from the request stream to the device and back to Redis.

This module is the map of the data path; the steps it does not do itself are named here with
the place that does them.

1. **Stream → manager** (``nosq.manager.serving.pipeline``): ``XREADGROUP`` gives each entry's payload as
   ``bytes`` (hiredis copies it out of the socket once). The manager never decodes a payload.
2. **Manager → replica, one buffer** (:func:`pack` here; ``nosq.workers.channel``): the payloads of
   a batch are written back to back into one buffer, with ``n + 1`` offsets. To a replica on
   the same host that buffer is a shared-memory segment (``memfd``) the replica maps: the
   bytes are copied once, by the manager, and only a small header crosses a Unix socket. To a
   replica elsewhere the buffer travels as a numpy array in a Ray call (out of band, never a
   pickled list).
3. **Decode straight into one host buffer** (:func:`uniform_tensors` here;
   ``nosq.workers.runtime``): when every item of the batch is the same msgpack tensor layout (same
   dtype, shape and header bytes, the common case), the items are one strided view of the
   buffer, checked in one vectorised comparison and copied once into the replica's staging
   buffer (page-locked on CUDA, reused across batches), which is copied to the device
   asynchronously. Other batches (JSON, mixed shapes, maps, lists) are decoded item by item.
4. **Model** (``nosq.workers.runtime``): one call for the batch; a batch that raises is bisected.
5. **Outputs encoded as a batch** (:func:`encode_tensor_rows` here): a tensor output whose rows
   are the items is encoded with one vectorised copy (the msgpack header of one item is the
   same for every item); anything else item by item. The encoded outputs are written back to
   back into the replica's output segment (or returned as a numpy array through Ray).
6. **Envelope and Redis, once per request** (``nosq.manager.serving.results``): each request's envelope is
   its small header spliced before its encoded output (never re-encoded), written with one
   ``SET NX EX``; the reply-stream notice carries the envelope only when it is small
   (``ManagerSettings.reply_inline_bytes``), otherwise just the id.

Only numpy and the standard library are used here: the manager imports this module, torch
stays in the replicas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np

from nosq.producer.codec import DTYPES
from nosq.producer.wire import ErrorCode

__all__ = [
    "Alloc",
    "BatchInput",
    "BatchOutput",
    "ItemResult",
    "TensorLayout",
    "batch_of",
    "encode_tensor_rows",
    "new_buffer",
    "pack",
    "pack_outputs",
    "uniform_tensors",
]

_TENSOR_KEYS: Final = frozenset(("dtype", "shape", "data"))
Bytes = np.ndarray[Any, np.dtype[np.uint8]]
Offsets = np.ndarray[Any, np.dtype[np.int64]]
#: where encoded outputs go: ``alloc(size)`` gives ``size`` writable bytes (the output segment
#: of a shared-memory channel, or a fresh array for a Ray call)
Alloc = Callable[[int], Bytes]


def new_buffer(size: int) -> Bytes:
    """An :data:`Alloc` for outputs that travel back through Ray."""
    return np.empty(size, dtype=np.uint8)


@dataclass(slots=True)
class BatchInput:
    """A batch on its way to a replica: the payloads back to back, ``offsets[i]:offsets[i+1]``
    is item ``i``; ``cts`` is one content type for every item or one per item."""

    method: str
    cts: str | tuple[str, ...]
    buffer: Bytes
    offsets: Offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ct(self, index: int) -> str:
        return self.cts if isinstance(self.cts, str) else self.cts[index]

    def item(self, index: int) -> bytes:
        return self.buffer[int(self.offsets[index]):int(self.offsets[index + 1])].tobytes()


@dataclass(slots=True)
class BatchOutput:
    """A batch's outcome: item ``i``'s encoded output is ``buffer[offsets[i]:offsets[i+1]]``;
    a failed item has an empty slice and an entry in ``failures`` (index -> code, message).
    ``ran`` is False for items that never reached the model (they did not decode);
    ``stages`` has the ms spent in each step (decode, stage, model, fetch, encode);
    ``provenance`` is what the model said about the batch (``batch_provenance()``: a text
    model's ``tokens`` and ``padding``), JSON-ready, added to each result's ``batch`` map."""

    buffer: Any  # np.ndarray (through Ray) or a memoryview of a shared-memory segment
    offsets: Offsets
    failures: dict[int, tuple[ErrorCode, str]] = field(default_factory=dict)
    not_run: frozenset[int] = frozenset()
    exec_ms: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def out(self, index: int) -> memoryview:
        return memoryview(self.buffer)[int(self.offsets[index]):int(self.offsets[index + 1])]

    def items(self) -> list[ItemResult]:
        """Each item's outcome on its own (outputs copied out of the buffer)."""
        results = []
        for index in range(len(self)):
            failure = self.failures.get(index)
            results.append(ItemResult(True, bytes(self.out(index))) if failure is None
                           else ItemResult(False, code=failure[0], message=failure[1]))
        return results


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item of a :class:`BatchOutput`: its encoded output, or an error code and message."""

    ok: bool
    out: bytes = b""
    code: ErrorCode | None = None
    message: str = ""


def batch_of(method: str, cts: str | Sequence[str], payloads: Sequence[bytes]) -> BatchInput:
    """A :class:`BatchInput` of ``payloads`` (one content type for all, or one each)."""
    return BatchInput(method, cts if isinstance(cts, str) else tuple(cts),
                      np.frombuffer(b"".join(payloads), dtype=np.uint8), pack(payloads))


def pack(payloads: Sequence[bytes], into: Any = None, start: int = 0) -> Offsets:
    """Offsets of ``payloads`` laid back to back; with ``into`` (a writable buffer, e.g. a
    shared-memory segment) they are also copied there from byte ``start`` (one copy each)."""
    offsets = np.empty(len(payloads) + 1, dtype=np.int64)
    offsets[0] = 0
    np.cumsum([len(p) for p in payloads], out=offsets[1:])
    if into is not None:
        view = memoryview(into)
        position = start
        for payload in payloads:
            end = position + len(payload)
            view[position:end] = payload
            position = end
    return offsets


def pack_outputs(items: Sequence[bytes], alloc: Alloc) -> tuple[Bytes, Offsets]:
    """Encoded outputs (one per item, ``b""`` for a failed one) in one buffer, and their offsets."""
    offsets = pack(items)
    buffer = alloc(int(offsets[-1]))
    pack(items, into=buffer)
    return buffer, offsets


# -- step 3: a batch of identical msgpack tensors is one strided view -----------------------


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """What every item of a uniform batch is: dtype and shape on the wire."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


def uniform_tensors(batch: BatchInput) -> tuple[TensorLayout, np.ndarray[Any, Any]] | None:
    """``(layout, items)`` when every item of ``batch`` is a msgpack tensor map with the same
    header bytes (same dtype, shape, key order): ``items`` is a read-only view of shape
    ``(n, *shape)`` into the batch's buffer, nothing copied. None otherwise (decode item by item)."""
    n = len(batch)
    if n == 0 or batch.cts != "msgpack":
        return None
    offsets = batch.offsets
    size = int(offsets[1] - offsets[0])
    if size <= 0 or int(offsets[0]) != 0 or int(offsets[-1]) != n * size:
        return None
    if n > 1 and not bool(np.all(np.diff(offsets) == size)):
        return None
    rows = batch.buffer[: n * size].reshape(n, size)
    parsed = _tensor_header(rows[0].tobytes())
    if parsed is None:
        return None
    layout, start, end = parsed
    if end - start != math.prod(layout.shape) * DTYPES[layout.dtype]:
        return None
    if n > 1 and not (bool(np.all(rows[:, :start] == rows[0, :start]))
                      and bool(np.all(rows[:, end:] == rows[0, end:]))):
        return None
    data = rows[:, start:end]
    items = data.view(np.dtype(layout.dtype).newbyteorder("<")) if data.shape[1] else \
        np.zeros((n, 0), np.dtype(layout.dtype))
    return layout, items.reshape(n, *layout.shape)


def _tensor_header(item: bytes) -> tuple[TensorLayout, int, int] | None:
    """(layout, data start, data end) of a msgpack map that is exactly one tensor, else None."""
    if not item or item[0] != 0x83:  # fixmap of 3 entries
        return None
    reader = _Reader(item, 1)
    fields: dict[str, Any] = {}
    data_at = (0, 0)
    try:
        for _ in range(3):
            key = reader.string()
            if key not in _TENSOR_KEYS or key in fields:
                return None
            if key == "data":
                data_at = reader.binary()
                fields[key] = True
            elif key == "dtype":
                fields[key] = reader.string()
            else:
                fields[key] = reader.int_array()
    except (IndexError, ValueError):
        return None
    if reader.at != len(item) or fields.get("dtype") not in DTYPES or fields.get("shape") is None:
        return None
    return TensorLayout(fields["dtype"], tuple(fields["shape"])), data_at[0], data_at[1]


class _Reader:
    """The few msgpack forms a tensor map uses; anything else raises ValueError."""

    def __init__(self, data: bytes, at: int) -> None:
        self.data = data
        self.at = at

    def _take(self, size: int) -> bytes:
        chunk = self.data[self.at:self.at + size]
        if len(chunk) != size:
            raise ValueError("truncated")
        self.at += size
        return chunk

    def _uint(self, size: int) -> int:
        return int.from_bytes(self._take(size), "big")

    def string(self) -> str:
        head = self._uint(1)
        if 0xA0 <= head <= 0xBF:
            size = head & 0x1F
        elif head == 0xD9:
            size = self._uint(1)
        else:
            raise ValueError("not a short string")
        return self._take(size).decode("utf-8")

    def binary(self) -> tuple[int, int]:
        head = self._uint(1)
        widths = {0xC4: 1, 0xC5: 2, 0xC6: 4}
        if head not in widths:
            raise ValueError("not bin")
        size = self._uint(widths[head])
        start = self.at
        self._take(size)
        return start, start + size

    def int_array(self) -> list[int]:
        head = self._uint(1)
        if 0x90 <= head <= 0x9F:
            count = head & 0x0F
        elif head == 0xDC:
            count = self._uint(2)
        else:
            raise ValueError("not a short array")
        return [self._uint_value() for _ in range(count)]

    def _uint_value(self) -> int:
        head = self._uint(1)
        if head <= 0x7F:
            return head
        widths = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
        if head not in widths:
            raise ValueError("not a non-negative int")
        return self._uint(widths[head])


# -- step 5: a tensor output encoded as a batch ----------------------------------------------


def encode_tensor_rows(ct: str, rows: np.ndarray[Any, Any], alloc: Alloc) -> tuple[Bytes, Offsets] | None:
    """Item ``i`` = ``rows[i]`` encoded as a tensor in ``ct``, all items back to back, with their
    offsets: the same bytes ``nosq.producer.codec.encode_value`` gives each row. None when the dtype
    has no wire form or the items are numbers (the caller then encodes item by item)."""
    name = rows.dtype.name
    if name not in DTYPES or rows.ndim < 2:  # one number per item travels as a number, not a 0-d tensor
        return None
    n = rows.shape[0]
    little = np.ascontiguousarray(rows.astype(rows.dtype.newbyteorder("<"), copy=False))
    flat = little.reshape(n, -1).view(np.uint8) if little.size else np.zeros((n, 0), np.uint8)
    item_shape = list(rows.shape[1:])
    if ct == "msgpack":
        head = msgpack.packb({"dtype": name, "shape": item_shape}, use_bin_type=True)
        prefix = b"\x83" + head[1:] + b"\xa4data" + _bin_header(flat.shape[1])
        width = len(prefix) + flat.shape[1]
        buffer = alloc(n * width)
        out = buffer.reshape(n, width)
        out[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        out[:, len(prefix):] = flat
        return buffer, np.arange(n + 1, dtype=np.int64) * width
    if ct == "json":
        import base64
        import json

        start = b'{"dtype":' + json.dumps(name).encode() + b',"shape":' + json.dumps(item_shape,
                                                                                     separators=(",", ":")).encode()
        items = [start + b',"b64":"' + base64.b64encode(row.data) + b'"}' for row in flat]
        return pack_outputs(items, alloc)
    return None


def _bin_header(size: int) -> bytes:
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")
