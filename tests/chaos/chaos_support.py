"""What the chaos and fuzz tests share: db 7 of the real Redis (or a private AOF redis-server),
``nosq serve`` as a subprocess, a steady producer in a thread, and the accounting
(accepted / answered / lost / duplicate results).

Every process started here is stopped by its owner's ``finally``/fixture teardown, and every
loop is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import redis

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import NosqError, Producer, RedisSettings, keys
from nosq.producer.wire import decode_envelope
from tests.background import Background
from tests.manager.harness import results
from tests.procs import descendants, reap_ray_of

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/7"  # db 7: the chaos/fuzz tier's own
MODELS: list[dict[str, Any]] = [
    {"id": "noop", "factory": "nosq.workers.demo:noop", "device": "cpu", "max_batch": 64, "num_cpus": 0.25,
     "threads": 1},
    {"id": "mlp", "factory": "nosq.workers.demo:mlp", "device": "cpu", "max_batch": 32, "num_cpus": 0.5,
     "threads": 1},
]
INPUT_SHAPES = {"noop": (8,), "mlp": (512,)}


# -- Redis --------------------------------------------------------------------------------------


def redis_settings(url: str = REDIS_URL) -> RedisSettings:
    return RedisSettings(url=url)


@contextlib.contextmanager
def db7() -> Iterator[redis.Redis]:
    """db 7, flushed before and after, under an exclusive file lock (one chaos run at a time)."""
    lock_path = Path(tempfile.gettempdir()) / "nosq-tests-redis-db7.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = redis_settings().client()
        client.flushdb()
        try:
            yield client
        finally:
            client.flushdb()
            client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AofRedis:
    """A private ``redis-server`` on a loopback port, AOF with ``appendfsync everysec``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", "", "--dir", str(self.dir), "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    # PING may answer while the AOF is still loading: wait for loading 0
                    if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)  # a child process: nothing to wait on
        finally:
            client.close()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def clean_restart_stop(self) -> None:
        """SHUTDOWN (not NOSAVE): Redis fsyncs the AOF before it exits."""
        assert self.process is not None
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        client.close()
        self.process.wait(20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# -- the manager --------------------------------------------------------------------------------


def write_config(path: Path, models: list[dict[str, Any]] | None = None) -> Path:
    lines = []
    for model in models or MODELS:
        lines.append("[[models]]")
        for key, value in model.items():
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value!r}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def use_repo_pythonpath() -> None:
    """Ray workers of the managers import ``nosq.workers.demo`` from this checkout."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


class ManagerProcess:
    """``nosq serve`` as a subprocess that the test can SIGKILL and restart (same consumer)."""

    def __init__(self, config: Path, consumer: str, url: str = REDIS_URL, *extra: str) -> None:
        self.config = config
        self.consumer = consumer
        self.settings = redis_settings(url)
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def start(self) -> None:
        use_repo_pythonpath()
        self.process = start_manager(self.settings, "--config", str(self.config), "--log-level", "warning",
                                     "--min-idle-ms", "600000", *self.extra, consumer=self.consumer)
        self.pids.append(self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sigkill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)  # reaped: its heartbeat names a dead pid, so a restart may take the name
        kill_ray_of(self.process.pid)

    def stop(self) -> int | None:
        """SIGTERM and drain (SIGKILL if it hangs); then no process of its Ray may be left."""
        if self.process is None:
            return None
        status = stop_manager(self.process, timeout_s=60) if self.process.poll() is None else self.process.returncode
        for pid in self.pids:
            kill_ray_of(pid)
        return status


def model_workers(manager_pid: int) -> list[int]:
    """pids of the ``ray::ModelWorker`` actor processes of one manager's own Ray."""
    return [pid for pid, cmd in descendants(manager_pid).items() if cmd.startswith("ray::ModelWorker")]


def kill_ray_of(pid: int, timeout_s: float = 15.0) -> list[int]:
    """Wait (bounded) for that Ray to go; SIGKILL stragglers; return what was left."""
    return reap_ray_of(pid, timeout_s)


# -- load and accounting ------------------------------------------------------------------------


