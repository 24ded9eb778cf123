"""The manager as its own process (``python -m nosq.manager.ops.cli serve``): SIGKILL mid-load and a
restart lose nothing; SIGTERM drains what was read and exits 0. Each manager starts its own
Ray, which must go with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import NosqError, Producer, keys
from nosq.producer.wire import decode_envelope
from tests.manager.harness import redis_settings, results
from tests.manager.models import read_record
from tests.procs import proc_table, ray_processes_of, reap_ray_of

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
DRAIN_BOUND_S = 20.0


@pytest.fixture
def db(redis_db10: Any) -> Iterator[redis.Redis]:
    """A sync client: these tests block on processes, with no manager on their event loop."""
    client = redis_settings().client()
    yield client
    client.close()


@pytest.fixture(autouse=True)
def repo_on_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """The managers' Ray workers import the test models as ``tests.manager.models``."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def write_config(path: Path, models: list[dict[str, Any]]) -> Path:
    lines = []
    for model in models:
        lines.append("[[models]]")
        for key, value in model.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {_toml(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def assert_ray_gone(pid: int, timeout_s: float = 15.0) -> None:
    """No process of that manager's Ray is left; kills stragglers (ours) before failing."""
    left = reap_ray_of(pid, timeout_s)
    assert not left, f"the Ray of manager pid {pid} left {len(left)} process(es) behind: {left}"


def pending(db: redis.Redis, model: str) -> int:
    return int(db.xpending(keys.requests(model), keys.GROUP)["pending"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_load_then_restart_loses_nothing(db: redis.Redis, tmp_path: Path) -> None:
    config = write_config(tmp_path / "serve.toml", [
        {"id": "noop", "factory": "nosq.workers.demo:noop", "device": "cpu", "max_batch": 64, "num_cpus": 0.25,
         "threads": 1},
        {"id": "mlp", "factory": "nosq.workers.demo:mlp", "device": "cpu", "max_batch": 32, "num_cpus": 0.5,
         "threads": 1},
    ])
    settings = redis_settings()
    rng = np.random.default_rng(0)
    work = {"mlp": [rng.standard_normal(512, dtype=np.float32) for _ in range(64)],
            "noop": [rng.standard_normal(8, dtype=np.float32) for _ in range(64)]}
    per_model = 1500
    first = start_manager(settings, "--config", str(config), "--log-level", "warning", consumer="crash")
    try:
        accepted: dict[str, str] = {}  # request id -> model
        with Producer(settings) as producer:
            for model in ("mlp", "noop"):  # mlp first: the slow part is what gets cut short
                inputs = [work[model][i % 64] for i in range(per_model)]
                for handle in producer.submit_many(model, inputs):
                    accepted[handle.id] = model
        ids = list(accepted)
        deadline = time.monotonic() + 60
        while len(results(db, ids[:200])) < 50:  # the first few mlp batches are done
            assert time.monotonic() < deadline, "the manager answered nothing within 60 s"
            assert first.poll() is None, f"the manager exited with {first.returncode}"
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)  # reaped: its heartbeat names a dead pid, so the restart may take the name
        done_at_kill = len(results(db, ids))
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    assert 0 < done_at_kill < len(ids), f"the kill came too late to test anything: {done_at_kill} done"
    in_flight_at_kill = pending(db, "mlp") + pending(db, "noop")
    assert in_flight_at_kill > 0, "nothing was pending at the kill: the restart would recover nothing"
    assert_ray_gone(first.pid)

    # the same consumer name: it must take back its own pending entries at once (a janitor,
    # which would reclaim them from a dead consumer, waits min_idle_ms: ten minutes here)
    second = start_manager(settings, "--config", str(config), "--log-level", "warning",
                           "--min-idle-ms", "600000", consumer="crash")
    try:
        deadline = time.monotonic() + 120
        while len(done := results(db, ids)) < len(ids) and time.monotonic() < deadline:
            assert second.poll() is None, f"the restarted manager exited with {second.returncode}"
            time.sleep(0.2)
    finally:
        status = stop_manager(second, timeout_s=60)
    assert_ray_gone(second.pid)

    assert len(done) == len(ids), (
        f"{len(ids) - len(done)} of {len(ids)} accepted requests have no result "
        f"({done_at_kill} were done and {in_flight_at_kill} pending when the manager was killed)"
    )
    failed = {}
    for rid, data in done.items():
        envelope = decode_envelope("msgpack", data)
        assert envelope.id == rid
        if not envelope.ok:
            failed[rid] = (envelope.code, envelope.message)
    assert not failed, f"{len(failed)} failed, e.g. {next(iter(failed.values()))}"
    for model in ("mlp", "noop"):
        assert db.xlen(keys.requests(model)) == 0
        assert pending(db, model) == 0
    assert status == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_drains_what_was_read_and_exits_zero(db: redis.Redis, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    config = write_config(tmp_path / "serve.toml", [
        {"id": "slow", "factory": "tests.manager.models:slow", "device": "cpu", "max_batch": 4,
         "num_cpus": 0.25, "threads": 1, "options": {"delay_s": 0.5, "record": str(record)}},
    ])
    settings = redis_settings()
    # no read-ahead for priorities: the manager reads only what its replica takes next, so
    # most of the 40 requests are still in the stream at SIGTERM (what this test is about)
    manager = start_manager(settings, "--config", str(config), "--log-level", "warning",
                            "--shutdown-timeout", str(DRAIN_BOUND_S), "--priority-lookahead", "0", consumer="term")
    try:
        with Producer(settings) as producer:
            handles = producer.submit_many("slow", [np.full(4, i, dtype=np.float32) for i in range(40)])
        deadline = time.monotonic() + 30
        while not read_record(record):  # a batch is running
            assert time.monotonic() < deadline, "no batch started within 30 s"
            time.sleep(0.02)
        manager.send_signal(signal.SIGTERM)
        started = time.monotonic()
        status = manager.wait(DRAIN_BOUND_S + 15)
        took = time.monotonic() - started
    except subprocess.TimeoutExpired:
        os.killpg(manager.pid, signal.SIGKILL)
        manager.wait(10)
        raise
    finally:
        if manager.poll() is None:
            stop_manager(manager)
    assert_ray_gone(manager.pid)

    assert status == 0, f"the manager exited with {status} after SIGTERM"
    assert took < DRAIN_BOUND_S + 10
    ids = [h.id for h in handles]
    answered = results(db, ids)
    ran = {v for call in read_record(record) for v in call["firsts"]}  # type: ignore[attr-defined]
    for i, rid in enumerate(ids):
        if float(i) in ran:
            assert rid in answered, f"request {i} ran but has no result"
    for data in answered.values():
        assert decode_envelope("msgpack", data).ok
    unread = {fields[b"id"].decode() for _, fields in db.xrange(keys.requests("slow"))}
    assert set(answered) | unread == set(ids), "every request is either answered or still waiting in the stream"
    assert not set(answered) & unread
    assert pending(db, "slow") == 0, "what the manager read, it answered before exiting"
    assert 0 < len(answered) < len(ids)


def test_start_manager_does_not_trust_a_stale_heartbeat(db: redis.Redis, tmp_path: Path) -> None:
    """After a crash the dead manager's heartbeat (same consumer name) says "running" until it
    expires: start_manager must wait for the heartbeat of the process it started."""
    stale = {"host": "elsewhere", "pid": 999_999_999, "state": "running", "models": ["noop"]}
    db.set(keys.manager_heartbeat("stale"), json.dumps(stale), ex=30)
    missing = tmp_path / "missing.toml"  # the new manager exits at once: it has no config
    try:
        process = start_manager(redis_settings(), "--config", str(missing), consumer="stale")
    except NosqError as exc:
        assert "exited with status" in str(exc)
        return
    status = stop_manager(process, timeout_s=30)
    pytest.fail(f"start_manager returned a manager that was not running (it exited with {status})")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sigkilled_manager_takes_its_ray_along(db: redis.Redis, tmp_path: Path) -> None:
    """SIGKILL of the manager process alone (as ``kill -9 PID`` or the OOM killer does it, not
    its process group): its reaper kills every process of its Ray (the GCS, the raylet, the
    agents and the actors) within seconds. Left alone, Ray's agents outlived it by 60-70 s."""
    config = write_config(tmp_path / "serve.toml", [
        {"id": "noop", "factory": "nosq.workers.demo:noop", "device": "cpu", "num_cpus": 0.25, "threads": 1},
    ])
    manager = start_manager(redis_settings(), "--config", str(config), "--log-level", "warning",
                            "--no-profile-on-start", consumer="reaped")
    try:
        ray = ray_processes_of(manager.pid)
        names = {proc_table().get(pid, (0, ""))[1].split(" ")[0].rsplit("/", 1)[-1] for pid in ray}
        assert {"ray::ModelWorker", "ray::DashboardAgent", "raylet"} <= names, names
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(10)
        killed = time.monotonic()
        while (left := ray_processes_of(manager.pid)) and time.monotonic() - killed < 30:
            time.sleep(0.1)  # processes exiting: nothing to wait on
        gone_after = time.monotonic() - killed
    finally:
        if manager.poll() is None:
            os.killpg(manager.pid, signal.SIGKILL)
            manager.wait(10)
        reap_ray_of(manager.pid, timeout_s=1)
    assert not left, f"{len(left)} process(es) of the killed manager's Ray still alive after 30 s"
    assert gone_after < 5.0, f"its Ray took {gone_after:.1f} s to go"
