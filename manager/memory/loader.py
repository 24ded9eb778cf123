"""On-demand loading under a memory budget: the manager's side of the registry protocol.

Used only when ``ManagerSettings.cpu_budget_bytes`` is set (without it every model is loaded at
start and the registry is not used). Every model has a pipeline from the start (its consumer
group exists) but reads its stream only while it is loaded here.

Every ``load_poll_ms`` the loader

- looks at the streams of the models not loaded here (one pipelined ``XLEN`` each): a model with
  entries waiting gets one load task (never two at once for one model), which asks the registry
  (``Registry.reserve``) for the model's bytes:

  - ``RESERVED``: start the replicas, ``mark_ready``, start reading (its own pending entries
    first: those of batches refused while it was draining before);
  - ``ALREADY``: loaded or loading elsewhere (or by a concurrent call): nothing to do, the
    requests wait in the stream for the manager that has it;
  - ``EVICT``: the victims this manager owns are drained here at once (stop reading, the batches
    in flight end, ``ray.kill``, ``release``), then the reserve is tried again; victims of other
    managers are drained by them;
  - ``WAIT``: tried again after ``load_poll_ms``;

- reads ``snapshot(owner=me)``: a model loaded here that the registry marks DRAINING (chosen as a
  victim by another manager's reserve) is drained and released; one it no longer counts as ours
  (reaped after a stall) has its actors killed, without a release.

A model's bytes: from its stored profile on this device kind (any signature, same spec
fingerprint): ``(weights_bytes + memory_bytes at b*) x replicas``; with none stored,
``default_model_bytes x replicas``. The reservation keeps the bytes it was made with: a profile
measured after the load counts from the next load on.

GPU placement: when the manager's process sees CUDA, each GPU of the node gets a budget (its
total less ``gpu_reserve_bytes``). A GPU model's bytes come from its profile on that card kind, plus
``gpu_overhead_bytes`` per replica (each actor's CUDA context and allocator slack);
it is reserved on the first GPU with room (first fit, ``nosq.manager.memory.placement``), so models pack
across the GPUs of the node. Its actors ask Ray for their measured share of a GPU (``num_gpus``
= bytes over the GPU's budget, rounded up, never 0) and run on the registry's GPU (``cuda:<i>``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio

from nosq.manager.memory import placement
from nosq.manager.memory.registry import ModelState, Outcome, Registry, RegistryError, ReservationLost
from nosq.manager.profiles.store import ProfileRecord, decode, ensure_profile
from nosq.manager.runtime.redislink import forever
from nosq.manager.serving.pipeline import ModelPipeline
from nosq.manager.serving.replicas import ReplicaPool, cluster_gpus, start_failure, wants_gpu
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys
from nosq.workers.profiles.curve import ProfileError, ProfileOptions
from nosq.workers.spec import ModelSpec

__all__ = ["CPU_DEVICE", "Loader", "model_bytes"]

log = logging.getLogger(__name__)
CPU_DEVICE = "cpu"
FAILED_RETRY_S = 5.0  # a model whose load failed is tried again after this long

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


async def model_bytes(client: redis.asyncio.Redis, spec: ModelSpec, device_kind: str, default_per_replica: int) -> int:
    """Bytes to reserve for all of ``spec``'s replicas (see the module docstring)."""
    best = -1
    pattern = keys.registry_profile(spec.id, device_kind, "*")
    async for key in client.scan_iter(match=pattern, count=100):
        data = await client.get(key)
        if data is None:
            continue
        try:
            profile = decode(data)
        except ProfileError:
            continue
        if profile.fingerprint != spec.fingerprint():
            continue
        point = profile.point(profile.best_batch)
        best = max(best, profile.plan.weights_bytes + (point.memory_bytes if point is not None else 0))
    per_replica = best if best >= 0 else default_per_replica
    return per_replica * spec.replicas


