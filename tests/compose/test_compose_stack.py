"""compose.yaml run for real (issue 20): the shipped Dockerfile and compose file, on a real engine,
with real containers, Redis, Ray and requests; compose.test.yaml only moves the services onto
the host's loopback at free ports.

Requests come from the stack's own producer service, from this host in Python (the producer
library) and from the Node example (examples/node/cli.js). Each is answered exactly once: the
client gets one envelope per id, with its own id, ok, delivered once; the managers' served
counters (``nosq status --json`` in the manager's container) grow by exactly what was sent;
no stream keeps an entry, a pending one or a dead letter. Then the manager is killed under
load, twice: by a crash (SIGKILL of its process: the restart policy brings it back) and by
``docker kill`` (Docker takes that as an operator's stop: the policy leaves it down until
``docker compose up``); nothing accepted is lost either way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any

import numpy as np
import pytest
from compose_stack import MODELS, ROOT, Answers, Load, Stack, StackError, collect_answers, producer_of, run

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

NODE_DIR = ROOT / "examples" / "node"
PRODUCER_SERVICE_REQUESTS = 200  # per model: compose.yaml's producer command
HOST_REQUESTS = 300  # per model
NODE_REQUESTS = 6  # per content type
RESTART_TIMEOUT_S = 300.0
CUDA_LIBRARY = re.compile(r"lib(cudart|cublas|cudnn|nccl|cufft|curand|cusparse|cusolver)[^/]*\.so")


def assert_answered_once(stack: Stack, answers: Answers, *, redeliveries_allowed: bool = False) -> None:
    assert not answers.missing, f"{len(answers.missing)} of {len(answers.sent)} requests unanswered"
    assert not answers.repeated, f"answered more than once: {answers.repeated[:5]}"
    assert not answers.strangers, f"envelopes for ids not sent: {answers.strangers[:5]}"
    assert not answers.failed, f"errors: {list(answers.failed.items())[:5]}"
    if not redeliveries_allowed:
        assert answers.redelivered() == 0, "requests delivered more than once with no fault"
    left = stack.queues(list(MODELS))
    assert not any(left.values()), f"entries left behind: {left}"


def test_the_cpu_image_carries_no_cuda(stack: Stack) -> None:
    listing = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", "nosq:latest", "-c",
                   "pip list --format=freeze; find / -xdev -name 'lib*.so*' 2>/dev/null; true"], timeout_s=300).stdout
    packages = [line for line in listing.splitlines() if "==" in line]
    torch = [p for p in packages if p.lower().startswith("torch==")]
    assert torch and torch[0].endswith("+cpu"), f"the image's torch is not the CPU build: {torch}"
    assert not [p for p in packages if p.lower().startswith("nvidia-")], "the image carries NVIDIA packages"
    assert not CUDA_LIBRARY.search(listing), "the image carries CUDA libraries"
    stack.figures["image_torch"] = torch[0]


def test_every_service_is_healthy(stack: Stack) -> None:
    for service in ("redis", "ray-head", "manager"):
        state = stack.inspect(service)["State"]
        assert state["Status"] == "running", (service, state)
        assert state["Health"]["Status"] == "healthy", (service, state["Health"]["Log"][-1:])
    models = {row["model"]: row for row in stack.status()["models"]}
    assert set(MODELS) <= set(models), f"the manager serves {sorted(models)}"
    assert not [m for m, row in models.items() if row.get("load_error")], models


def test_the_producer_service_is_answered(stack: Stack) -> None:
    before = stack.served()
    started = time.monotonic()
    stack.compose("up", "--detach", "producer", timeout_s=300)
    container = stack.container("producer")
    done = run(["docker", "wait", container], timeout_s=600).stdout.strip()
    stack.figures["producer_service_s"] = round(time.monotonic() - started, 1)
    logs = stack.logs("producer")
    state = stack.inspect("producer")
    assert (done, state["RestartCount"]) == ("0", 0), f"the producer service failed:\n{logs[-3000:]}"
    for model in MODELS:  # its own count: every handle it submitted came back through as_completed
        assert re.search(rf"^{model}: {PRODUCER_SERVICE_REQUESTS} results in ", logs, re.M), logs[-3000:]
    expected = {m: before.get(m, 0) + PRODUCER_SERVICE_REQUESTS for m in MODELS}
    assert stack.wait_served(expected) == {**before, **expected}, "served counters differ from what was sent"
    assert not any(stack.queues(list(MODELS)).values())
    stack.figures["producer_service_requests"] = {"sent": PRODUCER_SERVICE_REQUESTS * len(MODELS),
                                                  "answered": PRODUCER_SERVICE_REQUESTS * len(MODELS)}


def test_host_python_requests_are_answered_once(stack: Stack) -> None:
    before = stack.served()
    rng = np.random.default_rng(20)
    started = time.monotonic()
    with producer_of(stack) as producer:
        handles = []
        for model, shape in MODELS.items():
            inputs = rng.standard_normal((HOST_REQUESTS, *shape), dtype=np.float32)
            handles += producer.submit_many(model, list(inputs), timeout_s=120)
        answers = collect_answers(producer, handles, timeout_s=300)
        item = rng.standard_normal(8, dtype=np.float32)
        echo = producer.infer("noop", item, timeout_s=60)  # noop returns its input
    stack.figures["host_python_s"] = round(time.monotonic() - started, 1)
    np.testing.assert_array_equal(echo, item)
    assert_answered_once(stack, answers)
    sent = answers.per_model()
    sent["noop"] += 1
    expected = {m: before.get(m, 0) + n for m, n in sent.items()}
    assert stack.wait_served(expected) == {**before, **expected}, "served counters differ from what was sent"
    stack.figures["host_python_requests"] = {"sent": sum(sent.values()), "answered": len(answers.got) + 1}


@pytest.fixture(scope="module")
def node() -> str:
    """node, with examples/node's dependencies (npm ci, once)."""
    node_bin, npm = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm is None:
        pytest.fail("node and npm must be on PATH (Node.js 20+) to send the Node example's requests")
    if not (NODE_DIR / "node_modules").is_dir():
        run([npm, "ci", "--no-audit", "--no-fund"], timeout_s=300, cwd=NODE_DIR)
    return node_bin


