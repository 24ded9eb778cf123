"""Three managers share one memory budget under random traffic: the budget holds, by the
registry and by the actors' real memory, no request is lost, and evictions follow the policy.

Set-up (issue #5, "budget smaller than the sum of the models, 2 to 3 managers at once")
--------------------------------------------------------------------------------------
* One Ray head (``ray start --head`` on 127.0.0.1, its own temp dir and ports, killed by pid at
  the end) that the three managers join with ``--ray-address``: every actor process is then a
  child of one raylet, where the test finds and measures it, and the 2-core machine runs one
  Ray, not three. The head is shared by the policies' runs (module fixture).
* Three ``nosq serve`` processes (``python -m nosq.manager.ops.cli serve``) on db 2, with the same node
  name and the same CPU budget (``--cpu-budget-mib``), serving four ``tests.registry.ballast``
  models that hold 48, 64, 80 and 96 MiB of written weights. Each model's stored profile says
  weights + 4 MiB at b*, so the registry counts 52 + 68 + 84 + 100 = 304 MiB against a budget
  of 200 MiB: any two models fit, no three do.
* One producer sends bursts of 1-8 requests to a random model every 50-250 ms for
  ``TRAFFIC_S``, so each model is loaded, evicted and loaded again, by whichever manager's
  loader gets to it first.

What is checked
---------------
Every ~150 ms, while traffic runs and until the managers have stopped:

(a) the registry: ``Registry.audit()`` (one atomic script): ``used_bytes`` equals the sum of
    the counted models' bytes, no stray member, and ``used_bytes <= budget``;
(b) the real memory: the live ``ray::ModelWorker`` processes of the head's raylet, read from
    ``/proc``. An actor's RSS includes ~300 MiB of Python, torch and Ray that every actor has,
    model or not; what the model adds is measured as that process's RSS now minus its own RSS
    just before the model's weights were allocated (the ballast factory records it, with its
    pid and model id, in a file). The sum over the live actors must stay within the budget
    plus ``RSS_TOLERANCE`` (allocator and Ray buffers an actor grows while serving). A model
    that was never allocated yet (an actor still importing torch) adds nothing.

After the traffic: every accepted request got exactly one result (one completion notice on the
producer's reply stream, and a result key), each ok and equal to its input (an echo); the
streams are empty with nothing pending; every actor of an evicted model exited within
``EXIT_GRACE_S`` of the registry's ``evicted`` event (the loader releases the bytes once
``ray.kill`` is sent, and Ray ends the process asynchronously: 10-60 ms on an idle machine,
seconds when the 2 cores are saturated, so (b) is what bounds the real memory meanwhile); after
the managers stop, no actor is left and the registry counts nothing. The eviction log
(``Registry.evictions``) holds each decision with the candidates' policy fields: the victims
chosen must be those ``nosq.manager.memory.eviction`` chooses from the same candidates at the same time,
under the policy that was configured, and the candidates' ``loaded_at`` must follow the order
of the registry's ``ready`` events (load order, seen independently on Pub/Sub). The run must
have loaded and evicted several times, by more than one manager.

Figures are printed (``-s``) and appended to ``$NOSQ_BUDGET_REPORT`` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio
import torch

from nosq.manager.memory.registry import Eviction, ModelState, Registry
from nosq.manager.profiles.store import store
from nosq.producer import Producer, RedisSettings, keys
from nosq.producer.wire import decode_envelope
from nosq.workers.profiles.curve import Plan, Point, Profile, Stop
from nosq.workers.profiles.measure import input_signature
from nosq.workers.spec import ModelSpec, load_config
from tests.chaos.chaos_support import reply_notices
from tests.manager.harness import results
from tests.registry.ballast import read_records, rss_bytes
from tests.registry.budget_support import EventLog, ManagerProcess, RayHead, start_managers

pytestmark = [pytest.mark.integration, pytest.mark.ray]

URL = "redis://127.0.0.1:6379/2"  # db 2: this test's own
NODE = "budget-node"
MIB = 1024 * 1024
SIZES_MIB = {"ballast48": 48, "ballast64": 64, "ballast80": 80, "ballast96": 96}
MODELS = tuple(SIZES_MIB)
BATCH_MIB = 4  # the stored profiles' memory at b*, counted on top of the weights
BUDGET = 200 * MIB  # any two models fit (at most 100 + 84 = 184 MiB), no three (at least 204)
MANAGERS = 3
TRAFFIC_S = 12.0
SAMPLE_EVERY_S = 0.15
RSS_TOLERANCE = 24 * MIB
EXIT_GRACE_S = 30.0  # ray.kill returns before the process is gone: 0.01-17 s seen on a busy 2-core machine
ANSWER_TIMEOUT_S = 60.0
SIGNATURE = input_signature(torch.zeros(8, dtype=torch.float32))  # Ballast.example_input(): profiles reused
COUNTED = frozenset({ModelState.LOADING.value, ModelState.READY.value, ModelState.DRAINING.value})


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # a short path: Ray's socket paths under it must fit the 107 bytes of a unix socket name
    temp = Path(tempfile.mkdtemp(prefix="nosq-rb-", dir="/tmp"))
    head = RayHead(temp)
    try:
        head.start()
        yield head
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def db2() -> Iterator[redis.Redis]:
    """db 2, flushed before and after, under an exclusive file lock (one run at a time)."""
    lock_path = Path(tempfile.gettempdir()) / "nosq-tests-redis-db2.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = redis.Redis.from_url(URL)
        client.flushdb()
        try:
            yield client
        finally:
            client.flushdb()
            client.close()


# -- the models ------------------------------------------------------------------------------------


def write_config(path: Path, record_dir: Path) -> list[ModelSpec]:
    """The four ballast models as a serve config; returns the specs the managers will read."""
    lines = []
    for model, mib in SIZES_MIB.items():
        lines += ["[[models]]", f'id = "{model}"', 'factory = "tests.registry.ballast:ballast"', 'device = "cpu"',
                  "max_batch = 16", "max_wait_ms = 2.0", "num_cpus = 0.25", "threads = 1",
                  f'options = {{ mib = {mib}, tag = "{model}", record_dir = "{record_dir}" }}', ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return list(load_config(path).models)


def ballast_profile(spec: ModelSpec, mib: int) -> Profile:
    """A stored CPU profile: ``mib`` MiB of weights, BATCH_MIB at b* (16): the bytes reserved."""
    plan = Plan(model=spec.id, fingerprint=spec.fingerprint(), method="forward", device="cpu", device_kind="cpu",
                signature=SIGNATURE, max_batch=16, sizes=(1, 16), latency_budget_ms=100.0,
                weights_bytes=mib * MIB, baseline_bytes=0, memory_limit_bytes=1024 * MIB, memory_method="none",
                threads=1, torch_version="handmade")
    points = (Point(1, 1.0, 1.5, 1000.0, MIB, 3), Point(16, 2.0, 3.0, 8000.0, BATCH_MIB * MIB, 3))
    return Profile(plan=plan, points=points, stop=Stop("cap", 16, "cap"), best_batch=16, reason="handmade",
                   profiled_at=0.0, seconds=0.0)


# -- sampling -------------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Checks (a) and (b) of the module docstring every SAMPLE_EVERY_S; keeps what it saw."""

    registry: Registry
    head: RayHead
    record_dir: Path
    samples: int = 0
    peak_used: int = 0
    peak_rss: int = 0
    peak_rss_detail: dict[str, int] = field(default_factory=dict)
    peak_model_rss: dict[str, int] = field(default_factory=dict)  # per model, one process's growth
    peak_workers: int = 0
    broken: list[str] = field(default_factory=list)
    pid_model: dict[int, str] = field(default_factory=dict)
    first_seen: dict[int, float] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    owners: dict[str, set[str]] = field(default_factory=dict)  # model -> managers seen holding it

    async def run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def sample(self) -> None:
        for device in await self.registry.audit():
            if device.node != NODE:
                continue
            self.peak_used = max(self.peak_used, device.used_bytes)
            if not device.ok or device.used_bytes > BUDGET:
                self.broken.append(f"registry: {device}")
        for row in await self.registry.snapshot():
            if row["state"] in COUNTED and row["owner"]:
                self.owners.setdefault(row["model"], set()).add(row["owner"])
        pids = self.head.workers()
        records = read_records(self.record_dir)
        now = time.monotonic()
        total, detail = 0, {}
        for pid in pids:
            rss = rss_bytes(pid)
            record = records.get(pid)
            if not rss or record is None:  # exited meanwhile, or its model not built yet
                continue
            model = str(record["model"])
            grown = max(0, rss - int(str(record["rss_before"])))
            self.pid_model[pid] = model
            self.first_seen.setdefault(pid, now)
            self.last_seen[pid] = now
            self.peak_model_rss[model] = max(self.peak_model_rss.get(model, 0), grown)
            detail[f"{model}@{pid}"] = grown
            total += grown
        self.samples += 1
        self.peak_workers = max(self.peak_workers, len(pids))
        if total > self.peak_rss:
            self.peak_rss, self.peak_rss_detail = total, detail
        if total > BUDGET + RSS_TOLERANCE:
            self.broken.append(f"RSS: models' memory {total / MIB:.1f} MiB > budget {BUDGET / MIB:.0f} MiB + "
                               f"{RSS_TOLERANCE / MIB:.0f} MiB: {detail}")


