"""Wire protocol v1: request fields, entry parsing and result envelopes."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosq.producer import ErrorCode, ProtocolError, wire
from nosq.producer.codec import CONTENT_TYPES, decode_value, encode_value
from nosq.producer.wire import (
    DEFAULT_TTL_S,
    MAX_TTL_S,
    PROTOCOL_VERSION,
    REQUEST_ID_RE,
    BadEntry,
    Envelope,
    Request,
    decode_envelope,
    encode_envelope,
    parse_request,
    request_fields,
)

FAST = settings(max_examples=200, deadline=None)
ENTRY_ID = b"1700000000123-4"


def as_entry(fields: dict[str, str | bytes | int]) -> dict[bytes, bytes]:
    """The fields as XREADGROUP returns them: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def good_entry(**extra: bytes) -> dict[bytes, bytes]:
    return {b"v": b"1", b"id": b"req-1", b"ct": b"msgpack", b"p": b"\x01", **{k.encode(): v for k, v in
                                                                             extra.items()}}


# -- request_fields ------------------------------------------------------------------------------


def test_request_fields_minimal() -> None:
    fields = request_fields(request_id="r1", ct="json", payload=b"[1]")
    assert fields == {"v": PROTOCOL_VERSION, "id": "r1", "ct": "json", "p": b"[1]"}


def test_request_fields_all_options() -> None:
    fields = request_fields(request_id="r1", ct="msgpack", payload=b"\x90", method="embed",
                            deadline_ms=1_700_000_000_000, ttl_s=60, reply="client-1", priority=0)
    assert fields == {"v": 1, "id": "r1", "ct": "msgpack", "p": b"\x90", "method": "embed",
                      "dl": 1_700_000_000_000, "ttl": 60, "reply": "client-1", "prio": 0}
    assert "prio" not in request_fields(request_id="r", ct="json", payload=b"1", priority=1)
    assert "ttl" not in request_fields(request_id="r", ct="json", payload=b"1", ttl_s=DEFAULT_TTL_S)


@pytest.mark.parametrize("request_id", ["a", "A-z_0.9:x", "x" * 128, "0"])
def test_good_request_ids(request_id: str) -> None:
    assert request_fields(request_id=request_id, ct="json", payload=b"1")["id"] == request_id


@pytest.mark.parametrize("request_id", ["", "x" * 129, "has space", "a{b}", "é", "a/b", "line\n",
                                        "tab\t", "a*", "nul\x00"])
def test_bad_request_ids(request_id: str) -> None:
    with pytest.raises(ProtocolError, match="request id"):
        request_fields(request_id=request_id, ct="json", payload=b"1")


@pytest.mark.parametrize("ttl_s", [0, -1, MAX_TTL_S + 1])
def test_bad_ttl(ttl_s: int) -> None:
    with pytest.raises(ProtocolError, match=f"result ttl {ttl_s} s"):
        request_fields(request_id="r", ct="json", payload=b"1", ttl_s=ttl_s)


@pytest.mark.parametrize("ttl_s", [1, MAX_TTL_S])
def test_ttl_bounds(ttl_s: int) -> None:
    assert request_fields(request_id="r", ct="json", payload=b"1", ttl_s=ttl_s)["ttl"] == ttl_s


@pytest.mark.parametrize("priority", [-1, 3, 10])
def test_bad_priority(priority: int) -> None:
    with pytest.raises(ProtocolError, match="priority"):
        request_fields(request_id="r", ct="json", payload=b"1", priority=priority)


@pytest.mark.parametrize("ct", ["xml", "", "JSON", "pickle"])
def test_bad_content_type(ct: str) -> None:
    with pytest.raises(ProtocolError, match="content type"):
        request_fields(request_id="r", ct=ct, payload=b"1")


