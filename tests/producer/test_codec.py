"""The value codec: round trips of every wire dtype, and malformed bytes that only ever raise ProtocolError."""

from __future__ import annotations

import ast
import base64
import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nosq.producer import ProtocolError, RawTensor
from nosq.producer import codec as producer_codec
from nosq.producer import wire as producer_wire
from nosq.producer.codec import CONTENT_TYPES, DTYPES, MAX_DIMS, decode_value, encode_value

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TENSOR_KEYS = ({"dtype", "shape", "data"}, {"dtype", "shape", "b64"})

# -- strategies ----------------------------------------------------------------------------------

dtypes = st.sampled_from(sorted(DTYPES))
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def arrays(draw: st.DrawFn, byte_orders: str = "<>") -> np.ndarray:
    dtype = np.dtype(draw(dtypes)).newbyteorder(draw(st.sampled_from(byte_orders)))
    return draw(hnp.arrays(dtype, draws_shape(draw)))


def draws_shape(draw: st.DrawFn) -> tuple[int, ...]:
    return draw(shapes)


def not_a_tensor_map(value: dict[str, Any]) -> bool:
    return set(value) not in TENSOR_KEYS


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars | arrays(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4).filter(not_a_tensor_map),
    max_leaves=16,
)

# -- helpers -------------------------------------------------------------------------------------


def little(array: np.ndarray) -> bytes:
    """The wire bytes of an array: little-endian, C order."""
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()


def same(expected: Any, got: Any) -> bool:
    """Deep equality where arrays compare by dtype, shape and bytes (so NaN payloads count too)."""
    if isinstance(expected, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and got.dtype.name == expected.dtype.name
            and got.shape == expected.shape
            and got.tobytes() == little(expected)
        )
    if isinstance(expected, dict):
        return (isinstance(got, dict) and got.keys() == expected.keys()
                and all(same(v, got[k]) for k, v in expected.items()))
    if isinstance(expected, list | tuple):
        return (isinstance(got, list) and len(got) == len(expected)
                and all(same(e, g) for e, g in zip(expected, got, strict=True)))
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    return type(got) is type(expected) and got == expected


def round_trip(ct: str, value: Any) -> Any:
    return decode_value(ct, encode_value(ct, value))