def node_cli(node: str, stack: Stack, *args: str) -> Any:
    env = {**os.environ, "NOSQ_REDIS_URL": stack.settings().url}
    done = subprocess.run([node, "cli.js", *args], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"node cli.js {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


def test_node_example_requests_are_answered_once(stack: Stack, node: str) -> None:
    before = stack.served()
    started = time.monotonic()
    sent: dict[str, str] = {}
    for ct in ("msgpack", "json"):
        for _ in range(NODE_REQUESTS):
            sent[node_cli(node, stack, "enqueue", "noop", ct, "--timeout-ms=60000")["id"]] = ct
    envelopes = {rid: node_cli(node, stack, "wait", rid, ct, "60") for rid, ct in sent.items()}
    stack.figures["node_s"] = round(time.monotonic() - started, 1)
    for rid, envelope in envelopes.items():
        assert (envelope["id"], envelope["ok"], envelope["model"], envelope["deliveries"]) == (rid, True, "noop", 1)
        assert envelope["out"]["x"] == {"dtype": "float32", "shape": [2, 3], "values": [0, 1, 2, 3, 4, 5]}
        assert envelope["out"]["note"] == "hello from node"
    assert len(set(sent)) == 2 * NODE_REQUESTS
    expected = {**before, "noop": before.get("noop", 0) + len(sent)}
    assert stack.wait_served(expected) == expected, "served counters differ from what was sent"
    assert not any(stack.queues(list(MODELS)).values())
    stack.figures["node_requests"] = {"sent": len(sent), "answered": len(envelopes)}


def wait_healthy(stack: Stack, *, restarts: int | None, since: float) -> float:
    """Seconds from ``since`` until the manager runs healthy (after ``restarts`` restarts by
    the restart policy, when given)."""
    deadline = since + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        info = stack.inspect("manager")
        restarted = restarts is None or info["RestartCount"] == restarts
        if restarted and info["State"].get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - since
        time.sleep(0.5)
    raise StackError(f"the manager was not back and healthy within {RESTART_TIMEOUT_S:.0f} s:\n"
                     f"{stack.logs('manager')[-3000:]}")


def under_load(stack: Stack, fault: str) -> tuple[Answers, float]:
    """Kill the manager by ``fault`` while a producer sends, bring it back, and collect."""
    with producer_of(stack) as producer:
        with Load(producer) as load:
            time.sleep(3.0)  # steady serving
            info = stack.inspect("manager")
            restarts = info["RestartCount"]
            killed_at = time.monotonic()
            if fault == "crash":  # what an OOM kill or a segfault does: the restart policy applies
                os.kill(info["State"]["Pid"], signal.SIGKILL)
                back_s = wait_healthy(stack, restarts=restarts + 1, since=killed_at)
            else:  # docker kill: Docker marks the container stopped on purpose
                run(["docker", "kill", stack.container("manager")], timeout_s=60)
                time.sleep(5.0)
                state = stack.inspect("manager")
                assert (state["State"]["Status"], state["RestartCount"]) == ("exited", restarts), (
                    "docker kill: the restart policy was expected to leave the container down")
                stack.compose("up", "--detach", "manager", timeout_s=120)  # what an operator does
                back_s = wait_healthy(stack, restarts=None, since=killed_at)
            time.sleep(3.0)  # served again under load
        assert not load.errors, load.errors[:3]
        answers = collect_answers(producer, load.handles, timeout_s=300)
    return answers, back_s


@pytest.mark.parametrize("fault", ["crash", "docker-kill"])
def test_manager_killed_under_load_loses_nothing(stack: Stack, fault: str) -> None:
    answers, back_s = under_load(stack, fault)
    assert len(answers.sent) > 500, f"the load sent only {len(answers.sent)} requests"
    assert_answered_once(stack, answers, redeliveries_allowed=True)
    stack.figures[f"kill[{fault}]"] = {"accepted": len(answers.sent), "answered": len(answers.got),
                                       "redelivered": answers.redelivered(), "back_healthy_s": round(back_s, 1)}


def test_down_leaves_nothing(stack: Stack) -> None:
    """``down -v`` leaves no container, network, volume or container process of the project
    (checked by Stack.down; the fixture's teardown runs it again, harmlessly)."""
    for service in ("redis", "ray-head", "manager", "producer"):
        stack.container(service)  # recorded for the check of processes left behind
    stack.down()
