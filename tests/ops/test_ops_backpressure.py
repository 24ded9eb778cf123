"""Backpressure: a model's max_backlog refuses producers with QueueFull and a retry-after hint
computed from the drain rate; everything that was accepted is answered, nothing dropped."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import Producer, QueueFull, RedisSettings, keys

URL = "redis://127.0.0.1:6379/9"  # the db of the redis_db fixture, which every test here holds (lock, flush)
ROOT = Path(__file__).resolve().parents[2]
LIMIT = 40
CONFIG = f"""
[[models]]
id = "slow"
factory = "tests.manager.models:slow"
device = "cpu"
max_batch = 4
max_wait_ms = 1.0
num_cpus = 0.25
threads = 1
max_backlog = {LIMIT}
options = {{ delay_s = 0.02 }}
"""


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_db: RedisSettings) -> Iterator[None]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    assert redis_db.url == URL
    config = tmp_path / "slow.toml"
    config.write_text(CONFIG)
    process = start_manager(RedisSettings(url=URL), "--config", str(config), "--metrics-port", "-1",
                            "--log-level", "warning", consumer="backpressure-test")
    try:
        yield
    finally:
        assert stop_manager(process) == 0


@pytest.mark.integration
@pytest.mark.ray
def test_queue_full_with_retry_after_and_nothing_accepted_is_dropped(manager: None) -> None:
    client = redis.Redis.from_url(URL)
    assert client.hgetall(keys.admission("slow"))[b"max_backlog"] == str(LIMIT).encode()
    accepted = []
    refusals = []
    todo = [[float(i), 1.0] for i in range(300)]
    deadline = time.monotonic() + 120
    with Producer(RedisSettings(url=URL)) as producer:
        while todo and time.monotonic() < deadline:
            try:
                accepted.extend(producer.submit_many("slow", todo))
                todo = []
            except QueueFull as exc:
                accepted.extend(exc.accepted)
                todo = todo[len(exc.accepted):]
                refusals.append(exc)
                assert exc.backlog >= LIMIT and exc.retry_after_s is not None and 0.05 <= exc.retry_after_s <= 10
                time.sleep(exc.retry_after_s)
        assert not todo, "the producer could not get everything in within the time bound"
        assert refusals, "a 300-request burst against a backlog of 40 must be refused at first"
        assert len(refusals[0].accepted) <= LIMIT
        envelopes = [producer.outcome(h, timeout_s=60) for h in accepted]
    assert len(accepted) == 300
    assert all(e.ok for e in envelopes), [e.code for e in envelopes if not e.ok][:5]
    assert len({e.id for e in envelopes}) == 300