@pytest.mark.parametrize("options", [{"deadline_ms": -5}, {"ttl_s": 1.5}, {"priority": 2.0}])
def test_request_fields_refuses_what_the_server_refuses(options: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        request_fields(request_id="r", ct="json", payload=b"1", **options)


request_options = st.fixed_dictionaries({
    "request_id": st.from_regex(REQUEST_ID_RE, fullmatch=True),
    "ct": st.sampled_from(CONTENT_TYPES),
    "payload": st.binary(max_size=32),
    "method": st.none() | st.text(min_size=1, max_size=16),
    "deadline_ms": st.none() | st.integers(1, 2**53),
    "ttl_s": st.integers(1, MAX_TTL_S),
    "reply": st.none() | st.from_regex(REQUEST_ID_RE, fullmatch=True),
    "priority": st.sampled_from([0, 1, 2]),
})


@FAST
@given(options=request_options)
def test_what_request_fields_writes_parses_back(options: dict[str, Any]) -> None:
    request = parse_request(ENTRY_ID, as_entry(request_fields(**options)))
    expected = {("id" if k == "request_id" else k): v for k, v in options.items()}
    assert request == Request(**expected, entry_id=ENTRY_ID.decode(), enqueued_ms=1_700_000_000_123)


# -- parse_request -------------------------------------------------------------------------------


def test_parse_minimal_entry() -> None:
    request = parse_request("1700000000123-0", good_entry())
    assert (request.id, request.ct, request.payload) == ("req-1", "msgpack", b"\x01")
    assert (request.method, request.deadline_ms, request.ttl_s, request.reply, request.priority) == (
        None, None, DEFAULT_TTL_S, None, 1)
    assert (request.entry_id, request.enqueued_ms) == ("1700000000123-0", 1_700_000_000_123)


def test_parse_full_entry() -> None:
    entry = good_entry(method=b"embed", dl=b"1700000001000", ttl=b"30", reply=b"c1", prio=b"2")
    request = parse_request(ENTRY_ID, entry)
    assert (request.method, request.deadline_ms, request.ttl_s, request.reply, request.priority) == (
        "embed", 1_700_000_001_000, 30, "c1", 2)


def test_parse_drops_an_unsafe_reply_name() -> None:
    assert parse_request(ENTRY_ID, good_entry(reply=b"a}b")).reply is None
    assert parse_request(ENTRY_ID, good_entry(dl=b"0")).deadline_ms is None


@pytest.mark.parametrize("raw_id", [None, b"", b"has space", b"x" * 129, b"\xff\xfe", b"{a}"])
def test_parse_without_a_usable_id(raw_id: bytes | None) -> None:
    entry = good_entry()
    if raw_id is None:
        del entry[b"id"]
    else:
        entry[b"id"] = raw_id
    with pytest.raises(BadEntry) as info:
        parse_request(ENTRY_ID, entry)
    assert info.value.request_id is None
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert isinstance(info.value, ProtocolError)
    assert ENTRY_ID.decode() in str(info.value)


@pytest.mark.parametrize(
    ("change", "code", "match"),
    [
        ({b"v": None}, ErrorCode.UNSUPPORTED_VERSION, "protocol version None"),
        ({b"v": b"2"}, ErrorCode.UNSUPPORTED_VERSION, "send v=1"),
        ({b"v": b"one"}, ErrorCode.UNSUPPORTED_VERSION, "version"),
        ({b"ct": b"xml"}, ErrorCode.BAD_REQUEST, "'ct' 'xml'"),
        ({b"ct": None}, ErrorCode.BAD_REQUEST, "'ct'"),
        ({b"ttl": b"abc"}, ErrorCode.BAD_REQUEST, "'ttl'"),
        ({b"ttl": b"0"}, ErrorCode.BAD_REQUEST, "'ttl'"),
        ({b"ttl": str(MAX_TTL_S + 1).encode()}, ErrorCode.BAD_REQUEST, "'ttl'"),
        ({b"p": None}, ErrorCode.BAD_REQUEST, "'p'"),
        ({b"dl": b"-1"}, ErrorCode.BAD_REQUEST, "'dl'"),
        ({b"dl": b"soon"}, ErrorCode.BAD_REQUEST, "'dl'"),
        ({b"dl": b"1.5"}, ErrorCode.BAD_REQUEST, "'dl'"),
        ({b"prio": b"3"}, ErrorCode.BAD_REQUEST, "'prio'"),
        ({b"prio": b"-1"}, ErrorCode.BAD_REQUEST, "'prio'"),
        ({b"prio": b"high"}, ErrorCode.BAD_REQUEST, "'prio'"),
    ],
)
def test_parse_bad_entry_carries_the_request_id(change: dict[bytes, bytes | None], code: ErrorCode,
                                                match: str) -> None:
    entry = good_entry(reply=b"client-7")
    for key, value in change.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    with pytest.raises(BadEntry, match=match) as info:
        parse_request(ENTRY_ID, entry)
    bad = info.value
    assert (bad.request_id, bad.code, bad.reply) == ("req-1", code, "client-7")
    assert bad.ct == ("msgpack" if b"ct" not in change else "json")  # answered in a ct it can read
    assert bad.ttl_s == DEFAULT_TTL_S


def test_bad_entry_keeps_a_valid_ttl() -> None:
    with pytest.raises(BadEntry) as info:
        parse_request(ENTRY_ID, good_entry(ttl=b"60", prio=b"9", ct=b"json"))
    assert (info.value.ttl_s, info.value.ct) == (60, "json")


field_names = st.sampled_from([b"v", b"id", b"ct", b"p", b"method", b"dl", b"ttl", b"reply", b"prio", b"x"])
field_values = (
    st.binary(max_size=12)
    | st.sampled_from([b"1", b"json", b"msgpack", b"req-1", b"0", b"-1", b"600", b"2"])
    | st.integers(-(2**70), 2**70).map(lambda i: str(i).encode())
)


@FAST
@given(fields=st.dictionaries(field_names, field_values, max_size=10),
       entry_id=st.sampled_from([b"1-0", "1700000000000-1", b"0-1"]))
def test_parse_any_entry_raises_only_bad_entry(fields: dict[bytes, bytes], entry_id: bytes | str) -> None:
    try:
        request = parse_request(entry_id, fields)
    except BadEntry as exc:
        assert exc.request_id is None or REQUEST_ID_RE.fullmatch(exc.request_id)
        assert exc.ct in CONTENT_TYPES
        assert 1 <= exc.ttl_s <= MAX_TTL_S
        return
    assert REQUEST_ID_RE.fullmatch(request.id) and request.ct in CONTENT_TYPES
    assert 1 <= request.ttl_s <= MAX_TTL_S and request.priority in (0, 1, 2)


# -- envelopes -----------------------------------------------------------------------------------


def header(**extra: Any) -> dict[str, Any]:
    return {"v": 1, "id": "req-1", "ok": True, "model": "mlp", "timings": {"queued_ms": 1.5, "wait_ms": 0.5,
            "exec_ms": 3.0}, "batch": {"id": "b-9", "size": 32, "reason": "full"}, "deliveries": 2, **extra}


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_envelope_with_output(ct: str) -> None:
    out = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "label": "cat"}
    data = encode_envelope(ct, header(), encode_value(ct, out))
    envelope = decode_envelope(ct, data)
    assert (envelope.id, envelope.ok, envelope.model, envelope.deliveries) == ("req-1", True, "mlp", 2)
    assert envelope.timings == {"queued_ms": 1.5, "wait_ms": 0.5, "exec_ms": 3.0}
    assert envelope.batch == {"id": "b-9", "size": 32, "reason": "full"}
    np.testing.assert_array_equal(envelope.out["y"], out["y"])
    assert envelope.out["label"] == "cat"
    assert (envelope.code, envelope.message) == ("", "")


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_envelope_without_output(ct: str) -> None:
    data = encode_envelope(ct, header(ok=False, err={"code": "model_error", "message": "boom"}))
    envelope = decode_envelope(ct, data)
    assert (envelope.ok, envelope.out, envelope.code, envelope.message) == (False, None, "model_error", "boom")
    assert "out" not in decode_value(ct, data)


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_minimal_envelope(ct: str) -> None:
    assert decode_envelope(ct, encode_envelope(ct, {"id": "r", "ok": True})) == Envelope(id="r", ok=True)


