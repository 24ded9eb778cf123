"""The replicas of one model: Ray actors, their in-flight slots, and surviving their deaths.

A batch goes to a replica on this host through its shared-memory channel (``nosq.workers.channel``:
one connection per in-flight slot), to one elsewhere through a Ray call (``await ref``, never
blocking the event loop). An actor that dies is restarted by Ray (``max_restarts=-1``); its
batch is retried; a batch that keeps killing its worker is split until the input that does it
fails alone with ``worker_died``. Which batch a death is blamed on: over a channel, the one
the replica had in its model (``Stage.suspect``), not those decoding, waiting, fetching or
encoding beside it; over Ray, the oldest call (the actor runs Ray calls one at a time). A replica's node that goes
away (raylet killed, host lost) is the same to the pool: Ray restarts the actor on another
node that has the spec's ``resources`` (waiting for one to join), and the batches it held are
retried there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError

from nosq.producer.wire import ErrorCode
from nosq.workers import channel
from nosq.workers.actor import ModelWorker
from nosq.workers.channel import ChannelClient, ChannelLost
from nosq.workers.datapath import BatchOutput, batch_of
from nosq.workers.spec import ModelSpec

__all__ = ["Replica", "ReplicaPool", "start_failure", "wants_gpu"]

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 30.0  # how long a killed actor may take to be gone
# a batch is tried again after these: its worker died (ActorDiedError), is unreachable because its
# node went away (ActorUnavailableError), or its output was lost with that node's object store
_WORKER_LOST = (RayActorError, NodeDiedError, ObjectLostError, ChannelLost)
# Ray's switch that leaves CUDA_VISIBLE_DEVICES alone in an actor (ray._private.accelerators.nvidia_gpu)
_NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


@dataclass(slots=True)
class Replica:
    """One actor and the number of batches it is running or has queued."""

    index: int
    actor: Any
    inflight: int = 0
    info: dict[str, Any] | None = None
    calls: list[object] = field(default_factory=list)  # Ray calls in flight, oldest (= running) first
    channels: list[ChannelClient] = field(default_factory=list)  # idle channel connections (slots)
    restarts: int = 0  # bumped on each restart: older channel connections are dead

    def close_channels(self) -> None:
        for client in self.channels:
            client.close()
        self.channels.clear()


class ReplicaPool:
    """Starts, feeds and stops the actors that serve one model."""

    def __init__(self, spec: ModelSpec, *, inflight_per_replica: int, dispatch_attempts: int,
                 local_channel: bool = True) -> None:
        self.spec = spec
        self._local_channel = local_channel and channel.available()
        self._slots = inflight_per_replica
        self._attempts = dispatch_attempts
        self.replicas: list[Replica] = []
        #: Ray's num_gpus per actor: measured bytes over the GPU's bytes, rounded up, never 0
        #: (set by the loader from the profile; a whole GPU when nothing is known)
        self.gpu_share = 1.0
        #: the GPU the registry placed this model on ("cuda:<index>", set by the loader): the
        #: actors see every GPU of the node and use this one (None: Ray's choice of GPU)
        self.device: str | None = None

    async def start(self, replicas: int | None = None) -> None:
        """Start the actors and wait until each has built its model. If one fails or does not
        come up in time, every actor of this start is killed (none is left holding memory)."""
        count = replicas or self.spec.replicas
        cls = ray.remote(ModelWorker)
        new = [
            Replica(index=len(self.replicas) + i,
                    actor=cls.options(**self._actor_options()).remote(self.spec, device=self.device,
                                                                      local_channel=self._local_channel))
            for i in range(count)
        ]
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(r.actor.ready.remote() for r in new)), READY_TIMEOUT_S
            )
        except BaseException:
            for replica in new:
                ray.kill(replica.actor, no_restart=True)
            raise
        for replica, info in zip(new, infos, strict=True):
            replica.info = info
        self.replicas.extend(new)
        log.info("model %s: %d replica(s) ready on %s", self.spec.id, count, infos[0].get("device"))

    def _actor_options(self) -> dict[str, Any]:
        gpu = wants_gpu(self.spec)
        options: dict[str, Any] = {
            "num_cpus": self.spec.num_cpus,
            "num_gpus": self.gpu_share if gpu else 0,
            "max_restarts": -1,
            "max_task_retries": 0,
            "max_concurrency": 1,
            "name": None,
            # custom resources (spec.resources) pin the replicas to the nodes that offer them
            "resources": dict(self.spec.resources),
        }
        if gpu:
            env = {}
            if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:  # an operator's own setting wins
                # batches of every size up to b* fragment the caching allocator; with expandable
                # segments the registry's figure holds (docs/benchmarks.md, GPU placement and eviction)
                env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
            if self.device is not None:
                # Ray still counts num_gpus against the node's GPUs; which card is the registry's call
                env[_NOSET_CUDA_VISIBLE_DEVICES] = "1"
            if env:
                options["runtime_env"] = {"env_vars": env}
        return options

    async def scale_to(self, replicas: int) -> None:
        """Add replicas, or retire the newest: no new batch goes to them, the running ones finish."""
        if replicas < 1:
            raise ValueError(f"a loaded model keeps at least 1 replica, not {replicas}")
        if replicas > len(self.replicas):
            await self.start(replicas - len(self.replicas))
            return
        retiring = self.replicas[replicas:]
        del self.replicas[replicas:]
        deadline = time.monotonic() + READY_TIMEOUT_S
        # a rare control-path wait, bounded: slots are plain counters the pipeline's batch tasks release
        while any(r.inflight for r in retiring) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await _kill(retiring)
        log.info("model %s: scaled to %d replica(s)", self.spec.id, replicas)

    async def stop(self) -> None:
        """Kill every replica and return once they are gone (see ``_kill``)."""
        replicas, self.replicas = self.replicas, []
        await _kill(replicas)

    # -- slots ------------------------------------------------------------------------------

    def idle(self) -> bool:
        """A replica with nothing in flight: dispatch at once (work-conserving)."""
        return any(r.inflight == 0 for r in self.replicas)

    def free(self) -> Replica | None:
        """The least busy replica with a free slot, if any."""
        best = min(self.replicas, key=lambda r: r.inflight, default=None)
        return best if best is not None and best.inflight < self._slots else None

    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas)

    # -- running ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def dispatch(self, replica: Replica, method: str, cts: str | list[str],
                       payloads: list[bytes]) -> AsyncIterator[BatchOutput]:
        """Run one batch on ``replica``, surviving its worker's death (see the module docstring);
        the outputs are readable until the block ends (over a channel they are in shared
        memory that the slot's next batch overwrites).

        The caller holds one of the replica's slots (``inflight``) for the whole call."""
        lease = _Lease(await self._channel(replica))
        try:
            yield await self._run(replica, lease, method, cts, payloads)
        finally:
            if lease.client is not None and lease.generation == replica.restarts:
                replica.channels.append(lease.client)
            elif lease.client is not None:
                lease.client.close()

    async def _run(self, replica: Replica, lease: _Lease, method: str, cts: str | list[str],
                   payloads: list[bytes]) -> BatchOutput:
        attempt = 0
        while attempt < self._attempts:
            if lease.client is None or lease.generation != replica.restarts:
                if lease.client is not None:
                    lease.client.close()
                lease.client, lease.generation = await self._channel(replica), replica.restarts
            token = object()
            replica.calls.append(token)
            try:
                if lease.client is not None:
                    return await lease.client.run(method, cts, payloads)
                output: BatchOutput = await replica.actor.run.remote(batch_of(method, cts, payloads))
                return output
            except _WORKER_LOST as exc:
                # over Ray the actor runs its calls in order: only the oldest was running when it
                # died; over a channel the replica's stage byte says whether it had started this one
                blamed = lease.client.stage.suspect if lease.client is not None else replica.calls[0] is token
                attempt += blamed
                log.warning("model %s: replica %d died %s a batch of %d (attempt %d/%d): %s",
                            self.spec.id, replica.index, "running" if blamed else "with", len(payloads),
                            attempt, self._attempts, type(exc).__name__)
                await self._await_restart(replica)
            finally:
                replica.calls.remove(token)
        if len(payloads) == 1:
            message = f"the worker process died {self._attempts} times running this input"
            return BatchOutput(b"", np.zeros(2, np.int64), {0: (ErrorCode.WORKER_DIED, message)})
        half = len(payloads) // 2
        left = _owned(await self._run(replica, lease, method, _part(cts, 0, half), payloads[:half]))
        right = _owned(await self._run(replica, lease, method, _part(cts, half, None), payloads[half:]))
        return _concat(left, right)

    async def _channel(self, replica: Replica) -> ChannelClient | None:
        """An idle channel connection to ``replica``, a new one, or None (not on this host: Ray)."""
        if replica.channels:
            return replica.channels.pop()
        info = replica.info or {}
        address = info.get("channel")
        if not self._local_channel or not address or info.get("host") != socket.gethostname():
            return None
        try:
            return await ChannelClient.connect(address)
        except ChannelLost as exc:
            log.warning("model %s: replica %d: no shared-memory channel (%s); using Ray calls",
                        self.spec.id, replica.index, exc)
            return None

    async def _await_restart(self, replica: Replica) -> None:
        """Wait until Ray has restarted the actor and it has rebuilt its model.

        A replica whose whole node went away answers ``ActorUnavailableError`` until Ray marks
        the node dead, then waits (``RESTARTING``) until a node with its resources has room: each
        call is bounded by what is left of ``READY_TIMEOUT_S``."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    replica.info = await replica.actor.ready.remote()
                replica.restarts += 1  # a new process: every channel connection to the old one is dead
                replica.close_channels()
                return
            except RayActorError:  # ActorDiedError, ActorUnavailableError (its node is gone)
                await asyncio.sleep(0.2)  # Ray reports restarts only by failing calls
            except TimeoutError:
                break
        raise TimeoutError(f"model {self.spec.id}: replica {replica.index} did not restart within "
                           f"{READY_TIMEOUT_S:.0f} s (resources {self.spec.resources or 'none'} free on no live node?)")

    def placements(self) -> list[dict[str, Any]]:
        """Where each replica runs, as its actor reported when it became ready: pid, device."""
        return [{"pid": (r.info or {}).get("pid"), "device": (r.info or {}).get("device")} for r in self.replicas]

    async def refresh_info(self) -> None:
        """Ask every replica for its ``ready()`` info again (compile status, memory)."""
        infos = await asyncio.gather(*(r.actor.ready.remote() for r in self.replicas), return_exceptions=True)
        for replica, info in zip(self.replicas, infos, strict=True):
            if isinstance(info, dict):
                replica.info = info

    def compile_problem(self) -> str | None:
        """The compile/trace failure the replicas fell back to eager for (``ready()["compile"]``)."""
        for replica in self.replicas:
            status = (replica.info or {}).get("compile") or {}
            if status.get("error"):
                return f"compile {status.get('requested')} -> {status.get('active')}: {status['error']}"
        return None

    async def memory(self) -> list[dict[str, int]]:
        return list(await asyncio.gather(*(r.actor.memory.remote() for r in self.replicas)))


def start_failure(exc: BaseException) -> str:
    """Why replicas did not start, in one line: a replica's own error (``ModelLoadError: model
    'x': ... does not exist``) is the last line of the traceback Ray wraps it in."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if _ERROR_LINE.match(line)), None)
    if cause is not None:
        name, _, rest = cause.partition(":")
        text = name.rsplit(".", 1)[-1] + ":" + rest  # the error's class without its module
    else:
        text = f"{type(exc).__name__}: {lines[-1] if lines else repr(exc)}"
    return text if len(text) <= 500 else text[:497] + "..."


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b[^:]*:")


