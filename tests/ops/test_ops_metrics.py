"""/metrics, /healthz and `nosq status` of a real manager, scraped while it serves a load."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import Producer, RedisSettings

URL = "redis://127.0.0.1:6379/9"  # the db of the redis_db fixture, which every test here holds (lock, flush)
CONFIG = """
[[models]]
id = "noop"
factory = "nosq.workers.demo:noop"
device = "cpu"
max_batch = 64
num_cpus = 0.25
threads = 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def manager(tmp_path: Path, redis_db: RedisSettings) -> Iterator[int]:
    assert redis_db.url == URL
    config = tmp_path / "noop.toml"
    config.write_text(CONFIG)
    port = free_port()
    process = start_manager(RedisSettings(url=URL), "--config", str(config), "--metrics-port", str(port),
                            "--log-level", "warning", consumer="metrics-test")
    try:
        yield port
    finally:
        assert stop_manager(process) == 0


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


@pytest.mark.integration
@pytest.mark.ray
def test_metrics_health_and_status_during_a_load(manager: int) -> None:
    port = manager
    assert get(port, "/healthz") == (200, "ok\n")
    scrapes: list[str] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            scrapes.append(get(port, "/metrics")[1])
            stop.wait(0.05)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        with Producer(RedisSettings(url=URL)) as producer:
            for _ in range(20):  # a load that lasts: 20 rounds of 100
                handles = producer.submit_many("noop", [np.ones(8, np.float32)] * 100)
                producer.gather(handles, timeout_s=60)
            bad = producer.submit("noop", {"x": 1}, method="nope")
            assert producer.outcome(bad, timeout_s=30).code == "unknown_method"
    finally:
        stop.set()
        scraper.join()
    assert len(scrapes) >= 2, "scraped during the load"
    status, text = get(port, "/metrics")
    assert status == 200
    assert metric(text, "nosq_requests_total", model="noop", outcome="ok") == 2000
    assert metric(text, "nosq_errors_total", code="unknown_method", model="noop") == 1
    assert metric(text, "nosq_batch_size_count", model="noop") >= 1
    # the unknown method is answered before batching: it never ran in a batch
    assert metric(text, "nosq_batch_size_sum", model="noop") == 2000
    assert metric(text, "nosq_replicas", model="noop") == 1
    assert metric(text, "nosq_backlog", model="noop") == 0
    assert "nosq_batches_total" in text and "nosq_queue_wait_ms_bucket" in text and "nosq_exec_ms_bucket" in text
    assert get(port, "/nope")[0] == 404

    # heartbeats (which carry the traffic figures) refresh every ttl/3 = 3.3 s; a busy machine
    # delays them (CI once saw served 0 after ten tries): wait for the figure, up to a minute
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", URL, "status", "--json"],
                              capture_output=True, text=True, check=True, timeout=60)
        view = json.loads(done.stdout)
        (row,) = [m for m in view["models"] if m["model"] == "noop"]
        if row["served"] >= 2001 or time.monotonic() > deadline:
            break
        stop.wait(1.0)
    assert row["served"] == 2001 and row["backlog"] == 0 and row["replicas"] == 1, view
    assert row["p50_ms"] > 0 and row["mean_batch"] >= 1
    assert [m["consumer"] for m in view["managers"]] == ["metrics-test"]
    table = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", URL, "status", "--once"],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    assert "noop" in table and "metrics-test" in table
