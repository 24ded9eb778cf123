"""One replica fed through its shared-memory channel: items/s with one and two slots in flight
beside the model called directly, each stage's time, and a timeline of the overlap.

The replica (``nosq.workers.actor.ModelWorker``: model, staging buffers, channel server) runs in a
process of its own, as under Ray; this process plays the manager's part of the channel (no
Redis, no Ray), sending the same pre-encoded batch again and again on ``--slots`` connections.
With two slots, one batch's decode, copy and encode overlap the other's time in the model; the
timeline PNG shows it (one row per slot, one colour per stage).

    python -m benchmarks.overlap --model cnn --device cuda --batch 64 --out-dir OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nosq.producer.codec import encode_value
from nosq.workers.channel import ChannelClient
from nosq.workers.demo import demo_config_path
from nosq.workers.spec import ModelSpec, load_config

STAGES = ("decode", "wait", "model", "fetch", "encode")
COLOURS = {"decode": "tab:blue", "wait": "lightgrey", "model": "tab:red", "fetch": "tab:orange", "encode": "tab:green"}


def _replica(spec: ModelSpec, device: str, addresses: Any) -> None:
    from nosq.workers.actor import ModelWorker

    worker = ModelWorker(spec, device=device)
    addresses.put(worker.ready()["channel"])
    threading.Event().wait(3600)


def direct_items_per_s(spec: ModelSpec, device: str, batch: int, seconds: float) -> float:
    """The limit: the model on a batch already on its device, synchronised per call."""
    import torch

    from nosq.workers.runtime import ModelRuntime

    runtime = ModelRuntime(spec, device=device)
    x = torch.stack([runtime.example()] * batch).to(runtime.device)
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(5):
            runtime.model(x)
        sync()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            runtime.model(x)
            sync()
            done += batch
    return done / (time.perf_counter() - started)


async def _feed(address: str, slots: int, payloads: list[bytes], seconds: float) -> tuple[float, list[dict[str, Any]]]:
    clients = [await ChannelClient.connect(address) for _ in range(slots)]
    timeline: list[dict[str, Any]] = []
    done = 0
    stop_at = time.perf_counter() + seconds

    async def slot(index: int, client: ChannelClient) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            output = await client.run("forward", "msgpack", payloads)
            done += len(output)
            timeline.append({"slot": index, **output.stages})

    for client in clients:  # warm-up: staging buffers, segments, kernels
        await client.run("forward", "msgpack", payloads)
    started = time.perf_counter()
    await asyncio.gather(*(slot(i, c) for i, c in enumerate(clients)))
    rate = done / (time.perf_counter() - started)
    for client in clients:
        client.close()
    return rate, timeline


def plot(timeline: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = sorted(timeline, key=lambda row: row["at"])[-12:]
    origin = min(row["at"] for row in last)
    fig, ax = plt.subplots(figsize=(10, 2.6))
    for row in last:
        start = row["at"] - origin
        for stage in STAGES:
            width = row.get(stage, 0.0)
            ax.barh(row["slot"], width, left=start, color=COLOURS[stage], edgecolor="white", linewidth=0.3)
            start += width
    ax.set_yticks(sorted({row["slot"] for row in last}), [f"slot {s}" for s in sorted({row["slot"] for row in last})])
    ax.set_xlabel("ms")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[s]) for s in STAGES]
    ax.legend(handles, STAGES, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    spec = load_config(demo_config_path()).model(args.model)
    ctx = multiprocessing.get_context("spawn")
    addresses = ctx.Queue()
    replica = ctx.Process(target=_replica, args=(spec, args.device, addresses), daemon=True)
    replica.start()
    figures: dict[str, Any] = {"model": args.model, "device": args.device, "batch": args.batch}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        address = addresses.get(timeout=300)
        from nosq.workers.runtime import ModelRuntime

        example = ModelRuntime(spec, device="cpu").example().numpy()
        payloads = [encode_value("msgpack", example)] * args.batch
        figures["item_bytes"] = len(payloads[0])
        for slots in (1, 2):
            rate, timeline = asyncio.run(_feed(address, slots, payloads, args.seconds))
            figures[f"slots_{slots}"] = {
                "items_per_s": rate,
                "stage_ms_median": {s: statistics.median(r.get(s, 0.0) for r in timeline) for s in STAGES},
            }
            plot(timeline, args.out_dir / f"overlap-{args.model}-{args.device}-{slots}slot.png",
                 f"{args.model} on {args.device}, batch {args.batch}, {slots} slot(s): {rate:,.0f} items/s")
    finally:
        replica.kill()
        replica.join(10)
    figures["direct_items_per_s"] = direct_items_per_s(spec, args.device, args.batch, args.seconds)
    print(f"{args.model} on {args.device}, batch {args.batch} x {figures['item_bytes']} B")
    print(f"{'':<10}{'items/s':>10}{'/ direct':>10}   median ms: " + " ".join(f"{s:>7}" for s in STAGES))
    for slots in (1, 2):
        row = figures[f"slots_{slots}"]
        row["ratio_to_direct"] = row["items_per_s"] / figures["direct_items_per_s"]
        print(f"{slots} slot(s){row['items_per_s']:>11,.0f}{row['ratio_to_direct']:>10.2f}   " + " " * 11
              + " ".join(f"{row['stage_ms_median'][s]:>7.2f}" for s in STAGES))
    print(f"{'direct':<10}{figures['direct_items_per_s']:>10,.0f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"overlap-{args.model}-{args.device}.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