@dataclass
class Load(Background):
    """A producer in a thread: ``batch`` requests per model every ``interval_s`` (sync
    ``submit_many``), recording every accepted id and when Redis acknowledged it."""

    url: str
    batch: int = 8
    interval_s: float = 0.05
    max_requests: int = 40_000
    max_seconds: float = 600.0
    accepted: dict[str, str] = field(default_factory=dict)  # id -> model
    acked_at: dict[str, float] = field(default_factory=dict)  # id -> time.time() of the ack
    refused: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    client_id: str = ""

    name: ClassVar[str] = "chaos-load"

    def __post_init__(self) -> None:
        Background.__init__(self)
        rng = np.random.default_rng(0)
        self._inputs = {m: [rng.standard_normal(s, dtype=np.float32) for _ in range(16)]
                        for m, s in INPUT_SHAPES.items()}

    def _run(self) -> None:
        started = time.monotonic()
        producer = Producer(redis_settings(self.url))
        producer.start()
        self.client_id = producer._client_id
        turn = 0
        try:
            while (not self._stop.is_set() and len(self.accepted) < self.max_requests
                   and time.monotonic() - started < self.max_seconds):
                model = ("noop", "mlp")[turn % 2]
                turn += 1
                inputs = [self._inputs[model][(turn + i) % 16] for i in range(self.batch)]
                try:
                    handles = producer.submit_many(model, inputs)
                except (NosqError, redis.RedisError) as exc:  # Redis down: these were not acknowledged
                    self.refused += self.batch
                    self.errors[type(exc).__name__] += 1
                    self._stop.wait(0.2)
                    continue
                now = time.time()
                for handle in handles:
                    self.accepted[handle.id] = model
                    self.acked_at[handle.id] = now
                self._stop.wait(self.interval_s)
        finally:  # not producer.close(): it deletes the reply stream, which the accounting reads
            if producer._redis is not None:
                producer._redis.close()


def wait_results(db: redis.Redis, ids: list[str], timeout_s: float, alive: Any = None) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout_s
    done = results(db, ids)
    while len(done) < len(ids) and time.monotonic() < deadline:
        if alive is not None and not alive():  # the manager died: what is done is all there is
            break
        time.sleep(0.25)
        done.update(results(db, [i for i in ids if i not in done]))
    return done


def reply_notices(db: redis.Redis, client_id: str) -> dict[str, list[bytes]]:
    """id -> every envelope the manager added to that client's reply stream (one per write)."""
    notices: dict[str, list[bytes]] = {}
    last = "-"
    stream = keys.reply(client_id)
    for _ in range(10_000):
        batch = db.xrange(stream, min=last, count=5000)
        if last != "-":
            batch = batch[1:]
        if not batch:
            break
        for _, fields in batch:
            notices.setdefault(fields[b"id"].decode(), []).append(fields[b"r"])
        last = batch[-1][0].decode()
    return notices


def _outcome(data: bytes) -> tuple[Any, ...]:
    env = decode_envelope("msgpack", data)
    out = env.out.tobytes() if hasattr(env.out, "tobytes") else repr(env.out)
    return (env.ok, env.code, out)


@dataclass
class Figures:
    scenario: str
    accepted: int
    answered: int
    lost: int
    ok: int
    codes: dict[str, int]
    reruns: int  # ids whose result was written more than once (each write after the first lost NX)
    conflicting: int  # ids with a notice whose outcome differs from the stored result
    pending_left: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.extra.items())
        return (f"| {self.scenario} | {self.accepted} | {self.answered} | {self.lost} | {self.ok} | "
                f"{self.codes or '-'} | {self.reruns} | {self.conflicting} | {self.pending_left} | "
                f"{self.seconds:.0f} | {extra} |")


def account(db: redis.Redis, scenario: str, load: Load, done: dict[str, bytes], seconds: float,
            **extra: Any) -> Figures:
    ids = list(load.accepted)
    codes: Counter[str] = Counter()
    ok = 0
    for rid, data in done.items():
        env = decode_envelope("msgpack", data)
        assert env.id == rid
        if env.ok:
            ok += 1
        else:
            codes[env.code] += 1
    notices = reply_notices(db, load.client_id)
    reruns = sum(1 for rid in ids if len(notices.get(rid, ())) > 1)
    conflicting = 0
    for rid, data in done.items():
        stored = _outcome(data)
        if any(_outcome(n) != stored for n in notices.get(rid, ())):
            conflicting += 1
    pending_left = 0
    for model in INPUT_SHAPES:
        with contextlib.suppress(redis.ResponseError):
            pending_left += int(db.xpending(keys.requests(model), keys.GROUP)["pending"])
    figures = Figures(scenario, len(ids), len(done), len(ids) - len(done), ok, dict(codes), reruns,
                      conflicting, pending_left, seconds, extra)
    print("\nFIGURES", figures.row(), flush=True)
    report = os.environ.get("NOSQ_CHAOS_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as file:
            file.write(figures.row() + "\n")
    return figures


def jitter(rng: random.Random, low: float, high: float) -> float:
    return rng.uniform(low, high)
