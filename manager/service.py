"""The manager process: lifecycle, one pipeline per model, janitor, heartbeat.

Shutdown is a state machine, RUNNING → DRAINING → STOPPED: a signal only asks for it; the
drain stops reading, finishes what was read (bounded by ``shutdown_timeout_s``), and stops.

At start each model gets its profile (``nosq.manager.profiles.store``): the stored one for its device kind
and input signature, or one measured on its first replica (one model at a time, before any
request is served, so the figures are not disturbed) and stored. Its batch cap is then b* and
its latency(b) the profile's curve.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any

import redis.asyncio

from nosq.manager.memory import placement
from nosq.manager.memory.loader import Loader
from nosq.manager.memory.registry import Registry
from nosq.manager.ops.control import ControlWorker
from nosq.manager.ops.metrics import Metrics, MetricsServer
from nosq.manager.profiles.store import ProfileRecord, ensure_profile, profile_key
from nosq.manager.runtime import raycluster
from nosq.manager.runtime.reaper import alive
from nosq.manager.runtime.redislink import LOST, RedisLink, RedisOutage, forever
from nosq.manager.scaling.loop import Scaling, check_config
from nosq.manager.serving import depth
from nosq.manager.serving.depth import Depth
from nosq.manager.serving.janitor import Janitor
from nosq.manager.serving.pipeline import ModelPipeline
from nosq.manager.serving.replicas import ReplicaPool, cluster_gpus, start_failure, wants_gpu
from nosq.manager.serving.unserved import UnknownModels
from nosq.manager.settings import ManagerSettings
from nosq.producer import keys
from nosq.producer.errors import NosqError
from nosq.producer.settings import RedisSettings
from nosq.producer.wire import now_ms
from nosq.workers.profiles.curve import ProfileOptions
from nosq.workers.spec import ServeConfig

__all__ = ["Manager", "State"]

log = logging.getLogger(__name__)
#: redis-py retries a command this long itself (a dropped connection, a blip); a longer outage
#: is the RedisLink's to wait out (nosq.manager.runtime.redislink)
RECONNECT_IN_CALL_S = 2.0
LOAD_RETRY_FIRST_S = 5.0  # a model whose load failed (no budget) is tried again after this, doubling
LOAD_RETRY_MAX_S = 300.0


class State(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Manager:
    """Serves every model of ``config`` from Redis until asked to stop."""

    def __init__(self, config: ServeConfig, settings: ManagerSettings) -> None:
        self.config = config
        self.settings = settings
        self.state = State.CREATED
        self.pipelines: dict[str, ModelPipeline] = {}
        self.profiles: dict[str, ProfileRecord | None] = {}
        self._pools: dict[str, ReplicaPool] = {}
        self._redis: redis.asyncio.Redis | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = time.time()
        self._owns_ray = False
        self.registry: Registry | None = None
        self.loader: Loader | None = None
        self.failed: BaseException | None = None
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.control: ControlWorker | None = None
        self.scaling: Scaling | None = None
        self._compile_reported: set[str] = set()
        self.load_errors: dict[str, str] = {}  # without a budget: models whose load failed, and why
        self.link = RedisLink(lambda: self._client().ping(), outage_limit_s=settings.redis_outage_limit_s,
                              describe=f"Redis at {settings.redis.describe()}")

    def request_stop(self) -> None:
        """Safe from a signal handler: only records the wish."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        """Start, serve until ``request_stop`` (or SIGTERM/SIGINT), then drain and stop."""
        try:
            await self.start()
            if handle_signals:  # after Ray's init, which installs handlers of its own
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.request_stop)
            await self._stop.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        if self.state is not State.CREATED:
            raise NosqError(f"manager cannot start from state {self.state.value}")
        self.state = State.STARTING
        settings = self.settings
        check_config(self.config, on_demand=settings.cpu_budget_bytes is not None)  # before Ray: fail fast
        self._redis = settings.redis.async_client(reconnect_s=RECONNECT_IN_CALL_S)
        await self._claim_consumer_name()
        # in the main thread: Ray installs signal handlers
        self._owns_ray = raycluster.connect(settings.ray_address, settings.ray_num_cpus)
        for spec in self.config.models:
            pool = ReplicaPool(spec, inflight_per_replica=settings.inflight_per_replica,
                               dispatch_attempts=settings.dispatch_attempts, local_channel=settings.local_channel)
            self._pools[spec.id] = pool
        on_demand = settings.cpu_budget_bytes is not None
        if on_demand:  # models load when requests wait for them (nosq.manager.memory.loader)
            self.registry = Registry(self._redis, owner=settings.consumer, policy=settings.eviction_policy)
            self.profiles.update(dict.fromkeys(self._pools))
        else:
            await self._load_every_model()
        for spec in self.config.models:
            record = self.profiles[spec.id]
            pipeline = ModelPipeline(spec, client=self._redis, pool=self._pools[spec.id], settings=settings,
                                     spawn=self._spawn, registry=self.registry, metrics=self.metrics,
                                     link=self.link)
            pipeline.apply_profile(record.profile if record is not None else None)
            self.pipelines[spec.id] = pipeline
            await pipeline.ensure_group()
        await self._publish_served()  # before reading: other managers must not answer unknown_model
        if self.registry is not None:
            for pipeline in self.pipelines.values():
                pipeline.hold()  # until it is loaded here
            self.loader = loader = Loader(client=self._redis, settings=settings, registry=self.registry,
                                          pools=self._pools, pipelines=self.pipelines, profiles=self.profiles,
                                          spawn=self._spawn)
            await loader.setup()
            self._spawn_loop(lambda: loader.run(self._stop), "loader")
        else:
            for model, pipeline in self.pipelines.items():
                if model in self.load_errors:
                    pipeline.hold()  # its entries wait in the stream until it loads
                    self._spawn_loop(lambda model=model: self._retry_load(model), f"load-{model}")  # type: ignore[misc]
                else:
                    self._serve(model)
        janitor = Janitor(self._redis, settings, self.pipelines)
        unserved = UnknownModels(self._redis, settings, set(self.pipelines), self.link)
        self._spawn_loop(lambda: janitor.run(self._stop), "janitor")
        self._spawn_loop(lambda: unserved.run(self._stop), "unknown-models")
        self.scaling = scaling = Scaling(client=self._redis, settings=settings, pools=self._pools,
                                         pipelines=self.pipelines, loader=self.loader, published=self._beat)
        if scaling.enabled:
            self._spawn_loop(lambda: scaling.run(self._stop), "autoscaler")
        self._spawn_loop(self._heartbeat, "heartbeat")
        await self._start_metrics()
        self.control = ControlWorker(self)  # on Redis Cluster: one hash-tagged slot, its master (ops/control.py)
        self._spawn(self.control.run(), "control")
        self.state = State.RUNNING
        log.info("manager %s serving %s", settings.consumer, ", ".join(self.pipelines))

    async def stop(self) -> None:
        """Drain (bounded), then release Ray and Redis."""
        if self.state in (State.STOPPED, State.CREATED):
            self.state = State.STOPPED
            return
        self.state = State.DRAINING
        self._stop.set()
        if self.control is not None:
            await self.control.aclose()
        if self.metrics_server is not None:
            await self.metrics_server.aclose()
        for pipeline in self.pipelines.values():
            pipeline.drain()
        # batches released while draining spawn tasks of their own: wait until none is left
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        still = {t for t in self._tasks if not t.done()}
        while still and time.monotonic() < deadline:
            await asyncio.wait(still, timeout=deadline - time.monotonic())
            still = {t for t in self._tasks if not t.done()}
        if still:
            log.warning("shutdown: %d task(s) did not finish within %.0f s; their entries stay pending "
                        "and will be reclaimed", len(still), self.settings.shutdown_timeout_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for pool in self._pools.values():
            await pool.stop()
        if self.registry is not None:  # after the actors are killed
            with contextlib.suppress(NosqError, *LOST):  # Redis down: the dead-owner reaper releases them
                released = await self.registry.release_all()
                log.info("manager %s released %s", self.settings.consumer, ", ".join(released) or "nothing")
        if self._owns_ray:
            await asyncio.to_thread(raycluster.disconnect)
        await self.link.aclose()
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError):
                await self._redis.delete(keys.manager_heartbeat(self.settings.consumer))
            await self._redis.aclose()
        self.state = State.STOPPED
        log.info("manager %s stopped", self.settings.consumer)

    # -- control plane (nosq.manager.ops.control runs these as arq jobs; ``Controllable``) -------------

    @property
    def consumer(self) -> str:
        return self.settings.consumer

    @property
    def redis_settings(self) -> RedisSettings:
        return self.settings.redis

    @property
    def served(self) -> Collection[str]:
        return self.pipelines.keys()

    def _describe(self, model: str) -> dict[str, Any]:
        loaded = self.loader is None or model in self.loader.resident
        return {"model": model, "manager": self.settings.consumer, "loaded": loaded,
                "replicas": len(self._pools[model].replicas), "batch_cap": self.pipelines[model].batcher.cap}

    async def load_model(self, model: str) -> dict[str, Any]:
        """Load now rather than on the first request (every model is loaded without a budget)."""
        if self.loader is not None and model not in self.loader.resident:
            await self.loader.load_now(model, self._stop)
        return self._describe(model)

    async def unload_model(self, model: str) -> dict[str, Any]:
        """Drain and evict (on-demand mode: the next request loads it again)."""
        if self.loader is None:
            raise NosqError(f"model {model!r}: unload needs on-demand loading (nosq serve --cpu-budget-mib ...); "
                            "without a budget every configured model stays loaded")
        if model in self.loader.resident:
            await self.loader.evict(model, release=True)
        return self._describe(model)

    async def scale_model(self, model: str, replicas: int) -> dict[str, Any]:
        """Set the replicas now (the autoscaler, if on, moves them within its bounds later)."""
        if self.loader is not None and model not in self.loader.resident:
            raise NosqError(f"model {model!r} is not loaded here: load it first")
        if replicas < 1:
            raise NosqError(f"model {model!r}: a loaded model keeps at least 1 replica, not {replicas}; "
                            f"`nosq models unload {model}` unloads it")
        if self.scaling is None:
            raise NosqError("manager is not started")
        refused = await self.scaling.scale(model, replicas, "operator: nosq models scale")
        if refused:
            raise NosqError(f"model {model!r}: scale to {replicas} refused: {refused}")
        return self._describe(model)

    async def reprofile_model(self, model: str) -> dict[str, Any]:
        """Measure the model's profile again on its replica, store it, and serve with it."""
        pool, pipeline = self._pools[model], self.pipelines[model]
        if not pool.replicas:
            raise NosqError(f"model {model!r} is not loaded here: load it first")
        info = pool.replicas[0].info or {}
        if info.get("device_kind") and info.get("signature"):
            await self._client().delete(profile_key(model, info["device_kind"], info["signature"]))
        record = await ensure_profile(self._client(), pool.spec, pool, measure=True,
                                      options=ProfileOptions(memory_limit_bytes=self.settings.profile_memory_limit_bytes))
        self.profiles[model] = record
        pipeline.apply_profile(record.profile if record is not None else None)
        return {**self._describe(model), "profile": record.profile.to_dict() if record is not None else None}

    # -- internals --------------------------------------------------------------------------

    async def _load_every_model(self) -> None:
        """Without a memory budget: start every model now; one that fails to load is tried again
        later (``_retry_load``) while the others serve."""
        self._share_gpus()
        outcomes = await asyncio.gather(*(pool.start() for pool in self._pools.values()), return_exceptions=True)
        for (model, pool), outcome in zip(self._pools.items(), outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._load_failed(model, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            elif (problem := pool.compile_problem()) is not None:
                log.warning("model %s: %s; serving eagerly", model, problem)
        for spec in self.config.models:  # one at a time: profiles measured side by side disturb each other
            self.profiles[spec.id] = None if spec.id in self.load_errors else await self._profile(spec.id)

    def _share_gpus(self) -> None:
        """Without a budget, the GPU models' replicas (up to each one's max_replicas) split the
        cluster's GPUs equally: a whole GPU each would leave all but the first unplaced on a
        one-GPU node, waiting for a GPU that never frees."""
        gpu_pools = [pool for pool in self._pools.values() if wants_gpu(pool.spec)]
        replicas = sum(pool.spec.replica_bounds[1] for pool in gpu_pools)
        gpus = cluster_gpus()
        if not gpu_pools or gpus <= 0:
            return
        share = placement.shared_fraction(replicas, gpus)
        for pool in gpu_pools:
            pool.gpu_share = share
        log.info("%d GPU replica(s) share %g GPU(s): %.2f each", replicas, gpus, share)

    async def _profile(self, model: str) -> ProfileRecord | None:
        return await ensure_profile(self._client(), self._pools[model].spec, self._pools[model],
                                    measure=self.settings.profile_on_start,
                                    options=ProfileOptions(memory_limit_bytes=self.settings.profile_memory_limit_bytes))

    def _serve(self, model: str) -> None:
        pipeline = self.pipelines[model]
        self._spawn_loop(pipeline.read_loop, f"read-{model}")
        self._spawn(pipeline.batch_loop(), f"batch-{model}")

    def _load_failed(self, model: str, exc: Exception) -> None:
        self.load_errors[model] = start_failure(exc)
        log.error("model %s: load failed: %s; the other models serve on, and it is tried again",
                  model, self.load_errors[model])

    async def _retry_load(self, model: str) -> None:
        """Without a memory budget: start a model whose load failed, again and again (backoff
        up to ``LOAD_RETRY_MAX_S``); once it is up, profile it and serve it."""
        delay = LOAD_RETRY_FIRST_S
        pool, pipeline = self._pools[model], self.pipelines[model]
        while model in self.load_errors:
            try:
                async with asyncio.timeout(delay):
                    await self._stop.wait()
                return  # stopping
            except TimeoutError:
                pass
            try:
                await pool.start()
            except Exception as exc:  # recorded, shown by nosq status; tried again later
                self._load_failed(model, exc)
                delay = min(LOAD_RETRY_MAX_S, delay * 2)
                continue
            record = await self._profile(model)
            self.profiles[model] = record
            pipeline.apply_profile(record.profile if record is not None else None)
            pipeline.resume()
            del self.load_errors[model]
            self._serve(model)
            log.info("model %s: loaded after an earlier failure", model)

    def _spawn_loop(self, loop: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """A long-running loop that survives Redis restarts (nosq.manager.runtime.redislink)."""
        return self._spawn(forever(loop, name, self.link), name)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, RedisOutage):
            if self.failed is None:
                log.error("%s", exc)
            self.failed = exc
            self._stop.set()
        elif exc is not None:
            log.error("task %s failed: %r; stopping the manager", task.get_name(), exc, exc_info=exc)
            self.failed = exc
            self._stop.set()

    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise NosqError("manager is not started")
        return self._redis

    def _heartbeat_value(self) -> str:
        stats = {m: {**p.stats.snapshot(), "replicas": len(self._pools[m].replicas),
                     "actors": self._pools[m].placements(), "compile_problem": self._pools[m].compile_problem(),
                     "load_error": self.load_errors.get(m)}
                 for m, p in self.pipelines.items()}
        if self.scaling is not None:
            for model, figures in stats.items():
                figures["autoscale"] = self.scaling.view(model)
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": self._started_at,
            "state": self.state.value, "models": sorted(self.pipelines), "at_ms": now_ms(),
            "served": {m: p.served for m, p in self.pipelines.items()}, "stats": stats,
        })

    async def _start_metrics(self) -> None:
        """/metrics and /healthz; a port in use costs the metrics, never the serving."""
        if self.settings.metrics_port is None:
            return
        server = MetricsServer(self.metrics, host=self.settings.metrics_host, port=self.settings.metrics_port,
                               refresh=self._refresh_gauges, problem=self._health_problem)
        try:
            await server.start()
        except OSError as exc:
            log.error("metrics server not started on %s:%d: %s", self.settings.metrics_host,
                      self.settings.metrics_port, exc)
            return
        self.metrics_server = server

    def _health_problem(self) -> str | None:
        """Why this manager is not serving now (``/healthz`` answers 503 with it), or None."""
        if self.state is not State.RUNNING:
            return f"manager is {self.state.value}"
        if self.pipelines and len(self.load_errors) == len(self.pipelines):
            return "no model loaded: " + "; ".join(f"{m}: {e}" for m, e in sorted(self.load_errors.items()))
        return self.link.problem()

    async def _refresh_gauges(self) -> None:
        """Backlog, pending, replicas and resident bytes, read when scraped."""
        for model, queue in zip(self.pipelines, await self._depths(), strict=True):
            self.metrics.backlog.labels(model).set(queue.backlog)
            self.metrics.pending.labels(model).set(queue.pending)
            self.metrics.replicas.labels(model).set(len(self._pools[model].replicas))
        if self.registry is not None:
            for device in await self.registry.devices():
                name = f"{device.get('node', '')}/{device.get('device', '')}"
                self.metrics.resident_bytes.labels(name).set(float(device.get("used_bytes", 0) or 0))

    async def _claim_consumer_name(self) -> None:
        """Refuse to run beside a live manager that uses the same consumer name."""
        key = keys.manager_heartbeat(self.settings.consumer)
        current = await self._client().get(key)
        if current is not None:
            other = json.loads(current)
            same_host = other.get("host") == socket.gethostname()
            pid = int(other.get("pid", 0))
            # our own pid: a predecessor in the same pid namespace (a container restarted as pid 1)
            if not same_host or (pid != os.getpid() and alive(pid)):
                raise NosqError(
                    f"consumer name {self.settings.consumer!r} is in use by a live manager "
                    f"(pid {other.get('pid')} on {other.get('host')}): give each manager its own --consumer"
                )
        await self._client().set(key, self._heartbeat_value(), ex=self.settings.heartbeat_ttl_s)

    async def _check_compile(self) -> None:
        """A traced/compiled model may fall back to eager on a later batch: look, report once."""
        for model, pool in self._pools.items():
            if pool.spec.compile == "eager" or model in self._compile_reported or not pool.replicas:
                continue
            await pool.refresh_info()
            problem = pool.compile_problem()
            if problem is not None:
                self._compile_reported.add(model)
                log.warning("model %s: %s; serving eagerly", model, problem)
                if self.registry is not None:
                    await self.registry.record_error(model, problem)

    async def _publish_admission(self) -> None:
        """Each model's backlog limit for the enqueue scripts, with a retry-after hint: the time
        this manager needs to drain a tenth of the limit at its measured rate (50 ms to 10 s)."""
        pipe = self._client().pipeline(transaction=False)
        for model, pipeline in self.pipelines.items():
            tags, limit = pipeline.tags, pipeline.spec.max_backlog
            if limit is None:
                for tag in tags:
                    pipe.hdel(keys.admission(tag), "max_backlog", "retry_after_ms")
            else:
                rate = pipeline.stats.snapshot()["req_per_s"]
                retry_ms = 1000 if rate <= 0 else min(10_000, max(50, int(1000 * limit * 0.1 / rate)))
                share = -(-limit // len(tags))  # the limit split evenly over the partitions
                for tag in tags:
                    pipe.hset(keys.admission(tag), mapping={"max_backlog": share, "retry_after_ms": retry_ms})
            if len(tags) > 1:  # where producers in any language find the partitions (protocol §1, Partitioned models)
                pipe.hset(keys.admission(model), mapping={"partitions": len(tags), "tags": " ".join(tags)})
            else:
                pipe.hdel(keys.admission(model), "partitions", "tags")
        await pipe.execute()

    async def _publish_served(self) -> None:
        """Record the models this manager serves, each until its heartbeat would lapse."""
        await self._publish_admission()
        expires = now_ms() + self.settings.heartbeat_ttl_s * 1000
        await self._client().hset(keys.registry_served(), mapping=dict.fromkeys(self.pipelines, expires))  # type: ignore[misc]

    async def _heartbeat(self) -> None:
        """Say this manager is alive, and which models it serves (until when)."""
        while not self._stop.is_set():
            await self._check_compile()
            await self._beat()
            await self._publish_served()
            if self.registry is not None:
                await self._registry_heartbeat(self.registry)
            try:
                async with asyncio.timeout(self.settings.heartbeat_ttl_s / 3):
                    await self._stop.wait()
            except TimeoutError:
                pass


    async def _beat(self) -> None:
        """Write this manager's heartbeat now (also right after an autoscaling decision)."""
        await self._client().set(keys.manager_heartbeat(self.settings.consumer), self._heartbeat_value(),
                                 ex=self.settings.heartbeat_ttl_s)

    async def _depths(self) -> list[Depth]:
        """Each served model's queue depth over its streams, in ``self.pipelines`` order."""
        pipe = self._client().pipeline(transaction=False)
        for pipeline in self.pipelines.values():
            depth.ask(pipe, pipeline.streams)
        answers = await pipe.execute(raise_on_error=False)
        return depth.depths(answers, [len(p.streams) for p in self.pipelines.values()])

    async def _registry_heartbeat(self, registry: Registry) -> None:
        """Backlogs for the cost policy; release the models of managers that stopped heartbeating."""
        depths = await self._depths()
        await registry.set_backlog({m: d.backlog for m, d in zip(self.pipelines, depths, strict=True)})
        reaped = await registry.reap_dead_owners()
        if reaped:
            log.warning("registry: released %s, whose manager stopped heartbeating", ", ".join(reaped))
