"""The control plane over arq: load, unload, scale and profile requests as durable jobs.

Any machine that reaches Redis can ask a manager to act (``nosq models load X``): the request
is an arq job on the ``nosq:control`` queue, deduplicated by job id (one ``load:mlp`` at a time),
retried by arq if the manager dies while running it, its result kept for ``KEEP_RESULT_S``.
Each manager runs an arq worker in its own event loop and acts on the models it serves.

An existing arq application calls nosq from its own jobs the same way::

    job = await ctx["redis"].enqueue_job("load", "mlp", _queue_name="nosq:control", _job_id="load:mlp")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import Any, Protocol

import redis
from arq import create_pool
from arq.connections import ArqRedis
from arq.connections import RedisSettings as ArqRedisSettings
from arq.jobs import Job
from arq.worker import Worker, func

from nosq.producer.errors import NosqError, NosqTimeout
from nosq.producer.settings import RedisSettings

__all__ = ["CONTROL_QUEUE", "OPERATIONS", "Controllable", "ControlWorker", "arq_settings", "request"]

log = logging.getLogger(__name__)
CONTROL_QUEUE = "nosq:control"
KEEP_RESULT_S = 60
JOB_TIMEOUT_S = 600
OPERATIONS = ("load", "unload", "scale", "profile")


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


def arq_settings(settings: RedisSettings) -> ArqRedisSettings:
    """arq's connection settings from nosq's (URL, ACL user, TLS)."""
    if settings.cluster:
        raise NosqError(f"the control plane (arq) cannot run on Redis Cluster ({settings.describe()}): arq's "
                        "queue keys span slots. Change models by restarting managers with a new --config, "
                        "or run the control plane against a plain Redis (docs/operations.md)")
    arq = ArqRedisSettings.from_dsn(settings.url)
    if settings.username is not None:
        arq.username = settings.username
    if settings.password is not None:
        arq.password = settings.password.get_secret_value()
    if settings.db is not None:
        arq.database = settings.db
    if settings.tls:
        arq.ssl_ca_certs = settings.ssl_ca_file
        arq.ssl_certfile = settings.ssl_cert_file
        arq.ssl_keyfile = settings.ssl_key_file
    return arq


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


class ControlWorker:
    """The arq worker a manager runs beside its pipelines."""

    def __init__(self, manager: Controllable) -> None:
        self._manager = manager
        self._worker = self._new_worker()
        self._task: asyncio.Task[Any] | None = None

    def _new_worker(self) -> Worker:
        manager = self._manager
        return Worker(
            functions=[func(f, name=f.__name__, timeout=JOB_TIMEOUT_S, keep_result=KEEP_RESULT_S)
                       for f in (load, unload, scale, profile)],
            redis_settings=arq_settings(manager.redis_settings), queue_name=CONTROL_QUEUE,
            ctx={"manager": manager}, handle_signals=False, max_jobs=4, poll_delay=0.1, max_tries=3,
        )

    async def run(self) -> None:
        """Poll for jobs; a lost Redis connection means a fresh worker after a backoff, not a stop."""
        self._task = asyncio.current_task()
        delay = 0.1
        while True:
            try:
                await self._worker.main()
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("control plane: Redis connection lost (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                with contextlib.suppress(Exception):
                    await self._worker.close()
                self._worker = self._new_worker()

    async def aclose(self) -> None:
        """Stop polling first (closing the pool under a polling worker fails it), then close."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._worker.close()


async def request(settings: RedisSettings, operation: str, *args: Any, timeout_s: float = 300.0) -> Any:
    """Enqueue one control job (deduplicated by its id) and wait for its result."""
    if operation not in OPERATIONS:
        raise NosqError(f"unknown operation {operation!r}: use one of {', '.join(OPERATIONS)}")
    pool: ArqRedis = await create_pool(arq_settings(settings), default_queue_name=CONTROL_QUEUE)
    job_id = ":".join([operation, *map(str, args)])
    try:
        job = await pool.enqueue_job(operation, *args, _job_id=job_id)
        job = job or Job(job_id, pool, _queue_name=CONTROL_QUEUE)  # the same request is already queued
        try:
            return await job.result(timeout=timeout_s, poll_delay=0.2)
        except TimeoutError:
            raise NosqTimeout(job_id, timeout_s) from None
    finally:
        await pool.aclose()
