"""Values on the wire: msgpack or JSON, with a tensor encoding any language can build.

A tensor is a map with exactly three keys:

* msgpack: ``{"dtype": "float32", "shape": [2, 3], "data": <bin: little-endian, C order>}``
* JSON:    ``{"dtype": "float32", "shape": [2, 3], "b64": "<base64 of the same bytes>"}``

Decoded tensors are numpy arrays when numpy is installed, else :class:`RawTensor`. Torch
tensors are accepted on encode when torch is installed; torch is never imported here.
Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from nosq.producer.errors import ProtocolError

try:  # numpy is optional for a producer
    import numpy as np
except ImportError:  # pragma: no cover - exercised in the no-numpy install check
    np = None  # type: ignore[assignment]

__all__ = ["CONTENT_TYPES", "DTYPES", "RawTensor", "decode_envelope_value", "decode_value", "encode_value"]

CONTENT_TYPES: Final = ("msgpack", "json")
#: dtype name on the wire -> bytes per element
DTYPES: Final[dict[str, int]] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "uint32": 4,
    "int32": 4,
    "uint64": 8,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}
MAX_DIMS: Final = 32
_MSGPACK_KEYS: Final = frozenset(("dtype", "shape", "data"))
_JSON_KEYS: Final = frozenset(("dtype", "shape", "b64"))
#: little-endian numpy dtype -> wire name (the arrays that go out without a copy), and back
_WIRE_NAMES: Final[dict[Any, str]] = {} if np is None else {np.dtype(n).newbyteorder("<"): n for n in DTYPES}
_NUMPY_DTYPES: Final[dict[str, Any]] = {} if np is None else {n: d for d, n in _WIRE_NAMES.items()}
_TENSOR_HEADS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_local = threading.local()  # one msgpack Packer per thread (a Packer is not thread-safe)


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A tensor as it travels: used when numpy is not installed."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode_value(ct: str, value: Any) -> bytes:
    """Encode one value (inputs or outputs) in content type ``ct``."""
    try:
        if ct == "msgpack":
            if np is not None and type(value) is np.ndarray:
                head = _tensor_head(value)
                if head is not None:  # one copy of the array's bytes, straight into the result
                    return b"".join((head, value.data))
            packer = getattr(_local, "packer", None)
            if packer is None:
                packer = _local.packer = msgpack.Packer(default=_msgpack_default, use_bin_type=True)
            return packer.pack(value)  # type: ignore[no-any-return]
        if ct == "json":
            return json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False).encode()
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {type(value).__name__} as {ct}: {exc}") from exc
    raise ProtocolError(f"unknown content type {ct!r}: use one of {', '.join(CONTENT_TYPES)}")


def decode_value(ct: str, data: bytes) -> Any:
    """Decode one value; malformed bytes raise :class:`ProtocolError`, never anything else."""
    try:
        if ct == "msgpack":
            value = msgpack.unpackb(data, raw=False, ext_hook=_reject_ext, strict_map_key=True)
            kind = type(value)
            if kind is dict or kind is list:
                return _walk_msgpack(value)
            if kind is msgpack.Timestamp:
                raise ProtocolError("msgpack timestamps (ext -1) are not part of protocol v1")
            return value
        if ct == "json":  # RFC 8259: no NaN/Infinity literals, no number beyond float64
            return json.loads(data, object_hook=_json_hook, parse_constant=_reject_constant,
                              parse_float=_finite_float)
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"payload is not valid {ct}: {exc}") from exc
    raise ProtocolError(f"unknown content type {ct!r}: use one of {', '.join(CONTENT_TYPES)}")


def decode_envelope_value(ct: str, data: bytes) -> Any:
    """:func:`decode_value` for a result envelope: in msgpack, only ``out`` is searched for
    tensors (the other fields are metadata, checked only for timestamps): cheaper per result."""
    if ct != "msgpack":
        return decode_value(ct, data)
    try:
        value = msgpack.unpackb(data, raw=False, ext_hook=_reject_ext, strict_map_key=True)
        if type(value) is not dict:
            return _walk_msgpack(value) if type(value) is list else _refuse_timestamp(value)
        for key, item in value.items():
            kind = type(item)
            if kind is dict or kind is list:
                if key == "out":
                    walked = _walk_msgpack(item)
                    if walked is not item:
                        value[key] = walked
                else:
                    for inner in item.values() if kind is dict else item:
                        inner_kind = type(inner)
                        if inner_kind is dict or inner_kind is list:
                            _walk_msgpack(inner)
                        elif inner_kind is msgpack.Timestamp:
                            raise ProtocolError("msgpack timestamps (ext -1) are not part of protocol v1")
            elif kind is msgpack.Timestamp:
                raise ProtocolError("msgpack timestamps (ext -1) are not part of protocol v1")
        return value
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"payload is not valid {ct}: {exc}") from exc


def _refuse_timestamp(value: Any) -> Any:
    if type(value) is msgpack.Timestamp:
        raise ProtocolError("msgpack timestamps (ext -1) are not part of protocol v1")
    return value


def tensor_parts(value: Any) -> tuple[str, tuple[int, ...], bytes] | None:
    """(dtype, shape, little-endian bytes) of a numpy array, torch tensor or RawTensor."""
    if isinstance(value, RawTensor):
        return value.dtype, value.shape, value.data
    if np is not None and isinstance(value, np.ndarray):
        return _numpy_parts(value)
    if _is_torch_tensor(value):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            raise ProtocolError("bfloat16 has no wire dtype: convert to float32 or float16 first")
        return _numpy_parts(tensor.numpy())
    return None


def _is_torch_tensor(value: Any) -> bool:
    """Without importing torch: a torch.Tensor or a subclass (nn.Parameter, ...)."""
    return any(c.__name__ == "Tensor" and c.__module__ == "torch" for c in type(value).__mro__)


def _numpy_parts(array: Any) -> tuple[str, tuple[int, ...], bytes]:
    name = array.dtype.name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {name!r} has no wire encoding: use one of {', '.join(DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return name, tuple(int(d) for d in array.shape), np.ascontiguousarray(little).tobytes()


def _tensor_head(array: Any) -> bytes | None:
    """The msgpack bytes of a plain C-contiguous little-endian array's tensor map up to its data
    (cached by dtype and shape); None for any other array."""
    name = _WIRE_NAMES.get(array.dtype)
    if name is None or not array.flags.c_contiguous:
        return None
    key = (name, array.shape)
    head = _TENSOR_HEADS.get(key)
    if head is None:
        head = msgpack.packb({"dtype": name, "shape": list(array.shape), "data": b""}, use_bin_type=True)[:-2]
        if len(_TENSOR_HEADS) < 4096:
            _TENSOR_HEADS[key] = head
    size: int = array.nbytes
    if size < 1 << 8:
        return head + bytes((0xC4, size))
    if size < 1 << 16:
        return head + b"\xc5" + size.to_bytes(2, "big")
    if size < 1 << 32:
        return head + b"\xc6" + size.to_bytes(4, "big")
    return None  # msgpack cannot carry it: the packer says so


def _msgpack_default(value: Any) -> Any:
    if np is not None and type(value) is np.ndarray:
        name = _WIRE_NAMES.get(value.dtype)
        if name is not None and value.flags.c_contiguous:  # msgpack packs the buffer itself as bin
            return {"dtype": name, "shape": value.shape, "data": value.data}
    parts = tensor_parts(value)
    if parts is not None:
        return {"dtype": parts[0], "shape": list(parts[1]), "data": parts[2]}
    return _scalar(value)


def _json_default(value: Any) -> Any:
    parts = tensor_parts(value)
    if parts is not None:
        return {"dtype": parts[0], "shape": list(parts[1]), "b64": base64.b64encode(parts[2]).decode()}
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("raw bytes have no JSON form: use msgpack or a uint8 tensor")
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not a msgpack/JSON value, array or tensor")


def _walk_msgpack(value: Any) -> Any:
    """Tensor maps become tensors and msgpack timestamps are refused, in one pass over the
    containers (cheaper than a Python hook per map and per list)."""
    if type(value) is dict:
        if len(value) == 3 and value.keys() == _MSGPACK_KEYS:
            data = value["data"]
            if not isinstance(data, bytes):
                raise ProtocolError("tensor 'data' must be msgpack bin (raw bytes)")
            return _build_tensor(value["dtype"], value["shape"], data)
        for key, item in value.items():
            kind = type(item)
            if kind is dict or kind is list:
                walked = _walk_msgpack(item)
                if walked is not item:
                    value[key] = walked  # replaces a value: the dict keeps its size
            elif kind is msgpack.Timestamp:
                raise ProtocolError("msgpack timestamps (ext -1) are not part of protocol v1")
        return value
    for index, item in enumerate(value):
        kind = type(item)
        if kind is dict or kind is list:
            walked = _walk_msgpack(item)
            if walked is not item:
                value[index] = walked
        elif kind is msgpack.Timestamp:
            raise ProtocolError("msgpack timestamps (ext -1) are not part of protocol v1")
    return value


def _json_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 3 and obj.keys() == _JSON_KEYS:
        b64 = obj["b64"]
        if not isinstance(b64, str):
            raise ProtocolError("tensor 'b64' must be a base64 string")
        try:
            data = base64.b64decode(b64, validate=True)
        except ValueError as exc:
            raise ProtocolError(f"tensor 'b64' is not valid base64: {exc}") from exc
        return _build_tensor(obj["dtype"], obj["shape"], data)
    return obj


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"JSON has no {name} (RFC 8259): send non-finite floats inside a float tensor")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ProtocolError(f"JSON number {text[:40]} is beyond the float64 range")
    return value


def _build_tensor(dtype: Any, shape: Any, data: bytes) -> Any:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"tensor dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"tensor shape {shape!r} must be a list of at most {MAX_DIMS} ints >= 0")
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"tensor shape {shape!r} must be a list of at most {MAX_DIMS} ints >= 0")
        count *= d
    expected = count * DTYPES[dtype]
    if len(data) != expected:
        raise ProtocolError(
            f"tensor of dtype {dtype} and shape {shape} needs {expected} bytes, got {len(data)}"
        )
    if np is None:
        return RawTensor(dtype, tuple(shape), data)
    array = np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype])
    return array if len(shape) == 1 else array.reshape(shape)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not part of protocol v1")
