"""Load generation from several processes, so one Python process is not the limit.

Two shapes, both measured over a window after a warm-up:

* closed loop: ``clients`` clients, each with exactly one request in flight;
* open loop: arrivals at ``rate`` per second (Poisson or evenly spaced), whatever the system
  does; latency runs from the *scheduled* arrival, so a generator or system that falls behind
  shows up as latency instead of silently lowering the offered load.

A ``LoadPool`` starts its processes once per system; each builds its client with the system's
``connect(params)`` (imported there by name, so a system's packages are imported only where it
runs), then runs the shapes the driver sends it. Each shard reports its latencies, the requests
completed in the window, errors, and its own CPU time over the window: a load process near one
whole core is the generator limiting the figure (``gen_cpu`` in the results).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Literal, Protocol

import numpy as np

from benchmarks.peers.models import input_items

__all__ = ["Client", "Closed", "LoadPool", "Open", "achieved_rate", "percentiles", "summarise"]

START_DELAY_S = 0.25  # between the driver's command and the synchronised start of every shard
READY_TIMEOUT_S = 180.0
GEN_BOUND_CPU = 0.9  # a load process using this much of a core is the bottleneck


class Client(Protocol):
    """A system's client inside a load process: ``call`` returns when the output has arrived."""

    async def call(self, model: str, x: np.ndarray) -> None: ...

    async def aclose(self) -> None: ...

    def extra(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Closed:
    model: str
    clients: int
    warmup_s: float
    seconds: float
    drain_s: float


@dataclass(frozen=True, slots=True)
class Open:
    model: str
    rate: float  # this shard's arrivals per second
    arrivals: Literal["poisson", "fixed"]
    phase_s: float  # this shard's offset, so evenly spaced shards interleave
    seed: int
    warmup_s: float
    seconds: float
    drain_s: float
    max_inflight: int


@dataclass(slots=True)
class Shard:
    """What one load process measured."""

    window_s: float
    latencies_ms: list[float] = field(default_factory=list)
    completed: int = 0  # finished inside the window
    sent: int = 0  # open loop: arrivals scheduled inside the window
    errors: int = 0
    first_error: str = ""
    cpu_s: float = 0.0  # this process's CPU time over the window
    lags_ms: list[float] = field(default_factory=list)  # open loop: actual send - scheduled send
    answered: list[tuple[float, float]] = field(default_factory=list)  # open loop: (scheduled, done) in window
    abandoned: int = 0  # still waiting when the drain time ran out
    shed: int = 0  # open loop: arrivals not sent because max_inflight were waiting
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {str(exc)[:300]}"


class LoadPool:
    """``processes`` load processes holding one client each of the system ``connect`` names."""

    def __init__(self, *, connect: str, params: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 processes: int) -> None:
        self.connect = connect  # "package.module:function"
        self.params = params
        self.shapes = shapes
        self.processes = processes
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> LoadPool:
        ctx = multiprocessing.get_context("spawn")
        for index in range(self.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_shard_main, args=(child, self.connect, self.params, self.shapes, index),
                               name=f"peers-load-{index}", daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            self._replies(READY_TIMEOUT_S, "connect")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, EOFError):
                conn.send(None)
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def closed(self, model: str, *, clients: int, warmup_s: float, seconds: float, drain_s: float) -> dict[str, Any]:
        """``clients`` clients (spread over the processes), one request in flight each."""
        used = min(self.processes, clients)
        shares = [clients // used + (1 if i < clients % used else 0) for i in range(used)]
        commands = [Closed(model, n, warmup_s, seconds, drain_s) for n in shares]
        return summarise(self._run(commands, seconds + warmup_s + drain_s))

    def open(self, model: str, *, rate: float, arrivals: Literal["poisson", "fixed"], warmup_s: float,
             seconds: float, drain_s: float, max_inflight: int, seed: int = 0) -> dict[str, Any]:
        """Arrivals at ``rate`` per second in all, split evenly over the processes."""
        used = self.processes
        commands = [Open(model, rate / used, arrivals, i / rate, seed * 1000 + i, warmup_s, seconds, drain_s,
                         max(1, max_inflight // used)) for i in range(used)]
        result = summarise(self._run(commands, seconds + warmup_s + drain_s))
        result["offered_per_s"] = rate
        return result

    def _run(self, commands: Sequence[Closed | Open], budget_s: float) -> list[Shard]:
        start = time.monotonic() + START_DELAY_S
        for conn, command in zip(self._conns, commands, strict=False):
            conn.send((start, command))
        return self._replies(START_DELAY_S + budget_s + 60.0, "run", len(commands))

    def _replies(self, timeout_s: float, what: str, count: int | None = None) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        out = []
        for index, conn in enumerate(self._conns[:count]):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"load process {index} did not answer ({what}) within {timeout_s:.0f} s")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"load process {index} failed ({what}): {value}")
            out.append(value)
        return out


def summarise(shards: Sequence[Shard]) -> dict[str, Any]:
    """One figure set from the shards of one run."""
    latencies = sorted(x for s in shards for x in s.latencies_ms)
    lags = sorted(x for s in shards for x in s.lags_ms)
    window = max(s.window_s for s in shards)
    cpu = [s.cpu_s / s.window_s for s in shards]
    extra: dict[str, Any] = {}
    for s in shards:
        for key, value in s.extra.items():
            extra.setdefault(key, []).append(value)
    result: dict[str, Any] = {
        "req_per_s": sum(s.completed for s in shards) / window,
        "n": len(latencies),
        "errors": sum(s.errors for s in shards),
        "first_error": next((s.first_error for s in shards if s.first_error), ""),
        "abandoned": sum(s.abandoned for s in shards),
        "shed": sum(s.shed for s in shards),
        "load_processes": len(shards),
        "gen_cpu": round(max(cpu), 3),
        "gen_bound": max(cpu) >= GEN_BOUND_CPU,
        **percentiles(latencies),
    }
    if any(s.sent for s in shards):
        result["sent_per_s"] = sum(s.sent for s in shards) / window
        result["lag_p99_ms"] = _pct(lags, 0.99) if lags else 0.0
        result["completed_in_window_per_s"] = result["req_per_s"]
        result["req_per_s"] = achieved_rate([a for s in shards for a in s.answered], window)
    if extra:
        result["extra"] = extra
    return result


def achieved_rate(answered: Sequence[tuple[float, float]], window_s: float) -> float:
    """Open loop: how fast the window's arrivals were answered, whenever that was.

    From ``(scheduled, done)`` pairs: the arrivals between the centre of the first fifth and the
    centre of the last fifth (by schedule) over the time between those fifths' median answer
    times. A system that keeps up answers them as fast as they came, however long each waits; a
    saturated one answers them at its own rate, its latency growing over the window. Medians
    make it robust to answers that come in bursts (arq's 0.5 s polls); answers inside the
    window would call a system with 0.5 s latency saturated in a 5 s window. Never more than
    the answered count over the window (unanswered arrivals lower it)."""
    n = len(answered)
    if n < 10:
        return n / window_s
    pairs = sorted(answered)
    k = n // 5
    first, last = pairs[:k], pairs[-k:]
    c1 = statistics.median(s for s, _ in first)
    c2 = statistics.median(s for s, _ in last)
    d1 = c1 + statistics.median(d - s for s, d in first)
    d2 = c2 + statistics.median(d - s for s, d in last)
    between = sum(1 for s, _ in pairs if c1 <= s <= c2)
    rate = between / (d2 - d1) if d2 > d1 else float("inf")
    return min(rate, n / window_s)


def percentiles(sorted_ms: Sequence[float]) -> dict[str, float | None]:
    if not sorted_ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    return {"p50_ms": _pct(sorted_ms, 0.5), "p90_ms": _pct(sorted_ms, 0.9), "p99_ms": _pct(sorted_ms, 0.99),
            "mean_ms": statistics.fmean(sorted_ms)}


def _pct(sorted_ms: Sequence[float], q: float) -> float:
    return float(sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))])


