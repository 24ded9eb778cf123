"""GPU placement through the manager (issue 5): models packed over a node's GPUs by measured
bytes, checked against where their actors really run and what they really take.

Starts ``nosq serve`` in budget mode with a GPU reserve that leaves ``--gpu-budget-mib`` per GPU,
serving six GPU models (the demo models and three larger variants) whose bytes together exceed
the budgets. A first manager loads each model once, which profiles it and stores the profile (a
model's first load reserves ``default_model_bytes``); a second manager then reserves measured
bytes (plus ``gpu_overhead_bytes`` per actor) and serves random traffic over all six for
``--seconds``, loading, packing and evicting them. Every ``--sample-s`` the run reads:

* the registry: bytes reserved per GPU, never above its budget;
* ``nvidia-smi``: the memory each actor process really holds on each GPU, summed per GPU,
  against the same budget, and whether each actor runs on the GPU the registry placed it on
  (the manager's heartbeat gives each replica's pid and device);
* at the end, every request answered, and each GPU's free memory (``torch.cuda.mem_get_info``)
  back at its baseline once the manager has stopped.

    python -m benchmarks.gpu_packing --redis-server /path/to/redis-server --out results/gpu_packing.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.support import redis_url
from nosq.manager.memory.registry import Registry
from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import keys
from nosq.producer.aio import AsyncProducer
from nosq.producer.errors import NosqError
from nosq.producer.settings import RedisSettings

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn": ("cnn", {}),
    "transformer": ("transformer", {}),
    "mlp": ("mlp", {}),
    "cnn-large": ("cnn", {"size": 128}),
    "mlp-wide": ("mlp", {"d_in": 512, "d_hidden": 8192, "d_out": 512}),
    "transformer-deep": ("transformer", {"d_model": 1024, "nhead": 16, "layers": 6, "seq": 32}),
}
CONTEXT_PROBE = "import torch, time; torch.zeros(1, device='cuda'); print('up', flush=True); time.sleep(30)"


def config_text() -> str:
    blocks = []
    for model_id, (factory, options) in MODELS.items():
        table = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + " }"
        blocks.append(f'[[models]]\nid = "{model_id}"\nfactory = "nosq.workers.demo:{factory}"\ndevice = "cuda"\n'
                      f"max_batch = 256\nmax_wait_ms = 2.0\nnum_cpus = 0.5\nthreads = 1\n"
                      + (f"options = {table}\n" if options else ""))
    return "\n".join(blocks)


def example_inputs() -> dict[str, np.ndarray]:
    from nosq.workers import demo

    return {m: getattr(demo, f)(**o).example_input().numpy() for m, (f, o) in MODELS.items()}


def gpu_processes() -> dict[int, tuple[int, int]]:
    """pid -> (GPU index, MiB used) from nvidia-smi."""
    uuids = dict(line.split(", ")[::-1] for line in _smi("--query-gpu=index,uuid"))
    out = {}
    for line in _smi("--query-compute-apps=pid,gpu_uuid,used_memory"):
        pid, uuid, mib = line.split(", ")
        out[int(pid)] = (int(uuids[uuid]), int(mib))
    return out


def _smi(query: str) -> list[str]:
    text = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                          check=True).stdout
    return [line.strip() for line in text.splitlines() if line.strip()]


def context_mib() -> int:
    """What one process that only initialised CUDA with torch holds on the GPU."""
    probe = subprocess.Popen([sys.executable, "-c", CONTEXT_PROBE], stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None
        probe.stdout.readline()
        return gpu_processes()[probe.pid][1]
    finally:
        probe.kill()
        probe.wait()


def free_mib() -> list[float]:
    import torch

    return [torch.cuda.mem_get_info(i)[0] / 2**20 for i in range(torch.cuda.device_count())]


async def actors(client: Any, consumer: str) -> dict[int, tuple[str, str]]:
    """pid -> (model, device) from the manager's heartbeat."""
    beat = await client.get(keys.manager_heartbeat(consumer))
    out = {}
    for model, stats in (json.loads(beat)["stats"] if beat else {}).items():
        for actor in stats.get("actors", []):
            if actor.get("pid"):
                out[int(actor["pid"])] = (model, str(actor.get("device")))
    return out


