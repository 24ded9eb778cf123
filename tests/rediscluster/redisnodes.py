"""A Redis Cluster of real ``redis-server --cluster-enabled yes`` processes on loopback ports, in
a temporary directory: 3 masters and 3 replicas, created with ``redis-cli --cluster create``,
always torn down (SIGKILL, reaped) with no process left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

__all__ = ["RedisNodes", "redis_cluster"]

BASE_PORT = 7100
NODE_TIMEOUT_MS = 2000  # a dead master is failed over about this long after it stops answering


@dataclass
class RedisNodes:
    """The running nodes: port -> process."""

    ports: list[int]
    directory: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def master_of(self, key: str) -> int:
        """Port of the master that owns ``key``'s slot now."""
        client = redis.Redis(port=self.ports[0], socket_connect_timeout=1)
        try:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        raise AssertionError(f"no master owns the slot of {key!r}")

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no save): what a crashed host does."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def _wait_ping(port: int, timeout_s: float = 10.0) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a child process starting: nothing to wait on
    finally:
        client.close()


def _wait_ok(port: int, timeout_s: float = 30.0) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster at :{port} is not ok after {timeout_s} s")
            time.sleep(0.1)
    finally:
        client.close()


@contextlib.contextmanager
def redis_cluster(base_port: int = BASE_PORT, replicas: int = 1) -> Iterator[RedisNodes]:
    """Six nodes on ``base_port`` .. ``base_port + 5``: 3 masters, 3 replicas (``replicas``
    per master: 0 gives three masters alone, as a benchmark may want)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is not on PATH: install Redis 7 (apt-get install redis-server)")
    nodes = RedisNodes(ports=[base_port + i for i in range(3 * (1 + replicas))],
                       directory=Path(tempfile.mkdtemp(prefix="nosq-rc-")))
    try:
        for port in nodes.ports:
            node_dir = nodes.directory / str(port)
            node_dir.mkdir()
            nodes.processes[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--appendonly", "no", "--save", "", "--dir", str(node_dir), "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for port in nodes.ports:
            _wait_ping(port)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in nodes.ports),
                        "--cluster-replicas", str(replicas), "--cluster-yes"], check=True, capture_output=True,
                       timeout=60)
        for port in nodes.ports:
            _wait_ok(port)
        yield nodes
    finally:
        for process in nodes.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        shutil.rmtree(nodes.directory, ignore_errors=True)
