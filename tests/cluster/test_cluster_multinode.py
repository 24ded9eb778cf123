"""Multi-node Ray (issue #8, point 3), on a real cluster and the real Redis (db 1).

A head (custom resource ``head``) and a worker node (``node_a``) are started with ``ray start``
on loopback; ``nosq serve --ray-address`` joins them with two models pinned by ``resources``:
``pinned`` to ``node_a`` and ``headed`` to ``head``. Under steady load the worker node is
SIGKILLed whole (raylet, agents, the model's worker), a new node with ``node_a`` joins, and:

* each model's replica ran on the node its resources name, and ``pinned``'s moved to the new node;
* the batch ``pinned`` was running when its node died ran again, whole, on the new node (the
  model records each batch's inputs and pid);
* every accepted request got exactly one result, all ok: none lost (the batches the dead node
  held were retried), none written twice (one completion per id in the reply stream);
* nothing is left pending in either stream, and no process of the cluster outlives the test.

A second test lets the node stay gone past the restart wait (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import redis
from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.manager.runtime import raycluster
from nosq.manager.serving import replicas as dispatcher
from nosq.producer import Handle, NosqError, Producer, RedisSettings, keys
from nosq.producer.aio import AsyncProducer
from nosq.producer.wire import decode_envelope
from tests.background import Background
from tests.chaos.chaos_support import reply_notices
from tests.cluster.cluster_support import LocalCluster
from tests.cluster.conftest import REDIS_URL
from tests.manager.harness import config, manager_settings, results, running_manager, spec
from tests.manager.harness import wait_for as harness_wait_for

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

MODELS = ("pinned", "headed")
CONFIG = """
[[models]]
id = "pinned"
factory = "tests.manager.models:slow"
device = "cpu"
num_cpus = 0.5
threads = 1
max_batch = 8
options = {delay_s = 0.08, record = "RECORD_pinned"}
resources = {node_a = 1}

[[models]]
id = "headed"
factory = "tests.manager.models:slow"
device = "cpu"
num_cpus = 0.5
threads = 1
max_batch = 8
options = {delay_s = 0.0, record = "RECORD_headed"}
resources = {head = 1}
"""


class Load(Background):
    """A producer thread: ``per_model`` requests to each model every ``interval_s``."""

    name = "cluster-load"

    def __init__(self, *, per_model: int = 4, interval_s: float = 0.05) -> None:
        super().__init__()
        self.per_model = per_model
        self.interval_s = interval_s
        self.accepted: dict[str, str] = {}  # id -> model
        self.errors: Counter[str] = Counter()
        self.client_id = ""
        self._lock = threading.Lock()

    def ids(self, model: str | None = None) -> list[str]:
        with self._lock:
            return [i for i, m in self.accepted.items() if model is None or m == model]

    def _run(self) -> None:
        producer = Producer(RedisSettings(url=REDIS_URL))
        producer.start()
        self.client_id = producer._client_id
        turn = 0
        try:
            while not self._stop.is_set() and turn < 5000:
                turn += 1
                for model in MODELS:
                    inputs = [np.full(4, turn * 100 + i, dtype=np.float32) for i in range(self.per_model)]
                    try:
                        handles = producer.submit_many(model, inputs)
                    except (NosqError, redis.RedisError) as exc:
                        self.errors[type(exc).__name__] += 1
                        continue
                    with self._lock:
                        self.accepted.update((h.id, model) for h in handles)
                self._stop.wait(self.interval_s)
        finally:  # not producer.close(): it deletes the reply stream, which the accounting reads
            if producer._redis is not None:
                producer._redis.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Until ``predicate()`` is truthy (state of other processes: Ray's GCS, Redis)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)
    return value


def alive_nodes() -> dict[str, dict[str, float]]:
    """node id -> resources of every live node."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}  # type: ignore[no-untyped-call]


def node_with(resource: str, exclude: frozenset[str] = frozenset()) -> str | None:
    return next((nid for nid, res in alive_nodes().items() if resource in res and nid not in exclude), None)


def replicas() -> dict[str, tuple[str, int, int]]:
    """actor id -> (node id, pid, restarts) of every live ModelWorker actor."""
    from ray._private import state

    return {actor_id: (actor["Address"]["NodeID"], int(actor["Pid"]), int(actor["NumRestarts"]))
            for actor_id, actor in state.actors().items()
            if actor.get("ActorClassName") == "ModelWorker" and actor.get("State") == "ALIVE"}


