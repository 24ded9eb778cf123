"""Enqueue throughput of the producer, beside redis-benchmark's XADD on the same Redis, one run.

Small requests (``{"x": [1, 2, 3]}``) are enqueued with ``Producer.submit_many`` and
``AsyncProducer.submit_many`` in batches into a dedicated db (flushed before and after), and
``redis-benchmark -P 16 XADD`` gives the server's own ceiling for the same command on the same
machine. A plain redis-py pipeline of XADDs (no validation, no admission script) shows how much
of the gap is redis-py itself. Prints a table and writes JSON.

    python benchmarks/producer_bench.py --n 200000 --batch 1000 --out benchmarks/results/producer.json

(Not ``benchmarks/producer.py``: a script run as a file puts its folder first on ``sys.path``,
so a file of that name would shadow the ``producer`` package for every script in this folder.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from nosq.producer import AsyncProducer, Producer, RedisSettings, keys

MODEL = "bench"
PAYLOAD: dict[str, Any] = {"x": [1, 2, 3]}
GOAL_PER_S = 30_000
RATE_RE = re.compile(r"([\d.]+) requests per second")


@dataclass
class Row:
    name: str
    requests: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


def batches(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


def run_sync(settings: RedisSettings, n: int, batch: int) -> Row:
    with Producer(settings) as producer:
        started = time.perf_counter()
        for size in batches(n, batch):
            producer.submit_many(MODEL, [PAYLOAD] * size)
        elapsed = time.perf_counter() - started
    return Row("Producer.submit_many (sync)", n, elapsed)


async def run_async(settings: RedisSettings, n: int, batch: int, concurrency: int) -> Row:
    async with AsyncProducer(settings) as producer:
        pending: set[asyncio.Task[Any]] = set()
        started = time.perf_counter()
        for size in batches(n, batch):
            if len(pending) >= concurrency:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.create_task(producer.submit_many(MODEL, [PAYLOAD] * size)))
        for task in pending:
            await task
        elapsed = time.perf_counter() - started
    label = "AsyncProducer.submit_many" + (f" ({concurrency} in flight)" if concurrency > 1 else "")
    return Row(label, n, elapsed)


def run_raw_pipeline(settings: RedisSettings, n: int, batch: int) -> Row:
    """The redis-py floor: XADD of the same entry shape, no validation, no admission script."""
    client = settings.client()
    fields = {"v": 1, "id": "0" * 32, "ct": "msgpack", "p": b"\x81\xa1x\x93\x01\x02\x03", "reply": "0" * 32}
    started = time.perf_counter()
    for size in batches(n, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.xadd(keys.requests(MODEL), fields)
        pipe.execute()
    elapsed = time.perf_counter() - started
    client.close()
    return Row("redis-py pipelined XADD (floor)", n, elapsed)


def run_redis_benchmark(url: str, db: int, n: int) -> tuple[Row | None, list[str]]:
    parsed = urlparse(url)
    binary = shutil.which("redis-benchmark")
    command = [binary or "redis-benchmark", "-h", parsed.hostname or "127.0.0.1",
               "-p", str(parsed.port or 6379), "--dbnum", str(db), "-P", "16", "-n", str(n), "-q",
               "XADD", "nosq:bench:redis-benchmark", "*", "f", "v"]
    if binary is None:
        print("redis-benchmark is not installed: skipping the baseline", file=sys.stderr)
        return None, command
    env = {**os.environ, "REDISCLI_AUTH": parsed.password} if parsed.password else None
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    rates = RATE_RE.findall(output)
    if not rates:
        raise RuntimeError(f"no 'requests per second' in redis-benchmark's output: {output!r}")
    per_s = float(rates[-1])
    return Row("redis-benchmark -P 16 XADD", n, n / per_s), command


def check_count(client: redis.Redis, stream: str, expected: int) -> None:
    length = client.xlen(stream)
    if length != expected:
        raise RuntimeError(f"{stream} holds {length} entries after the run, expected {expected}")
    client.delete(stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="requests per measurement")
    parser.add_argument("--batch", type=int, default=1000, help="requests per submit_many call")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="submit_many calls in flight for the extra async row (1 = skip it)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="Redis, without a db")
    parser.add_argument("--db", type=int, default=14,
                        help="dedicated db, flushed before and after (tests use 9, manager tests 10, e2e 12)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/producer.json"))
    args = parser.parse_args(argv)
    if args.db == 0:
        parser.error("--db 0 is where real data lives: pick a dedicated db (default 14)")
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be >= 1")

    url = args.redis_url.rstrip("/")
    settings = RedisSettings(url=f"{url}/{args.db}")  # the URL's db wins over db= in redis-py
    client = settings.client()
    client.flushdb()
    stream = keys.requests(MODEL)
    rows: list[Row] = []
    try:
        rows.append(run_sync(settings, args.n, args.batch))
        check_count(client, stream, args.n)
        rows.append(asyncio.run(run_async(settings, args.n, args.batch, 1)))
        check_count(client, stream, args.n)
        if args.concurrency > 1:
            rows.append(asyncio.run(run_async(settings, args.n, args.batch, args.concurrency)))
            check_count(client, stream, args.n)
        rows.append(run_raw_pipeline(settings, args.n, args.batch))
        check_count(client, stream, args.n)
        baseline, command = run_redis_benchmark(url, args.db, args.n)
        redis_version = client.info("server")["redis_version"]
    finally:
        client.flushdb()
        client.close()

    print(f"{'what':<44} {'requests':>9} {'seconds':>8} {'req/s':>10} {'/ redis-benchmark':>18}")
    for row in [*rows, *([baseline] if baseline else [])]:
        ratio = f"{row.per_s / baseline.per_s:.3f}" if baseline else "-"
        print(f"{row.name:<44} {row.requests:>9} {row.seconds:>8.2f} {row.per_s:>10,.0f} {ratio:>18}")
    producer_rows = [row for row in rows if "Producer" in row.name]
    goal_met = {row.name: row.per_s >= GOAL_PER_S for row in producer_rows}
    print(f"goal >= {GOAL_PER_S:,} requests/s from one Python process: "
          + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in goal_met.items()))

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_server": redis_version,
        "cpus": os.cpu_count(),
        "n": args.n,
        "batch": args.batch,
        "payload": PAYLOAD,
        "rows": [{**asdict(row), "per_s": row.per_s} for row in rows],
        "redis_benchmark": ({**asdict(baseline), "per_s": baseline.per_s, "command": command}
                            if baseline else None),
        "ratio_to_redis_benchmark": ({row.name: row.per_s / baseline.per_s for row in rows}
                                     if baseline else None),
        "goal_per_s": GOAL_PER_S,
        "goal_met": goal_met,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