# -- inside a load process ----------------------------------------------------------------------


def _shard_main(conn: Connection, connect: str, params: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                index: int) -> None:
    asyncio.run(_shard(conn, connect, params, shapes, index))


async def _shard(conn: Connection, connect: str, params: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 index: int) -> None:
    module, _, name = connect.partition(":")
    try:
        client: Client = await getattr(importlib.import_module(module), name)(params)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    items = {model: input_items(shape, seed=index) for model, shape in shapes.items()}
    loop = asyncio.get_running_loop()
    try:
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            if message is None:
                return
            start, command = message
            try:
                if isinstance(command, Closed):
                    shard = await _closed(client, items[command.model], start, command)
                else:
                    shard = await _open(client, items[command.model], start, command)
                shard.extra = client.extra()
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                return
            conn.send(("ok", shard))
    finally:
        await client.aclose()


async def _cpu_over(shard: Shard, t0: float, t1: float) -> None:
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, t1 - time.monotonic()))
    shard.cpu_s = time.process_time() - before


async def _closed(client: Client, items: list[np.ndarray], start: float, cmd: Closed) -> Shard:
    t0 = start + cmd.warmup_s
    t1 = t0 + cmd.seconds
    shard = Shard(window_s=cmd.seconds)

    async def one_client(k: int) -> None:
        while (sent := time.monotonic()) < t1:
            try:
                await client.call(cmd.model, items[k % len(items)])
            except Exception as exc:  # recorded; this client stops so a failing system cannot spin
                shard.error(exc)
                return
            done = time.monotonic()
            k += 1
            if sent >= t0:
                shard.latencies_ms.append((done - sent) * 1000)
            if t0 <= done <= t1:
                shard.completed += 1

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu = asyncio.create_task(_cpu_over(shard, t0, t1))
    tasks = [asyncio.create_task(one_client(i)) for i in range(cmd.clients)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, t1 - time.monotonic()) + cmd.drain_s)
    for task in pending:
        task.cancel()
    shard.abandoned = len(pending)
    await asyncio.gather(cpu, *pending, return_exceptions=True)
    return shard