def wants_gpu(spec: ModelSpec) -> bool:
    """The model runs on a GPU: its spec says cuda, or auto and the cluster has GPUs."""
    return spec.device == "cuda" or (spec.device == "auto" and cluster_gpus() > 0)


def cluster_gpus() -> float:
    """GPUs Ray counts in the cluster (0 without)."""
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return resources.get("GPU", 0.0)


@dataclass(slots=True)
class _Lease:
    """The channel connection one batch uses, and the replica generation it was made for."""

    client: ChannelClient | None
    generation: int = 0


def _part(cts: str | list[str], start: int, stop: int | None) -> str | list[str]:
    return cts if isinstance(cts, str) else cts[start:stop]


def _owned(output: BatchOutput) -> BatchOutput:
    """The outputs copied out of a channel's shared memory (its next batch overwrites them)."""
    output.buffer = bytes(output.buffer)
    return output


def _concat(left: BatchOutput, right: BatchOutput) -> BatchOutput:
    shift = len(left)
    return BatchOutput(
        buffer=bytes(left.buffer) + bytes(right.buffer),
        offsets=np.concatenate([left.offsets, right.offsets[1:] + left.offsets[-1]]),
        failures={**left.failures, **{i + shift: f for i, f in right.failures.items()}},
        not_run=left.not_run | {i + shift for i in right.not_run},
        exec_ms=left.exec_ms + right.exec_ms,
    )


async def _kill(replicas: list[Replica]) -> None:
    """Kill the actors, then wait (at most ``EXIT_TIMEOUT_S``) until Ray reports each dead and,
    for one that ran on this host, its process has exited: only then is its memory free, and
    only then may the registry count it as released."""
    for replica in replicas:
        replica.close_channels()
        ray.kill(replica.actor, no_restart=True)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for replica in replicas:
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(replica.actor.ready.remote(), max(0.05, deadline - time.monotonic()))
            except (RayActorError, TimeoutError):
                break
            await asyncio.sleep(0.05)  # it still answers: the kill has not landed yet
        info = replica.info or {}
        pid = info.get("pid")
        if isinstance(pid, int) and info.get("host") == socket.gethostname():
            while _running(pid) and time.monotonic() < deadline:  # noqa: ASYNC110 - a process has no event
                await asyncio.sleep(0.02)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc; elsewhere: it exists)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
