"""The arq control plane: `nosq models load/scale/profile/unload` go through Redis to a real manager."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import Producer, RedisSettings

URL = "redis://127.0.0.1:6379/9"  # the db of the redis_db fixture, which every test here holds (lock, flush)
CONFIG = """
[[models]]
id = "noop"
factory = "nosq.workers.demo:noop"
device = "cpu"
max_batch = 32
num_cpus = 0.25
threads = 1

[[models]]
id = "mlp"
factory = "nosq.workers.demo:mlp"
device = "cpu"
max_batch = 16
num_cpus = 0.25
threads = 1
"""


@pytest.fixture
def manager(tmp_path: Path, redis_db: RedisSettings) -> Iterator[None]:
    assert redis_db.url == URL
    config = tmp_path / "models.toml"
    config.write_text(CONFIG)
    process = start_manager(RedisSettings(url=URL), "--config", str(config), "--cpu-budget-mib", "4096",
                            "--metrics-port", "-1", "--log-level", "warning", consumer="control-test")
    try:
        yield
    finally:
        assert stop_manager(process) == 0


def nosq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", URL, "--log-level", "warning",
                           "models", *args], capture_output=True, text=True, timeout=300, check=False)


def _replicas(model: str) -> int:
    """The replica count the manager's heartbeat reports now (``nosq status``)."""
    shown = subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", URL, "status", "--json"],
                           capture_output=True, text=True, timeout=60, check=True)
    rows = {row["model"]: row for row in json.loads(shown.stdout)["models"]}
    return int(rows[model]["replicas"])


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.slow
def test_load_scale_profile_unload_through_arq(manager: None) -> None:
    loaded = nosq("load", "mlp")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout) | {"batch_cap": 0} == {
        "model": "mlp", "manager": "control-test", "loaded": True, "replicas": 1, "batch_cap": 0}

    scaled = nosq("scale", "mlp", "2")
    assert scaled.returncode == 0, scaled.stderr
    assert json.loads(scaled.stdout)["replicas"] == 2
    with Producer(RedisSettings(url=URL)) as producer:  # served by the two replicas
        handles = producer.submit_many("mlp", [[0.5] * 512 for _ in range(64)])
        assert len(producer.gather(handles, timeout_s=60)) == 64
    assert json.loads(nosq("scale", "mlp", "1").stdout)["replicas"] == 1
    again = nosq("scale", "mlp", "2")  # the same request as before, within its result's lifetime: it runs again
    assert again.returncode == 0, again.stderr
    assert _replicas("mlp") == 2

    profiled = nosq("profile", "mlp")
    assert profiled.returncode == 0, profiled.stderr
    profile = json.loads(profiled.stdout)["profile"]
    assert profile["model"] == "mlp" and profile["best_batch"] in profile["sizes"]

    unloaded = nosq("unload", "mlp")
    assert unloaded.returncode == 0, unloaded.stderr
    assert json.loads(unloaded.stdout)["loaded"] is False

    unknown = nosq("load", "nope")
    assert unknown.returncode == 1 and "not served by manager control-test" in unknown.stderr
    usage = nosq("scale", "mlp")
    assert usage.returncode == 2 and "usage: nosq models scale MODEL N" in usage.stderr
