"""The shared-memory channel (nosq.workers.channel) with a real server thread and real sockets.

The replica side runs a handler of the test's own (no model): what is checked is the transport:
payloads and outputs through memfd segments that grow, the stage byte, errors that come back
as errors, and a closed replica that shows up as a lost channel.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from nosq.producer.wire import ErrorCode
from nosq.workers import channel
from nosq.workers.channel import ChannelClient, ChannelError, ChannelLost, ChannelServer, Stage
from nosq.workers.datapath import Alloc, BatchInput, BatchOutput, pack_outputs

pytestmark = pytest.mark.skipif(not channel.available(), reason="needs memfd and Unix sockets (Linux)")


def reverse(batch: BatchInput, stage: Callable[[Stage], None], alloc: Alloc) -> BatchOutput:
    """Each item's bytes reversed; item b"boom" fails; method "crash" raises."""
    if batch.method == "crash":
        raise RuntimeError("the handler broke")
    stage(Stage.IN_MODEL)
    items = [batch.item(i)[::-1] for i in range(len(batch))]
    failures = {i: (ErrorCode.MODEL_ERROR, "boom") for i, item in enumerate(items) if item == b"moob"}
    buffer, offsets = pack_outputs([b"" if i in failures else item for i, item in enumerate(items)], alloc)
    return BatchOutput(buffer, offsets, failures, exec_ms=0.5, stages={"model": 0.5})


@pytest.fixture
def server() -> Iterator[ChannelServer]:
    serving = ChannelServer(reverse, name="test")
    yield serving
    serving.close()


def test_a_batch_round_trip(server: ChannelServer) -> None:
    async def go() -> tuple[list[bytes], BatchOutput, Stage]:
        client = await ChannelClient.connect(server.address)
        try:
            output = await client.run("forward", "msgpack", [b"abc", b"boom", b"", b"xy"])
            return [bytes(output.out(i)) for i in range(len(output))], output, client.stage
        finally:
            client.close()

    outs, output, stage = asyncio.run(go())
    assert outs == [b"cba", b"", b"", b"yx"]
    assert output.failures == {1: (ErrorCode.MODEL_ERROR, "boom")}
    assert type(output.failures[1][0]) is ErrorCode  # decoded back into the enum, not left a str
    assert output.exec_ms == 0.5 and output.stages == {"model": 0.5}
    assert stage is Stage.DONE


def test_segments_grow_and_each_slot_is_its_own_connection(server: ChannelServer) -> None:
    """Batches larger than the segments (1 MiB at first) make both sides send new ones; two
    connections (slots) run batches at the same time without mixing them up."""
    rng = np.random.default_rng(0)
    big = [rng.bytes(700_000) for _ in range(3)]  # 2.1 MB in, 2.1 MB out

    async def slot(payloads: list[bytes]) -> list[bytes]:
        client = await ChannelClient.connect(server.address)
        try:
            outs = []
            for _ in range(3):
                output = await client.run("forward", "msgpack", payloads)
                outs = [bytes(output.out(i)) for i in range(len(output))]
            return outs
        finally:
            client.close()

    async def both() -> list[list[bytes]]:
        return list(await asyncio.gather(slot(big), slot([b"small", b"batch"])))

    first, second = asyncio.run(both())
    assert first == [p[::-1] for p in big]
    assert second == [b"llams", b"hctab"]


def test_a_handler_error_comes_back_as_an_error(server: ChannelServer) -> None:
    async def go() -> list[bytes]:
        client = await ChannelClient.connect(server.address)
        try:
            with pytest.raises(ChannelError, match="RuntimeError: the handler broke"):
                await client.run("crash", "json", [b"1"])
            output = await client.run("forward", "json", [b"12"])  # the connection is still good
            return [bytes(output.out(0))]
        finally:
            client.close()

    assert asyncio.run(go()) == [b"21"]


def dying(batch: BatchInput, stage: Callable[[Stage], None], alloc: Alloc) -> BatchOutput:
    """Method "die": the process exits in the middle of the model, as a segfault would."""
    stage(Stage.DECODING)
    if batch.method == "die":
        stage(Stage.IN_MODEL)
        os._exit(1)
    return reverse(batch, stage, alloc)


def _replica_process(addresses: Any) -> None:
    serving = ChannelServer(dying, name="test")
    addresses.put(serving.address)
    threading.Event().wait(60)


def test_a_replica_process_that_dies_is_a_lost_channel_and_its_stage_survives() -> None:
    """The replica process dies mid-batch: the manager's side gets ChannelLost, and the stage
    byte in the shared segment (still mapped by the manager) says it died in the model."""
    ctx = multiprocessing.get_context("spawn")
    addresses = ctx.Queue()
    replica = ctx.Process(target=_replica_process, args=(addresses,), daemon=True)
    replica.start()

    async def go(address: str) -> tuple[list[bytes], type[BaseException] | None, Stage]:
        client = await ChannelClient.connect(address)
        try:
            output = await client.run("forward", "json", [b"12"])
            before = [bytes(output.out(0))]
            try:
                await client.run("die", "json", [b"1"])
            except ChannelLost as exc:
                return before, type(exc), client.stage
            return before, None, client.stage
        finally:
            client.close()

    try:
        before, error, stage = asyncio.run(go(addresses.get(timeout=60)))
    finally:
        replica.join(10)
        if replica.is_alive():
            replica.kill()
    assert before == [b"21"]
    assert error is ChannelLost
    assert stage is Stage.IN_MODEL and stage.suspect
    assert replica.exitcode == 1


def test_connecting_to_nothing_is_a_lost_channel() -> None:
    with pytest.raises(ChannelLost, match="cannot connect"):
        asyncio.run(ChannelClient.connect("nosq-nobody-listens-here"))


def test_only_the_model_stage_is_suspect() -> None:
    assert [s for s in Stage if s.suspect] == [Stage.IN_MODEL]
