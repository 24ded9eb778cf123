"""The queue past one Redis (issue 18): one model served through one plain Redis, through a Redis
Cluster of 3 masters (and 3 replicas) with the model on one stream, and with the model on 3
partitions, side by side in one run, as ratios to the plain Redis.

Each case is one item kind: ``noop`` (16 floats, 64 B: the request path's own cost), ``noop48k``
(12,288 floats, 48 KiB: payload bytes through Redis) or ``cnn`` (the demo CNN, 3x64x64 floats,
48 KiB; with ``--device cuda`` also called directly at the profiled batch size, for its limit).
``--managers`` manager processes (each with its private Ray, ``--replicas`` each) serve it, and
``--producers`` processes keep requests in flight (closed loop). Per layout it reports req/s,
payload MB/s, and each Redis master's CPU use over the measured window (``INFO cpu``): a master
near 100 % is what limits.

    python -m benchmarks.cluster --out benchmarks/results/cluster_cpu.json
    PATH=/path/to/redis/bin:$PATH python -m benchmarks.cluster --device cuda --cases noop48k,cnn \\
        --managers 3 --producers 8 --out benchmarks/results/cluster_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from benchmarks.scaling import WARMUP_S, chosen_batch, managers
from benchmarks.support import closed_loop_throughput, redis_url
from nosq.producer.settings import RedisSettings
from tests.rediscluster.redisnodes import redis_cluster

CASES: dict[str, tuple[str, tuple[int, ...]]] = {  # case -> (demo model, one item's shape)
    "noop": ("noop", (16,)),
    "noop48k": ("noop", (12288,)),
    "cnn": ("cnn", (3, 64, 64)),
}
LAYOUTS = ("single", "cluster-1p", "cluster-3p")  # plain Redis; 3 masters, the model on 1 or 3 streams
CLUSTER_PORT = 7300  # the cluster's nodes: 7300..7305 (and their bus ports, +10000)


@contextlib.contextmanager
def backend(layout: str, redis_server: str, replicas: int) -> Iterator[tuple[str, list[int]]]:
    """(URL, master ports) of a fresh Redis for one layout: a private plain server, or a
    cluster of 3 masters with ``replicas`` replicas each."""
    if layout == "single":
        with redis_url("redis://127.0.0.1:6379/0", redis_server) as url:
            yield url, [int(urlsplit(url).port or 6379)]
        return
    with redis_cluster(CLUSTER_PORT, replicas) as nodes:
        client = redis.Redis(port=nodes.ports[0])
        try:
            masters = sorted({int(row[2][1]) for row in client.execute_command("CLUSTER", "SLOTS")})
        finally:
            client.close()
        yield nodes.url, masters


def cpu_seconds(ports: list[int]) -> list[float]:
    """CPU seconds (user + sys, main thread and the rest) each server has used so far."""
    used = []
    for port in ports:
        client = redis.Redis(port=port)
        try:
            info: Any = client.info("cpu")
            used.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
        finally:
            client.close()
    return used


def config(case: str, args: argparse.Namespace, partitions: int) -> Path:
    model, _ = CASES[case]
    path = Path(tempfile.mkdtemp(prefix="nosq-cluster-")) / "serve.toml"
    path.write_text(f'[[models]]\nid = "{model}"\nfactory = "nosq.workers.demo:{model}"\ndevice = "{args.device}"\n'
                    f"replicas = {args.replicas}\nmax_batch = {args.max_batch}\nnum_cpus = {args.num_cpus}\n"
                    f"threads = {args.threads}\npartitions = {partitions}\n", encoding="utf-8")
    return path


def run(case: str, layout: str, args: argparse.Namespace) -> dict[str, Any]:
    model, shape = CASES[case]
    partitions = 3 if layout == "cluster-3p" else 1
    item_bytes = 4 * math.prod(shape)
    with backend(layout, args.redis_server, args.cluster_replicas) as (url, masters):
        settings = RedisSettings(url=url)
        started = time.perf_counter()
        with managers(settings, config(case, args, partitions), args.managers, args.device):
            ready_s = time.perf_counter() - started
            window = args.window or 4 * args.max_batch * args.managers * args.replicas
            closed_loop_throughput(url, model, shape, processes=args.producers, seconds=WARMUP_S,
                                   window=window, chunk=args.chunk)
            before, at = cpu_seconds(masters), time.perf_counter()
            rate = closed_loop_throughput(url, model, shape, processes=args.producers, seconds=args.seconds,
                                          window=window, chunk=args.chunk)
            after, elapsed = cpu_seconds(masters), time.perf_counter() - at
            batch = chosen_batch(settings, model)
    busy = [round((b - a) / elapsed, 3) for a, b in zip(before, after, strict=True)]
    row = {"case": case, "layout": layout, "partitions": partitions, "masters": len(masters),
           "req_per_s": round(rate, 1), "payload_mb_per_s": round(rate * item_bytes / 1e6, 1),
           "master_cpu": busy, "ready_s": round(ready_s, 1), "profiled_batch": batch}
    print(json.dumps(row), flush=True)
    return row


def direct(case: str, args: argparse.Namespace, batch: int) -> float:
    """Items/s of the model called in-process at ``batch`` (``benchmarks.scaling.direct``)."""
    from benchmarks.scaling import direct as scaling_direct

    model, shape = CASES[case]
    options = argparse.Namespace(model=model, device=args.device, max_batch=args.max_batch, max_wait_ms=2.0,
                                 num_cpus=args.num_cpus, latency_budget_ms=100.0, threads=args.threads,
                                 options="{}", shape=json.dumps(list(shape)))
    return scaling_direct(options, batch, args.seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="noop,noop48k", help=f"item kinds: {', '.join(CASES)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--managers", type=int, default=2, help="manager processes, each with its private Ray")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per manager")
    parser.add_argument("--producers", type=int, default=2, help="load processes")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--num-cpus", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window", type=int, default=0, help="requests in flight per producer (0: 4 x batch x actors)")
    parser.add_argument("--chunk", type=int, default=64, help="requests per submit_many")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--cluster-replicas", type=int, default=1, help="replicas per master (they take CPU too)")
    parser.add_argument("--redis-server", default="redis-server", help="the binary for the plain Redis")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cluster.json"))
    args = parser.parse_args()
    rows = [run(case, layout, args) for case in args.cases.split(",") for layout in args.layouts.split(",")]
    for row in rows:
        base = next((r for r in rows if r["case"] == row["case"] and r["layout"] == "single"), None)
        row["vs_single"] = round(row["req_per_s"] / base["req_per_s"], 2) if base and base["req_per_s"] else None
    directs = {}
    if args.device == "cuda":
        for case in {r["case"] for r in rows if CASES[r["case"]][0] != "noop"}:
            batch = max((r["profiled_batch"] or 0) for r in rows if r["case"] == case) or args.max_batch
            directs[case] = {"batch": batch, "items_per_s": round(direct(case, args, batch), 1)}
            for row in rows:
                if row["case"] == case:
                    row["vs_direct"] = round(row["req_per_s"] / directs[case]["items_per_s"], 3)
    print(f"\n{'case':<9} {'layout':<11} {'req/s':>9} {'MB/s':>8} {'x single':>8} {'x direct':>8}  master CPU")
    for row in rows:
        print(f"{row['case']:<9} {row['layout']:<11} {row['req_per_s']:>9.0f} {row['payload_mb_per_s']:>8.1f} "
              f"{row['vs_single'] or 0:>8.2f} {row.get('vs_direct', float('nan')):>8.3f}  {row['master_cpu']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "direct": directs, "rows": rows},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