async def sampled(sampler: Sampler) -> asyncio.Task[None]:
    task = asyncio.create_task(sampler.run(), name="budget-sampler")
    await asyncio.sleep(0)
    return task


# -- traffic ---------------------------------------------------------------------------------------


async def random_traffic(producer: Producer, seconds: float, seed: int) -> dict[str, tuple[str, np.ndarray]]:
    """Bursts of 1-8 requests to a random model every 50-250 ms; id -> (model, input)."""
    rng = random.Random(seed)
    accepted: dict[str, tuple[str, np.ndarray]] = {}
    end = time.monotonic() + seconds
    serial = 0
    while time.monotonic() < end:
        model = rng.choice(MODELS)
        inputs = []
        for _ in range(rng.randint(1, 8)):
            serial += 1
            inputs.append(np.array([serial, seed, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=np.float32))
        handles = await asyncio.to_thread(producer.submit_many, model, inputs)
        for handle, x in zip(handles, inputs, strict=True):
            accepted[handle.id] = (model, x)
        await asyncio.sleep(rng.uniform(0.05, 0.25))
    return accepted


async def wait_answers(db: redis.Redis, ids: list[str], timeout_s: float) -> dict[str, bytes]:
    done: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(ids) and time.monotonic() < deadline:
        done.update(await asyncio.to_thread(results, db, [i for i in ids if i not in done]))
        if len(done) < len(ids):
            await asyncio.sleep(0.5)
    return done


def streams_left(db: redis.Redis) -> dict[str, tuple[int, int]]:
    left = {}
    for model in MODELS:
        length: Any = db.xlen(keys.requests(model))
        summary: Any = db.xpending(keys.requests(model), keys.GROUP) if length else {"pending": 0}
        pending = int(summary["pending"])
        if length or pending:
            left[model] = (length, pending)
    return left


# -- eviction order --------------------------------------------------------------------------------


def check_decisions(decisions: list[Eviction], events: list[tuple[float, ModelState, str]],
                    policy: str) -> list[str]:
    """What is wrong with the eviction decisions (empty: nothing). See the module docstring."""
    problems = []
    for decision in decisions:
        if decision.policy != policy:
            problems.append(f"decision for {decision.model} used policy {decision.policy}, not {policy}")
        if decision.victims != decision.policy_victims():
            problems.append(f"decision for {decision.model}: victims {decision.victims}, but {policy} over the "
                            f"same candidates chooses {decision.policy_victims()}: {decision.candidates}")
    # walk the events: each decision's victims enter DRAINING in its order; at the first of them,
    # the READY candidates' loaded_at must follow the order of their ready events
    victims = iter([(d, v) for d in decisions for v in d.victims])
    ready_order: list[str] = []
    for _, state, model in events:
        if state is ModelState.READY:
            ready_order = [m for m in ready_order if m != model] + [model]
        elif state is ModelState.DRAINING:
            decision, victim = next(victims, (None, ""))  # type: ignore[assignment]
            if decision is None or victim != model:
                problems.append(f"draining {model} matches no logged decision (expected {victim or 'none'})")
                break
            if victim == decision.victims[0]:
                ready = sorted((c for c in decision.candidates if c.state is ModelState.READY),
                               key=lambda c: ready_order.index(c.model) if c.model in ready_order else -1)
                stamps = [(c.model, c.loaded_at_ms) for c in ready]
                if [t for _, t in stamps] != sorted(t for _, t in stamps):
                    problems.append(f"decision for {decision.model}: loaded_at {stamps} does not follow the "
                                    f"ready events' order {ready_order}")
            ready_order = [m for m in ready_order if m != model]
        elif state in (ModelState.EVICTED, ModelState.FAILED):
            ready_order = [m for m in ready_order if m != model]
    left = list(victims)
    if left:
        problems.append(f"{len(left)} logged victim(s) never seen draining: {[(d.model, v) for d, v in left]}")
    return problems


def busy_skips(decisions: list[Eviction], policy: str) -> int:
    """Decisions where the policy's first READY candidate had batches in flight (so was passed over)."""
    from nosq.manager.memory.eviction import policy as policy_named

    order = policy_named(policy)
    skipped = 0
    for decision in decisions:
        ready = sorted((c for c in decision.candidates if c.state is ModelState.READY and c.nbytes > 0), key=order.key)
        skipped += bool(ready) and ready[0].inflight > 0
    return skipped


# -- the test ---------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("policy", ["fifo", "lru"])
async def test_managers_share_a_budget_under_random_traffic(policy: str, ray_head: RayHead, db2: redis.Redis,
                                                            tmp_path: Path) -> None:
    started = time.monotonic()
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    specs = write_config(tmp_path / "ballast.toml", record_dir)
    client = redis.asyncio.Redis.from_url(URL)
    registry = Registry(client, owner="budget-test-sampler")
    for spec in specs:
        await store(client, ballast_profile(spec, SIZES_MIB[spec.id]))
    events = EventLog(URL, frozenset(MODELS))
    subscribed = asyncio.Event()
    listener = asyncio.create_task(events.run(subscribed), name="registry-events")
    await subscribed.wait()
    args = ["--config", str(tmp_path / "ballast.toml"), "--node", NODE,
            "--cpu-budget-mib", str(BUDGET // MIB), "--eviction-policy", policy, "--metrics-port", "-1",
            "--min-idle-ms", "5000", "--shutdown-timeout", "20"]
    managers = [ManagerProcess(f"budget-{policy}-{i}", URL, args, tmp_path / f"manager-{i}.log", ray_head)
                for i in range(MANAGERS)]
    sampler = Sampler(registry, ray_head, record_dir)
    sampling: asyncio.Task[None] | None = None
    stopping_at = float("inf")
    producer = Producer(RedisSettings(url=URL))
    producer.start()
    codes: list[int] = []
    try:
        await asyncio.to_thread(start_managers, managers, URL)
        ready_at = time.monotonic()
        sampling = await sampled(sampler)
        accepted = await random_traffic(producer, TRAFFIC_S, seed=7 if policy == "fifo" else 11)
        traffic_end = time.monotonic()
        answers = await wait_answers(db2, list(accepted), ANSWER_TIMEOUT_S)
        answered_at = time.monotonic()
        for _ in range(40):  # results are written before their entries are acked and deleted
            if not streams_left(db2):
                break
            await asyncio.sleep(0.25)
        left = streams_left(db2)
        notices = reply_notices(db2, producer._client_id)
        evicted_before_stop = events.count(ModelState.EVICTED)
        stopping_at = time.monotonic()
        codes = list(await asyncio.gather(*(asyncio.to_thread(m.stop) for m in managers)))
        for _ in range(int(EXIT_GRACE_S / 0.2)):  # the actors go with their managers
            if not ray_head.workers():
                break
            await asyncio.sleep(0.2)
        await sampler.sample()
        workers_left = ray_head.workers()
    finally:
        if sampling is not None:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        for manager in managers:
            manager.stop(timeout_s=5)
        producer.close()
    decisions = [d for d in await registry.evictions() if d.model in SIZES_MIB]
    rows = await registry.snapshot()
    devices = await registry.devices(NODE)
    await asyncio.sleep(0.3)  # the last events arrive
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await client.aclose()
    logs = {m.consumer: m.log_tail(1500) for m in managers}

    # -- the figures ---------------------------------------------------------------------------
    loads = events.count(ModelState.READY)
    # how long each actor was still seen after the registry's "evicted" (its bytes released)
    lags = {f"{model}@{pid}{'' if t < stopping_at else '(stop)'}": round(sampler.last_seen[pid] - t, 2)
            for t, state, model in events.events if state is ModelState.EVICTED
            for pid, m in sampler.pid_model.items()
            if m == model and sampler.first_seen[pid] < t <= sampler.last_seen[pid]}
    # how long each victim had been READY when it was chosen (a load's worth of work, wasted when short)
    ready_since: dict[str, float] = {}
    served_for = []
    for t, state, model in events.events:
        if state is ModelState.READY:
            ready_since[model] = t
        elif state is ModelState.DRAINING and model in ready_since:
            served_for.append(round(t - ready_since.pop(model), 2))
    outcomes: Counter[str] = Counter()
    wrong = []
    latencies, deliveries = [], Counter[int]()
    for rid, data in answers.items():
        envelope = decode_envelope("msgpack", data)
        outcomes[envelope.code or "ok"] += 1
        latencies.append(sum(envelope.timings.get(k, 0.0) for k in ("queued_ms", "wait_ms", "exec_ms")) / 1000)
        deliveries[envelope.deliveries] += 1
        if envelope.ok and not np.array_equal(np.asarray(envelope.out, dtype=np.float32), accepted[rid][1]):
            wrong.append(rid)
    figures = (
        f"policy={policy} managers={MANAGERS} budget={BUDGET // MIB}MiB models(MiB)={SIZES_MIB} "
        f"requests={len(accepted)} answered={len(answers)} outcomes={dict(outcomes)} "
        f"loads={loads} evictions={evicted_before_stop} decisions={len(decisions)} "
        f"busy_skips={busy_skips(decisions, policy)} victims_ready_for_s={sorted(served_for)} "
        f"victims_uses={sorted(c.uses for d in decisions for c in d.candidates if c.model in d.victims)} "
        f"owners={ {m: len(o) for m, o in sorted(sampler.owners.items())} } "
        f"samples={sampler.samples} peak_registry={sampler.peak_used / MIB:.0f}MiB "
        f"peak_models_rss={sampler.peak_rss / MIB:.1f}MiB {sampler.peak_rss_detail} "
        f"per_model_rss(MiB)={ {m: round(v / MIB, 1) for m, v in sorted(sampler.peak_model_rss.items())} } "
        f"peak_actors={sampler.peak_workers} exit_lags_s={lags} "
        f"latency_s(p50/p99/max)={np.percentile(latencies, 50):.1f}/{np.percentile(latencies, 99):.1f}/"
        f"{max(latencies):.1f} deliveries={dict(sorted(deliveries.items()))} "
        f"start={ready_at - started:.0f}s traffic={traffic_end - ready_at:.0f}s "
        f"answered_after={answered_at - traffic_end:.1f}s total={time.monotonic() - started:.0f}s"
    )
    print(f"\nBUDGET {figures}", flush=True)
    report = os.environ.get("NOSQ_BUDGET_REPORT")
    if report:
        with Path(report).open("a", encoding="utf-8") as file:  # noqa: ASYNC230 - one line, at the end
            file.write(figures + "\n")

    # -- the checks ----------------------------------------------------------------------------
    assert codes == [0] * MANAGERS, f"manager exit codes {codes}: {logs}"
    assert sampler.samples >= 50, sampler.samples
    assert not sampler.broken, f"{len(sampler.broken)} broken sample(s), first: {sampler.broken[:3]}"
    assert sampler.peak_used <= BUDGET
    # nothing lost, nothing answered twice, every answer right
    missing = [rid for rid in accepted if rid not in answers]
    assert not missing, f"{len(missing)} of {len(accepted)} requests got no result (e.g. {missing[:3]}): {logs}"
    assert outcomes == Counter(ok=len(accepted)), outcomes
    assert not wrong, f"{len(wrong)} results differ from their inputs"
    twice = {rid: len(n) for rid, n in notices.items() if len(n) != 1}
    assert not twice and set(notices) == set(accepted), f"completion notices: {len(notices)}, not once each: {twice}"
    assert not left, f"entries left in the streams (length, pending): {left}"
    # evicted actors really exit; none outlives its manager; the registry ends empty
    assert max(lags.values(), default=0.0) <= EXIT_GRACE_S, f"evicted models' actors lived on (s): {lags}"
    assert not workers_left, f"actor processes left after the managers stopped: {workers_left}"
    assert {r["state"] for r in rows if r["model"] in SIZES_MIB} <= {"evicted"}, rows
    assert devices and devices[0]["used_bytes"] == 0, devices
    # eviction order: the configured policy, from the candidates as they were
    assert not (problems := check_decisions(decisions, events.events, policy)), problems[:5]
    # the run did what it is for: loads and evictions, again and again, by more than one manager
    assert loads >= 4 and evicted_before_stop >= 2 and len(decisions) >= 2, figures
    assert len(set().union(*sampler.owners.values())) >= 2, sampler.owners
    assert sampler.peak_rss >= 100 * MIB, "the actors' memory never showed two models: is the RSS read right?"