def calls(record: Path) -> list[tuple[int, list[float]]]:
    """(pid, first elements) of each batch a model ran, in order (its ``record`` file; a line
    cut short by the SIGKILL of its writer is skipped)."""
    found = []
    for line in record.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            call = json.loads(line)
            found.append((int(call["pid"]), [float(v) for v in call["firsts"]]))
    return found


def pids(record: Path) -> list[int]:
    return [pid for pid, _ in calls(record)]


@pytest.fixture
def driver(cluster: LocalCluster) -> Iterator[None]:
    """This test's own connection to the cluster (to read where the actors run), and the
    environment the manager it starts inherits (token, PYTHONPATH); both undone after."""
    saved = {name: os.environ.get(name) for name in cluster.env()}
    os.environ.update(cluster.env())
    Config.initialize("")  # Ray read RAY_AUTH_MODE when it was imported: read it again
    AuthenticationTokenLoader.instance().reset_cache()  # and the token: this cluster's own
    try:
        cluster.start_head({"head": 1})
        yield
    finally:
        raycluster.disconnect()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        Config.initialize("")
        # the loader caches the token it read: a later local Ray (this pytest process's next
        # tests) must not present this cluster's token to a GCS that expects its own
        AuthenticationTokenLoader.instance().reset_cache()


@pytest.mark.timeout(240)
def test_pinned_replica_follows_its_resource_to_a_new_node_and_nothing_is_lost(
        db1: redis.Redis, cluster: LocalCluster, driver: None, tmp_path: Path) -> None:
    started = time.monotonic()
    node_a = cluster.start_node("node-a", {"node_a": 1})
    raycluster.connect(cluster.address)
    head_id = node_with("head")
    first_id = wait_for(lambda: node_with("node_a"), 30, "node-a in the cluster")
    record = {model: tmp_path / f"{model}.jsonl" for model in MODELS}
    config = tmp_path / "serve.toml"
    config.write_text(CONFIG.replace("RECORD_pinned", str(record["pinned"])).replace(
        "RECORD_headed", str(record["headed"])), encoding="utf-8")
    manager = start_manager(RedisSettings(url=REDIS_URL), "--config", str(config), "--ray-address", cluster.address,
                            "--log-level", "warning", "--metrics-port", "-1", consumer="cluster-a")
    try:
        placed = wait_for(lambda: len(found := replicas()) == 2 and found, 30, "both replicas alive")
        by_node = {node: (actor_id, pid) for actor_id, (node, pid, _) in placed.items()}
        assert set(by_node) == {first_id, head_id}, f"replicas on {placed}: not one on node-a, one on the head"
        pinned_actor, pinned_pid = by_node[first_id]

        with Load() as load:
            wait_for(lambda: len(results(db1, load.ids("pinned"))) >= 40, 30, "pinned serving")
            # each model ran where its resources say: pinned on node-a, headed on the head
            assert set(pids(record["pinned"])) == {pinned_pid}
            assert set(pids(record["headed"])) == {by_node[head_id][1]}
            # pinned is busy most of the time (a batch of 8 takes 80 ms, 4 requests come every
            # 50 ms): the node dies just after a batch started, with ~80 ms of it left to run
            accepted_at_kill = len(load.ids("pinned"))
            answered_at_kill = len(results(db1, load.ids("pinned")))
            recorded = record["pinned"].stat().st_size
            cluster.kill_node(node_a, when=lambda: record["pinned"].stat().st_size > recorded)
            killed_at = time.monotonic()
            wait_for(lambda: first_id not in alive_nodes(), 30, "node-a marked dead")
            cluster.start_node("node-a2", {"node_a": 1})
            second_id = wait_for(lambda: node_with("node_a", frozenset({first_id})), 30, "node-a2 in the cluster")
            moved = wait_for(lambda: replicas().get(pinned_actor, ("",))[0] == second_id and replicas(),
                             60, "pinned's replica restarted on node-a2")
            recovered_s = time.monotonic() - killed_at
            served_after = len(results(db1, load.ids("pinned")))
            wait_for(lambda: len(results(db1, load.ids("pinned"))) >= served_after + 40, 30, "pinned serving again")
        ids = load.ids()
        done = wait_for(lambda: len(found := results(db1, ids)) == len(ids) and found, 60,
                        f"a result for each of {len(ids)} accepted requests")
    finally:
        status = stop_manager(manager)

    assert status == 0, f"the manager exited with {status}"
    assert not load.errors, f"submissions refused: {load.errors}"
    _, new_pid, restarts = moved[pinned_actor]
    assert restarts >= 1 and pids(record["pinned"])[-1] == new_pid, (moved, pids(record["pinned"])[-3:])
    # the batch node-a was running when it died ran again, whole, on node-a2
    on_a = {tuple(firsts) for pid, firsts in calls(record["pinned"]) if pid == pinned_pid}
    on_a2 = {tuple(firsts) for pid, firsts in calls(record["pinned"]) if pid == new_pid}
    assert on_a & on_a2, "no batch of the killed node was retried on the new one"
    assert moved[by_node[head_id][0]] == placed[by_node[head_id][0]], "headed's replica moved or restarted"
    envelopes = {rid: decode_envelope("msgpack", data) for rid, data in done.items()}
    failed = Counter(env.code for env in envelopes.values() if not env.ok)
    assert not failed, f"requests failed: {failed}"
    notices = Counter({rid: len(n) for rid, n in reply_notices(db1, load.client_id).items()})
    assert set(notices) == set(ids) and max(notices.values()) == 1, \
        f"completions per request: {Counter(notices.values())}, missing {len(set(ids) - set(notices))}"
    for model in MODELS:
        assert int(db1.xpending(keys.requests(model), keys.GROUP)["pending"]) == 0  # type: ignore[index]
        assert db1.xlen(keys.requests(model)) == 0
    print(f"\nCLUSTER {len(ids)} requests ({len(load.ids('pinned'))} pinned), node-a killed with "
          f"{accepted_at_kill - answered_at_kill} pinned requests unanswered, {len(on_a & on_a2)} batch(es) of it "
          f"retried; replica back on node-a2 "
          f"{recovered_s:.1f} s later; test {time.monotonic() - started:.0f} s", flush=True)


