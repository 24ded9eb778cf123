"""GPU verification of placement and eviction (issue 5), on a machine with CUDA and Ray.

1. Packing: the demo models are profiled for their measured bytes (weights, and the peak of
   one batch at their cap), given ``num_gpus`` = bytes / device bytes rounded UP (never 0),
   bin-packed over the node's GPUs, and started together as Ray actors; each reports the
   device it landed on.
2. Load/evict cycles: ``--cycles`` times, load a model actor on the GPU (build + one batch),
   kill it the way the manager evicts (``ray.kill``), and read the device's free memory
   (``torch.cuda.mem_get_info`` from this driver process, which holds no CUDA tensors): it must
   come back to the baseline each time, with no growth.

    python benchmarks/gpu_eviction.py --cycles 50 --out results/gpu_eviction.json

Ray is kept on loopback. Writes every figure to JSON and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch

from nosq.manager.memory.placement import gpu_fraction, pack
from nosq.manager.runtime import raycluster
from nosq.workers.actor import ModelWorker
from nosq.workers.demo import demo_config_path
from nosq.workers.spec import load_config

SETTLE_S = 0.5  # the driver's view of free memory after a process exits


def free_bytes(device: int) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def measure(spec: Any) -> dict[str, Any]:
    """Weights and one full batch's peak, measured by the model's own actor on the GPU."""
    actor = ray.remote(ModelWorker).options(num_gpus=1, max_restarts=0).remote(spec)
    info = ray.get(actor.ready.remote())
    row = ray.get(actor.profile_one.remote(min(spec.max_batch, 64)))
    ray.kill(actor, no_restart=True)
    return {"weights_bytes": int(info["weights_bytes"]), "batch": row}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_eviction.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this verification needs a GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    raycluster.connect(None, os.cpu_count() or 4)
    gpus = torch.cuda.device_count()
    totals = [torch.cuda.get_device_properties(i).total_memory for i in range(gpus)]
    config = load_config(demo_config_path())
    specs = {s.id: s.model_copy(update={"device": "cuda"}) for s in config.models}
    figures: dict[str, Any] = {"cards": [torch.cuda.get_device_name(i) for i in range(gpus)],
                               "device_bytes": totals}

    measured = {model: measure(spec) for model, spec in specs.items()}
    nbytes = {}
    for model, m in measured.items():
        peak = int(m["batch"].get("memory_bytes") or 0)
        nbytes[model] = m["weights_bytes"] + peak
    packing = pack(nbytes, totals)
    actors = {}
    for model, spec in specs.items():
        fraction = packing.num_gpus[model]
        actors[model] = ray.remote(ModelWorker).options(num_gpus=fraction, max_restarts=0).remote(spec)
    placed = {model: ray.get(actor.ready.remote()) for model, actor in actors.items()}
    figures["packing"] = {
        model: {"measured_bytes": nbytes[model], "num_gpus": packing.num_gpus[model],
                "gpu_index_planned": packing.gpu[model], "device": placed[model].get("device"),
                "weights_bytes": measured[model]["weights_bytes"],
                "batch_peak_bytes": measured[model]["batch"].get("memory_bytes"),
                "gpu_fraction_unpacked": gpu_fraction(nbytes[model], totals[0])}
        for model in specs
    }
    for actor in actors.values():
        ray.kill(actor, no_restart=True)
    time.sleep(2)

    figures.update(cycle(specs, packing.num_gpus, args.cycles))
    raycluster.disconnect()
    report(figures, args.cycles)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")
    return 0 if figures["max_shortfall_mib"] < 64 else 1


def cycle(specs: dict[str, Any], num_gpus: dict[str, float], cycles_n: int) -> dict[str, Any]:
    """Load and evict models ``cycles_n`` times; free memory after each eviction vs baseline."""
    baseline = free_bytes(0)
    cycles = []
    model_ids = [m for m in specs if m != "noop"]
    for i in range(cycles_n):
        model = model_ids[i % len(model_ids)]
        actor = ray.remote(ModelWorker).options(num_gpus=num_gpus[model], max_restarts=0).remote(specs[model])
        ray.get(actor.ready.remote())
        ray.get(actor.profile_one.remote(8))
        loaded = free_bytes(0)
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 20
        after = free_bytes(0)
        while after < baseline and time.monotonic() < deadline:
            time.sleep(SETTLE_S)  # the killed process's context is torn down asynchronously
            after = free_bytes(0)
        cycles.append({"cycle": i, "model": model, "used_while_loaded_mib": (baseline - loaded) / 2**20,
                       "free_after_vs_baseline_mib": (after - baseline) / 2**20})
    drift = [c["free_after_vs_baseline_mib"] for c in cycles]
    return {"baseline_free_bytes": baseline, "cycles": cycles, "max_shortfall_mib": -min(drift),
            "final_shortfall_mib": -drift[-1]}


def report(figures: dict[str, Any], cycles_n: int) -> None:
    cycles = figures["cycles"]
    drift = [c["free_after_vs_baseline_mib"] for c in cycles]
    print(f"cards: {figures['cards']}")
    print(f"{'model':<12}{'measured MiB':>14}{'num_gpus':>10}{'device':>10}")
    for model, row in figures["packing"].items():
        print(f"{model:<12}{row['measured_bytes'] / 2**20:>14.1f}{row['num_gpus']:>10.2f}{row['device']!s:>10}")
    print(f"{cycles_n} load/evict cycles: used while loaded "
          f"{min(c['used_while_loaded_mib'] for c in cycles):.0f}-{max(c['used_while_loaded_mib'] for c in cycles):.0f}"
          f" MiB; free memory after eviction vs baseline: worst {min(drift):+.1f} MiB, last {drift[-1]:+.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
