"""A batch's provenance beyond id, size and reason (length bucket, the model's padded length and
padding share) in every envelope of the batch, from the shared template and from the error path."""

from __future__ import annotations

import pytest

from nosq.manager.serving.results import BatchInfo, Successes, error
from nosq.producer.codec import encode_value
from nosq.producer.wire import Request, decode_envelope

EXTRA = {"bucket": 64, "tokens": 58, "padding": 0.12}


@pytest.mark.parametrize("ct", ["msgpack", "json"])
def test_successes_carry_the_batch_provenance(ct: str) -> None:
    info = BatchInfo(id="m:1", size=2, reason="full", dispatched_ms=1010, exec_ms=3.5, extra=EXTRA)
    successes = Successes("emb", info)
    request = Request(id="a1", ct=ct, payload=b"", read_ms=1000, enqueued_ms=990)
    envelope = decode_envelope(ct, successes.envelope(request, encode_value(ct, [1.0])).envelope)
    assert envelope.ok and envelope.out == [1.0]
    assert envelope.batch == {"id": "m:1", "size": 2, "reason": "full", **EXTRA}
    failed = decode_envelope(ct, error("emb", request, "model_error", "boom", info).envelope)
    assert failed.batch == envelope.batch


def test_without_extra_the_batch_map_is_unchanged() -> None:
    info = BatchInfo(id="m:2", size=1, reason="idle", dispatched_ms=0, exec_ms=0.0)
    request = Request(id="a2", ct="json", payload=b"", read_ms=1)
    envelope = decode_envelope("json", Successes("noop", info).envelope(request, b"1").envelope)
    assert envelope.batch == {"id": "m:2", "size": 1, "reason": "idle"}