def decodes_or_protocol_error(ct: str, data: bytes) -> Any:
    """Decode; any exception other than ProtocolError fails the test."""
    try:
        return decode_value(ct, data)
    except ProtocolError:
        return None


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ct", CONTENT_TYPES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (3, 0, 2), (1,), (2, 3), (2, 1, 3, 2)])
def test_every_dtype_round_trips(ct: str, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    decoded = round_trip(ct, array)
    assert same(array, decoded)
    assert decoded.dtype.itemsize == DTYPES[dtype]


@FAST
@given(ct=st.sampled_from(CONTENT_TYPES), array=arrays())
def test_arrays_round_trip(ct: str, array: np.ndarray) -> None:
    assert same(array, round_trip(ct, array))


@FAST
@given(ct=st.sampled_from(CONTENT_TYPES), value=values)
def test_nested_values_round_trip(ct: str, value: Any) -> None:
    assert same(value, round_trip(ct, value))


@FAST
@given(value=values)
def test_json_and_msgpack_decode_alike(value: Any) -> None:
    from_json = round_trip("json", value)
    from_msgpack = round_trip("msgpack", value)
    assert same(from_json, from_msgpack) and same(from_msgpack, from_json)


def test_nan_and_infinity() -> None:
    """msgpack carries them; JSON has no NaN or Infinity, so plain floats are refused (tensors are bytes)."""
    floats = [math.nan, math.inf, -math.inf, -0.0]
    tensor = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
    decoded = round_trip("msgpack", {"f": floats, "a": tensor})
    assert same({"f": floats, "a": tensor}, decoded)
    assert math.copysign(1.0, decoded["f"][3]) == -1.0
    assert same(tensor, round_trip("json", tensor))
    for value in floats[:3]:
        with pytest.raises(ProtocolError, match="json"):
            encode_value("json", {"f": [value]})


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_large_array(ct: str) -> None:
    array = np.arange(1_000_000, dtype=np.float32).reshape(1000, 1000)
    decoded = round_trip(ct, {"x": array})["x"]
    assert same(array, decoded)


def test_python_containers_and_numpy_scalars() -> None:
    value = {"t": (1, 2), "s": {3}, "n": np.float32(1.5), "i": np.int64(7), "b": np.bool_(True)}
    for ct in CONTENT_TYPES:
        assert round_trip(ct, value) == {"t": [1, 2], "s": [3], "n": 1.5, "i": 7, "b": True}
    assert round_trip("msgpack", {"raw": b"\x00\xff"}) == {"raw": b"\x00\xff"}


@FAST
@given(array=arrays(byte_orders="<>"))
def test_byte_order_and_layout_do_not_change_the_bytes(array: np.ndarray) -> None:
    native = array.astype(array.dtype.newbyteorder("<"))
    for ct in CONTENT_TYPES:
        assert encode_value(ct, array) == encode_value(ct, native.copy(order="C"))
    if array.ndim >= 2:
        view = np.asfortranarray(array).T
        assert same(view, round_trip("msgpack", view))


def test_the_wire_form_is_buildable_by_hand() -> None:
    """What a Node or Go client writes: little-endian bytes in a three-key map."""
    data = struct.pack("<3f", 1.0, 2.5, -3.0) + struct.pack("<3f", 0.0, 0.5, 8.0)
    by_hand = msgpack.packb({"dtype": "float32", "shape": [2, 3], "data": data})
    expected = np.array([[1.0, 2.5, -3.0], [0.0, 0.5, 8.0]], dtype=np.float32)
    assert same(expected, decode_value("msgpack", by_hand))
    assert msgpack.unpackb(encode_value("msgpack", expected)) == {"dtype": "float32", "shape": [2, 3],
                                                                   "data": data}
    b64 = base64.b64encode(data).decode()
    by_hand_json = json.dumps({"dtype": "float32", "shape": [2, 3], "b64": b64}).encode()
    assert same(expected, decode_value("json", by_hand_json))
    assert json.loads(encode_value("json", expected)) == {"dtype": "float32", "shape": [2, 3], "b64": b64}


def test_decoded_arrays_are_little_endian_views() -> None:
    decoded = round_trip("msgpack", np.arange(4, dtype=np.int32))
    assert decoded.dtype == np.dtype("<i4")
    assert not decoded.flags.writeable  # zero-copy over the received bytes: copy before editing


def test_without_numpy_tensors_decode_to_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    encoded = {ct: encode_value(ct, {"x": array}) for ct in CONTENT_TYPES}
    monkeypatch.setattr(producer_codec, "np", None)
    for ct, data in encoded.items():
        raw = decode_value(ct, data)["x"]
        assert raw == RawTensor("int16", (2, 3), little(array))
        assert encode_value(ct, {"x": raw}) == data


# -- torch ---------------------------------------------------------------------------------------


@FAST
@given(array=arrays(byte_orders="<"))
def test_torch_encodes_like_numpy(array: np.ndarray) -> None:
    tensor = torch.from_numpy(array.copy())
    for ct in CONTENT_TYPES:
        assert encode_value(ct, tensor) == encode_value(ct, array)
        assert encode_value(ct, [tensor, {"t": tensor}]) == encode_value(ct, [array, {"t": array}])


def test_torch_views_and_grad() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for tensor in (base.T, base[:, ::2], base.clone().requires_grad_(True)):
        expected = tensor.detach().contiguous().numpy()
        assert encode_value("msgpack", tensor) == encode_value("msgpack", expected)


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_torch_bfloat16_is_refused(ct: str) -> None:
    with pytest.raises(ProtocolError, match="bfloat16"):
        encode_value(ct, {"x": torch.zeros(2, dtype=torch.bfloat16)})


def test_torch_tensor_subclasses_encode() -> None:
    weight = torch.nn.Parameter(torch.ones(2, 2))
    assert encode_value("msgpack", weight) == encode_value("msgpack", np.ones((2, 2), np.float32))


# -- what cannot be encoded ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ct", "value"),
    [
        ("msgpack", object()),
        ("json", object()),
        ("json", b"bytes"),
        ("msgpack", 2**64),
        ("msgpack", np.array(["a"])),
        ("json", np.array([object()], dtype=object)),
        ("msgpack", np.array(["2024-01-01"], dtype="datetime64[D]")),
        ("msgpack", torch.zeros(2, dtype=torch.float8_e4m3fn)),
        ("xml", 1),
    ],
)
def test_unencodable_values(ct: str, value: Any) -> None:
    with pytest.raises(ProtocolError):
        encode_value(ct, value)


