"""The peers harness (benchmarks/peers) runs end to end: a correctness test, never a speed test.

One ``--quick`` run on noop through all five systems (a real manager, Ray Serve, an arq worker),
with tiny windows; every system must have answered (throughput > 0, latencies present) and the
run must leave the JSON, the table and the plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nosq.producer import RedisSettings

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("direct", "nosq", "serve-handle", "serve-http", "arq")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def test_quick_run_measures_every_system(redis_db: RedisSettings, tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    command = [
        sys.executable, "-m", "benchmarks.peers", "--quick", "--models", "noop", "--systems", ",".join(SYSTEMS),
        "--concurrency", "2", "--rates", "50", "--load-procs", "1", "--batch", "16",
        "--arq-poll-ms", "20", "--ray-cpus", "2",
        "--redis-url", redis_db.url, "--out", str(out), "--plots", str(tmp_path / "plots"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads(out.read_text())
    systems = results["models"]["noop"]["systems"]
    assert set(systems) == set(SYSTEMS)
    for name, system in systems.items():
        assert system["closed"], name
        for point in system["closed"]:
            assert point["req_per_s"] > 0, (name, point)
            assert point["p50_ms"] is not None and point["p99_ms"] is not None, (name, point)
            assert point["errors"] == 0, (name, point)
        if name != "direct":  # the in-process limit has no arrival process
            (point,) = system["open"]
            assert point["offered_per_s"] == 50 and point["req_per_s"] > 0, (name, point)
            assert point["p50_ms"] is not None, (name, point)
        assert system["summary"]["best_req_per_s"] > 0, name
    assert results["models"]["noop"]["target"]["batch"] == 16
    assert "x nosq" in done.stdout and "serve-http" in done.stdout  # the table with its ratio columns
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"cpu-noop-throughput.png", "cpu-noop-latency.png"}
