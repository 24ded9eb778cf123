"""Fuzzing the manager with raw stream entries (hypothesis): random and adversarial entries,
XADDed the way any client could, interleaved with good requests, against one ``nosq serve``
subprocess (noop + mlp, Redis db 7).

Checked after every batch: the manager process is alive; every good request succeeded within
GOOD_BOUND_S; every entry with a readable id has a result envelope with that id (an error with
the expected code for the constructed-bad ones); every entry with an unreadable id is in the
dead-letter stream ``nosq:{model}:dlq``. At the end nothing is pending or left in the streams.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from chaos_support import ManagerProcess, db7, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nosq.producer import keys
from nosq.producer.codec import encode_value
from nosq.producer.wire import REQUEST_ID_RE, decode_envelope, request_fields

pytestmark = [pytest.mark.integration, pytest.mark.ray]

GOOD_BOUND_S = 15.0  # a good request interleaved with bad ones is answered within this
EXAMPLES = 100
MAX_PAYLOAD = 16 * 1024 * 1024  # the manager's default max_payload_bytes
ANY = None  # expectation: some result (ok or not), with the entry's id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[redis.Redis, ManagerProcess]]:
    with db7() as db:
        config = write_config(tmp_path_factory.mktemp("fuzz") / "serve.toml")
        manager = ManagerProcess(config, "fuzz")
        manager.start()
        try:
            yield db, manager
        finally:
            status = manager.stop()
            assert status == 0, f"the fuzzed manager exited with {status} on SIGTERM"


# -- strategies ------------------------------------------------------------------------------

def _rid() -> str:
    return "fz-" + uuid.uuid4().hex


def good(model: str, ct: str = "msgpack") -> dict[str, Any]:
    shape = (8,) if model == "noop" else (512,)
    value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return dict(request_fields(request_id=_rid(), ct=ct, payload=encode_value(ct, value)))


def _tensor_msgpack(dtype: Any, shape: Any, data: Any) -> bytes:
    return msgpack.packb({"dtype": dtype, "shape": shape, "data": data}, use_bin_type=True)


BAD = "bad_request"
# (name, mutation of a good entry's fields, expected error codes); model-dependent ones use ANY
MUTATIONS: list[tuple[str, Any, set[str] | None]] = [
    ("no v", lambda f: f.pop("v"), {"unsupported_version"}),
    ("v=2", lambda f: f.update(v="2"), {"unsupported_version"}),
    ("v=1.0", lambda f: f.update(v="1.0"), {"unsupported_version"}),
    ("v binary", lambda f: f.update(v=b"\xff\x00"), {"unsupported_version"}),
    ("no ct", lambda f: f.pop("ct"), {BAD}),
    ("ct=xml", lambda f: f.update(ct="xml"), {BAD}),
    ("ct=MSGPACK", lambda f: f.update(ct="MSGPACK"), {BAD}),
    ("no p", lambda f: f.pop("p"), {BAD}),
    ("p empty", lambda f: f.update(p=b""), {BAD}),
    ("p not msgpack", lambda f: f.update(p=b"\xc1\xc1\xc1"), {BAD}),
    ("p truncated", lambda f: f.update(p=f["p"][:-3]), {BAD}),
    ("p json as msgpack ct", lambda f: f.update(p=b'{"a": [1, 2'), {BAD}),
    ("msgpack ext", lambda f: f.update(p=msgpack.packb(msgpack.ExtType(5, b"xx"))), {BAD}),
    ("msgpack timestamp", lambda f: f.update(p=msgpack.packb(msgpack.Timestamp(1, 0))), {BAD}),
    ("msgpack int map key", lambda f: f.update(p=msgpack.packb({1: 2})), {BAD}),
    ("tensor bad dtype", lambda f: f.update(p=_tensor_msgpack("bfloat16", [2], b"\0" * 4)), {BAD}),
    ("tensor dtype int", lambda f: f.update(p=_tensor_msgpack(7, [2], b"\0" * 8)), {BAD}),
    ("tensor short bytes", lambda f: f.update(p=_tensor_msgpack("float32", [8], b"\0" * 31)), {BAD}),
    ("tensor long bytes", lambda f: f.update(p=_tensor_msgpack("float32", [8], b"\0" * 33)), {BAD}),
    ("tensor negative dim", lambda f: f.update(p=_tensor_msgpack("float32", [-1], b"")), {BAD}),
    ("tensor float dim", lambda f: f.update(p=_tensor_msgpack("float32", [2.0], b"\0" * 8)), {BAD}),
    ("tensor 33 dims", lambda f: f.update(p=_tensor_msgpack("uint8", [1] * 33, b"\0")), {BAD}),
    ("tensor huge shape", lambda f: f.update(p=_tensor_msgpack("float64", [1 << 40, 1 << 40], b"")), {BAD}),
    ("tensor data str", lambda f: f.update(p=_tensor_msgpack("uint8", [1], "x")), {BAD}),
    ("tensor shape str", lambda f: f.update(p=_tensor_msgpack("uint8", "1", b"\0")), {BAD}),
    ("json bad", lambda f: f.update(ct="json", p=b"{nope"), {BAD}),
    ("json NaN literal ok", lambda f: f.update(ct="json", p=b"[NaN]"), ANY),
    ("json bad b64", lambda f: f.update(ct="json", p=json.dumps(
        {"dtype": "float32", "shape": [1], "b64": "!!!!"}).encode()), {BAD}),
    ("json b64 wrong count", lambda f: f.update(ct="json", p=json.dumps(
        {"dtype": "float32", "shape": [2], "b64": base64.b64encode(b"\0" * 7).decode()}).encode()), {BAD}),
    ("json deep nesting", lambda f: f.update(ct="json", p=b"[" * 100_000 + b"]" * 100_000), {BAD}),
    ("msgpack deep nesting", lambda f: f.update(p=b"\x91" * 100_000 + b"\xc0"), ANY),
    ("unknown method", lambda f: f.update(method="__init__"), {"unknown_method"}),
    ("method unicode", lambda f: f.update(method="forwärd"), {"unknown_method"}),
    ("dl negative", lambda f: f.update(dl="-5"), {BAD}),
    ("dl garbage", lambda f: f.update(dl="soon"), {BAD}),
    ("dl float", lambda f: f.update(dl="1.5e12"), {BAD}),
    ("dl past", lambda f: f.update(dl="1"), {"deadline_exceeded"}),
    ("dl huge", lambda f: f.update(dl=str(1 << 80)), ANY),
    ("ttl 0", lambda f: f.update(ttl="0"), {BAD}),
    ("ttl negative", lambda f: f.update(ttl="-1"), {BAD}),
    ("ttl 7 days + 1", lambda f: f.update(ttl="604801"), {BAD}),
    ("ttl garbage", lambda f: f.update(ttl="ten"), {BAD}),
    ("prio 3", lambda f: f.update(prio="3"), {BAD}),
    ("prio -1", lambda f: f.update(prio="-1"), {BAD}),
    ("prio binary", lambda f: f.update(prio=struct.pack("<q", 1)), {BAD}),
    ("reply bad id", lambda f: f.update(reply="a b{c}"), ANY),
    ("extra fields", lambda f: f.update(zzz="1", **{"": "empty name"}), ANY),
    ("wrong tensor for model", lambda f: f.update(p=encode_value("msgpack", np.zeros((3, 5), np.int64))), ANY),
    ("scalar payload", lambda f: f.update(p=msgpack.packb(3)), ANY),
    ("nil payload", lambda f: f.update(p=msgpack.packb(None)), ANY),
    ("empty tensor", lambda f: f.update(p=_tensor_msgpack("float32", [0], b"")), ANY),
]

ODD_IDS = st.one_of(
    st.sampled_from(["a{b}", "{x}", "has space", " lead", "trail ", "tab\tid", "nl\nid", "ünïcödé", "日本",
                     "x" * 129, "y" * 200, "", "a/b", "a*b", "id\x00nul", "😀"]),
    st.text(min_size=1, max_size=200).filter(lambda s: not REQUEST_ID_RE.fullmatch(s)),
    st.binary(min_size=1, max_size=64).filter(lambda b: not REQUEST_ID_RE.fullmatch(b.decode("utf-8", "replace"))),
)
FIELD_NAMES = st.sampled_from(["v", "id", "ct", "p", "method", "dl", "ttl", "reply", "prio", "x", "ID", "P"])
FIELD_VALUES = st.one_of(st.binary(max_size=64), st.text(max_size=32), st.integers().map(str),
                         st.sampled_from(["1", "msgpack", "json", "0", "-1", ""]))


@st.composite
def bad_entries(draw: st.DrawFn, model: str) -> tuple[dict[str, Any], str | None, set[str] | None]:
    """(fields, readable id or None, expected codes or ANY)."""
    kind = draw(st.sampled_from(["mutation", "mutation", "mutation", "odd_id", "random"]))
    fields = good(model, draw(st.sampled_from(["msgpack", "json"])))
    if kind == "mutation":
        _name, mutate, expected = draw(st.sampled_from(MUTATIONS))
        mutate(fields)
        return fields, fields["id"], expected
    if kind == "odd_id":
        fields["id"] = draw(ODD_IDS)
        if draw(st.booleans()):
            fields.pop("id")
        return fields, None, None
    raw = draw(st.dictionaries(FIELD_NAMES, FIELD_VALUES, min_size=1, max_size=9))
    readable = draw(st.booleans())
    if readable:
        raw["id"] = _rid()
    raw_id = raw.get("id")
    if isinstance(raw_id, str) and REQUEST_ID_RE.fullmatch(raw_id):
        raw["id"] = _rid()  # a unique one: a random valid id could repeat across examples
        return raw, raw["id"], ANY
    if isinstance(raw_id, bytes) and REQUEST_ID_RE.fullmatch(raw_id.decode("utf-8", "replace")):
        raw["id"] = _rid()
        return raw, raw["id"], ANY
    return raw, None, None


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[tuple[dict[str, Any], str | None, set[str] | None, bool]]]:
    model = draw(st.sampled_from(["noop", "mlp"]))
    items = [(*draw(bad_entries(model)), False) for _ in range(draw(st.integers(1, 6)))]
    goods = [(f, f["id"], {"ok"}, True) for f in (good(model) for _ in range(draw(st.integers(1, 2))))]
    order = draw(st.permutations(items + goods))
    return model, list(order)


# -- checks ----------------------------------------------------------------------------------

def _dlq_entries(db: redis.Redis, model: str) -> set[str]:
    return {fields.get(b"entry", b"").decode() for _, fields in db.xrange(f"nosq:{{{model}}}:dlq")}


def _check_batch(db: redis.Redis, manager: ManagerProcess, model: str,
                 sent: list[tuple[str, dict[str, Any], str | None, set[str] | None, bool]]) -> float:
    """Wait for every outcome; return the slowest good request's latency (s)."""
    started = time.monotonic()
    deadline = started + GOOD_BOUND_S
    want = {rid for _, _, rid, _, _ in sent if rid is not None}
    dead = {eid for eid, _, rid, _, _ in sent if rid is None}
    found: dict[str, bytes] = {}
    slowest_good = 0.0
    goods = {rid for _, _, rid, _, is_good in sent if is_good}
    while True:
        assert manager.alive, f"the manager died (status {manager.process.returncode if manager.process else None})"
        missing = sorted(want - set(found))
        if missing:
            for rid, data in zip(missing, db.mget([keys.result(r) for r in missing]), strict=True):
                if data is not None:
                    found[rid] = data
                    if rid in goods:
                        slowest_good = max(slowest_good, time.monotonic() - started)
        dlq = _dlq_entries(db, model) if dead else set()
        if want <= set(found) and dead <= dlq:
            break
        assert time.monotonic() < deadline, (
            f"within {GOOD_BOUND_S} s: no result for {sorted(want - set(found))}, "
            f"not dead-lettered: {sorted(dead - dlq)}; sent {[(s[1], s[3]) for s in sent]!r}")
        time.sleep(0.01)
    for _, fields, rid, expected, is_good in sent:
        if rid is None:
            continue
        data = found[rid]
        ct = fields.get("ct") if fields.get("ct") in ("msgpack", "json") else "json"
        try:
            envelope = decode_envelope(ct, data)
        except Exception:  # the envelope came back in the other content type
            envelope = decode_envelope("json" if ct == "msgpack" else "msgpack", data)
        assert envelope.id == rid
        if is_good:
            assert envelope.ok, f"a good request failed: {envelope.code} {envelope.message}"
        elif expected is not None:
            assert not envelope.ok and envelope.code in expected, (
                f"{fields!r:.300}: expected {expected}, got ok={envelope.ok} {envelope.code} {envelope.message}")
    return slowest_good


