"""End-to-end figures of the manager core (issue 3), each beside its baseline, one run.

* noop throughput with concurrent producer processes (requests/s);
* MLP throughput end to end divided by direct in-process throughput of the same model at the
  same batch size, measured in the same run;
* noop latency at low load (one request in flight): p50 and p99.

Starts its own manager (``nosq serve`` as a subprocess, Ray on loopback) against the Redis
given by ``--redis-url`` (a dedicated db is flushed first), prints a table and writes JSON.

    python -m benchmarks.e2e --out benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.support import closed_loop_throughput
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer.aio import AsyncProducer
from nosq.producer.settings import RedisSettings

CONFIG = """
[[models]]
id = "noop"
factory = "nosq.workers.demo:noop"
device = "cpu"
max_batch = {noop_batch}
max_wait_ms = 2.0
num_cpus = 0.25
threads = 1

[[models]]
id = "mlp"
factory = "nosq.workers.demo:mlp"
device = "cpu"
max_batch = {mlp_batch}
max_wait_ms = 5.0
num_cpus = 0.5
threads = {mlp_threads}
"""


async def _latency(url: str, n: int) -> dict[str, float]:
    x = np.ones(8, dtype=np.float32)
    samples = []
    async with AsyncProducer(RedisSettings(url=url)) as producer:
        for _ in range(50):  # warm-up
            await producer.infer("noop", x, timeout_s=10)
        for _ in range(n):
            t0 = time.perf_counter()
            await producer.infer("noop", x, timeout_s=10)
            samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1],
            "mean_ms": statistics.fmean(samples)}


def direct_mlp(batch: int, threads: int, seconds: float) -> float:
    """The limit: the same model, same batch size, called in-process."""
    import torch

    from nosq.workers.demo import mlp

    torch.set_num_threads(threads)
    model = mlp()
    x = torch.ones(batch, 512)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        n = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--producers", type=int, default=2, help="producer processes for noop")
    parser.add_argument("--noop-batch", type=int, default=256)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--mlp-threads", type=int, default=1)
    parser.add_argument("--latency-n", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"))
    args = parser.parse_args()

    settings = RedisSettings(url=args.redis_url)
    settings.client().flushdb()
    config = Path(tempfile.mkdtemp()) / "bench.toml"
    config.write_text(CONFIG.format(noop_batch=args.noop_batch, mlp_batch=args.mlp_batch,
                                    mlp_threads=args.mlp_threads))
    process = start_manager(settings, "--config", str(config), "--log-level", "warning", consumer="bench")
    figures: dict[str, Any] = {"machine": "2-core CPU, no GPU", "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        figures["noop_latency"] = asyncio.run(_latency(args.redis_url, args.latency_n))
        figures["noop_req_per_s"] = closed_loop_throughput(args.redis_url, "noop", (8,), processes=args.producers,
                                               seconds=args.seconds, window=2048, chunk=256)
        figures["mlp_req_per_s"] = closed_loop_throughput(args.redis_url, "mlp", (512,), processes=1,
                                              seconds=args.seconds, window=4 * args.mlp_batch, chunk=args.mlp_batch)
    finally:
        status = stop_manager(process)
    figures["manager_exit_status"] = status
    figures["mlp_direct_items_per_s"] = direct_mlp(args.mlp_batch, args.mlp_threads, args.seconds / 2)
    figures["mlp_direct_2threads_items_per_s"] = direct_mlp(args.mlp_batch, 2, args.seconds / 2)
    figures["mlp_ratio"] = figures["mlp_req_per_s"] / figures["mlp_direct_items_per_s"]
    figures["mlp_ratio_vs_2threads"] = figures["mlp_req_per_s"] / figures["mlp_direct_2threads_items_per_s"]
    settings.client().flushdb()

    lat = figures["noop_latency"]
    print(f"{'figure':<44}{'nosq':>12}{'baseline':>12}{'ratio':>8}  goal")
    print(f"{'noop throughput (req/s)':<44}{figures['noop_req_per_s']:>12.0f}{'':>12}{'':>8}  >= 10,000")
    print(f"{'mlp throughput (items/s) vs direct, same b':<44}{figures['mlp_req_per_s']:>12.0f}"
          f"{figures['mlp_direct_items_per_s']:>12.0f}{figures['mlp_ratio']:>8.2f}  >= 0.8")
    print(f"{'  ... vs direct with 2 torch threads':<44}{figures['mlp_req_per_s']:>12.0f}"
          f"{figures['mlp_direct_2threads_items_per_s']:>12.0f}{figures['mlp_ratio_vs_2threads']:>8.2f}")
    print(f"{'noop latency, 1 in flight: p50 / p99 (ms)':<44}{lat['p50_ms']:>12.2f}{lat['p99_ms']:>12.2f}"
          f"{'':>8}  p50 <= 3")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