# -- malformed input: ProtocolError and nothing else ---------------------------------------------


@FAST
@given(ct=st.sampled_from(CONTENT_TYPES), data=st.binary(max_size=300))
def test_random_bytes(ct: str, data: bytes) -> None:
    decodes_or_protocol_error(ct, data)


@FAST
@given(value=values, data=st.data())
def test_truncated_msgpack(value: Any, data: st.DataObject) -> None:
    encoded = encode_value("msgpack", value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ProtocolError):
        decode_value("msgpack", encoded[:cut])


@FAST
@given(value=values, data=st.data())
def test_mutated_payloads(value: Any, data: st.DataObject) -> None:
    ct = data.draw(st.sampled_from(CONTENT_TYPES))
    encoded = bytearray(encode_value(ct, value))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    decodes_or_protocol_error(ct, bytes(encoded))


junk = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=6)
tensor_dtypes = st.sampled_from(sorted(DTYPES)) | junk
tensor_shapes = (
    st.lists(st.integers(-3, 4), max_size=4)
    | st.lists(st.integers(0, 2**64 - 1), max_size=3)
    | st.lists(st.integers(0, 1), min_size=MAX_DIMS, max_size=MAX_DIMS + 2)
    | st.lists(junk, max_size=3)
    | junk
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
)


@FAST
@given(dtype=tensor_dtypes, shape=tensor_shapes, data=st.binary(max_size=64) | junk)
def test_msgpack_tensor_maps(dtype: Any, shape: Any, data: Any) -> None:
    try:
        encoded = msgpack.packb({"dtype": dtype, "shape": shape, "data": data}, use_bin_type=True)
    except (OverflowError, TypeError):
        return  # not representable in msgpack at all
    decoded = decodes_or_protocol_error("msgpack", encoded)
    if decoded is not None:
        assert isinstance(decoded, np.ndarray)
        assert (decoded.dtype.name, list(decoded.shape)) == (dtype, shape)
        assert decoded.nbytes == len(data)


json_junk = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)


@FAST
@given(dtype=st.sampled_from(sorted(DTYPES)) | json_junk,
       shape=st.lists(st.integers(-3, 4), max_size=4) | st.lists(json_junk, max_size=3) | json_junk
       | st.lists(st.integers(0, 1), min_size=MAX_DIMS, max_size=MAX_DIMS + 2),
       b64=st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=12)
       | st.integers() | st.none())
def test_json_tensor_maps(dtype: Any, shape: Any, b64: Any) -> None:
    encoded = json.dumps({"dtype": dtype, "shape": shape, "b64": b64}).encode()
    decoded = decodes_or_protocol_error("json", encoded)
    if decoded is not None:
        assert isinstance(decoded, np.ndarray)
        assert (decoded.dtype.name, list(decoded.shape)) == (dtype, shape)


