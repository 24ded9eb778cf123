"""What several benchmarks share: a private Redis server, a free port, closed-loop load.

A GPU machine has no Redis: ``--redis-server PATH`` starts one on a free loopback port for the
run (nothing kept on disk) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import redis

from nosq.producer.aio import AsyncProducer
from nosq.producer.settings import RedisSettings

__all__ = ["closed_loop", "closed_loop_process", "closed_loop_throughput", "free_port", "redis_url"]

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_url(url: str, server: str | None) -> Iterator[str]:
    """``url`` as it is, or, with ``server`` (a redis-server binary, or its name on PATH), the URL
    of a private server started on a free loopback port, with ``url``'s db number."""
    if server is None:
        yield url
        return
    binary = shutil.which(server) or server
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="nosq-bench-redis-")
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    db = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0)
    private = f"redis://127.0.0.1:{port}/{db}"
    client = redis.Redis.from_url(private)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{binary} did not answer on port {port}") from None
                time.sleep(0.05)  # a process starting: nothing to wait on
        print(f"redis-server {binary} on {private}", flush=True)
        yield private
    finally:
        client.close()
        process.terminate()
        process.wait(10)


async def closed_loop(url: str, model: str, shape: tuple[int, ...], *, seconds: float, window: int,
                      chunk: int) -> tuple[int, float, float]:
    """Keep ``window`` requests in flight, submitted ``chunk`` at a time, for ``seconds`` (after a
    short warm-up); return (answered, elapsed s, this process's CPU s meanwhile)."""
    x = np.ones(shape, dtype=np.float32)
    done = 0
    async with AsyncProducer(RedisSettings(url=url)) as producer:
        for _ in range(3):  # warm-up
            await producer.gather(await producer.submit_many(model, [x] * chunk), timeout_s=60)
        usage = os.times()
        started = time.perf_counter()
        stop_at = started + seconds
        inflight: set[asyncio.Future[list[Any]]] = set()
        while time.perf_counter() < stop_at or inflight:
            while time.perf_counter() < stop_at and len(inflight) * chunk < window:
                handles = await producer.submit_many(model, [x] * chunk)
                inflight.add(asyncio.ensure_future(producer.gather(handles, timeout_s=120)))
            finished, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            done += sum(len(task.result()) for task in finished)
        elapsed = time.perf_counter() - started
        used = os.times()
    return done, elapsed, used.user + used.system - usage.user - usage.system


def closed_loop_process(args: tuple[Any, ...]) -> tuple[int, float, float]:
    """:func:`closed_loop` in a process of its own: (url, model, shape, seconds, window, chunk)."""
    url, model, shape, seconds, window, chunk = args
    return asyncio.run(closed_loop(url, model, shape, seconds=seconds, window=window, chunk=chunk))


def closed_loop_throughput(url: str, model: str, shape: tuple[int, ...], *, processes: int, seconds: float,
                           window: int, chunk: int) -> float:
    """Requests per second answered with ``processes`` producer processes, each keeping ``window``
    requests in flight (submitted ``chunk`` at a time) for ``seconds``."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.map(closed_loop_process, [(url, model, shape, seconds, window, chunk)] * processes)
    done = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    return done / elapsed
