"""What the several-managers budget test needs: one Ray head for all managers, ``nosq serve``
processes, the actor processes read from ``/proc``, and the registry's events recorded.

* ``RayHead``: ``ray start --head --block`` on loopback with its own temp dir and free ports, in
  a session of its own; ``stop()`` kills that process group by pid (never ``ray stop``, which
  would stop every Ray on the machine) and then any worker process its raylet left.
* ``ManagerProcess``: ``python -m nosq.manager.ops.cli serve`` joined to that head (its auth token is
  the head's own, in the temp dir); ``stop()`` is SIGTERM
  and a bounded drain, then SIGKILL of its group.
* ``model_workers(raylet_pid)``: pid -> RSS of the live ``ray::ModelWorker`` processes that
  this head's raylet started (other engineers' Rays on the machine are not ours to count).
* ``EventLog``: every ``"<state> <model>"`` of ``EVENTS_CHANNEL`` for the given models, in the
  order Redis published them (Pub/Sub is not per db: other tests' events are filtered out by
  model id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from nosq.manager.memory.registry import EVENTS_CHANNEL, ModelState, parse_event
from nosq.producer import keys
from tests.procs import children

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def repo_env(token_path: Path) -> dict[str, str]:
    """The environment of every process started here: loopback Ray, the repo importable, and
    the head's own auth token (``~/.ray/auth_token`` is shared by every Ray on the machine)."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    return env


def model_workers(raylet_pid: int) -> list[int]:
    """The live ``ray::ModelWorker`` actor processes of one raylet (Ray sets the title)."""
    return sorted(pid for pid, cmd in children(raylet_pid).items() if cmd.startswith("ray::ModelWorker"))


class RayHead:
    """One Ray instance on loopback that every manager of the test joins."""

    def __init__(self, temp_dir: Path, *, num_cpus: int = 4) -> None:
        self.temp_dir = temp_dir
        self.token_path = temp_dir / "auth_token"
        self.num_cpus = num_cpus
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.raylet_pid = 0
        self._workers_seen: set[int] = set()

    def start(self) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32), encoding="utf-8")
        log = (self.temp_dir / "head.log").open("wb")
        command = [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=100000000",
        ]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        env=repo_env(self.token_path), start_new_session=True)
        log.close()
        current = self.temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: "
                                   f"{(self.temp_dir / 'head.log').read_text()[-2000:]}")
            raylets = [p for p, cmd in children(self.process.pid).items() if "/raylet/raylet " in cmd]
            started = b"Ray runtime started" in (self.temp_dir / "head.log").read_bytes()
            if started and raylets and current.exists():
                self.address = current.read_text().strip()
                self.raylet_pid = raylets[0]
                return
            time.sleep(0.2)  # another process: nothing to wait on
        self.stop()
        raise RuntimeError(f"the Ray head did not start within {START_TIMEOUT_S:.0f} s")

    def workers(self) -> list[int]:
        found = model_workers(self.raylet_pid) if self.raylet_pid else []
        self._workers_seen.update(found)
        return found

    def stop(self) -> None:
        """Kill the head's process group by pid, then every worker its raylet still has."""
        if self.process is None:
            return
        leftovers = set(children(self.raylet_pid)) if self.raylet_pid else set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # gcs_server and raylet outlive a SIGTERM
        self.process.wait(10)
        for pid in leftovers | self._workers_seen:  # workers are in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process = None


class ManagerProcess:
    """``nosq serve`` (``python -m nosq.manager.ops.cli serve``) as a process of its own."""

    def __init__(self, consumer: str, url: str, args: list[str], log_path: Path, head: RayHead) -> None:
        self.consumer = consumer
        self.head = head
        self.url = url
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", self.url, "--log-level", "info",
                   "serve", "--consumer", self.consumer, "--ray-address", self.head.address, *self.args]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=repo_env(self.head.token_path), cwd=ROOT, start_new_session=True)

    def running(self, client: redis.Redis) -> bool:
        """Its heartbeat says it is serving (and names this process)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"manager {self.consumer} exited with {self.process.returncode} while starting:\n"
                               f"{self.log_tail()}")
        beat: Any = client.get(keys.manager_heartbeat(self.consumer))
        state = json.loads(beat) if beat is not None else {}
        return bool(state.get("state") == "running" and state.get("pid") == self.process.pid)

    def stop(self, timeout_s: float = 45.0) -> int:
        """SIGTERM and wait for the drain; SIGKILL of its group if it hangs."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            return -signal.SIGKILL

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def start_managers(managers: list[ManagerProcess], url: str) -> None:
    """Start them all at once and wait until each heartbeat says it is running."""
    for manager in managers:
        manager.start()
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = list(managers)
        while waiting:
            waiting = [m for m in waiting if not m.running(client)]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"managers {[m.consumer for m in waiting]} did not start within "
                                   f"{START_TIMEOUT_S:.0f} s:\n{waiting[0].log_tail()}")
            time.sleep(0.2)  # other processes: nothing to wait on
    finally:
        client.close()


@dataclass
class EventLog:
    """The registry's events for ``models``, as ``(monotonic seconds, state, model)``."""

    url: str
    models: frozenset[str]
    events: list[tuple[float, ModelState, str]] = field(default_factory=list)

    async def run(self, subscribed: asyncio.Event) -> None:
        client = redis.asyncio.Redis.from_url(self.url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(EVENTS_CHANNEL)
            subscribed.set()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                state, model = parse_event(message["data"])
                if model in self.models:
                    self.events.append((time.monotonic(), state, model))
        finally:
            await pubsub.aclose()
            await client.aclose()

    def count(self, state: ModelState) -> int:
        return sum(1 for _, s, _ in self.events if s is state)
