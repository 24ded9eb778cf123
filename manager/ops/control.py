"""The control plane over arq: load, unload, scale and profile requests as durable jobs.

Any machine that reaches Redis can ask a manager to act (``nosq models load X``): the request
is an arq job on the ``nosq:control`` queue, deduplicated by job id (one ``load:mlp`` at a time),
retried by arq if the manager dies while running it, its result kept for ``KEEP_RESULT_S``.
Each manager runs an arq worker in its own event loop and acts on the models it serves.

An existing arq application calls nosq from its own jobs the same way::

    job = await ctx["redis"].enqueue_job("load", "mlp", _queue_name="nosq:control", _job_id="load:mlp")

On Redis Cluster (``redis+cluster://``) the queue is ``nosq:{arq:abort}:control`` and every job
id starts with ``{arq:abort}`` (``control_queue``, ``control_job_id``): every key arq touches for
those jobs is then in one slot, and arq's plain connection goes to the master that owns it
(``SlotOwner``), looked up again whenever that connection is lost or redirected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import Any, Protocol, cast
from urllib.parse import urlparse, urlunparse

import redis
import redis.asyncio.cluster
import redis.exceptions
from arq import create_pool
from arq.connections import ArqRedis
from arq.connections import RedisSettings as ArqRedisSettings
from arq.constants import result_key_prefix
from arq.jobs import Job, JobStatus
from arq.worker import Worker, func

from nosq.producer.errors import NosqConnectionError, NosqError, NosqTimeout
from nosq.producer.resp import CLUSTER_RETRY_S
from nosq.producer.settings import RedisSettings

__all__ = ["CLUSTER_CONTROL_QUEUE", "CLUSTER_TAG", "CONTROL_QUEUE", "OPERATIONS", "Controllable", "ControlWorker",
           "SlotOwner", "arq_settings", "control_job_id", "control_queue", "request"]

log = logging.getLogger(__name__)
CONTROL_QUEUE = "nosq:control"
KEEP_RESULT_S = 60
JOB_TIMEOUT_S = 600
OPERATIONS = ("load", "unload", "scale", "profile")

# Redis Cluster: one slot for every key arq builds for nosq's jobs (arq 0.28, read from its source).
#   arq.connections.ArqRedis.enqueue_job: WATCH arq:job:<id>; EXISTS arq:job:<id> arq:result:<id>;
#       MULTI PSETEX arq:job:<id>, ZADD <queue> EXEC
#   arq.worker.Worker: ZRANGEBYSCORE <queue>; start_jobs: WATCH arq:in-progress:<id>, EXISTS it,
#       ZSCORE <queue> <id>, MULTI PSETEX arq:in-progress:<id> EXEC; run_job: MULTI GET arq:job:<id>,
#       INCR/EXPIRE arq:retry:<id> (+ ZREM arq:abort with allow_abort_jobs) EXEC; SETEX arq:retry:<id>;
#       finish_job / finish_failed_job: MULTI [PEXPIRE arq:in-progress:<id>] SET arq:result:<id>,
#       ZREM arq:abort <id>, ZREM <queue>, [ZINCRBY <queue>], DEL arq:in-progress/retry/job:<id> EXEC;
#       record_health: ZCARD <queue>, PSETEX <queue>:health-check; close: DEL <queue>:health-check;
#       log_redis_info: INFO, DBSIZE (no key); with allow_abort_jobs (off here): ZRANGE/ZREMRANGEBYSCORE/
#       ZREM arq:abort.
#   arq.jobs.Job: result: MULTI GET arq:result:<id>, ZSCORE <queue> <id> EXEC; info/status: GET
#       arq:job:<id>, EXISTS arq:result/arq:in-progress:<id>, ZSCORE <queue>; abort: ZADD arq:abort.
# finish_job and finish_failed_job ZREM the fixed key ``arq:abort`` inside the job's MULTI whether
# aborts are allowed or not, and nosq cannot rename it. So the hash tag is that key's own name:
# ``{arq:abort}`` puts the queue, ``<queue>:health-check`` and ``arq:*:{arq:abort}<id>`` in the slot of
# ``arq:abort`` (a ``{control}`` tag fails every job's finish with MOVED or CROSSSLOT). Nothing else
# in arq touches a key (``all_job_results`` runs KEYS, unused here).
CLUSTER_TAG = "{arq:abort}"
CLUSTER_CONTROL_QUEUE = f"nosq:{CLUSTER_TAG}:control"
_REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN")


class Controllable(Protocol):
    """The actions the control plane runs on a manager (``nosq.manager.service.Manager`` is one).

    This module depends on this protocol, not on the service: the service imports the control
    plane, never the other way round.
    """

    @property
    def consumer(self) -> str: ...

    @property
    def redis_settings(self) -> RedisSettings: ...

    @property
    def served(self) -> Collection[str]: ...

    async def load_model(self, model: str) -> dict[str, Any]: ...

    async def unload_model(self, model: str) -> dict[str, Any]: ...

    async def scale_model(self, model: str, replicas: int) -> dict[str, Any]: ...

    async def reprofile_model(self, model: str) -> dict[str, Any]: ...


def control_queue(settings: RedisSettings) -> str:
    """arq's queue for nosq's control jobs: ``nosq:control``, hash-tagged on a cluster."""
    return CLUSTER_CONTROL_QUEUE if settings.cluster else CONTROL_QUEUE


def control_job_id(settings: RedisSettings, operation: str, *args: Any) -> str:
    """The job id that deduplicates a request: ``load:mlp``, ``{arq:abort}load:mlp`` on a cluster."""
    job_id = ":".join([operation, *map(str, args)])
    return CLUSTER_TAG + job_id if settings.cluster else job_id


def arq_settings(settings: RedisSettings, node: tuple[str, int] | None = None) -> ArqRedisSettings:
    """arq's connection settings from nosq's (URL, ACL user, TLS). On a cluster, ``node`` is the
    master that owns the control queue's slot (``SlotOwner.find``): arq connects to it alone."""
    if settings.cluster:
        if node is None:
            raise NosqError(f"the control plane on Redis Cluster ({settings.describe()}) connects to the master "
                            "of its queue's slot: pass node=await SlotOwner(settings).find()")
        parsed = urlparse(settings.url)
        arq = ArqRedisSettings.from_dsn(urlunparse(parsed._replace(scheme=parsed.scheme.removesuffix("+cluster"),
                                                                   path="", query="")))
        arq.host, arq.port = node
        arq.database = 0  # a cluster has db 0 only
        arq.conn_retries = 0  # an owner that does not answer is looked up again, not retried 5 times
    else:
        arq = ArqRedisSettings.from_dsn(settings.url)
        if settings.db is not None:
            arq.database = settings.db
    if settings.username is not None:
        arq.username = settings.username
    if settings.password is not None:
        arq.password = settings.password.get_secret_value()
    if settings.tls:
        arq.ssl_ca_certs = settings.ssl_ca_file
        arq.ssl_certfile = settings.ssl_cert_file
        arq.ssl_keyfile = settings.ssl_key_file
    return arq


