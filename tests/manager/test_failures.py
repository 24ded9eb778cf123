"""Failure isolation: one bad request, entry or input fails alone, with the right code, and the
manager keeps serving everything else (design.md section 3, steps 3 and 6).

One manager serves this module (its models' actors take seconds to start), so db 10 is
flushed around the module and cleaned, streams kept, around each test (see ``redis_db10``).
Each test uses item values of its own, which the test models write to their record files.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis.asyncio

from nosq.producer import AsyncProducer, keys
from nosq.producer.wire import ErrorCode, now_ms
from tests.manager.harness import (
    config,
    entry,
    manager_settings,
    redis_settings,
    running_manager,
    spec,
    stream_is_drained,
    wait_envelope,
    wait_for,
    xadd_all,
)
from tests.manager.models import read_record

pytestmark = [pytest.mark.integration, pytest.mark.ray]
SHARED_MANAGER = True

RECORDER_DELAY_S = 0.5  # long enough to submit, cancel and check while it runs
SLEEPY_DELAY_S = 3.0


@dataclass
class Served:
    """The record files of the module's manager's test models."""

    picky_record: Path
    recorder_record: Path
    sleepy_record: Path


@pytest.fixture(scope="module")
async def served(
    ray_cluster: None, module_db10: None, tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Served]:
    """noop, picky (raises on negatives), mismatch (2n outputs), recorder and sleepy (slow).

    One batch in flight per replica, so requests wait in the batcher while a replica is busy.
    """
    records = tmp_path_factory.mktemp("records")
    served = Served(records / "picky.jsonl", records / "recorder.jsonl", records / "sleepy.jsonl")
    serve = config(
        spec("noop", "nosq.workers.demo:noop", max_batch=64),
        spec("picky", "raising", max_batch=16, options={"delay_s": 0.2, "record": str(served.picky_record)}),
        spec("mismatch", "wrong_count", max_batch=16),
        spec("recorder", "slow", max_batch=16,
             options={"delay_s": RECORDER_DELAY_S, "record": str(served.recorder_record)}),
        spec("sleepy", "slow", max_batch=16,
             options={"delay_s": SLEEPY_DELAY_S, "record": str(served.sleepy_record)}),
    )
    settings = manager_settings(inflight_per_replica=1, unknown_scan_interval_s=0.25)
    async with running_manager(serve, settings):
        yield served


@pytest.fixture
async def producer(redis_db10: redis.asyncio.Redis) -> AsyncIterator[AsyncProducer]:
    async with AsyncProducer(redis_settings(), default_timeout_s=30) as client:
        yield client


def vec(first: float, d: int = 4) -> np.ndarray:
    """An item whose first element identifies it in the models' record files."""
    item = np.arange(d, dtype=np.float32)
    item[0] = first
    return item


def ran(record: Path, first: float) -> int:
    """How many model calls included an item starting with ``first``."""
    return sum(1 for call in read_record(record) if first in call["firsts"])  # type: ignore[operator]


# -- malformed entries -------------------------------------------------------------------------


