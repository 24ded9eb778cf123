"""A master of a real Redis Cluster killed (``kill -9``) under load: its replica is promoted,
the manager and the producer find the new master and go on. Counted per id: what was sent,
acknowledged, answered; no id has two different results. What asynchronous replication loses
(acknowledged by the old master, not yet on its replica) is measured and printed, not hidden:
docs/reliability.md states it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import AsyncProducer, Handle, NosqError, RedisSettings, keys
from nosq.producer.resp import get_many_blocking
from nosq.producer.wire import Envelope, decode_envelope
from tests.procs import reap_ray_of
from tests.rediscluster.redisnodes import RedisNodes

BASE_PORT = 7110  # a cluster of its own: this module kills one of its masters
LOAD_S = 9.0
KILL_AT_S = 3.0
BATCH = 20
ANSWER_WAIT_S = 45.0


async def _answer(producer: AsyncProducer, handle: Handle, deadline: float) -> Envelope | None:
    """The envelope, asked again after a connection error (the reader fails its waiters while
    no master answers); None if none came by ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            return await producer.outcome(handle, timeout_s=left)
        except NosqError:
            await asyncio.sleep(0.2)  # the reader is reconnecting: nothing to wait on
    return None


async def _load(settings: RedisSettings, nodes: RedisNodes, victim: int) -> dict[str, object]:
    sent = refused = 0
    handles: dict[str, tuple[Handle, float]] = {}
    loop = asyncio.get_running_loop()
    async with AsyncProducer(settings) as producer:
        started = time.monotonic()
        kill: asyncio.Future[None] | None = None
        killed_at = 0.0
        n = 0
        while time.monotonic() - started < LOAD_S:
            if kill is None and time.monotonic() - started >= KILL_AT_S:
                kill = loop.run_in_executor(None, nodes.kill, victim)
                killed_at = time.monotonic() - started
            values = [float(n + k) for k in range(BATCH)]
            n += BATCH
            sent += BATCH
            try:
                batch = await producer.submit_many("noop", [np.full(2, v, dtype=np.float32) for v in values],
                                                   timeout_s=ANSWER_WAIT_S)
            except NosqError:
                refused += BATCH  # not acknowledged: the caller knows to send again
                continue
            handles.update((h.id, (h, v)) for h, v in zip(batch, values, strict=True))
            await asyncio.sleep(0.01)  # a steady load, not a flood: the test is about the failover
        assert kill is not None
        await kill
        deadline = time.monotonic() + ANSWER_WAIT_S
        answers = await asyncio.gather(*(_answer(producer, h, deadline) for h, _ in handles.values()))
    seen = dict(zip(handles, answers, strict=True))
    return {"sent": sent, "refused": refused, "handles": handles, "seen": seen, "killed_at_s": killed_at}


@pytest.mark.timeout(240)
def test_master_killed_under_load_is_survived(nodes: RedisNodes, serve_config: Path, tmp_path: Path) -> None:
    settings = RedisSettings(url=nodes.url)
    victim = nodes.master_of(keys.requests("noop"))
    with (tmp_path / "manager.log").open("wb") as log:
        manager = start_manager(settings, "--config", str(serve_config), "--log-level", "warning",
                                consumer="rc-failover", log=log)
        try:
            run = asyncio.run(_load(settings, nodes, victim))
            assert manager.poll() is None, f"the manager exited with {manager.returncode} after the failover"
        finally:
            status = stop_manager(manager)
            left = reap_ray_of(manager.pid)
            assert not left, f"the manager's Ray left {len(left)} process(es) behind: {left}"
    handles: dict[str, tuple[Handle, float]] = run["handles"]  # type: ignore[assignment]
    seen: dict[str, Envelope | None] = run["seen"]  # type: ignore[assignment]
    client = settings.client()
    try:
        stored = dict(zip(handles, get_many_blocking(client, [keys.result(rid) for rid in handles]), strict=True))
    finally:
        client.close()
    answered = {rid: env for rid, env in seen.items() if env is not None}
    wrong = [rid for rid, env in answered.items()
             if not env.ok or float(np.asarray(env.out)[0]) != handles[rid][1]]
    different = rerun = 0
    for rid, env in answered.items():
        data = stored[rid]
        if data is None:
            continue  # the client saw it; the key was lost with the old master (counted below)
        final = decode_envelope("msgpack", data)
        if (final.ok, final.code) != (env.ok, env.code) or not np.array_equal(np.asarray(final.out),
                                                                               np.asarray(env.out)):
            different += 1
        elif final.timings != env.timings:
            rerun += 1  # computed twice (a result write lost with the old master), the same output
    figures = {"sent": run["sent"], "refused_at_submit": run["refused"], "acknowledged": len(handles),
               "answered": len(answered), "lost": len(handles) - len(answered), "wrong": len(wrong),
               "two_different_results": different, "answered_twice_same_output": rerun,
               "result_keys_missing_after": sum(1 for rid in answered if stored[rid] is None),
               "killed_at_s": round(float(run["killed_at_s"]), 2), "victim_port": victim,  # type: ignore[arg-type]
               "manager_exit": status}
    print("failover figures:", json.dumps(figures))
    assert status == 0, "the manager did not drain and exit 0 after the failover"
    assert not wrong, f"{len(wrong)} ids answered with a wrong output: {wrong[:5]}"
    assert different == 0, f"{different} ids have two different results: {figures}"
    # what async replication may lose is a window of writes acknowledged just before the kill;
    # everything submitted after the promotion must be answered
    assert len(answered) >= 0.9 * len(handles), f"too many acknowledged requests lost: {figures}"