class Loader:
    """Loads models when requests wait for them and evicts them when the registry says so."""

    def __init__(self, *, client: redis.asyncio.Redis, settings: ManagerSettings, registry: Registry,
                 pools: dict[str, ReplicaPool], pipelines: dict[str, ModelPipeline],
                 profiles: dict[str, ProfileRecord | None], spawn: Spawn) -> None:
        self._redis = client
        self._settings = settings
        self.registry = registry
        self._pools = pools
        self._pipelines = pipelines
        self._profiles = profiles
        self._spawn = spawn
        self.resident: set[str] = set()  # loaded here and reading
        self._busy: set[str] = set()  # a load or a drain under way
        self._loops: dict[str, list[asyncio.Task[None]]] = {}
        self._retry_at: dict[str, float] = {}
        self._gpu_kind: str | None = None  # the profile device kind of this node's GPUs
        self.loads: list[str] = []  # models loaded here, in order (tests, logs)
        self.evictions: list[str] = []  # models drained and killed here, in order

    async def setup(self) -> None:
        """Set this node's budgets: the CPU's from settings; each GPU's, total less the reserve."""
        settings = self._settings
        assert settings.cpu_budget_bytes is not None
        await self.registry.set_budget(settings.node, CPU_DEVICE, settings.cpu_budget_bytes)
        if cluster_gpus() > 0:
            import torch  # only where GPUs are: the manager itself runs no model

            if torch.cuda.is_available():
                self._gpu_kind = f"cuda:{torch.cuda.get_device_name(0)}"  # nosq.workers.profiles.measure.device_kind
                for i in range(torch.cuda.device_count()):
                    total = torch.cuda.get_device_properties(i).total_memory
                    await self.registry.set_budget(settings.node, f"cuda:{i}",
                                                   max(0, total - settings.gpu_reserve_bytes))

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._settings.load_poll_ms / 1000
        while not stop.is_set():
            await self.tick(stop)
            try:
                async with asyncio.timeout(interval):
                    await stop.wait()
            except TimeoutError:
                pass

    async def tick(self, stop: asyncio.Event) -> None:
        """One look: start loads for models with backlog, drain what the registry takes back."""
        now = time.monotonic()
        idle = [m for m in self._pipelines
                if m not in self.resident and m not in self._busy and self._retry_at.get(m, 0.0) <= now]
        if idle:
            pipe = self._redis.pipeline(transaction=False)
            for model in idle:
                for stream in self._pipelines[model].streams:
                    pipe.xlen(stream)
            lengths = iter(await pipe.execute())
            for model in idle:
                backlog = sum(int(next(lengths)) for _ in self._pipelines[model].streams)
                if backlog > 0 and not stop.is_set():
                    self._busy.add(model)
                    self._spawn(self._load(model, stop), f"load-{model}")
        mine = {row["model"]: row["state"] for row in await self.registry.snapshot(owner=self.registry.owner)}
        for model in sorted(self.resident - self._busy):
            state = mine.get(model)
            if state == ModelState.READY.value:
                continue
            self._busy.add(model)
            release = state == ModelState.DRAINING.value
            if not release:
                log.warning("model %s: the registry no longer counts it as ours (%s): killing its actors",
                            model, state or "absent")
            self._spawn(self._evict_task(model, release=release), f"evict-{model}")

    # -- loading ---------------------------------------------------------------------------------

    async def _place_on_gpu(self, model: str, nbytes: int) -> str:
        """The first GPU of this node with room for ``nbytes`` (else the first: the reserve then
        evicts there); its actors ask Ray for their measured share of it (nosq.manager.memory.placement)."""
        pool = self._pools[model]
        gpus = [d for d in await self.registry.devices(self._settings.node) if d["device"].startswith("cuda")]
        if not gpus:
            raise RegistryError(f"model {model!r} wants a GPU but node {self._settings.node} has no GPU budget")
        index = placement.first_fit(nbytes, [d["free_bytes"] for d in gpus])
        row = gpus[index if index is not None else 0]
        budget = int(row["budget_bytes"])
        if budget > 0:
            per_replica = nbytes // max(1, pool.spec.replicas)
            pool.gpu_share = placement.gpu_fraction(per_replica, budget)
            log.info("model %s: %.2f of a GPU per replica (%d MiB of %d MiB)", model, pool.gpu_share,
                     per_replica >> 20, budget >> 20)
        pool.device = str(row["device"])
        return pool.device

    async def load_now(self, model: str, stop: asyncio.Event) -> None:
        """Load ``model`` without waiting for backlog (a control-plane request)."""
        if model in self.resident:
            return
        if model in self._busy:  # a load or eviction is under way: let it finish, then look again
            while model in self._busy and not stop.is_set():  # noqa: ASYNC110 - rare control-path wait
                await asyncio.sleep(0.05)
            if model in self.resident:
                return
        self._busy.add(model)
        await self._load(model, stop)

    async def _load(self, model: str, stop: asyncio.Event) -> None:
        try:
            await self._load_when_room(model, stop)
        finally:
            self._busy.discard(model)

    async def _load_when_room(self, model: str, stop: asyncio.Event) -> None:
        spec = self._pools[model].spec
        node = self._settings.node
        gpu = wants_gpu(spec)
        kind = (self._gpu_kind or "cuda") if gpu else CPU_DEVICE
        nbytes = await model_bytes(self._redis, spec, kind, self._settings.default_model_bytes)
        if gpu:
            nbytes += self._settings.gpu_overhead_bytes * spec.replicas
        device = await self._place_on_gpu(model, nbytes) if gpu else CPU_DEVICE
        while not stop.is_set():
            reservation = await self.registry.reserve(model, node=node, device=device, nbytes=nbytes)
            if reservation.outcome is Outcome.RESERVED:
                await self._start(model, stop)
                return
            if reservation.outcome is Outcome.ALREADY:
                log.debug("model %s: already %s by %s", model, reservation.state, reservation.owner)
                return
            if reservation.outcome is Outcome.EVICT:
                ours = [v.model for v in reservation.victims
                        if v.owner == self.registry.owner and v.model in self.resident and v.model not in self._busy]
                log.info("model %s: evicting %s to make room", model,
                         ", ".join(f"{v.model} ({v.owner})" for v in reservation.victims))
                for victim in ours:
                    self._busy.add(victim)
                await asyncio.gather(*(self._evict_task(v, release=True) for v in ours))
                if ours:
                    continue
            try:
                async with asyncio.timeout(self._settings.load_poll_ms / 1000):
                    await stop.wait()
            except TimeoutError:
                pass

    async def _start(self, model: str, stop: asyncio.Event) -> None:
        pool, pipeline = self._pools[model], self._pipelines[model]
        started = time.monotonic()
        try:
            await pool.start()
            if self._profiles.get(model) is None:
                record = await ensure_profile(
                    self._redis, pool.spec, pool, measure=self._settings.profile_on_start,
                    options=ProfileOptions(memory_limit_bytes=self._settings.profile_memory_limit_bytes))
                self._profiles[model] = record
                pipeline.apply_profile(record.profile if record is not None else None)
        except Exception as exc:  # any load failure is recorded; the manager serves on
            cause = start_failure(exc)
            log.error("model %s: load failed: %s; retrying in %.0f s", model, cause, FAILED_RETRY_S)
            await pool.stop()
            await self.registry.fail(model, f"load failed: {cause}")
            self._retry_at[model] = time.monotonic() + FAILED_RETRY_S
            return
        load_ms = (time.monotonic() - started) * 1000
        try:
            await self.registry.mark_ready(model, len(pool.replicas), load_ms)
            problem = pool.compile_problem()
            if problem is not None:
                log.warning("model %s: %s; serving eagerly", model, problem)
                await self.registry.record_error(model, problem)
        except ReservationLost as exc:
            log.warning("model %s: %s", model, exc)
            await pool.stop()
            return
        if stop.is_set():  # the manager is stopping: it kills the actors and releases
            return
        pipeline.resume()
        read = forever(pipeline.read_loop, f"read-{model}", pipeline.link)
        self._loops[model] = [self._spawn(read, f"read-{model}"),
                              self._spawn(pipeline.batch_loop(), f"batch-{model}")]
        self.resident.add(model)
        self.loads.append(model)
        log.info("model %s: loaded in %.0f ms (%d replica(s))", model, load_ms, len(pool.replicas))

    # -- evicting --------------------------------------------------------------------------------

    # -- scaling ---------------------------------------------------------------------------------

    def settled(self, model: str) -> bool:
        """Loaded here, with no load, eviction or scale under way."""
        return model in self.resident and model not in self._busy

    async def scale(self, model: str, replicas: int) -> tuple[int, str]:
        """Resize a model loaded here (``nosq.manager.scaling.loop``): (replicas now, why not ``replicas``;
        "" when reached).

        Its bytes grow in the registry before new replicas start, to the most replicas up to
        ``replicas`` that the budget holds (nothing is evicted for a scale-up), and shrink after
        retired ones are killed. 0 evicts it (bytes released): requests then wait in the stream
        and the next tick loads it again. A load or eviction under way holds the model."""
        pool = self._pools[model]
        if model not in self.resident or model in self._busy:
            return len(pool.replicas), "not loaded here, or a load or eviction is under way"
        self._busy.add(model)
        try:
            current = len(pool.replicas)
            if replicas <= 0:
                await self.evict(model, release=True)
                return 0, ""
            if replicas < current:
                await pool.scale_to(replicas)
                await self.registry.resize(model, replicas)
                return replicas, ""
            refused = ""
            for count in range(replicas, current, -1):
                resized = await self.registry.resize(model, count)
                if resized.ok:
                    break
                refused = refused or resized.reason
            else:
                return current, refused
            try:
                await pool.scale_to(count)
            finally:
                if len(pool.replicas) != count:  # the start failed: give the bytes back
                    await self.registry.resize(model, max(1, len(pool.replicas)))
            return count, refused
        finally:
            self._busy.discard(model)

    async def _evict_task(self, model: str, *, release: bool) -> None:
        try:
            await self.evict(model, release=release)
        finally:
            self._busy.discard(model)

    async def evict(self, model: str, *, release: bool) -> None:
        """Drain (stop reading, batches in flight end), kill the actors, then ``release``."""
        pipeline = self._pipelines[model]
        await pipeline.halt()
        loops = self._loops.pop(model, [])
        await asyncio.gather(*loops, return_exceptions=True)
        await pipeline.halt()  # a batch the batch loop released while it was stopping
        await self._pools[model].stop()
        self.resident.discard(model)
        self.evictions.append(model)
        if release:
            await self.registry.release(model)
        log.info("model %s: evicted (actors killed%s)", model, ", bytes released" if release else "")