class SlotOwner:
    """Finds the master that owns the cluster control queue's slot, with a fresh cluster client
    (a fresh slot map) each time: after a failover or a slot migration the next ``find`` names
    the new owner. Every node seen is remembered as a startup node, so losing the node of the URL
    does not stop the next look-up."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._seen: list[tuple[str, int]] = []

    async def find(self) -> tuple[str, int]:
        client = cast(redis.asyncio.cluster.RedisCluster, self._settings.async_client())
        nodes = client.nodes_manager
        for host, port in self._seen:
            startup = redis.asyncio.cluster.ClusterNode(host, port, **nodes.connection_kwargs)
            nodes.startup_nodes.setdefault(startup.name, startup)
        try:  # the slot map alone: client.initialize() would also ask the first master for COMMAND, dead or not
            await nodes.initialize()
            owner = client.get_node_from_key(CLUSTER_CONTROL_QUEUE)
            self._seen = [(n.host, int(n.port)) for n in nodes.nodes_cache.values()]
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise NosqConnectionError(f"no master found for the control queue {CLUSTER_CONTROL_QUEUE!r} on "
                                      f"{self._settings.describe()}: {exc}") from exc
        finally:
            await nodes.aclose()
            await nodes.aclose("startup_nodes")
        if owner is None:
            raise NosqConnectionError(f"no master owns the slot of {CLUSTER_CONTROL_QUEUE!r} on "
                                      f"{self._settings.describe()}")
        return owner.host, int(owner.port)


def _lost(exc: BaseException) -> bool:
    """A connection lost, or (cluster) a reply that says the slot's master is elsewhere now: a
    plain connection gets ``MOVED``/``CLUSTERDOWN``... as a bare ``ResponseError``, inside a
    transaction annotated ``Command # 2 (ZREM ...) of pipeline caused error: ('MOVED ...',)``."""
    if isinstance(exc, redis.ResponseError):
        text = str(exc)
        return text.rpartition("caused error: ")[2].lstrip("('\"").startswith(_REDIRECTS)
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError | NosqConnectionError)


async def _manager_of(ctx: dict[str, Any], model: str) -> Controllable:
    manager: Controllable = ctx["manager"]
    if model not in manager.served:
        raise NosqError(f"model {model!r} is not served by manager {manager.consumer}; "
                        f"it serves: {', '.join(sorted(manager.served))}")
    return manager


async def load(ctx: dict[str, Any], model: str) -> dict[str, Any]:
    return await (await _manager_of(ctx, model)).load_model(model)


async def unload(ctx: dict[str, Any], model: str) -> dict[str, Any]:
    return await (await _manager_of(ctx, model)).unload_model(model)


async def scale(ctx: dict[str, Any], model: str, replicas: int) -> dict[str, Any]:
    return await (await _manager_of(ctx, model)).scale_model(model, int(replicas))