def mp(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


MALFORMED = [
    ("msgpack", b""),
    ("msgpack", b"\xc1"),  # the one never-used msgpack byte
    ("msgpack", mp([1, 2]) + b"\x01"),  # trailing bytes
    ("msgpack", b"\xa2\xff\xfe"),  # str that is not UTF-8
    ("msgpack", mp({1: "int key"})),
    ("msgpack", mp({"dtype": "float32", "shape": [2], "data": b"\x00" * 7})),  # wrong byte count
    ("msgpack", mp({"dtype": "float32", "shape": [], "data": b""})),  # 0-d needs one element
    ("msgpack", mp({"dtype": "float32", "shape": [0, 3], "data": b"\x00"})),
    ("msgpack", mp({"dtype": "float128", "shape": [1], "data": b"\x00" * 16})),
    ("msgpack", mp({"dtype": "object", "shape": [1], "data": b"\x00" * 8})),
    ("msgpack", mp({"dtype": 4, "shape": [1], "data": b"\x00" * 4})),
    ("msgpack", mp({"dtype": "int32", "shape": [-1], "data": b""})),
    ("msgpack", mp({"dtype": "int32", "shape": [1.0], "data": b"\x00" * 4})),
    ("msgpack", mp({"dtype": "int32", "shape": [True], "data": b"\x00" * 4})),
    ("msgpack", mp({"dtype": "int32", "shape": 1, "data": b"\x00" * 4})),
    ("msgpack", mp({"dtype": "int32", "shape": "1", "data": b"\x00" * 4})),
    ("msgpack", mp({"dtype": "int32", "shape": {"0": 1}, "data": b"\x00" * 4})),
    ("msgpack", mp({"dtype": "int32", "shape": None, "data": b""})),
    ("msgpack", mp({"dtype": "uint8", "shape": [1] * (MAX_DIMS + 1), "data": b"\x00"})),
    ("msgpack", mp({"dtype": "uint8", "shape": [0, 2**63 - 1, 2**63 - 1], "data": b""})),
    ("msgpack", mp({"dtype": "uint8", "shape": [2**64 - 1] * 2, "data": b""})),
    ("msgpack", mp({"dtype": "uint8", "shape": [3], "data": "abc"})),  # str, not bin
    ("msgpack", mp({"x": {"dtype": "int8", "shape": [2], "data": b"\x00"}})),  # nested, bad
    ("msgpack", mp(msgpack.ExtType(5, b"\x00"))),
    ("msgpack", b"\x91\xd4\xfb\x00"),  # [fixext1 of reserved type -5]
    ("msgpack", b"\x91" * 200_000 + b"\xc0"),  # deeply nested arrays
    ("msgpack", b"\x81\xa1k" * 200_000 + b"\xc0"),  # deeply nested maps
    ("json", b""),
    ("json", b"{"),
    ("json", b'{"a":}'),
    ("json", b"[1,"),
    ("json", b"nul"),
    ("json", b"\xff\xfe"),
    ("json", b'"\xff"'),
    ("json", b"1 2"),
    ("json", b"9" * 5000),  # past Python's int-from-string limit
    ("json", b"[" * 200_000 + b"]" * 200_000),
    ("json", b'{"a":' * 200_000 + b"1" + b"}" * 200_000),
    ("json", b'{"dtype":"int8","shape":[2],"b64":"AA=="}'),  # 1 byte for 2 elements
    ("json", b'{"dtype":"int8","shape":[1],"b64":"A"}'),  # bad padding
    ("json", b'{"dtype":"int8","shape":[1],"b64":"!!!!"}'),  # not base64
    ("json", b'{"dtype":"int8","shape":[1],"b64":[0]}'),
    ("json", b'{"dtype":"int8","shape":[1.5],"b64":"AA=="}'),
    ("json", b'{"dtype":"int8","shape":[1e400],"b64":"AA=="}'),
    ("json", b'{"dtype":"int8","shape":"[1]","b64":"AA=="}'),
    ("json", b'{"dtype":"char","shape":[1],"b64":"AA=="}'),
    ("json", b'{"dtype":"int8","shape":[-1],"b64":""}'),
    ("xml", b"<a/>"),
]


@pytest.mark.parametrize(("ct", "data"), MALFORMED, ids=[f"{ct}-{i}" for i, (ct, _) in enumerate(MALFORMED)])
def test_malformed(ct: str, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_value(ct, data)


def test_msgpack_timestamp_ext_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_value("msgpack", mp({"t": msgpack.Timestamp(1, 0)}))


# -- never pickle --------------------------------------------------------------------------------

UNPICKLED: list[str] = []


class Trap:
    """Unpickling this appends to UNPICKLED: the code a malicious pickle would run."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return UNPICKLED.append, ("unpickled!",)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something tried to unpickle wire data")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    UNPICKLED.clear()


@pytest.mark.usefixtures("no_unpickling")
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_pickles_are_refused(ct: str, protocol: int) -> None:
    payload = pickle.dumps({"x": Trap()}, protocol=protocol)
    with pytest.raises(ProtocolError):
        decode_value(ct, payload)
    assert UNPICKLED == []


@pytest.mark.usefixtures("no_unpickling")
def test_pickles_inside_values_stay_bytes() -> None:
    payload = pickle.dumps(Trap())
    assert decode_value("msgpack", mp({"blob": payload})) == {"blob": payload}
    as_object_array = mp({"dtype": "object", "shape": [1], "data": payload})
    with pytest.raises(ProtocolError, match="dtype"):
        decode_value("msgpack", as_object_array)
    assert UNPICKLED == []


def test_codec_modules_import_no_unpickler() -> None:
    forbidden = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    for module in (producer_codec, producer_wire):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & forbidden
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in forbidden
            elif isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle"
