"""The budget holds whatever the interleaving: several processes reserve, load, run and release.

Each worker process (this file run as a script) is a manager's registry traffic with its own
connection, policy and random choices: reserve random models on two devices, mark them ready
or failed, run batches, release the victims it owns once drained, release on its own, reap
dead owners. After every operation it audits the registry atomically; the test watches it
too while they run, SIGKILLs one worker mid-run (its heartbeat goes with it), and checks at
the end that ``used_bytes`` equals the sum of the resident models' bytes on every device and
that nothing of the killed worker is still counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import redis.asyncio

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script by the test
    sys.path.insert(0, str(ROOT))

from nosq.manager.memory.registry import Outcome, Registry, ReservationLost  # noqa: E402
from nosq.producer import keys  # noqa: E402

NODE = "n1"
BUDGETS = {"cuda:0": 1000, "cuda:1": 700}
MODELS = {f"m{i}": size for i, size in enumerate(random.Random(7).choices(range(50, 450, 10), k=12))}
WORKERS = [("w0", "fifo"), ("w1", "lru"), ("w2", "lfu"), ("w3", "cost")]
DOOMED = "w3"  # SIGKILLed mid-run
CYCLES = 500
COUNTED = ("loading", "ready", "draining")


class BudgetBroken(AssertionError):
    pass


async def check(reg: Registry) -> None:
    for device in await reg.audit():
        if not device.ok:
            raise BudgetBroken(f"invariant broken: {device}")


async def worker(url: str, owner: str, policy: str, seed: int, cycles: int) -> Counter[str]:
    rng = random.Random(seed)
    client = redis.asyncio.Redis.from_url(url)
    reg = Registry(client, owner=owner, policy=policy)
    busy: Counter[str] = Counter()  # batches this worker has in flight, per model
    stats: Counter[str] = Counter()
    try:
        for cycle in range(cycles):
            rows = await reg.snapshot()
            mine = {r["model"]: r["state"] for r in rows if r["owner"] == owner}
            for model, state in mine.items():  # victims of anyone's reserve: drain, "kill", release
                if state == "draining" and busy[model] == 0:
                    stats["released victim"] += await reg.release(model)
                    await check(reg)
            loading = sorted(m for m, s in mine.items() if s == "loading")
            ready = sorted(m for m, s in mine.items() if s == "ready")
            absent = sorted(set(MODELS) - {r["model"] for r in rows if r["state"] in COUNTED})
            roll = rng.random()
            if roll < 0.5:
                model = rng.choice(absent if absent and rng.random() < 0.85 else sorted(MODELS))
                got = await reg.reserve(model, node=NODE, device=rng.choice(sorted(BUDGETS)), nbytes=MODELS[model])
                stats[got.outcome.value + (f" {got.reason}" if got.outcome is Outcome.WAIT else "")] += 1
            elif roll < 0.65 and loading:
                model = rng.choice(loading)
                try:
                    if rng.random() < 0.9:
                        await reg.mark_ready(model, replicas=1, load_ms=rng.uniform(10, 900))
                        stats["ready"] += 1
                    else:
                        stats["failed"] += await reg.fail(model, "simulated load failure")
                except ReservationLost:
                    stats["reservation lost"] += 1
            elif roll < 0.85 and ready:
                model = rng.choice(ready)
                if await reg.inflight(model, +1):
                    await reg.touch(model, rng.randint(1, 8))
                    stats["batch"] += 1
                    if rng.random() < 0.7:  # most batches end at once; some stay in flight a while
                        await reg.inflight(model, -1)
                    else:
                        busy[model] += 1
                else:
                    stats["batch refused"] += 1
            elif roll < 0.93 and +busy:
                model = rng.choice(sorted(+busy))
                busy[model] -= 1
                await reg.inflight(model, -1)
            elif ready:
                model = rng.choice(ready)
                if busy[model] == 0:
                    stats["released"] += await reg.release(model)
            if cycle % 25 == 0:
                stats["reaped"] += len(await reg.reap_dead_owners())
                await reg.set_backlog({m: rng.randint(0, 5) for m in rng.sample(sorted(MODELS), 3)})
            await check(reg)
            stats["checks"] += 1
    finally:
        await client.aclose()
    return stats


async def holds_bytes(reg: Registry, owner: str) -> bool:
    return any(r["state"] in COUNTED for r in await reg.snapshot(owner=owner))


async def test_concurrent_reservers_never_exceed_the_budget(registry_url: str, client: redis.asyncio.Redis) -> None:
    reg = Registry(client, owner="watcher")
    for device, budget in BUDGETS.items():
        await reg.set_budget(NODE, device, budget)
    for owner, _ in WORKERS:
        await client.set(keys.manager_heartbeat(owner), "{}", ex=120)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, registry_url, owner, policy, str(seed), str(CYCLES),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        for seed, (owner, policy) in enumerate(WORKERS)
    ]
    doomed = procs[[owner for owner, _ in WORKERS].index(DOOMED)]
    outputs = [asyncio.ensure_future(p.communicate()) for p in procs]
    watched = 0
    try:
        async with asyncio.timeout(60):
            killed = False
            while not all(o.done() for o in outputs):
                await check(reg)
                watched += 1
                if not killed and watched % 20 == 0 and await holds_bytes(reg, DOOMED):
                    doomed.send_signal(signal.SIGKILL)  # mid-run, holding bytes; its heartbeat expires
                    await client.delete(keys.manager_heartbeat(DOOMED))
                    killed = True
                await asyncio.sleep(0)
            results = [await o for o in outputs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    stats: Counter[str] = Counter()
    for (owner, _), proc, (out, err) in zip(WORKERS, procs, results, strict=True):
        if owner == DOOMED:
            assert proc.returncode == -signal.SIGKILL, f"{owner} ended before it was killed: {err.decode()[-2000:]}"
            continue
        assert proc.returncode == 0, f"worker {owner} failed:\n{err.decode()[-4000:]}"
        stats.update(json.loads(out))
    await reg.reap_dead_owners()  # in case no live worker reaped after the kill
    await check(reg)
    audits = await reg.audit()
    assert {a.device for a in audits} == set(BUDGETS)
    for audit in audits:
        assert audit.used_bytes == audit.resident_bytes <= audit.budget_bytes, audit
    assert killed
    assert not await holds_bytes(reg, DOOMED)
    # the run went through every path
    assert watched >= 200
    assert stats["checks"] == CYCLES * (len(WORKERS) - 1)
    for outcome in ("reserved", "already", "evict", "wait busy", "ready", "batch", "released victim"):
        assert stats[outcome] > 0, (outcome, stats)


if __name__ == "__main__":
    url, owner, policy, seed, cycles = sys.argv[1:6]
    counts = asyncio.run(worker(url, owner, policy, int(seed), int(cycles)))
    print(json.dumps(counts))