def _malformed(kind: str, rid: str) -> tuple[dict[str, Any], str, str, str]:
    """(entry fields, expected code, content type of the answer, a fragment of its message)."""
    good_payload = msgpack.packb([1.0, 2.0])
    if kind == "missing_payload":
        return {"v": 1, "id": rid, "ct": "msgpack"}, ErrorCode.BAD_REQUEST, "msgpack", "'p'"
    if kind == "bad_content_type":  # answered in JSON: the only thing every client can read
        return {"v": 1, "id": rid, "ct": "xml", "p": good_payload}, ErrorCode.BAD_REQUEST, "json", "'ct'"
    if kind == "wrong_version":
        return {"v": 2, "id": rid, "ct": "msgpack", "p": good_payload}, ErrorCode.UNSUPPORTED_VERSION, "msgpack", "v=1"
    if kind == "invalid_msgpack":  # 0xc1 is never used by msgpack
        return {"v": 1, "id": rid, "ct": "msgpack", "p": b"\xc1"}, ErrorCode.BAD_REQUEST, "msgpack", "not valid msgpack"
    if kind == "json_nan":  # RFC 8259 has no NaN, Infinity or numbers past float64
        return {"v": 1, "id": rid, "ct": "json", "p": b'{"a":NaN}'}, ErrorCode.BAD_REQUEST, "json", "NaN"
    if kind == "json_infinity":
        return {"v": 1, "id": rid, "ct": "json", "p": b"[1,Infinity]"}, ErrorCode.BAD_REQUEST, "json", "Infinity"
    if kind == "json_overflow":
        return {"v": 1, "id": rid, "ct": "json", "p": b"1e400"}, ErrorCode.BAD_REQUEST, "json", "float64 range"
    if kind == "unknown_method":
        return ({"v": 1, "id": rid, "ct": "msgpack", "p": good_payload, "method": "train"}, ErrorCode.UNKNOWN_METHOD,
                "msgpack", "'train'")
    if kind == "tensor_byte_count":
        tensor = msgpack.packb({"dtype": "float32", "shape": [2], "data": b"\0" * 4})
        fields = {"v": 1, "id": rid, "ct": "msgpack", "p": tensor}
        return fields, ErrorCode.BAD_REQUEST, "msgpack", "needs 8 bytes, got 4"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing_payload", "bad_content_type", "wrong_version", "invalid_msgpack", "tensor_byte_count",
             "json_nan", "json_infinity", "json_overflow", "unknown_method"]
)
async def test_malformed_entry_fails_alone(served: Served, redis_db10: redis.asyncio.Redis, kind: str) -> None:
    bad_id = f"bad-{uuid.uuid4().hex}"
    bad_fields, code, answer_ct, fragment = _malformed(kind, bad_id)
    good = [entry("noop", vec(float(i))) for i in range(3)]
    # one burst: good requests on both sides of the bad one, in one read of the manager
    await xadd_all(redis_db10, "noop", [good[0][1], bad_fields, good[1][1], good[2][1]])

    bad = await wait_envelope(redis_db10, bad_id, answer_ct)
    assert not bad.ok
    assert bad.code == code, bad
    assert fragment in bad.message
    assert bad.batch == {} and bad.timings["exec_ms"] == 0  # it never ran in a batch (protocol §5)
    for i, (rid, _) in enumerate(good):
        envelope = await wait_envelope(redis_db10, rid)
        assert envelope.ok, envelope
        np.testing.assert_array_equal(envelope.out, vec(float(i)))
    assert await stream_is_drained(redis_db10, "noop") == (0, 0)


async def test_entry_without_readable_id_goes_to_dead_letters(served: Served, redis_db10: redis.asyncio.Redis) -> None:
    payload = msgpack.packb([1.0])
    no_id = {"v": 1, "ct": "msgpack", "p": payload}
    bad_id = {"v": 1, "id": "spaces are not allowed", "ct": "msgpack", "p": payload}
    rid, good = entry("noop", vec(7.0))
    no_id_entry, bad_id_entry, _ = await xadd_all(redis_db10, "noop", [no_id, bad_id, good])

    assert (await wait_envelope(redis_db10, rid)).ok
    dlq = keys.dead_letters("noop")
    await wait_for(lambda: _xlen_is(redis_db10, dlq, 2), 10, "two entries in the dead-letter stream")
    letters = {fields[b"entry"]: fields for _, fields in await redis_db10.xrange(dlq)}
    assert set(letters) == {no_id_entry, bad_id_entry}
    for fields in letters.values():
        assert b"field 'id'" in fields[b"reason"]
        assert fields[b"code"] == b"bad_request"
        assert fields[b"p"] == payload  # the original fields travel with it
    assert letters[bad_id_entry][b"id"] == b"spaces are not allowed"
    assert await stream_is_drained(redis_db10, "noop") == (0, 0)  # acked and deleted


