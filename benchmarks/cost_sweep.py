"""nosq / direct against the model's cost: where the request path stops mattering.

The demo transformer with a growing number of layers (the same 32 KiB items, more work per
item), each served by ``nosq serve`` (one replica, batch cap ``--batch``) and called directly in
this process at the same batch size, in the same run. Prints items/s of both and their ratio per
cost, and writes a PNG of the ratio against the model's own time per item: the cost above which
nosq reaches 0.9 x direct is where the curve crosses 0.9.

    python -m benchmarks.cost_sweep --device cuda --redis-server .dist/redis/usr/bin/redis-server
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import closed_loop_process, redis_url
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer.settings import RedisSettings

CONFIG = """
[[models]]
id = "t"
factory = "nosq.workers.demo:transformer"
device = "{device}"
max_batch = {batch}
max_wait_ms = 2.0
num_cpus = 1
options = {{ d_model = 256, nhead = 4, layers = {layers}, seq = 32 }}
input = {{ dtype = "float32", shape = [32, 256] }}
"""


def direct(device: str, layers: int, batch: int, seconds: float) -> float:
    """Items/s of the model on a batch already on its device, synchronised per call."""
    import torch

    from nosq.workers.demo import transformer

    model = transformer(layers=layers).to(device).eval()
    x = torch.randn(batch, 32, 256, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        sync()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            sync()
            done += batch
    return done / (time.perf_counter() - started)


def served(url: str, *, device: str, layers: int, batch: int, seconds: float, producers: int) -> float:
    config = Path(tempfile.mkdtemp()) / "sweep.toml"
    config.write_text(CONFIG.format(device=device, batch=batch, layers=layers))
    settings = RedisSettings(url=url)
    settings.client().flushdb()
    process = start_manager(settings, "--config", str(config), "--log-level", "warning", "--metrics-port", "-1",
                            "--no-profile-on-start", consumer="sweep")
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(producers) as pool:
            results = pool.map(closed_loop_process, [(url, "t", (32, 256), seconds, 4 * batch, batch)] * producers,
                               chunksize=1)
    finally:
        stop_manager(process)
    return sum(r[0] for r in results) / max(r[1] for r in results)


def plot(rows: list[dict[str, Any]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot([r["model_us_per_item"] for r in rows], [r["ratio"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"{r['layers']} layers", (r["model_us_per_item"], r["ratio"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("model time per item, us (direct, at the batch size)")
    ax.set_ylabel("nosq / direct (items/s)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"32 KiB items on {device}: the request path against the model's cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--redis-server", default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", default="2,8,32,128")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    with redis_url(args.redis_url, args.redis_server) as url:
        for layers in [int(x) for x in args.layers.split(",")]:
            limit = direct(args.device, layers, args.batch, args.seconds / 2)
            nosq = served(url, device=args.device, layers=layers, batch=args.batch, seconds=args.seconds,
                          producers=args.producers)
            row = {"layers": layers, "direct_items_per_s": limit, "nosq_items_per_s": nosq,
                   "ratio": nosq / limit, "model_us_per_item": 1e6 / limit}
            rows.append(row)
            print(f"{layers:>4} layers: direct {limit:>10,.0f}  nosq {nosq:>10,.0f}  ratio {row['ratio']:.2f}  "
                  f"model {row['model_us_per_item']:.1f} us/item", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"cost_sweep_{args.device}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out_dir / f"cost-sweep-{args.device}.png", args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
