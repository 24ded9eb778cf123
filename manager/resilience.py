"""Riding out a lost Redis connection: a restart of Redis costs a pause, never the manager.

redis-py retries a command that fails on an open connection, but not the connect itself; while
Redis is down every call raises ``ConnectionError``. The manager's loops run under ``forever``
(restarted after a backoff) and writes go through ``retrying`` (writes are idempotent: SET NX,
XACK, XDEL), both bounded by the manager's ``reconnect_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis

__all__ = ["LOST", "forever", "retrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")
LOST = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0


async def retrying(op: Callable[[], Awaitable[T]], what: str, budget_s: float) -> T:
    """``op()``, tried again with backoff while Redis is unreachable, for up to ``budget_s``."""
    deadline = time.monotonic() + budget_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return await op()
        except LOST as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY_S, delay * 2)


async def forever(loop: Callable[[], Awaitable[None]], what: str, budget_s: float) -> None:
    """Run ``loop()`` to its end; if Redis drops, start it again after a backoff. A connection
    that stays lost for longer than ``budget_s`` ends it with the error (the manager stops)."""
    delay = FIRST_DELAY_S
    lost_since: float | None = None
    while True:
        try:
            await loop()
            return
        except LOST as exc:
            now = time.monotonic()
            lost_since = lost_since if lost_since is not None and now - lost_since < budget_s + 10 else now
            if now - lost_since > budget_s:
                raise
            log.warning("%s: Redis unreachable (%s); restarting it in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY_S, delay * 2)