async def sample(registry: Registry, client: Any, consumer: str, budget_mib: float) -> dict[str, Any]:
    """One look at the registry, nvidia-smi and the heartbeat. Real use per GPU counts every
    process on it but this one (its own context, from reading free memory)."""
    devices = [d for d in await registry.devices() if d["device"].startswith("cuda")]
    procs = gpu_processes()
    placed = await actors(client, consumer)
    real: dict[int, int] = defaultdict(int)
    for pid, (gpu, mib) in procs.items():
        if pid != os.getpid():
            real[gpu] += mib
    mismatched = [(placed[pid], procs[pid][0]) for pid in placed
                  if pid in procs and placed[pid][1] != f"cuda:{procs[pid][0]}"]
    return {
        "registry_mib": {d["device"]: d["used_bytes"] / 2**20 for d in devices},
        "models": {d["device"]: d["models"] for d in devices},
        "real_mib": {f"cuda:{g}": mib for g, mib in sorted(real.items())},
        "per_actor_real_mib": {placed[pid][0]: procs[pid][1] for pid in placed if pid in procs},
        "mismatched": mismatched,
        "over_budget_registry": any(d["used_bytes"] / 2**20 > budget_mib for d in devices),
        "over_budget_real": any(mib > budget_mib for mib in real.values()),
    }


