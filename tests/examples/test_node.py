"""The Node.js example client (examples/node) against the Python side of wire protocol v1.

Node enqueues, Python parses what it wrote; Python writes results the way the manager does,
Node reads them. Needs `node` and `npm` (node_modules is installed once per session) and the
real Redis (db 9, flushed around each test by the shared ``redis_db`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from nosq.producer import RedisSettings, keys
from nosq.producer.codec import DTYPES, decode_value, encode_value
from nosq.producer.enqueue import ENQUEUE_LUA
from nosq.producer.wire import encode_envelope, parse_request

pytestmark = pytest.mark.integration

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
CONTENT_TYPES = ("msgpack", "json")
EXPECTED_X = np.arange(6, dtype=np.float32).reshape(2, 3)
NOTE = "hello from node"
CLI_TIMEOUT_S = 60

# exit statuses of cli.js
EXIT_QUEUE_FULL = 3
EXIT_TIMEOUT = 4


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with the example's dependencies installed."""
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.fail("`node` is not on PATH: install Node.js 20+ to test examples/node")
    if not (EXAMPLE_DIR / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("`npm` is not on PATH: it installs examples/node's dependencies (npm ci)")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE_DIR, capture_output=True, text=True,
            timeout=300, check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {EXAMPLE_DIR} failed ({done.returncode}):\n{done.stderr}")
    return node_bin


RunNode = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def db(redis_db: RedisSettings) -> Iterator[redis.Redis]:
    client = redis_db.client()
    yield client
    client.close()


@pytest.fixture
def run_node(node: str, redis_db: RedisSettings) -> RunNode:
    """Run `node <args>` in examples/node against db 9; returns the CompletedProcess."""
    env = {**os.environ, "NOSQ_REDIS_URL": redis_db.url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [node, *args], cwd=EXAMPLE_DIR, env=env, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_S, check=False,
        )

    return run


def node_ok(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, f"node exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


def write_result(client: redis.Redis, request_id: str, ct: str, header: dict[str, Any],
                 out: bytes | None = None, *, ttl_s: int = 600) -> None:
    """Write a result exactly as the manager does: SET NX EX, RPUSH the token, EXPIRE it."""
    envelope = encode_envelope(ct, {"v": 1, "id": request_id, **header}, out)
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.result(request_id), envelope, nx=True, ex=ttl_s)
    pipe.rpush(keys.done(request_id), 1)
    pipe.expire(keys.done(request_id), ttl_s)
    pipe.execute()


def ok_header(model: str) -> dict[str, Any]:
    return {
        "ok": True, "model": model, "timings": {"queued_ms": 1.5, "wait_ms": 0.25, "exec_ms": 0.125},
        "batch": {"id": "b-1", "size": 3, "reason": "idle"}, "deliveries": 1,
    }


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_node_enqueue_is_a_valid_v1_entry(ct: str, run_node: RunNode, db: redis.Redis) -> None:
    request_id = node_ok(run_node("cli.js", "enqueue", "noop", ct))["id"]

    entries = db.xrange(keys.requests("noop"))
    assert len(entries) == 1
    entry_id, fields = entries[0]
    request = parse_request(entry_id, fields)
    assert (request.id, request.ct, request.method, request.deadline_ms) == (request_id, ct, None, None)
    assert (request.ttl_s, request.reply, request.priority) == (600, None, 1)
    assert fields[b"v"] == b"1"
    inputs = decode_value(ct, request.payload)
    assert set(inputs) == {"x", "note"}
    assert inputs["note"] == NOTE
    assert inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(inputs["x"], EXPECTED_X)


def test_node_enqueue_options_reach_the_entry(run_node: RunNode, db: redis.Redis) -> None:
    request_id = f"node-{uuid.uuid4().hex}"
    before_ms = time.time_ns() // 1_000_000
    node_ok(run_node("cli.js", "enqueue", "mlp.v2", "json", "--timeout-ms=5000", "--ttl-s=60",
                     "--method=forward", f"--id={request_id}"))

    [(entry_id, fields)] = db.xrange(keys.requests("mlp.v2"))
    request = parse_request(entry_id, fields)
    assert (request.id, request.method, request.ttl_s) == (request_id, "forward", 60)
    assert request.deadline_ms is not None
    assert before_ms + 5000 <= request.deadline_ms <= time.time_ns() // 1_000_000 + 5000


def test_node_respects_the_admission_limit(run_node: RunNode, db: redis.Redis, node: str) -> None:
    script = subprocess.run([node, "-p", "require('./nosq').ENQUEUE_LUA"], cwd=EXAMPLE_DIR,
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=True)
    assert script.stdout.strip() == ENQUEUE_LUA.strip(), "nosq.js must carry producer's ENQUEUE_LUA"

    db.hset(keys.admission("noop"), mapping={"max_backlog": 1, "retry_after_ms": 250})
    node_ok(run_node("cli.js", "enqueue", "noop", "msgpack"))
    refused = run_node("cli.js", "enqueue", "noop", "msgpack")
    assert refused.returncode == EXIT_QUEUE_FULL, refused.stderr
    assert "full (1 waiting)" in refused.stderr
    assert "retry after 250 ms" in refused.stderr
    assert db.xlen(keys.requests("noop")) == 1


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_node_reads_a_result_written_before_it_waits(ct: str, run_node: RunNode, db: redis.Redis) -> None:
    request_id = node_ok(run_node("cli.js", "enqueue", "noop", ct))["id"]
    [(entry_id, fields)] = db.xrange(keys.requests("noop"))
    request = parse_request(entry_id, fields)
    echoed = decode_value(ct, request.payload)  # what the noop model would return
    write_result(db, request.id, ct, ok_header("noop"), encode_value(ct, echoed), ttl_s=request.ttl_s)

    envelope = node_ok(run_node("cli.js", "wait", request_id, ct, "5"))

    assert envelope["v"] == 1
    assert envelope["id"] == request_id
    assert envelope["ok"] is True
    assert envelope["out"] == {
        "x": {"dtype": "float32", "shape": [2, 3], "values": [0, 1, 2, 3, 4, 5]}, "note": NOTE,
    }
    assert envelope["model"] == "noop"
    assert envelope["timings"] == {"queued_ms": 1.5, "wait_ms": 0.25, "exec_ms": 0.125}
    assert envelope["batch"] == {"id": "b-1", "size": 3, "reason": "idle"}
    assert envelope["deliveries"] == 1
    assert "err" not in envelope


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_node_blocks_until_the_result_arrives(
    ct: str, node: str, redis_db: RedisSettings, db: redis.Redis,
) -> None:
    request_id = f"late-{uuid.uuid4().hex}"
    env = {**os.environ, "NOSQ_REDIS_URL": redis_db.url}
    waiter = subprocess.Popen(
        [node, "cli.js", "wait", request_id, ct, "30"], cwd=EXAMPLE_DIR, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        give_up = time.monotonic() + CLI_TIMEOUT_S
        while not any(c.get("cmd") == "blpop" for c in db.client_list()):  # the waiter is in BLPOP
            assert waiter.poll() is None, waiter.communicate()
            assert time.monotonic() < give_up, "node never reached BLPOP"
            time.sleep(0.02)
        write_result(db, request_id, ct, ok_header("noop"), encode_value(ct, [1.5, "late"]))
        stdout, stderr = waiter.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, stderr
    envelope = json.loads(stdout)
    assert (envelope["id"], envelope["ok"], envelope["out"]) == (request_id, True, [1.5, "late"])


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_node_reads_an_error_envelope(ct: str, run_node: RunNode, db: redis.Redis) -> None:
    request_id = f"err-{uuid.uuid4().hex}"
    header = {
        "ok": False, "err": {"code": "deadline_exceeded", "message": "deadline passed 12 ms ago"},
        "model": "noop", "timings": {"queued_ms": 20.0, "wait_ms": 0.0, "exec_ms": 0.0},
        "batch": {}, "deliveries": 1,
    }
    write_result(db, request_id, ct, header)

    envelope = node_ok(run_node("cli.js", "wait", request_id, ct, "5"))

    assert envelope["ok"] is False
    assert envelope["err"] == {"code": "deadline_exceeded", "message": "deadline passed 12 ms ago"}
    assert "out" not in envelope


def test_node_wait_times_out_without_a_result(run_node: RunNode) -> None:
    started = time.monotonic()
    done = run_node("cli.js", "wait", "never-answered", "json", "0.3")
    assert done.returncode == EXIT_TIMEOUT, done.stderr
    assert "no result for request 'never-answered' within 0.3 s" in done.stderr
    assert time.monotonic() - started < 10


def _sample(dtype: str) -> np.ndarray:
    values = {
        "bool": [True, False, False, True],
        "float16": [0.5, -1.25, 65504.0, 3 * 2.0**-24],  # the last one is subnormal
        "float32": [1.0, 2.0, -0.5, 0.25],
        "complex64": [1 - 1j, 2.5j, -3, 0],
        "complex128": [1 - 1j, 2.5j, -3, 1e300],
        "int64": [-(2**62), -1, 0, 2**53 - 1],
        "uint64": [0, 1, 2**53 - 1, 7],
    }.get(dtype, [0, 1, 2, 3 if dtype.startswith("u") else -3])
    return np.array(values, dtype=dtype).reshape(2, 2)


def _node_values(array: np.ndarray) -> list[Any]:
    """The flat values cli.js/toPlain gives for ``array``."""
    flat = array.reshape(-1)
    if array.dtype.kind == "c":
        return [[float(v.real), float(v.imag)] for v in flat]
    return [_exact(v.item()) for v in flat]


def _exact(value: Any) -> Any:
    """Node gives integers past 2**53 as decimal strings (a double cannot hold them)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53 - 1:
        return str(value)
    return value


@pytest.mark.parametrize("ct", CONTENT_TYPES)
def test_every_dtype_round_trips_between_python_and_node(
    ct: str, run_node: RunNode, db: redis.Redis, node: str,
) -> None:
    arrays = {dtype: _sample(dtype) for dtype in DTYPES}

    # Python -> Node: decoded values match, in C order.
    request_id = f"dtypes-{uuid.uuid4().hex}"
    write_result(db, request_id, ct, ok_header("noop"), encode_value(ct, arrays))
    out = node_ok(run_node("cli.js", "wait", request_id, ct, "5"))["out"]
    for dtype, array in arrays.items():
        assert out[dtype] == {"dtype": dtype, "shape": [2, 2], "values": _node_values(array)}, dtype

    # Node -> Python: encodeTensor gives the very bytes Python's codec gives.
    script = (
        "const nosq = require('./nosq');"
        "const [ct, spec] = [process.argv[1], JSON.parse(process.argv[2])];"
        "const out = {};"
        "for (const [dtype, values] of Object.entries(spec)) {"
        "  const parsed = values.map((v) => (typeof v === 'string' ? BigInt(v) : v));"
        "  out[dtype] = nosq.encodeValue(ct, nosq.encodeTensor(dtype, [2, 2], parsed)).toString('hex');"
        "}"
        "console.log(JSON.stringify(out));"
    )
    spec = {}
    for dtype, array in arrays.items():
        flat = _node_values(array)
        if array.dtype.kind == "c":
            flat = [part for pair in flat for part in pair]
        elif array.dtype.itemsize == 8 and array.dtype.kind in "iu":
            flat = [str(v) for v in flat]  # BigInt in Node: exact past 2**53
        spec[dtype] = flat
    encoded = node_ok(run_node("-e", script, ct, json.dumps(spec)))
    for dtype, array in arrays.items():
        assert bytes.fromhex(encoded[dtype]) == encode_value(ct, array), dtype