@pytest.mark.timeout(240)
async def test_batches_held_by_a_node_that_does_not_come_back_are_answered_not_lost(
        db1: redis.Redis, cluster: LocalCluster, driver: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no node left that offers its resources, a replica stays RESTARTING in Ray. The
    batches it held when its node died are answered ``internal`` once the restart wait ends
    (300 s; 6 s here); those sent to it later wait in Ray and run when a node joins again, and the
    model serves again. Every request gets exactly one answer, none is left pending."""
    node_a = cluster.start_node("node-a", {"node_a": 1})
    raycluster.connect(cluster.address)  # the manager below joins this driver's Ray
    model = spec("pinned", "slow", max_batch=4, options={"delay_s": 0.08}, num_cpus=0.5,
                 resources={"node_a": 1})
    settings = manager_settings(redis=RedisSettings(url=REDIS_URL), ray_address=cluster.address)
    rng = np.random.default_rng(0)
    handles: list[Handle] = []
    async with running_manager(config(model), settings), AsyncProducer(RedisSettings(url=REDIS_URL)) as producer:
        first = await producer.submit_many("pinned", [rng.standard_normal(4, dtype=np.float32) for _ in range(8)])
        assert all(env.ok for env in [await producer.outcome(h, timeout_s=30) for h in first])
        monkeypatch.setattr(dispatcher, "READY_TIMEOUT_S", 6.0)  # the restart wait, not the start
        for _ in range(10):  # a batch is running, more are queued and buffered
            handles += await producer.submit_many("pinned", [rng.standard_normal(4, dtype=np.float32)] * 4)
            await asyncio.sleep(0.05)
        cluster.kill_node(node_a)
        ids = [h.id for h in handles]
        await harness_wait_for(lambda: any(not decode_envelope("msgpack", d).ok for d in results(db1, ids).values()),
                               60, "the held batches answered")
        monkeypatch.setattr(dispatcher, "READY_TIMEOUT_S", 300.0)  # a restart on the new node may be slow
        await asyncio.to_thread(cluster.start_node, "node-a2", {"node_a": 1})
        envelopes = [await producer.outcome(h, timeout_s=90) for h in handles]
        later = await producer.submit_many("pinned", [rng.standard_normal(4, dtype=np.float32)] * 8)
        again = [await producer.outcome(h, timeout_s=60) for h in later]
        assert all(env.ok for env in again), f"not serving again: {[(env.code, env.message) for env in again]}"
    codes = Counter(env.code or "ok" for env in envelopes)
    assert set(codes) <= {"ok", "internal"} and codes["internal"] >= 1, codes
    assert all("did not restart" in env.message for env in envelopes if not env.ok)
    assert len(results(db1, ids)) == len(ids)
    assert int(db1.xpending(keys.requests("pinned"), keys.GROUP)["pending"]) == 0  # type: ignore[index]
    print(f"\nCLUSTER node-a gone for good: {dict(codes)} of {len(ids)} requests", flush=True)
