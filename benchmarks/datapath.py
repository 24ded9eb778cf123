"""The data path against the ceiling of Redis itself, per item size, with CPU per request.

For each item size (the encoded payload of one request, a float32 tensor):

* **ceiling**: what Redis does with the same bytes when a raw redis-py/hiredis loop does
  exactly what one request needs: ``XADD`` (producer process), ``XREADGROUP`` + ``SET`` of a
  result of the same size + ``XACK`` (consumer process), pipelined, closed loop;
* **nosq**: the ``noop`` model served by ``nosq serve`` (one manager, one replica), closed-loop
  ``AsyncProducer`` processes; each request's result is the same tensor back.

Both print requests/s and MB/s (payload in + result out), and the CPU each process spent per
request, in microseconds, from its CPU time over the window: client(s), manager, actor(s),
Redis, and Ray's own processes. The CPU per request is the number to drive down.

    python -m benchmarks.datapath --out benchmarks/results/datapath_cpu.json
    python -m benchmarks.datapath --device cuda --redis-server .dist/redis/usr/bin/redis-server ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis

from benchmarks.support import closed_loop_process, redis_url
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer.codec import encode_value
from nosq.producer.settings import RedisSettings
from tests.procs import descendants

SIZES = (64, 4096, 48 * 1024, 512 * 1024)
TICK = os.sysconf("SC_CLK_TCK")
CONFIG = """
[[models]]
id = "noop"
factory = "nosq.workers.demo:noop"
device = "{device}"
max_batch = {max_batch}
max_wait_ms = 1.0
num_cpus = 0.25
threads = 1
"""


def elements_for(size: int) -> int:
    """float32 elements whose msgpack tensor encoding is about ``size`` bytes."""
    header = len(encode_value("msgpack", np.zeros(1, np.float32))) - 4
    return max(1, (size - header) // 4)


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def redis_pid(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


class CpuMeter:
    """CPU seconds of named groups of processes between ``start`` and ``stop``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[int, float] = {}
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self._before = {pid: cpu_s(pid) for pids in self.groups.values() for pid in pids}

    def stop(self) -> dict[str, float]:
        self.seconds = {name: sum(cpu_s(pid) - self._before.get(pid, 0.0) for pid in pids)
                        for name, pids in self.groups.items()}
        return self.seconds


# -- the ceiling: a raw loop over Redis --------------------------------------------------------------


def _raw_producer(url: str, stream: str, counter: str, payload: bytes, *, seconds: float, window: int,
                  chunk: int, queue: Any) -> None:
    client = redis.Redis.from_url(url)
    sent = 0
    start = time.perf_counter()
    usage = os.times()
    while time.perf_counter() - start < seconds:
        done = int(client.get(counter) or 0)
        if sent - done + chunk > window:
            time.sleep(0.0002)  # a raw loop: nothing to wait on but the counter
            continue
        pipe = client.pipeline(transaction=False)
        for _ in range(chunk):
            pipe.xadd(stream, {"p": payload})
        pipe.execute()
        sent += chunk
    while int(client.get(counter) or 0) < sent and time.perf_counter() - start < seconds + 30:
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    used = os.times()
    queue.put((sent, elapsed, used.user + used.system - usage.user - usage.system))
    client.close()


def _raw_consumer(url: str, stream: str, counter: str, result: bytes, *, stop_at: float, queue: Any) -> None:
    client = redis.Redis.from_url(url)
    usage = os.times()
    served = 0
    while time.monotonic() < stop_at:
        response: Any = client.xreadgroup("g", "c", {stream: ">"}, count=256, block=100)
        if not response:
            continue
        entries = response[0][1]
        pipe = client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.set(b"res:" + entry_id, result, ex=60)
        pipe.xack(stream, "g", *[eid for eid, _ in entries])
        pipe.incrby(counter, len(entries))
        pipe.execute()
        served += len(entries)
    used = os.times()
    queue.put(("consumer", served, used.user + used.system - usage.user - usage.system))
    client.close()


