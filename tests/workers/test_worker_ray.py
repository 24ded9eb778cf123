"""ModelWorker inside a real Ray actor, the way the manager wraps it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from nosq.producer.codec import decode_value, encode_value
from nosq.workers import demo
from nosq.workers.actor import ModelWorker
from nosq.workers.datapath import BatchInput, BatchOutput, pack
from nosq.workers.spec import ModelSpec

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",  # never join a cluster some earlier run left behind
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def test_mlp_in_ray_actor_matches_direct(ray_local: Any) -> None:
    """One batch through a Ray call and the same batch through the replica's shared-memory
    channel: the same outputs, equal to the model called directly."""
    import asyncio

    from nosq.workers.channel import ChannelClient

    spec = ModelSpec(id="mlp", factory="nosq.workers.demo:mlp", threads=1)
    actor = ray_local.remote(ModelWorker).options(num_cpus=spec.num_cpus).remote(spec)
    try:
        info = ray_local.get(actor.ready.remote(), timeout=120)
        assert info["device"] == "cpu"
        assert info["pid"] != os.getpid()
        assert info["channel"]
        items = [np.random.default_rng(i).standard_normal(512, dtype=np.float32) for i in range(6)]
        cts = ["msgpack", "json"] * 3
        payloads = [encode_value(ct, item) for ct, item in zip(cts, items, strict=True)]
        batch = BatchInput("forward", tuple(cts), np.frombuffer(b"".join(payloads), np.uint8), pack(payloads))
        result = ray_local.get(actor.run.remote(batch), timeout=120)
        assert isinstance(result, BatchOutput)
        assert len(result) == 6 and result.failures == {}
        assert result.exec_ms > 0

        async def through_channel() -> list[bytes]:
            client = await ChannelClient.connect(info["channel"])
            try:
                output = await client.run("forward", cts, payloads)
                return [bytes(output.out(i)) for i in range(len(output))]
            finally:
                client.close()

        assert asyncio.run(through_channel()) == [bytes(result.out(i)) for i in range(6)]
        with torch.inference_mode():
            direct = demo.mlp()(torch.from_numpy(np.stack(items)))
        for i, ct in enumerate(cts):
            out = torch.from_numpy(decode_value(ct, bytes(result.out(i))).copy())
            assert torch.allclose(out, direct[i], atol=1e-5)
        assert set(ray_local.get(actor.memory.remote(), timeout=60)) == {"rss_bytes"}
    finally:
        ray_local.kill(actor)


def test_a_start_that_times_out_leaves_no_actor(ray_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor Ray cannot place (asks for more CPUs than exist) is killed when its start gives
    up, so it cannot start later and hold memory that no registry counts."""
    import asyncio

    from ray._private import state as ray_state

    from nosq.manager.serving import replicas as dispatcher

    monkeypatch.setattr(dispatcher, "READY_TIMEOUT_S", 1.0)
    spec = ModelSpec(id="huge", factory="nosq.workers.demo:noop", device="cpu", num_cpus=64)
    pool = dispatcher.ReplicaPool(spec, inflight_per_replica=1, dispatch_attempts=1)
    with pytest.raises(TimeoutError):
        asyncio.run(pool.start(2))
    assert pool.replicas == []
    actors = ray_state.actors().values()  # from the GCS: the state API needs a dashboard
    states = {a["State"] for a in actors if a["ActorClassName"].endswith("ModelWorker") and a["State"] != "DEAD"}
    assert states == set(), f"actors left behind: {states}"


def test_stop_returns_once_the_actor_process_is_gone(ray_local: Any) -> None:
    """The registry releases a model's bytes after ``stop()``: its process must be gone by then."""
    import asyncio

    from nosq.manager.serving import replicas as dispatcher

    spec = ModelSpec(id="mlp", factory="nosq.workers.demo:mlp", device="cpu", threads=1, num_cpus=0.25)
    pool = dispatcher.ReplicaPool(spec, inflight_per_replica=1, dispatch_attempts=1)

    async def start_then_stop() -> list[int]:
        await pool.start(2)
        pids = [int((r.info or {})["pid"]) for r in pool.replicas]
        await pool.stop()
        return pids

    pids = asyncio.run(start_then_stop())
    assert pool.replicas == []
    assert [pid for pid in pids if dispatcher._running(pid)] == []