async def test_a_huge_invalid_id_is_quoted_short(
    served: Served, redis_db10: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    huge = "x y" * 350_000  # a megabyte, and not a valid id
    rid, good = entry("noop", vec(8.0))
    (huge_entry, _) = await xadd_all(redis_db10, "noop", [{"v": 1, "id": huge, "ct": "json", "p": b"1"}, good])
    assert (await wait_envelope(redis_db10, rid)).ok
    dlq = keys.dead_letters("noop")
    await wait_for(lambda: _xlen_is(redis_db10, dlq, 1), 10, "the entry in the dead-letter stream")
    [(_, letter)] = await redis_db10.xrange(dlq)
    assert letter[b"entry"] == huge_entry and letter[b"id"] == huge.encode()  # kept whole for operators
    assert len(letter[b"reason"]) < 300 and b"(1050000 characters)" in letter[b"reason"]
    lines = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert lines and all(len(line) < 400 for line in lines), [len(line) for line in lines]


# -- streams of models nobody serves ---------------------------------------------------------


async def _gone(client: redis.asyncio.Redis, key: str) -> bool:
    return not await client.exists(key)


@pytest.mark.parametrize("model", ["ghost-typo", ""])
async def test_an_unknown_models_stream_is_answered_then_deleted(
    served: Served, redis_db10: redis.asyncio.Redis, model: str,
) -> None:
    """A typo (or an empty model id, ``nosq:{}:req``) gets ``unknown_model`` answers; then its
    stream and consumer group are deleted, so unknown names leave no keys behind but results."""
    stream = keys.requests(model)
    rid = uuid.uuid4().hex
    await redis_db10.xadd(stream, {"v": 1, "id": rid, "ct": "json", "p": b"[1]"})
    envelope = await wait_envelope(redis_db10, rid, "json", timeout_s=10)
    assert envelope.code == ErrorCode.UNKNOWN_MODEL, envelope
    assert ("not a valid model id" if model == "" else "not served here") in envelope.message
    await wait_for(lambda: _gone(redis_db10, stream), 10, f"{stream} deleted")


async def test_an_entry_without_id_on_an_unknown_stream_goes_to_its_dead_letters(
    served: Served, redis_db10: redis.asyncio.Redis,
) -> None:
    stream, dlq = keys.requests("ghost"), keys.dead_letters("ghost")
    bad_entry = await redis_db10.xadd(stream, {"v": 1, "id": "bad id", "ct": "json", "p": b"1"})
    await wait_for(lambda: _xlen_is(redis_db10, dlq, 1), 10, "the entry in the dead-letter stream")
    [(_, letter)] = await redis_db10.xrange(dlq)
    assert letter[b"entry"] == bad_entry and letter[b"code"] == b"bad_request"
    assert b"field 'id'" in letter[b"reason"]
    assert 0 < await redis_db10.ttl(dlq) <= 24 * 3600  # an unknown model's dead letters expire
    await wait_for(lambda: _gone(redis_db10, stream), 10, f"{stream} deleted")


async def _xlen_is(client: redis.asyncio.Redis, key: str, n: int) -> bool:
    return int(await client.xlen(key)) == n


async def test_unknown_model_is_answered_not_left_to_time_out(served: Served, producer: AsyncProducer) -> None:
    started = time.monotonic()
    handle = await producer.submit("no-such-model", vec(1.0))
    envelope = await producer.outcome(handle, timeout_s=5)
    assert time.monotonic() - started < 5
    assert envelope.code == ErrorCode.UNKNOWN_MODEL
    assert "'no-such-model'" in envelope.message and "noop" in envelope.message


async def test_unknown_method_fails_alone(served: Served, producer: AsyncProducer) -> None:
    good = await producer.submit("noop", vec(501.0))
    bad = await producer.submit("noop", vec(502.0), method="train")

    envelope = await producer.outcome(bad)
    assert envelope.code == ErrorCode.UNKNOWN_METHOD
    assert "'train'" in envelope.message and "forward" in envelope.message
    assert (await producer.outcome(good)).ok


# -- failures inside a batch -----------------------------------------------------------------


async def test_model_error_fails_only_its_input(served: Served, producer: AsyncProducer) -> None:
    blocker = await producer.submit("picky", vec(101.0))
    await wait_for(lambda: ran(served.picky_record, 101.0), 10, "the blocker batch to start")
    values = [102.0, 103.0, -104.0, 105.0, 106.0, 107.0]
    handles = await producer.submit_many("picky", [vec(v) for v in values])  # they wait for the replica

    envelopes = [await producer.outcome(h) for h in handles]
    assert (await producer.outcome(blocker)).ok
    assert len({e.batch["id"] for e in envelopes}) == 1, [e.batch for e in envelopes]
    assert all(e.batch["size"] == len(values) for e in envelopes)
    for value, envelope in zip(values, envelopes, strict=True):
        if value < 0:
            assert envelope.code == ErrorCode.MODEL_ERROR
            assert "ValueError" in envelope.message and "negative" in envelope.message
        else:
            assert envelope.ok, envelope
            np.testing.assert_array_equal(envelope.out, vec(value))


async def test_output_count_mismatch_names_both_numbers(served: Served, producer: AsyncProducer) -> None:
    handles = await producer.submit_many("mismatch", [vec(float(v)) for v in range(3)])
    for handle in handles:
        envelope = await producer.outcome(handle)
        assert envelope.code == ErrorCode.OUTPUT_MISMATCH, envelope
        size = envelope.batch["size"]
        assert f"returned {2 * size} outputs for a batch of {size}" in envelope.message


# -- dropped before they run -----------------------------------------------------------------


async def test_expired_deadline_is_answered_without_running(served: Served, producer: AsyncProducer) -> None:
    expired = await producer.submit("recorder", vec(201.0), deadline_ms=now_ms() - 1000)
    fine = await producer.submit("recorder", vec(202.0))

    envelope = await producer.outcome(expired)
    assert envelope.code == ErrorCode.DEADLINE_EXCEEDED
    assert "deadline" in envelope.message
    assert (await producer.outcome(fine)).ok
    assert ran(served.recorder_record, 202.0) == 1
    assert ran(served.recorder_record, 201.0) == 0


async def test_deadline_passing_in_the_queue_is_not_run(served: Served, producer: AsyncProducer) -> None:
    blocker = await producer.submit("recorder", vec(211.0))
    await wait_for(lambda: ran(served.recorder_record, 211.0), 10, "the blocker batch to start")
    late = await producer.submit("recorder", vec(212.0), timeout_s=0.1)  # passes while the replica is busy

    assert (await producer.outcome(late)).code == ErrorCode.DEADLINE_EXCEEDED
    assert (await producer.outcome(blocker)).ok
    assert ran(served.recorder_record, 212.0) == 0


async def test_deadline_is_answered_while_the_replica_is_still_busy(served: Served, producer: AsyncProducer) -> None:
    """A client whose deadline passes hears ``deadline_exceeded`` about then, not when the
    replica it waits for frees up (design.md sections 3.3 and 8: timeouts that fire while the
    model is busy). The model is fresh, so its latency is unknown and the request is admitted."""
    blocker = await producer.submit("sleepy", vec(221.0))
    await wait_for(lambda: ran(served.sleepy_record, 221.0), 10, "the blocker batch to start")
    started = time.monotonic()
    late = await producer.submit("sleepy", vec(222.0), timeout_s=0.3)

    envelope = await producer.outcome(late, timeout_s=SLEEPY_DELAY_S + 10)
    answered_after = time.monotonic() - started
    assert envelope.code == ErrorCode.DEADLINE_EXCEEDED
    assert (await producer.outcome(blocker)).ok
    assert answered_after < 0.3 + 1.5, (
        f"deadline_exceeded came {answered_after:.1f} s after submission for a 0.3 s deadline: "
        f"only once the busy replica ({SLEEPY_DELAY_S} s batch) freed"
    )


async def test_cancelled_before_dispatch_is_not_run(served: Served, producer: AsyncProducer) -> None:
    blocker = await producer.submit("recorder", vec(301.0))
    await wait_for(lambda: ran(served.recorder_record, 301.0), 10, "the blocker batch to start")
    victim = await producer.submit("recorder", vec(302.0))
    await producer.cancel(victim)

    envelope = await producer.outcome(victim)
    assert envelope.code == ErrorCode.CANCELLED
    assert (await producer.outcome(blocker)).ok
    assert ran(served.recorder_record, 302.0) == 0


async def test_resubmitted_id_gets_the_same_result_without_a_second_run(
    served: Served, producer: AsyncProducer,
) -> None:
    rid = f"idem-{uuid.uuid4().hex}"
    first = await producer.outcome(await producer.submit("recorder", vec(401.0), request_id=rid))
    assert first.ok
    again = await producer.outcome(await producer.submit("recorder", vec(402.0), request_id=rid))

    assert again.ok
    np.testing.assert_array_equal(again.out, vec(401.0))  # the first answer, not a new run
    assert again.batch == first.batch
    assert ran(served.recorder_record, 401.0) == 1
    assert ran(served.recorder_record, 402.0) == 0
