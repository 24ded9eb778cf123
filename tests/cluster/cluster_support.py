"""A real multi-node Ray cluster on loopback for the cluster tier: a head and worker nodes,
each a ``ray start --block`` process of its own (``tests.cluster.raynode``) that a test can
SIGKILL alone, without ``ray stop`` (which would stop every Ray on the machine).

Everything lives in a private temp dir: the session, the logs, and the cluster's auth token
(``RAY_AUTH_TOKEN_PATH``: ``~/.ray/auth_token`` is never read or written). The GCS marks a
killed node dead after ~1-2 s of missed health checks (the default is ~15 s). ``close()``
SIGKILLs every process that refers to the temp dir (a worker process sits in a process group
of its own, so killing the node's group is not enough) and reports any it could not end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import descendants

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
# the GCS's health checks of each raylet: a killed node is dead after 3 missed checks of 0.5 s
# one token for every cluster of this process: Ray caches the token it first reads in a process
_TOKEN = secrets.token_hex(32)
HEAD_ENV = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One ``ray start --block`` process and the ports it was given."""

    name: str
    resources: dict[str, float]
    process: subprocess.Popen[bytes]
    log: Path
    pids: set[int] = field(default_factory=set)  # every process seen under it (for the kill)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """Start with ``start_head()``, add nodes with ``start_node()``, kill one with ``kill_node()``;
    ``close()`` always (it also runs on an exception inside ``with``)."""

    def __init__(self) -> None:
        # short: Ray's socket paths (<temp>/session_.../sockets/raylet.N) must fit 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="nosq-rc-", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(_TOKEN, encoding="utf-8")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """What a process needs to join this cluster (the nodes', a manager's, a driver's)."""
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}

    def _ports(self) -> list[str]:
        args = []
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            args += [flag, str(free_port())]
        return args

    def _start(self, name: str, args: list[str], resources: dict[str, float], extra_env: dict[str, str]) -> Node:
        """Start a node and wait until it says it runs; tried twice: on a loaded machine a
        worker node's first call to the GCS can pass Ray's own 30 s deadline."""
        try:
            return self._start_once(name, args, resources, extra_env)
        except RuntimeError:
            self.kill_node(self.nodes[-1])
            return self._start_once(f"{name}-again", args, resources, extra_env)

    def _start_once(self, name: str, args: list[str], resources: dict[str, float],
                    extra_env: dict[str, str]) -> Node:
        log = self.temp_dir / f"{name}.log"
        command = [sys.executable, "-m", "tests.cluster.raynode", "start", *args, "--node-ip-address", "127.0.0.1",
                   "--num-cpus", "1", "--resources", json.dumps(resources), "--object-store-memory",
                   str(80 * 1024**2), "--disable-usage-stats", "--block", *self._ports()]
        with log.open("wb") as out:
            # raynode keeps loopback addresses; with this off, ray start refuses to join a cluster
            env = {**os.environ, **self.env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **extra_env}
            process = subprocess.Popen(command, env=env, cwd=ROOT,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, resources, process, log)
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in log.read_bytes():  # a child process: nothing to wait on
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return node

    def start_head(self, resources: dict[str, float]) -> Node:
        return self._start("head", ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir),
                                    "--include-dashboard=false", "--dashboard-port", str(free_port())],
                           resources, HEAD_ENV)

    def start_node(self, name: str, resources: dict[str, float]) -> Node:
        return self._start(name, ["--address", self.address], resources, {})

    def kill_node(self, node: Node, when: Callable[[], bool] | None = None) -> None:
        """The node goes away at once, as a lost host would: SIGKILL its raylet, its agents and
        its workers (each worker in a process group of its own). ``when``: polled after the
        processes are listed, the kill follows the first True at once, or 10 s (a test that needs the
        node to die mid-batch waits for a batch to start)."""
        node.pids |= set(descendants(node.process.pid, zombies=True))
        deadline = time.monotonic() + 10
        while when is not None and not when() and time.monotonic() < deadline:
            time.sleep(0.002)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        for pid in node.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(10)

    def processes(self) -> dict[int, str]:
        """Live processes of this cluster: any that names or holds a file under the temp dir."""
        mark = str(self.temp_dir)
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                mine = mark in cmdline or any(mark in os.readlink(fd) for fd in (entry / "fd").iterdir())
            except OSError:
                continue
            if mine:
                found[int(entry.name)] = cmdline.strip()[:120]
        return found

    def close(self, timeout_s: float = 20.0) -> dict[int, str]:
        """Kill every node and every process left of the cluster; return those that outlived it."""
        for node in reversed(self.nodes):
            if node.alive:
                self.kill_node(node)
        deadline = time.monotonic() + timeout_s
        left = self.processes()
        while left and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            left = self.processes()
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


