"""Any-language clients end to end: the Node.js example (examples/node/cli.js) enqueues to the
``noop`` model of a real manager and reads back what it echoed (wire protocol v1 only:
XADD, GET, BLPOP), and follows a model served on several request streams (``partitions``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from nosq.manager.serving.batcher import Reason
from nosq.producer import keys
from tests.manager.harness import REDIS_URL, config, manager_settings, running_manager, spec

pytestmark = [pytest.mark.integration, pytest.mark.ray]
SHARED_MANAGER = True  # see redis_db10

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE_TIMEOUT_S = 60
PARTITIONED = "noop3"  # the echo model again, on 3 request streams
PARTITIONS = 3


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
    """One manager for the module: ``noop`` on one stream, ``noop3`` on PARTITIONS streams."""
    served = config(spec("noop", "nosq.workers.demo:noop"),
                    spec(PARTITIONED, "nosq.workers.demo:noop", partitions=PARTITIONS))
    async with running_manager(served, manager_settings()):
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


async def published_tags(client: redis.asyncio.Redis, model: str, timeout_s: float = 10.0) -> list[str]:
    """The partition tags the manager publishes in the model's admission hash, once it has (it
    does on every heartbeat; the per-test clean-up deletes the hash)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value: bytes | None = await client.hget(keys.admission(model), "tags")  # type: ignore[misc]
        if value is not None:
            return keys.published_tags(model, value)
        assert time.monotonic() < deadline, f"no partition tags published for {model!r} within {timeout_s} s"
        await asyncio.sleep(0.05)


async def entries_added(client: redis.asyncio.Redis, tag: str) -> int:
    """Entries ever added to a partition's stream (its answered entries are deleted: XLEN won't do)."""
    info = await client.xinfo_stream(keys.requests(tag))
    return int(info["entries-added"])


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


async def test_node_and_python_put_a_request_in_the_same_partition(node: str) -> None:
    ids = [uuid.uuid4().hex for _ in range(150)] + [str(uuid.uuid4()) for _ in range(40)]
    ids += ["a", "req-1", "x.y:z_0", "A" * 128, "é-日本-\U0001f600"]  # the last: UTF-8 beyond ASCII
    for n in (1, 2, PARTITIONS, 7, 64):
        assert await run_node(node, "partition-of", str(n), *ids) == [keys.partition_of(i, n) for i in ids], n


async def test_node_client_follows_the_partitions_of_a_model(
    node: str, noop_manager: None, redis_db10: redis.asyncio.Redis,
) -> None:
    tags = await published_tags(redis_db10, PARTITIONED)
    assert tags == keys.partition_tags(PARTITIONED, PARTITIONS)
    before = {tag: await entries_added(redis_db10, tag) for tag in tags}

    by_script = (await run_node(node, "enqueue-many", PARTITIONED, "msgpack", "40"))["ids"]
    by_xadd = (await run_node(node, "enqueue-many", PARTITIONED, "json", "20", "--admission=off"))["ids"]
    envelopes = (await run_node(node, "wait-many", "msgpack", "20", *by_script)
                 + await run_node(node, "wait-many", "json", "20", *by_xadd))

    ids = by_script + by_xadd
    assert len(set(ids)) == 60
    for request_id, envelope in zip(ids, envelopes, strict=True):
        assert (envelope["id"], envelope["ok"], envelope["model"]) == (request_id, True, PARTITIONED), envelope
        assert envelope["out"] == {
            "x": {"dtype": "float32", "shape": [2, 3], "values": [0, 1, 2, 3, 4, 5]},
            "note": "hello from node",
        }
    expected = [0] * PARTITIONS
    for request_id in ids:
        expected[keys.partition_of(request_id, PARTITIONS)] += 1
    added = [await entries_added(redis_db10, tag) - before[tag] for tag in tags]
    assert added == expected
    assert all(added), f"60 ids left a partition empty: {added}"