async def drive(url: str, consumer: str, seconds: float, budget_mib: float, sample_s: float) -> dict[str, Any]:
    inputs = example_inputs()
    settings = RedisSettings(url=url)
    client = settings.async_client()
    registry = Registry(client, owner="gpu-packing-observer")
    samples: list[dict[str, Any]] = []
    answered: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    rng = random.Random(0)
    async with AsyncProducer(settings) as producer:
        async def one(model: str) -> None:
            try:
                envelope = await producer.outcome(await producer.submit(model, inputs[model], timeout_s=300),
                                                  timeout_s=300)
            except NosqError as exc:  # a timeout: counted, never lost silently
                errors[type(exc).__name__] += 1
                return
            (answered if envelope.ok else errors)[model if envelope.ok else envelope.code] += 1

        for model in MODELS:  # each model once, in order
            await one(model)
            samples.append(await sample(registry, client, consumer, budget_mib))
        stop_at = time.monotonic() + seconds
        pending: set[asyncio.Task[None]] = set()
        next_sample = time.monotonic()
        while time.monotonic() < stop_at:
            model = rng.choice(list(MODELS))
            burst = [asyncio.create_task(one(model)) for _ in range(rng.randint(16, 128))]
            pending.update(burst)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            pending = {t for t in pending if not t.done()}
            if time.monotonic() >= next_sample:
                samples.append(await sample(registry, client, consumer, budget_mib))
                next_sample = time.monotonic() + sample_s
        while pending:
            await asyncio.wait(pending, timeout=sample_s)
            pending = {t for t in pending if not t.done()}
            samples.append(await sample(registry, client, consumer, budget_mib))
        loads = await registry.snapshot()
    await client.aclose()
    return {"samples": samples, "answered": dict(answered), "errors": dict(errors), "registry_rows": loads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-budget-mib", type=float, default=2500.0, help="each GPU's budget")
    parser.add_argument("--gpu-overhead-mib", type=float, default=None, help="default: the manager's")
    parser.add_argument("--seconds", type=float, default=60.0, help="random traffic after the first loads")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--redis-server", default=None, help="start this redis-server binary for the run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_packing.json"))
    args = parser.parse_args()
    import torch

    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    figures: dict[str, Any] = {"cards": cards, "gpu_budget_mib": args.gpu_budget_mib,
                               "cuda_context_mib": context_mib(), "free_mib_before": free_mib()}
    config = Path(tempfile.mkdtemp(prefix="nosq-packing-")) / "packing.toml"
    config.write_text(config_text())
    serve = ["--config", str(config), "--cpu-budget-mib", "16384", "--metrics-port", "-1",
             "--gpu-reserve-mib", str(total_mib - args.gpu_budget_mib), "--log-level", "info"]
    if args.gpu_overhead_mib is not None:
        serve += ["--gpu-overhead-mib", str(args.gpu_overhead_mib)]
    with redis_url(args.redis_url, args.redis_server) as url:
        settings = RedisSettings(url=url)
        settings.client().flushdb()
        process = start_manager(settings, *serve, consumer="profiling")
        try:
            figures["first_pass"] = asyncio.run(drive(url, "profiling", 0.0, args.gpu_budget_mib, args.sample_s))
        finally:
            figures["first_pass_exit_status"] = stop_manager(process)
        process = start_manager(settings, *serve, consumer="packing")
        try:
            figures.update(asyncio.run(drive(url, "packing", args.seconds, args.gpu_budget_mib, args.sample_s)))
        finally:
            figures["manager_exit_status"] = stop_manager(process)
    time.sleep(3)  # the killed actors' contexts are torn down asynchronously
    figures["free_mib_after"] = free_mib()
    report(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written to {args.out}")
    ok = not any(s["over_budget_registry"] or s["over_budget_real"] or s["mismatched"] for s in figures["samples"])
    ok = ok and not figures["errors"] and not figures["first_pass"]["errors"]
    return 0 if ok and figures["manager_exit_status"] == figures["first_pass_exit_status"] == 0 else 1


def report(figures: dict[str, Any]) -> None:
    samples = figures["samples"]
    budget = figures["gpu_budget_mib"]
    peak_registry: dict[str, float] = defaultdict(float)
    peak_real: dict[str, float] = defaultdict(float)
    per_model: dict[str, int] = defaultdict(int)
    spread = max(sum(1 for models in s["models"].values() if models) for s in samples)
    for s in samples:
        for device, mib in s["registry_mib"].items():
            peak_registry[device] = max(peak_registry[device], mib)
        for device, mib in s["real_mib"].items():
            peak_real[device] = max(peak_real[device], mib)
        for model, mib in s["per_actor_real_mib"].items():
            per_model[model] = max(per_model[model], mib)
    print(f"cards: {figures['cards']}; budget {budget:.0f} MiB per GPU; a bare CUDA context "
          f"{figures['cuda_context_mib']} MiB")
    print(f"{'GPU':<8}{'peak registry MiB':>18}{'peak real MiB':>15}")
    for device in sorted(peak_registry):
        print(f"{device:<8}{peak_registry[device]:>18.0f}{peak_real.get(device, 0):>15.0f}")
    print(f"GPUs holding models at once (max): {spread}; samples {len(samples)}; over budget (registry/real): "
          f"{sum(s['over_budget_registry'] for s in samples)}/{sum(s['over_budget_real'] for s in samples)}; "
          f"actors off their registry GPU: {sum(len(s['mismatched']) for s in samples)}")
    print("largest real footprint per model (nvidia-smi, MiB):", dict(sorted(per_model.items())))
    for row in figures["registry_rows"]:
        print(f"  {row['model']:<18}{row['state']:<10}{row['device']:<8}{row['bytes'] / 2**20:>8.0f} MiB "
              f"uses {row['uses']}")
    print(f"answered {sum(figures['answered'].values())}, errors {figures['errors']}; free MiB before "
          f"{[round(x) for x in figures['free_mib_before']]} after {[round(x) for x in figures['free_mib_after']]}")


if __name__ == "__main__":
    sys.exit(main())