@pytest.mark.parametrize("ct", CONTENT_TYPES)
@pytest.mark.parametrize("n_fields", [14, 15, 16, 17, 40, 65_534])
@pytest.mark.parametrize("with_out", [False, True])
def test_envelope_map_sizes(ct: str, n_fields: int, with_out: bool) -> None:
    """msgpack maps of 16+ entries need a map16 header (and map32 past 65535)."""
    head = {"id": "r", "ok": True, **{f"x{i}": i for i in range(n_fields - 2)}}
    assert len(head) == n_fields
    out = encode_value(ct, [1, 2]) if with_out else None
    data = encode_envelope(ct, head, out)
    expected = {**head, "out": [1, 2]} if with_out else head
    assert decode_value(ct, data) == expected
    if ct == "msgpack":
        assert msgpack.unpackb(data) == expected
    assert decode_envelope(ct, data).out == ([1, 2] if with_out else None)


def test_msgpack_envelope_past_map16() -> None:
    head = {"id": "r", "ok": True, **{f"x{i}": i for i in range(65_535)}}
    assert decode_value("msgpack", encode_envelope("msgpack", head, b"\xc0")) == {**head, "out": None}


@FAST
@given(
    ct=st.sampled_from(CONTENT_TYPES),
    extra=st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("id", "ok", "out")),
                          st.none() | st.integers(-(2**31), 2**31) | st.text(max_size=5), max_size=24),
    out=st.none() | st.lists(st.integers(0, 9), max_size=4) | st.text(max_size=8),
)
def test_envelope_round_trip(ct: str, extra: dict[str, Any], out: Any) -> None:
    head = {"id": "r-1", "ok": True, **extra}
    data = encode_envelope(ct, head, encode_value(ct, out))
    assert decode_value(ct, data) == {**head, "out": out}