STATS: dict[str, Any] = {"batches": 0, "entries": 0, "dead": 0, "slowest_good_s": 0.0}


def test_fuzzed_entries_get_answers_or_dead_letters(served: tuple[redis.Redis, ManagerProcess]) -> None:
    db, manager = served
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batches())
    def one_batch(batch: tuple[str, list[tuple[dict[str, Any], str | None, set[str] | None, bool]]]) -> None:
        model, items = batch
        with db.pipeline(transaction=True) as pipe:
            for fields, _, _, _ in items:
                pipe.xadd(keys.requests(model), fields)
            entry_ids = [e.decode() for e in pipe.execute()]
        sent = [(eid, *item) for eid, item in zip(entry_ids, items, strict=True)]
        slowest = _check_batch(db, manager, model, sent)
        STATS["batches"] += 1
        STATS["entries"] += len(items)
        STATS["dead"] += sum(1 for s in sent if s[2] is None)
        STATS["slowest_good_s"] = max(STATS["slowest_good_s"], slowest)

    one_batch()
    took = time.monotonic() - started
    print(f"\nFUZZ {STATS} in {took:.1f} s", flush=True)
    assert took < 120, f"fuzzing took {took:.0f} s"
    _assert_drained(db)


def test_oversized_payload_is_too_large_and_manager_survives(served: tuple[redis.Redis, ManagerProcess]) -> None:
    """17 MiB once (over the default 16 MiB max_payload_bytes), and the limit exactly."""
    db, manager = served
    big = good("noop")
    big["p"] = msgpack.packb(b"\0" * (17 * 1024 * 1024), use_bin_type=True)
    edge = good("noop")
    edge["p"] = msgpack.packb(b"\1" * (MAX_PAYLOAD - 5), use_bin_type=True)  # bin32 header: 5 bytes
    assert len(edge["p"]) == MAX_PAYLOAD
    after = good("noop")
    entries = [db.xadd(keys.requests("noop"), f).decode() for f in (big, edge, after)]
    sent = [(entries[0], big, big["id"], {"too_large"}, False),
            (entries[1], edge, edge["id"], ANY, False),
            (entries[2], after, after["id"], {"ok"}, True)]
    _check_batch(db, manager, "noop", sent)
    _assert_drained(db)


def _assert_drained(db: redis.Redis) -> None:
    deadline = time.monotonic() + 10
    for model in ("noop", "mlp"):
        while True:
            pending = int(db.xpending(keys.requests(model), keys.GROUP)["pending"])
            length = db.xlen(keys.requests(model))
            if pending == 0 and length == 0:
                break
            assert time.monotonic() < deadline, f"{model}: {pending} pending, {length} left in the stream"
            time.sleep(0.05)