def raw_ceiling(url: str, size: int, seconds: float) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    stream, counter = "ceiling:req", "ceiling:done"
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    payload = encode_value("msgpack", np.zeros(elements_for(size), np.float32))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    pid = redis_pid(url)
    before = cpu_s(pid)
    consumer = ctx.Process(target=_raw_consumer, args=(url, stream, counter, payload),
                           kwargs={"stop_at": time.monotonic() + seconds + 40, "queue": queue})
    consumer.start()
    time.sleep(0.5)
    producer = ctx.Process(target=_raw_producer, args=(url, stream, counter, payload),
                           kwargs={"seconds": seconds, "window": 2048, "chunk": 128, "queue": queue})
    producer.start()
    sent, elapsed, producer_cpu = queue.get(timeout=seconds + 60)
    producer.join()
    redis_cpu = cpu_s(pid) - before
    consumer.terminate()
    consumer.join()
    client.flushdb()
    client.close()
    rate = sent / elapsed
    return {"req_per_s": rate, "mb_per_s": rate * 2 * len(payload) / 1e6, "payload_bytes": len(payload),
            "cpu_us_per_req": {"client": 1e6 * producer_cpu / sent, "redis": 1e6 * redis_cpu / sent}}


# -- nosq -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def manager(url: str, device: str, max_batch: int, extra: list[str]) -> Iterator[int]:
    config = Path(tempfile.mkdtemp()) / "datapath.toml"
    config.write_text(CONFIG.format(device=device, max_batch=max_batch))
    settings = RedisSettings(url=url)
    settings.client().flushdb()
    process = start_manager(settings, "--config", str(config), "--log-level", "warning", "--metrics-port", "-1",
                            "--no-profile-on-start", *extra, consumer="datapath")
    try:
        yield process.pid
    finally:
        stop_manager(process)


def nosq_run(url: str, manager_pid: int, size: int, *, seconds: float, producers: int, window: int,
             chunk: int) -> dict[str, Any]:
    shape = (elements_for(size),)
    family = descendants(manager_pid)
    actors = [pid for pid, cmd in family.items() if cmd.startswith("ray::ModelWorker")]
    ray_other = [pid for pid in family if pid not in actors]
    meter = CpuMeter({"manager": [manager_pid], "actor": actors, "redis": [redis_pid(url)], "ray": ray_other})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(producers) as pool:
        pending = pool.map_async(closed_loop_process, [(url, "noop", shape, seconds, window, chunk)] * producers)
        time.sleep(1.0)  # the producers' start-up and warm-up are not measured on the server side
        meter.start()
        results = pending.get(timeout=seconds + 300)
        seconds_used = meter.stop()
    done = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    payload = len(encode_value("msgpack", np.zeros(shape, np.float32)))
    rate = done / elapsed
    cpu = {"client": 1e6 * sum(r[2] for r in results) / done}
    cpu.update({name: 1e6 * s / (rate * min(elapsed, seconds)) for name, s in seconds_used.items()})
    return {"req_per_s": rate, "mb_per_s": rate * 2 * payload / 1e6, "payload_bytes": payload,
            "cpu_us_per_req": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--redis-server", default=None, help="start a private redis-server (binary) for the run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="item sizes in bytes")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--window", type=int, default=2048, help="requests in flight per producer")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--manager-arg", action="append", default=[], help="extra `nosq serve` argument")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/datapath_cpu.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
                               "sizes": {}}
    with redis_url(args.redis_url, args.redis_server) as url:
        for size in sizes:
            figures["sizes"][size] = {"ceiling": raw_ceiling(url, size, args.seconds)}
        with manager(url, args.device, args.max_batch, args.manager_arg) as pid:
            for size in sizes:
                window = args.window if size <= 64 * 1024 else max(args.chunk, args.window // 8)
                figures["sizes"][size]["nosq"] = nosq_run(url, pid, size, seconds=args.seconds,
                                                          producers=args.producers, window=window,
                                                          chunk=min(args.chunk, window))
    print(f"{'item':>8} {'ceiling req/s':>14} {'MB/s':>8} {'nosq req/s':>11} {'MB/s':>8} {'ratio':>6}   "
          "nosq CPU us/req: client manager actor redis ray | ceiling: client redis")
    for size, row in figures["sizes"].items():
        ceiling, nosq = row["ceiling"], row["nosq"]
        row["ratio"] = nosq["req_per_s"] / ceiling["req_per_s"]
        c, r = nosq["cpu_us_per_req"], ceiling["cpu_us_per_req"]
        print(f"{size:>8} {ceiling['req_per_s']:>14.0f} {ceiling['mb_per_s']:>8.0f} {nosq['req_per_s']:>11.0f} "
              f"{nosq['mb_per_s']:>8.0f} {row['ratio']:>6.2f}   {c['client']:>6.0f} {c['manager']:>7.0f} "
              f"{c['actor']:>5.0f} {c['redis']:>5.0f} {c['ray']:>4.0f} | {r['client']:>6.0f} {r['redis']:>5.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
