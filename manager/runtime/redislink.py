"""Riding out a lost Redis connection: an outage costs a pause, never the manager.

Every loop and write of the manager goes through one :class:`RedisLink`. When a call fails
because Redis is unreachable, the link is marked lost and one probe (``PING`` with backoff,
0.1 s doubling to 2 s) waits for Redis to answer again; the loops and writes wait for it
instead of hammering a dead server, then carry on (writes are idempotent: SET NX, XACK, XDEL).
While the link is lost, ``/healthz`` answers 503 with the reason.

Each outage is timed on its own: it ends when the probe gets an answer. By default the manager
waits however long an outage lasts (its entries are durable in Redis; it has nothing else to
do); with ``outage_limit_s`` it stops with :class:`RedisOutage` once one outage has lasted
that long, so that a supervisor can act on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError

from nosq.producer.errors import NosqConnectionError
from nosq.producer.resp import closed_transport

__all__ = ["LOST", "RedisLink", "RedisOutage", "forever", "is_lost", "retrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")
# on Redis Cluster a master failing over also answers CLUSTERDOWN/TRYAGAIN, or leaves a slot unmapped
LOST = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError, ClusterDownError, TryAgainError,
        RedisClusterException)
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0


def is_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis (or the slot's master) went away: ``LOST``, or a write on a
    connection the server closed as uvloop reports it (``resp.closed_transport``), which redis-py's
    own commands on a cluster node's pooled connection pass on untranslated."""
    return isinstance(exc, LOST) or closed_transport(exc)


class RedisOutage(NosqConnectionError):
    """Redis stayed unreachable longer than the manager's ``redis_outage_limit_s``."""


class RedisLink:
    """Whether this manager reaches Redis: shared by all its loops, one probe while lost."""

    def __init__(self, ping: Callable[[], Awaitable[object]], *, outage_limit_s: float | None = None,
                 describe: str = "Redis") -> None:
        self._ping = ping
        self._limit_s = outage_limit_s
        self._describe = describe
        self._up = asyncio.Event()
        self._up.set()
        self._probe: asyncio.Task[None] | None = None
        self.lost_since: float | None = None  # monotonic time the current outage began
        self.last_error = ""
        self.outages = 0  # outages seen since start
        self.failed: RedisOutage | None = None

    @property
    def reachable(self) -> bool:
        return self._up.is_set() and self.failed is None

    def problem(self) -> str | None:
        """Why Redis is not usable now (for ``/healthz``), or None."""
        if self.failed is not None:
            return str(self.failed)
        if self.lost_since is None:
            return None
        return (f"{self._describe} unreachable for {time.monotonic() - self.lost_since:.0f} s "
                f"({self.last_error}); waiting for it")

    def lost(self, exc: BaseException) -> None:
        """A call failed for want of Redis: start the probe if it is not running yet."""
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if not self._up.is_set():
            return
        self._up.clear()
        self.lost_since = time.monotonic()
        self.outages += 1
        log.warning("%s unreachable (%s); serving pauses until it answers", self._describe, self.last_error)
        self._probe = asyncio.create_task(self._wait_for_redis(), name="redis-probe")

    async def wait_up(self) -> None:
        """Until Redis answers again; :class:`RedisOutage` once the outage passes the limit."""
        await self._up.wait()
        if self.failed is not None:
            raise self.failed

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None

    async def _wait_for_redis(self) -> None:
        delay = FIRST_DELAY_S
        assert self.lost_since is not None
        while True:
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY_S, delay * 2)
            try:
                await self._ping()
            except Exception as exc:
                if not is_lost(exc):
                    raise
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                lasted = time.monotonic() - self.lost_since
                if self._limit_s is not None and lasted > self._limit_s:
                    self.failed = RedisOutage(
                        f"{self._describe} unreachable for {lasted:.0f} s, over the limit of {self._limit_s:.0f} s "
                        f"(--redis-outage-limit-s): stopping. Last error: {self.last_error}")
                    self._up.set()  # wake every waiter: each raises the failure
                    return
                continue
            log.warning("%s reachable again after %.1f s", self._describe, time.monotonic() - self.lost_since)
            self.lost_since = None
            self._up.set()
            return


async def retrying(op: Callable[[], Awaitable[T]], what: str, link: RedisLink) -> T:
    """``op()``, tried again each time Redis answers again after an outage."""
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_lost(exc):
                raise
            link.lost(exc)
            log.info("%s: waiting for Redis", what)
            await link.wait_up()


async def forever(loop: Callable[[], Awaitable[None]], what: str, link: RedisLink) -> None:
    """Run ``loop()`` to its end; if Redis drops, start it again once Redis answers."""
    while True:
        try:
            await loop()
            return
        except Exception as exc:
            if not is_lost(exc):
                raise
            link.lost(exc)
            log.info("%s: waiting for Redis to restart the loop", what)
            await link.wait_up()
