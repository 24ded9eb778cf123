"""Scale-out figures (issue 8): nosq throughput with 1 and 2 replicas and with 1 and 2 managers,
side by side in one run, each as a ratio to one manager with one replica.

A layout ``MxR`` is M manager processes (``nosq serve``, each with its private Ray on loopback)
serving one model with R replicas each. On CUDA, a manager's replicas each take a whole GPU;
with M > 1 each manager sees one GPU (``CUDA_VISIBLE_DEVICES``), one manager per GPU. The load
comes from ``--producers`` processes in a closed loop; the model is also run in-process
("direct") at the batch size the manager's profile chose, on one device, for the limit.

    python -m benchmarks.scaling --out benchmarks/results/scaling_cpu.json
    python -m benchmarks.scaling --device cuda --model transformer --layouts 1x1,1x2,2x1 \\
        --options '{"d_model": 1024, "nhead": 16, "layers": 24, "seq": 8}' --max-batch 256 \\
        --redis-server /path/to/redis-server --out benchmarks/results/scaling_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.support import closed_loop_throughput, redis_url
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.manager.profiles.store import decode
from nosq.producer import keys
from nosq.producer.settings import RedisSettings
from nosq.workers.spec import ModelSpec

WARMUP_S = 3.0


def parse_layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for item in text.split(","):
        managers, _, replicas = item.strip().partition("x")
        layouts.append((int(managers), int(replicas)))
    return layouts


def model_spec(args: argparse.Namespace, replicas: int) -> ModelSpec:
    return ModelSpec(id=args.model, factory=f"nosq.workers.demo:{args.model}", device=args.device, replicas=replicas,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, num_cpus=args.num_cpus,
                     latency_budget_ms=args.latency_budget_ms,
                     threads=args.threads, options=json.loads(args.options))


def model_config(args: argparse.Namespace, replicas: int) -> str:
    spec = model_spec(args, replicas)
    return "[[models]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in spec.model_dump(
        include={"id", "factory", "device", "replicas", "max_batch", "max_wait_ms", "latency_budget_ms",
                 "num_cpus", "threads"}).items()
        if v is not None) + ("options = " + _toml_table(spec.options) + "\n" if spec.options else "")


def _toml_table(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


@contextlib.contextmanager
def managers(settings: RedisSettings, config: Path, count: int, device: str) -> Iterator[list[Any]]:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            env = {"CUDA_VISIBLE_DEVICES": str(i)} if device == "cuda" and count > 1 else None
            processes.append(start_manager(settings, "--config", str(config), "--log-level", "warning",
                                           "--metrics-port", "-1", consumer=f"scale-{i}", env=env))
        yield processes
    finally:
        for process in processes:
            stop_manager(process)


def chosen_batch(settings: RedisSettings, model: str) -> int | None:
    """b* from the profile the manager stored (None without one)."""
    client = settings.client()
    try:
        for key in client.scan_iter(match=keys.registry_profile(model, "*", "*"), count=100):
            data: Any = client.get(key)
            if data is not None:
                return decode(data).best_batch
    finally:
        client.close()
    return None


def direct(args: argparse.Namespace, batch: int, seconds: float) -> float:
    """Items per second of the model called in-process on one device at ``batch``: inputs arrive
    and results leave on the host, as served (``benchmarks.peers.direct``)."""
    import torch

    from benchmarks.peers.direct import time_batches
    from benchmarks.peers.models import build_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    model = build_model(model_spec(args, 1), str(device))
    host = torch.stack([model.example_input()] * batch)
    time_batches(model, host, device, 0.5)  # warm-up
    times = time_batches(model, host, device, seconds)
    return batch * len(times) / sum(times)


def run_layout(args: argparse.Namespace, url: str, managers_n: int, replicas: int) -> dict[str, Any]:
    settings = RedisSettings(url=url)
    config = Path(tempfile.mkdtemp(prefix="nosq-scale-")) / "scale.toml"
    config.write_text(model_config(args, replicas))
    shape = tuple(json.loads(args.shape))
    window = args.window or 4 * args.max_batch * managers_n * replicas
    started = time.perf_counter()
    with managers(settings, config, managers_n, args.device):
        ready_s = time.perf_counter() - started
        closed_loop_throughput(url, args.model, shape, processes=args.producers, seconds=WARMUP_S,
                               window=window, chunk=args.chunk)
        rate = closed_loop_throughput(url, args.model, shape, processes=args.producers, seconds=args.seconds,
                                      window=window, chunk=args.chunk)
        batch = chosen_batch(settings, args.model)
    return {"managers": managers_n, "replicas_per_manager": replicas, "actors": managers_n * replicas,
            "req_per_s": rate, "ready_s": ready_s, "profiled_batch": batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="mlp", help="a demo model: noop, mlp, cnn, transformer")
    parser.add_argument("--options", default="{}", help="the demo model's options as JSON")
    parser.add_argument("--shape", default=None, help="one input item's shape as JSON (default: the model's)")
    parser.add_argument("--layouts", default="1x1,1x2,2x1", help="MxR: M managers with R replicas each")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--latency-budget-ms", type=float, default=100.0, help="the spec's: caps b* by latency")
    parser.add_argument("--num-cpus", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--producers", type=int, default=2, help="load processes")
    parser.add_argument("--window", type=int, default=0, help="requests in flight per producer (0: 4 x batch x actors)")
    parser.add_argument("--chunk", type=int, default=256, help="requests per submit_many")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--redis-server", default=None, help="start this redis-server binary for the run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    args = parser.parse_args()
    if args.shape is None:
        from nosq.workers import demo

        args.shape = json.dumps(list(getattr(demo, args.model)(**json.loads(args.options)).example_input().shape))

    rows = []
    with redis_url(args.redis_url, args.redis_server) as url:
        RedisSettings(url=url).client().flushdb()  # stored profiles stay between layouts
        for managers_n, replicas in parse_layouts(args.layouts):
            row = run_layout(args, url, managers_n, replicas)
            rows.append(row)
            print(f"{managers_n}x{replicas}: {row['req_per_s']:,.0f} req/s (b* {row['profiled_batch']})", flush=True)
    batch = next((r["profiled_batch"] for r in rows if r["profiled_batch"]), args.max_batch)
    limit = direct(args, batch, min(args.seconds, 5.0))
    base = rows[0]["req_per_s"]
    print(f"\n{args.model} on {args.device}; direct in-process on one device at b={batch}: {limit:,.0f} items/s")
    print(f"{'managers':>9}{'replicas':>9}{'actors':>7}{'req/s':>12}{'vs 1st':>8}{'vs direct':>10}")
    for row in rows:
        row["ratio_vs_first"] = row["req_per_s"] / base
        row["ratio_vs_direct_one_device"] = row["req_per_s"] / limit
        print(f"{row['managers']:>9}{row['replicas_per_manager']:>9}{row['actors']:>7}{row['req_per_s']:>12,.0f}"
              f"{row['ratio_vs_first']:>8.2f}{row['ratio_vs_direct_one_device']:>10.2f}")
    figures = {"args": {k: str(v) for k, v in vars(args).items()}, "direct_items_per_s": limit,
               "direct_batch": batch, "layouts": rows, "cards": _cards(args.device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")
    return 0


def _cards(device: str) -> list[str]:
    if device != "cuda":
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


if __name__ == "__main__":
    sys.exit(main())
