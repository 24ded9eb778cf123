"""End to end through a real manager: the demo models answer what a direct call answers, and
every result says how it was served (timings and batch provenance, design.md section 2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio
import torch

from nosq.manager.ops.demo import DEMO_INPUTS
from nosq.manager.serving.batcher import Reason
from nosq.producer import AsyncProducer
from nosq.workers import demo
from tests.manager.harness import config, manager_settings, redis_settings, running_manager, spec

pytestmark = [pytest.mark.integration, pytest.mark.ray]
SHARED_MANAGER = True  # see redis_db10

# the demo models as workers/demo.toml configures them (the factories' defaults); item shapes
DEMO: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    name: (options, DEMO_INPUTS[name])
    for name, options in {
        "mlp": {"d_in": 512, "d_hidden": 2048, "d_out": 512},
        "cnn": {"channels": 3, "size": 64, "classes": 10},
        "transformer": {"d_model": 256, "nhead": 4, "layers": 2, "seq": 32},
    }.items()
}
REASONS = {str(r) for r in Reason}


@pytest.fixture(scope="module")
async def demo_manager(ray_cluster: None, module_db10: None) -> AsyncIterator[None]:
    serve = config(*(
        spec(name, f"nosq.workers.demo:{name}", max_batch=64 if name == "mlp" else 8, options=options)
        for name, (options, _) in DEMO.items()
    ))
    async with running_manager(serve, manager_settings()):
        yield


@pytest.fixture
async def producer(demo_manager: None, redis_db10: redis.asyncio.Redis) -> AsyncIterator[AsyncProducer]:
    async with AsyncProducer(redis_settings(), default_timeout_s=60) as client:
        yield client


def direct(name: str, inputs: list[np.ndarray]) -> torch.Tensor:
    """The same factory, called in this process on the stacked inputs."""
    options, _ = DEMO[name]
    model = getattr(demo, name)(**options)
    with torch.inference_mode():
        out: torch.Tensor = model(torch.from_numpy(np.stack(inputs)))
    return out


@pytest.mark.parametrize("name", list(DEMO))
def test_demo_factories_are_deterministic(name: str) -> None:
    """What makes the comparison below meaningful: the worker builds the same weights."""
    options, _ = DEMO[name]
    first, second = getattr(demo, name)(**options), getattr(demo, name)(**options)
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("ct", ["msgpack", "json"])
@pytest.mark.parametrize("name", list(DEMO))
async def test_outputs_equal_a_direct_call(producer: AsyncProducer, redis_db10: redis.asyncio.Redis,
                                           name: str, ct: str) -> None:
    _, shape = DEMO[name]
    rng = np.random.default_rng(len(name))
    inputs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(12)]
    async with AsyncProducer(redis_settings(), content_type=ct, default_timeout_s=60) as client:
        handles = await client.submit_many(name, inputs)
        envelopes = [await client.outcome(h) for h in handles]

    expected = direct(name, inputs)
    for i, envelope in enumerate(envelopes):
        assert envelope.ok, envelope
        got = torch.from_numpy(np.asarray(envelope.out, dtype=np.float32).copy())
        assert got.shape == expected[i].shape
        assert torch.allclose(got, expected[i], atol=1e-5), (name, i, (got - expected[i]).abs().max())


async def test_every_result_carries_its_provenance(producer: AsyncProducer) -> None:
    _, shape = DEMO["mlp"]
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(500)]
    handles = await producer.submit_many("mlp", inputs)  # 500 in flight at once
    envelopes = [await producer.outcome(h) for h in handles]

    sizes: dict[str, int] = {}
    members: Counter[str] = Counter()
    for envelope in envelopes:
        assert envelope.ok, envelope
        assert envelope.model == "mlp"
        assert envelope.deliveries == 1
        assert set(envelope.timings) == {"queued_ms", "wait_ms", "exec_ms"}
        assert all(isinstance(v, (int, float)) and v >= 0 for v in envelope.timings.values()), envelope.timings
        assert envelope.timings["exec_ms"] > 0
        batch = envelope.batch
        assert set(batch) == {"id", "size", "reason"}
        assert batch["reason"] in REASONS, batch
        assert sizes.setdefault(batch["id"], batch["size"]) == batch["size"]
        members[batch["id"]] += 1
    assert members == Counter(sizes), "a batch's size must be the number of results that name it"
    assert max(sizes.values()) > 1, f"no batch larger than 1 formed under load: {sorted(sizes.values())}"
