"""The batch as one buffer (nosq.workers.datapath): packing, the uniform-tensor view, batch encoding.

Every fast path is checked against the per-item codec it replaces: the same bytes out, and a
batch the fast path cannot take is recognised as such (None) rather than misread.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosq.producer.codec import DTYPES, encode_value
from nosq.producer.wire import ErrorCode
from nosq.workers.datapath import (
    BatchOutput,
    batch_of,
    encode_tensor_rows,
    new_buffer,
    pack,
    pack_outputs,
    uniform_tensors,
)


def test_pack_lays_payloads_back_to_back() -> None:
    payloads = [b"ab", b"", b"cde"]
    buffer = bytearray(16)
    offsets = pack(payloads, into=buffer, start=3)
    assert offsets.tolist() == [0, 2, 2, 5]
    assert bytes(buffer[3:8]) == b"abcde"
    batch = batch_of("forward", "json", payloads)
    assert [batch.item(i) for i in range(3)] == payloads and len(batch) == 3


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(5,), (2, 3), (0,), (3, 1, 2)])
def test_uniform_tensors_view_equals_the_decoded_items(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    items = [(rng.random(shape) * 100).astype(dtype) for _ in range(4)]
    batch = batch_of("forward", "msgpack", [encode_value("msgpack", x) for x in items])
    found = uniform_tensors(batch)
    assert found is not None
    layout, view = found
    assert (layout.dtype, layout.shape) == (dtype, shape)
    assert view.shape == (4, *shape)
    np.testing.assert_array_equal(view, np.stack(items))


def _not_uniform(payloads: list[bytes], cts: Any = "msgpack") -> bool:
    return uniform_tensors(batch_of("forward", cts, payloads)) is None


def test_batches_the_fast_path_must_not_take() -> None:
    f32 = [encode_value("msgpack", np.zeros(3, np.float32))]
    assert _not_uniform([*f32, encode_value("msgpack", np.zeros(4, np.float32))])  # other shape
    assert _not_uniform([*f32, encode_value("msgpack", np.zeros(3, np.int32))])  # same size, other dtype
    assert _not_uniform([encode_value("msgpack", {"x": 1})] * 2)  # not a tensor
    assert _not_uniform([encode_value("json", np.zeros(3, np.float32))] * 2, "json")  # JSON
    assert _not_uniform(f32 * 2, ("msgpack", "json"))  # content types differ
    truncated = f32[0][:-1] + b""
    assert _not_uniform([truncated, truncated])
    extra = msgpack.packb({"dtype": "float32", "shape": [1], "data": b"\0" * 4, "x": 1})
    assert _not_uniform([extra, extra])  # a fourth key: not a tensor map
    wrong_count = msgpack.packb({"dtype": "float32", "shape": [2], "data": b"\0" * 4})
    assert _not_uniform([wrong_count, wrong_count])  # byte count does not match the shape
    assert _not_uniform([])


def test_key_order_is_free_but_must_be_the_same_in_every_item() -> None:
    data = np.arange(2, dtype=np.float32).tobytes()
    first = msgpack.packb({"shape": [2], "data": data, "dtype": "float32"})
    second = msgpack.packb({"dtype": "float32", "shape": [2], "data": data})
    found = uniform_tensors(batch_of("forward", "msgpack", [first, first]))
    assert found is not None and found[1].tolist() == [[0.0, 1.0]] * 2
    assert _not_uniform([first, second])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), min_size=1, max_size=3), st.integers(1, 6),
       st.sampled_from(["msgpack", "json"]))
def test_batch_encoding_gives_the_per_item_bytes(dtype: str, shape: list[int], n: int, ct: str) -> None:
    rows = (np.random.default_rng(n).random((n, *shape)) * 10).astype(dtype)
    encoded = encode_tensor_rows(ct, rows, new_buffer)
    assert encoded is not None
    buffer, offsets = encoded
    items = [bytes(buffer[offsets[i]:offsets[i + 1]]) for i in range(n)]
    assert items == [encode_value(ct, row) for row in rows]


def test_batch_encoding_leaves_numbers_and_unknown_dtypes_to_the_codec() -> None:
    assert encode_tensor_rows("msgpack", np.zeros((2, 2), dtype="datetime64[s]"), new_buffer) is None
    assert encode_tensor_rows("msgpack", np.zeros(3, np.float32), new_buffer) is None  # items are numbers


def test_outputs_land_in_the_buffer_they_are_given() -> None:
    given_out: list[np.ndarray[Any, Any]] = []

    def alloc(size: int) -> np.ndarray[Any, Any]:
        given_out.append(np.zeros(size, np.uint8))
        return given_out[-1]

    buffer, offsets = pack_outputs([b"x", b"", b"yz"], alloc)
    assert buffer is given_out[0] and bytes(buffer) == b"xyz" and offsets.tolist() == [0, 1, 1, 3]
    output = BatchOutput(buffer, offsets, {1: (ErrorCode.MODEL_ERROR, "boom")})
    assert [(i.ok, i.out, i.code) for i in output.items()] == [(True, b"x", None), (False, b"", ErrorCode.MODEL_ERROR),
                                                              (True, b"yz", None)]
