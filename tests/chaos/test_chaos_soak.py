"""Soak: 200,000 requests over three models that do not all fit the memory budget, so models are
evicted and loaded again throughout. Checks, over the run: every request answered ok, the model
served READY and the budget held after every chunk, each switch that needs room evicting for
it then (and no other), the manager's RSS flat after warm-up; at the end, no key left without
a TTL except the durable ones, and the streams empty."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.manager.profiles.store import store
from nosq.producer import Producer, RedisSettings, keys
from nosq.workers.spec import ModelSpec
from tests.registry.test_registry_manager import handmade_profile

URL = "redis://127.0.0.1:6379/9"  # the db of the redis_db fixture, which every test here holds (lock, flush)
TOTAL = 200_000
CHUNK = 2_000
MODELS = ("s1", "s2", "s3")
CONFIG = "".join(f"""
[[models]]
id = "{m}"
factory = "nosq.workers.demo:noop"
device = "cpu"
max_batch = 256
max_wait_ms = 2.0
num_cpus = 0.25
threads = 1
""" for m in MODELS)
DURABLE = (b"nosq:{", b"nosq:{registry}:", b"arq:")  # streams, registry, the control queue's keys


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def manager(tmp_path: Path, redis_db: RedisSettings) -> Iterator[int]:
    assert redis_db.url == URL
    config = tmp_path / "soak.toml"
    config.write_text(CONFIG)

    async def profiles() -> None:  # 40 MiB each under a 100 MiB budget: two fit, three do not
        aclient = redis.asyncio.Redis.from_url(URL)
        for model in MODELS:
            spec = ModelSpec(id=model, factory="nosq.workers.demo:noop", device="cpu", max_batch=256, max_wait_ms=2.0,
                             num_cpus=0.25, threads=1)
            await store(aclient, handmade_profile(spec))
        await aclient.aclose()

    asyncio.run(profiles())
    process = start_manager(RedisSettings(url=URL), "--config", str(config), "--cpu-budget-mib", "100",
                            "--metrics-port", "-1", "--log-level", "warning", consumer="soak")
    try:
        yield process.pid
    finally:
        assert stop_manager(process) == 0


COUNTED = (b"loading", b"ready", b"draining")  # states whose bytes count against the budget
BUDGET_MIB = 100
PHASE = 10  # chunks per model: a new model every 20,000 requests


def registry_view(client: redis.Redis) -> dict[str, tuple[bytes, int]]:
    """model -> (state, counted bytes) as the registry holds it now."""
    view = {}
    for model in MODELS:
        state, nbytes = client.hmget(keys.registry_model(model), ["state", "bytes"])
        view[model] = (state or b"absent", int(nbytes or 0))
    return view


def evictions_for(client: redis.Redis, after: bytes) -> list[dict[bytes, bytes]]:
    """The eviction decisions logged after stream id ``after``."""
    return [fields for _, fields in client.xrange(keys.registry_evictions(), min=b"(" + after)]


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_200k_with_evictions(manager: int) -> None:
    """Checked throughout the run, not only at its end: after every chunk the model just served
    is READY and the registry counts no more than the budget; each switch to a model that is
    not resident while two others are evicts one of them for it during that switch (and a
    switch to a resident model evicts nothing); RSS samples after warm-up stay flat."""
    client = redis.Redis.from_url(URL)
    rss: list[tuple[int, float]] = []
    answered = 0
    switches_with_eviction = 0
    started = time.monotonic()
    x = np.ones(8, np.float32)
    with Producer(RedisSettings(url=URL)) as producer:
        for index in range(TOTAL // CHUNK):
            model = MODELS[(index // PHASE) % len(MODELS)]
            if index % PHASE == 0:  # a switch: what is resident decides whether it must evict
                before = registry_view(client)
                resident = {m for m, (state, _) in before.items() if state in COUNTED}
                last = client.xrevrange(keys.registry_evictions(), count=1)
                mark = last[0][0] if last else b"0-0"
            handles = producer.submit_many(model, [x] * CHUNK, ttl_s=60)
            envelopes = [e for _, e in producer.as_completed(handles, timeout_s=120)]
            assert all(e.ok for e in envelopes), {e.code for e in envelopes if not e.ok}
            answered += len(envelopes)
            assert client.xlen(keys.requests(model)) <= CHUNK, "a stream grew past the backlog"
            view = registry_view(client)
            assert view[model][0] == b"ready", f"after chunk {index}: {model} served but {view[model][0]!r}"
            counted_mib = sum(nbytes for state, nbytes in view.values() if state in COUNTED) / 2**20
            assert counted_mib <= BUDGET_MIB, f"after chunk {index}: {counted_mib:.0f} MiB counted: {view}"
            if index % PHASE == 0:  # the switch's first chunk is answered: its eviction has happened
                decisions = evictions_for(client, mark)
                if model not in resident and len(resident) == 2:
                    assert [d[b"for"] for d in decisions] == [model.encode()], (index, resident, decisions)
                    victims = decisions[0][b"victims"].decode().split(",")
                    assert victims and model not in victims and set(victims) <= resident, decisions
                    switches_with_eviction += 1
                else:
                    assert decisions == [], f"switch to {model} (resident: {resident}) evicted: {decisions}"
            rss.append((answered, rss_mib(manager)))
    elapsed = time.monotonic() - started
    assert answered == TOTAL
    # s1, s2 load into the budget; every later switch (8 of 10) loads the model not resident
    assert switches_with_eviction == TOTAL // CHUNK // PHASE - 2
    print(f"\nsoak: {TOTAL} requests in {elapsed:.0f} s ({TOTAL / elapsed:.0f} req/s); manager RSS MiB by "
          f"requests answered: {rss[::PHASE]}")
    # bounded and flat after warm-up (the first quarter): docs/reliability.md has runs at +3 MiB
    warm = [mib for done, mib in rss if done >= TOTAL // 4]
    quarter = len(warm) // 3
    assert max(warm) - warm[0] < 40, f"manager RSS grew from {warm[0]:.0f} to {max(warm):.0f} MiB"
    early, late = sorted(warm[:quarter])[quarter // 2], sorted(warm[-quarter:])[quarter // 2]
    assert late - early < 20, f"manager RSS trends upward: median {early:.0f} -> {late:.0f} MiB"
    for model in MODELS:
        assert client.xlen(keys.requests(model)) == 0
    results = sum(1 for _ in client.scan_iter(match="nosq:res:*", count=5000))
    assert results > 0  # results are still there (TTL 60 s) ...
    no_ttl = [key for key in client.scan_iter(count=5000)
              if client.ttl(key) == -1 and not key.startswith(DURABLE)]
    assert not no_ttl, f"keys without a TTL: {no_ttl[:10]}"  # ... but every one of them expires
    if os.environ.get("NOSQ_SOAK_REPORT"):
        Path(os.environ["NOSQ_SOAK_REPORT"]).write_text(f"{TOTAL} requests, {elapsed:.0f} s, RSS MiB: {rss}\n")
