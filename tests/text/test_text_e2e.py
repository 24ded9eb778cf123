"""Text embeddings end to end through a real manager (``tests.manager.harness.running_manager``):
strings in over Redis (msgpack and JSON), vectors out equal to sentence-transformers', batches
formed by length with their provenance in every result; a broken model directory fails its load
with the reason in the registry (``nosq models``) while another model serves.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio

from nosq.manager.settings import ManagerSettings
from nosq.producer import AsyncProducer, RedisSettings
from nosq.workers.spec import Bucketing
from tests.manager.harness import config, entry, running_manager, spec, wait_envelope, wait_for, xadd_all
from tests.text.conftest import DB, PACKAGE

pytestmark = [pytest.mark.integration, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
URL = f"redis://127.0.0.1:6379/{DB}"
EDGES = (16, 32, 64, 128, 256)


def corpus(n: int, seed: int = 3) -> list[str]:
    """Texts of 1 to ~200 words, most short: a long-tailed mix."""
    rng = np.random.default_rng(seed)
    words = ("queue", "redis", "stream", "model", "vector", "search", "document", "batch", "token", "the",
             "a", "of", "to", "and", "embedding", "latency", "throughput", "replica", "manager", "actor")
    lengths = np.clip(rng.lognormal(2.6, 0.9, n).astype(int), 1, 200)
    return [" ".join(rng.choice(words, size=int(k))) for k in lengths]


def settings(**overrides: Any) -> ManagerSettings:
    overrides.setdefault("consumer", f"text-{uuid.uuid4().hex[:10]}")
    return ManagerSettings(redis=RedisSettings(url=URL), shutdown_timeout_s=30.0, profile_on_start=False,
                           **overrides)


def embedding_spec(model_id: str = "minilm", **options: Any) -> Any:
    options.setdefault("package", PACKAGE)
    return spec(model_id, "nosq.workers.text:embedder", max_batch=64, max_wait_ms=5.0, options=options,
                bucketing=Bucketing(edges=EDGES, token_budget=1024))


@pytest.mark.parametrize("local_channel", [False, True], ids=["ray-call", "shared-memory"])
async def test_embeddings_through_a_manager(ray_repo: None, redis_db12: redis.asyncio.Redis, reference: Any,
                                            local_channel: bool) -> None:
    texts = corpus(120)
    expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    serve = config(embedding_spec(chunk_tokens=512))
    async with running_manager(serve, settings(local_channel=local_channel)):
        async with AsyncProducer(RedisSettings(url=URL), default_timeout_s=120) as producer:
            handles = await producer.submit_many("minilm", texts)  # all in flight at once
            envelopes = [await producer.outcome(h) for h in handles]
        # the same through plain XADD with JSON, as any language would send it
        built = [entry("minilm", text, ct="json") for text in texts[:8]]
        await xadd_all(redis_db12, "minilm", [fields for _, fields in built])
        json_envelopes = [await wait_envelope(redis_db12, rid, "json", timeout_s=120) for rid, _ in built]

    batches: dict[str, dict[str, Any]] = {}
    for text, envelope, want in zip(texts, envelopes, expected, strict=True):
        assert envelope.ok, (envelope.code, envelope.message)
        got = np.asarray(envelope.out)
        assert got.dtype == np.float32 and got.shape == (384,)
        assert float(np.abs(got - want).max()) <= 1e-5, text
        batch = envelope.batch
        assert batch["bucket"] in EDGES
        assert 2 <= batch["tokens"] <= 256 and 0.0 <= batch["padding"] < 1.0, batch
        assert batches.setdefault(batch["id"], batch) == batch, "one provenance per batch"
    assert max(b["size"] for b in batches.values()) > 1, "no batch larger than 1 formed under load"
    assert all(b["size"] * b["bucket"] <= 1024 or b["size"] == 1 for b in batches.values()), batches
    for envelope, want in zip(json_envelopes, expected[:8], strict=True):
        assert envelope.ok, (envelope.code, envelope.message)
        assert float(np.abs(np.asarray(envelope.out, dtype=np.float32) - want).max()) <= 1e-5


def nosq_models(url: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--log-level", "warning", "models", "--json",
                           "--redis-url", url], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


async def test_a_broken_model_directory_fails_its_load_and_others_serve(
        ray_repo: None, redis_db12: redis.asyncio.Redis, tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    serve = config(embedding_spec("broken", path=str(missing), package=None),
                   spec("echo", "nosq.workers.demo:noop"))
    async with running_manager(serve, settings(cpu_budget_bytes=2 * 1024**3, load_poll_ms=100)) as manager:
        async with AsyncProducer(RedisSettings(url=URL), default_timeout_s=60) as producer:
            broken = await producer.submit("broken", "some text", timeout_s=60)
            assert await producer.infer("echo", {"still": "serving"}, timeout_s=60) == {"still": "serving"}

            rows: dict[str, Any] = {}

            async def failed() -> bool:  # it is tried again every few seconds: loading, failed, loading...
                rows.update({row["model"]: row for row in (await asyncio.to_thread(nosq_models, URL))["models"]})
                return rows.get("broken", {}).get("state") == "failed"

            await wait_for(failed, 60, "the broken model's failed load in `nosq models`", interval_s=0.5)
            assert rows["echo"]["state"] == "ready", rows["echo"]
            error = str(rows["broken"]["last_error"])
            assert error.startswith("load failed"), rows["broken"]
            await producer.cancel(broken)
        assert manager.failed is None
    assert "ModelLoadError" in error and "does not exist" in error and str(missing) in error, error


def nosq_status(url: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--log-level", "warning", "status", "--json",
                           "--redis-url", url], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


async def test_without_a_budget_a_model_that_fails_to_load_leaves_the_others_serving(
        ray_repo: None, redis_db12: redis.asyncio.Redis, tmp_path: Path) -> None:
    """Every model loads at start (no memory budget): one that cannot is reported in `nosq
    status` with its cause and tried again, while the others serve."""
    missing = tmp_path / "no-model-here"
    serve = config(embedding_spec("broken", path=str(missing), package=None), spec("echo", "nosq.workers.demo:noop"))
    async with running_manager(serve, settings(heartbeat_ttl_s=3)) as manager:
        assert set(manager.load_errors) == {"broken"}
        async with AsyncProducer(RedisSettings(url=URL), default_timeout_s=60) as producer:
            broken = await producer.submit("broken", "some text", timeout_s=60)
            assert await producer.infer("echo", {"still": "serving"}, timeout_s=60) == {"still": "serving"}
            rows = {row["model"]: row for row in (await asyncio.to_thread(nosq_status, URL))["models"]}
            await producer.cancel(broken)
        assert manager.failed is None
        assert manager._health_problem() is None  # one model serves: healthy
    error = str(rows["broken"].get("load_error"))
    assert "ModelLoadError" in error and str(missing) in error, rows["broken"]
    assert "load_error" not in rows["echo"] or not rows["echo"]["load_error"]