def _schedule(cmd: Open, start: float, t1: float) -> list[float]:
    rng = random.Random(cmd.seed)
    times = []
    t = start + cmd.phase_s
    while t < t1:
        times.append(t)
        t += rng.expovariate(cmd.rate) if cmd.arrivals == "poisson" else 1.0 / cmd.rate
    return times


async def _open(client: Client, items: list[np.ndarray], start: float, cmd: Open) -> Shard:
    t0 = start + cmd.warmup_s
    t1 = t0 + cmd.seconds
    shard = Shard(window_s=cmd.seconds)
    times = _schedule(cmd, start, t1)
    inflight: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, x: np.ndarray) -> None:
        sent = time.monotonic()
        try:
            await client.call(cmd.model, x)
        except Exception as exc:  # counted; an overloaded system's errors are part of its figures
            shard.error(exc)
            return
        done = time.monotonic()
        if scheduled >= t0:
            shard.latencies_ms.append((done - scheduled) * 1000)
            shard.lags_ms.append((sent - scheduled) * 1000)
            shard.answered.append((scheduled, done))
        if t0 <= done <= t1:
            shard.completed += 1

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu = asyncio.create_task(_cpu_over(shard, t0, t1))
    i = 0
    while i < len(times):
        now = time.monotonic()
        while i < len(times) and times[i] <= now:  # catch up on every arrival that is due
            if times[i] >= t0:
                shard.sent += 1
            if len(inflight) >= cmd.max_inflight:
                shard.shed += times[i] >= t0
            else:
                task = asyncio.create_task(one(times[i], items[i % len(items)]))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            i += 1
        if i < len(times):
            await asyncio.sleep(max(0.0, times[i] - time.monotonic()))
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=max(0.0, t1 - time.monotonic()) + cmd.drain_s)
        for task in pending:
            task.cancel()
        shard.abandoned = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    await cpu
    return shard