async def profile(ctx: dict[str, Any], model: str) -> dict[str, Any]:
    return await (await _manager_of(ctx, model)).reprofile_model(model)


async def _close_lost(worker: Worker) -> None:
    """Close a worker whose Redis is gone: arq's ``close`` deletes its health-check key before it
    closes its connections, so with the master gone it raises first; close them here then."""
    try:
        await worker.close()
    except Exception:
        pool: ArqRedis | None = getattr(worker, "_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.aclose(close_connection_pool=True)


class ControlWorker:
    """The arq worker a manager runs beside its pipelines."""

    def __init__(self, manager: Controllable) -> None:
        self._manager = manager
        settings = manager.redis_settings
        self._owner = SlotOwner(settings) if settings.cluster else None
        self._worker: Worker | None = None
        self._task: asyncio.Task[Any] | None = None

    async def _new_worker(self) -> Worker:
        manager = self._manager
        node = await self._owner.find() if self._owner is not None else None
        return Worker(
            functions=[func(f, name=f.__name__, timeout=JOB_TIMEOUT_S, keep_result=KEEP_RESULT_S)
                       for f in (load, unload, scale, profile)],
            redis_settings=arq_settings(manager.redis_settings, node), queue_name=control_queue(manager.redis_settings),
            ctx={"manager": manager}, handle_signals=False, max_jobs=4, poll_delay=0.1, max_tries=3,
        )

    async def run(self) -> None:
        """Poll for jobs; a lost Redis connection (on a cluster also a redirect: the slot's master
        moved) means a fresh worker after a backoff, its master looked up again, not a stop."""
        self._task = asyncio.current_task()
        delay = 0.1
        while True:
            try:
                if self._worker is None:
                    self._worker = await self._new_worker()
                await self._worker.main()
                return
            except (redis.RedisError, OSError, NosqConnectionError) as exc:
                if not _lost(exc):
                    raise
                log.warning("control plane: Redis connection lost (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                worker, self._worker = self._worker, None
                if worker is not None:
                    await _close_lost(worker)

    async def aclose(self) -> None:
        """Stop polling first (closing the pool under a polling worker fails it), then close."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._worker is not None:
            await self._worker.close()


async def _wait(pool: ArqRedis, queue: str, job_id: str, call: tuple[str, tuple[Any, ...]], timeout_s: float) -> Any:
    operation, args = call
    job = await pool.enqueue_job(operation, *args, _job_id=job_id)
    if job is None:  # the same request is queued or running (wait for it), or done earlier
        job = Job(job_id, pool, _queue_name=queue)
        if await job.status() is JobStatus.complete:  # an earlier request's result: ask again
            await pool.delete(result_key_prefix + job_id)
            job = await pool.enqueue_job(operation, *args, _job_id=job_id) or job
    try:
        return await job.result(timeout=timeout_s, poll_delay=0.2)
    except TimeoutError:
        raise NosqTimeout(job_id, timeout_s) from None


async def request(settings: RedisSettings, operation: str, *args: Any, timeout_s: float = 300.0) -> Any:
    """Enqueue one control job (deduplicated by its id) and wait for its result.

    On a cluster the queue's master is looked up first, and again after a lost connection or a
    redirect (failover, slot migration), for up to ``CLUSTER_RETRY_S`` without a connection;
    the job is enqueued again there unless it (or its result) already is."""
    if operation not in OPERATIONS:
        raise NosqError(f"unknown operation {operation!r}: use one of {', '.join(OPERATIONS)}")
    queue, job_id = control_queue(settings), control_job_id(settings, operation, *args)
    if not settings.cluster:
        pool: ArqRedis = await create_pool(arq_settings(settings), default_queue_name=queue)
        try:
            return await _wait(pool, queue, job_id, (operation, args), timeout_s)
        finally:
            await pool.aclose()
    loop = asyncio.get_running_loop()
    owner, deadline = SlotOwner(settings), loop.time() + timeout_s
    failing_since: float | None = None
    while True:
        connected: ArqRedis | None = None
        try:
            node = await owner.find()
            connected = await create_pool(arq_settings(settings, node), default_queue_name=queue)
            failing_since = None
            return await _wait(connected, queue, job_id, (operation, args), max(0.0, deadline - loop.time()))
        except (redis.RedisError, OSError, NosqConnectionError) as exc:
            if not _lost(exc):
                raise
            now = loop.time()
            failing_since = now if failing_since is None else failing_since
            if now >= deadline:
                raise NosqTimeout(job_id, timeout_s) from exc
            if now - failing_since > CLUSTER_RETRY_S:
                raise NosqConnectionError(f"control plane on {settings.describe()}: no master of the queue's "
                                          f"slot answered for {CLUSTER_RETRY_S:g} s: {exc}") from exc
            log.info("control plane: %s; looking up the queue's master again", exc)
            await asyncio.sleep(0.2)
        finally:
            if connected is not None:
                with contextlib.suppress(Exception):
                    await connected.aclose()