@pytest.mark.parametrize("ct", CONTENT_TYPES)
@pytest.mark.parametrize("value", [[1], "text", 3, {"ok": True}, {"id": "r"}, None])
def test_not_an_envelope(ct: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match="not a v1 envelope"):
        decode_envelope(ct, encode_value(ct, value))


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_envelope_from_bad_bytes(ct: str) -> None:
    with pytest.raises(ProtocolError):
        decode_envelope(ct, b"\xc1{")


@pytest.mark.parametrize("ct", CONTENT_TYPES)
@pytest.mark.parametrize("bad", [{"err": "boom"}, {"deliveries": "many"}, {"timings": [1, 2]},
                                 {"batch": "b"}, {"deliveries": [1]}])
def test_envelope_with_malformed_fields(ct: str, bad: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_envelope(ct, encode_value(ct, {"id": "r", "ok": False, **bad}))


_FIELD_VALUES = {
    b"v": [b"1", b"2", b"", b"01"],
    b"id": [b"abc-1", b"a" * 128, b"a" * 129, b"bad id", b"", b"\xff"],
    b"ct": [b"msgpack", b"json", b"xml", b""],
    b"p": [b"\x91\x01", b""],
    b"reply": [b"client-1", b"bad reply", b""],
    b"dl": [b"0", b"1717171717000", b"-5", b"+5", b" 7", b"x"],
    b"ttl": [b"1", b"600", b"604800", b"604801", b"0", b"+60", b"x"],
    b"prio": [b"0", b"1", b"2", b"3", b"01", b"x"],
    b"method": [b"forward", b"", b"\xff"],
}


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in _FIELD_VALUES.items()}))
def test_the_fast_parse_agrees_with_the_full_check(fields: dict[bytes, bytes]) -> None:
    """parse_request takes plainly valid entries in a few lookups; for every entry it must give
    what the full check gives: the same Request, or the same BadEntry."""
    def outcome(parse: Any) -> Any:
        try:
            return parse(b"1717171717000-3", fields)
        except BadEntry as exc:
            return (str(exc), exc.request_id, exc.ct, exc.reply, exc.ttl_s, exc.code)

    assert outcome(parse_request) == outcome(wire._parse_checked)
