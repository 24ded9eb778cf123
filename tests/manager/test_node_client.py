"""Any-language clients end to end: the Node.js example (examples/node/cli.js) enqueues to the
``noop`` model of a real manager and reads back what it echoed (wire protocol v1 only:
XADD, GET, BLPOP)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from nosq.manager.serving.batcher import Reason
from tests.manager.harness import REDIS_URL, config, manager_settings, running_manager, spec

pytestmark = [pytest.mark.integration, pytest.mark.ray]
SHARED_MANAGER = True  # see redis_db10

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's dependencies installed."""
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.fail("`node` is not on PATH: install Node.js 20+ to test examples/node")
    if not (EXAMPLE_DIR / "cli.js").is_file():
        pytest.fail(f"{EXAMPLE_DIR / 'cli.js'} is missing")
    if not (EXAMPLE_DIR / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("`npm` is not on PATH: it installs examples/node's dependencies (npm ci)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE_DIR, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {EXAMPLE_DIR} failed ({done.returncode}):\n{done.stderr}")
    return node_bin


@pytest.fixture(scope="module")
async def noop_manager(ray_cluster: None, module_db10: None) -> AsyncIterator[None]:
    async with running_manager(config(spec("noop", "nosq.workers.demo:noop")), manager_settings()):
        yield


async def run_node(node: str, *args: str) -> Any:
    """``node cli.js <args>`` without blocking the manager on this event loop; its JSON output."""
    process = await asyncio.create_subprocess_exec(
        node, "cli.js", *args, cwd=EXAMPLE_DIR, env={**os.environ, "NOSQ_REDIS_URL": REDIS_URL},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"node cli.js {' '.join(args)} exited {process.returncode}: {stderr.decode()}"
    return json.loads(stdout)


@pytest.mark.parametrize("ct", ["msgpack", "json"])
async def test_node_client_round_trip_through_a_manager(
    node: str, noop_manager: None, redis_db10: redis.asyncio.Redis, ct: str,
) -> None:
    request_id = (await run_node(node, "enqueue", "noop", ct))["id"]
    envelope = await run_node(node, "wait", request_id, ct, "20")

    assert envelope["id"] == request_id
    assert envelope["ok"] is True, envelope
    assert envelope["out"] == {
        "x": {"dtype": "float32", "shape": [2, 3], "values": [0, 1, 2, 3, 4, 5]},
        "note": "hello from node",
    }
    assert envelope["model"] == "noop"
    assert envelope["batch"]["reason"] in {str(r) for r in Reason}
    assert set(envelope["timings"]) == {"queued_ms", "wait_ms", "exec_ms"}
