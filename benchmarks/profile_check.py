"""Is the profiler's b* as good as the best batch size an exhaustive sweep finds?

For each model: the profile (powers of two, b* chosen by throughput within the p95 budget and
the memory limit), then, in the same process and measured the same way, every batch size of
1, 2, 3, 4, 6, 8, 12, ... (powers of two and their midpoints) up to max_batch, in as many
rounds as the profile and merged the same way (``nosq.workers.profiles.curve.merge``). Prints the
curve, b* with its reason, the memory at b* next to the weights' bytes, the throughput at b*
against the best within the budget found by the sweep and their ratio (goal >= 0.9); writes
JSON and one PNG plot per model.

    python benchmarks/profile_check.py                      # mlp and cnn on the CPU, via a Ray actor
    python benchmarks/profile_check.py --direct             # in this process (ModelWorker)
    python benchmarks/profile_check.py --device cuda --direct --out-dir /tmp/prof   # cnn, transformer

``--direct`` needs only torch, numpy and matplotlib: where the server's other dependencies
(redis, msgpack, pydantic, ray) are missing, the model is built from the config file with
tomllib and measured by ``nosq.workers.profiles.measure.Profiler``, the code ``ModelWorker.profile`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nosq.manager.profiles.report import format_table, write_plot  # noqa: E402
from nosq.workers.profiles.curve import (  # noqa: E402
    EXAMPLE_OPTION,
    MIB,
    Measurement,
    OutOfMemory,
    Point,
    Profile,
    measurement_from_dict,
    merge,
)
from nosq.workers.profiles.measure import Profiler  # noqa: E402

DEFAULT_MODELS = {"cpu": ["mlp", "cnn"], "cuda": ["cnn", "transformer"]}
GOAL = 0.9


def sweep_sizes(cap: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to ``cap`` (and ``cap`` itself)."""
    sizes = {cap}
    power = 1
    while power <= cap:
        sizes.add(power)
        if power >= 2 and power + power // 2 <= cap:
            sizes.add(power + power // 2)
        power *= 2
    return sorted(sizes)


@dataclasses.dataclass
class Subject:
    """One model to measure: ``profile()`` and ``measure(b)`` in one process."""

    profile: Callable[[], Profile]
    measure: Callable[[int], Measurement]
    where: str
    close: Callable[[], None] = lambda: None


def direct_subject(model: str, config: Path, device: str, max_batch: int | None) -> Subject:
    try:
        from nosq.workers.actor import ModelWorker
        from nosq.workers.spec import load_config
    except ImportError as exc:  # a GPU box with torch alone
        print(f"(nosq.workers.actor needs {exc.name}: building {model} from {config} with the profiler alone)")
        profiler = _bare_profiler(model, config, device, max_batch)
        return Subject(profile=profiler.run, measure=profiler.measure, where="this process (Profiler)")
    spec = load_config(config).model(model)
    if max_batch is not None:
        spec = spec.model_copy(update={"max_batch": max_batch})
    worker = ModelWorker(spec, device=device)
    return Subject(profile=lambda: Profile.from_dict(worker.profile()),
                   measure=lambda b: measurement_from_dict(worker.profile_one(b)),
                   where="this process (ModelWorker)")


def actor_subject(model: str, config: Path, device: str, max_batch: int | None) -> Subject:
    import ray

    from nosq.manager.runtime import raycluster
    from nosq.workers.actor import ModelWorker
    from nosq.workers.spec import load_config

    spec = load_config(config).model(model)
    if max_batch is not None:
        spec = spec.model_copy(update={"max_batch": max_batch})
    owns = raycluster.connect(None, 4)
    gpus = 1 if device == "cuda" else 0
    actor: Any = ray.remote(ModelWorker).options(num_cpus=spec.num_cpus, num_gpus=gpus).remote(spec, device=device)
    ray.get(actor.ready.remote(), timeout=300)

    def close() -> None:
        ray.kill(actor)
        if owns:
            raycluster.disconnect()

    return Subject(profile=lambda: Profile.from_dict(ray.get(actor.profile.remote(), timeout=600)),
                   measure=lambda b: measurement_from_dict(ray.get(actor.profile_one.remote(b), timeout=600)),
                   where="a Ray actor (ModelWorker)", close=close)


def _bare_profiler(model: str, config: Path, device: str, max_batch: int | None) -> Profiler:
    """The spec's model and Profiler without pydantic: the config's table, ModelSpec's defaults."""
    tables = tomllib.loads(config.read_text(encoding="utf-8"))["models"]
    table = next((t for t in tables if t["id"] == model), None)
    if table is None:
        raise SystemExit(f"no model {model!r} in {config}")
    module, _, attr = table["factory"].partition(":")
    options = {k: v for k, v in table.get("options", {}).items() if k != EXAMPLE_OPTION}
    if table.get("threads"):
        torch.set_num_threads(int(table["threads"]))
    target = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    net = getattr(importlib.import_module(module), attr)(**options).to(target).eval()
    method = table.get("methods", ["forward"])[0]
    return Profiler(getattr(net, method), model=net, model_id=model, fingerprint="unfingerprinted", method=method,
                    device=target, max_batch=max_batch or int(table.get("max_batch", 64)),
                    latency_budget_ms=float(table.get("latency_budget_ms", 100.0)), example=net.example_input())


def exhaustive(measure: Callable[[int], Measurement], sizes: list[int],
               rounds: int) -> tuple[dict[int, list[Point]], OutOfMemory | None]:
    """Every size, in rounds like the profiler's sweep (the first increasing, the rest largest
    first): the points of each size, and the first size out of memory, if any."""
    runs: dict[int, list[Point]] = {}
    for round_index in range(max(1, rounds)):
        for b in sizes if round_index == 0 else sorted(runs, reverse=True):
            result = measure(b)
            if isinstance(result, OutOfMemory):
                return {k: v for k, v in runs.items() if k < b}, result
            runs.setdefault(b, []).append(result)
        print(f"  round {round_index + 1} done", flush=True)
    return runs, None


def check(subject: Subject, model: str, out_dir: Path, device: str) -> dict[str, Any]:
    started = time.perf_counter()
    profile = subject.profile()
    print(format_table(profile))
    plan = profile.plan
    chosen = profile.point(profile.best_batch)
    mem = chosen.memory_bytes if chosen else 0
    print(f"memory at b*={profile.best_batch}: {mem / MIB:,.2f} MiB for the batch, next to "
          f"{plan.weights_bytes / MIB:,.2f} MiB of weights ({plan.memory_method})")
    plot = write_plot(profile, out_dir / f"profile-{model}-{device}.png")
    print(f"plot: {plot}")

    sizes = sweep_sizes(plan.max_batch)
    print(f"\nexhaustive sweep of {model}, {plan.rounds} round(s) like the profile's "
          f"({', '.join(map(str, sizes))}) ...", flush=True)
    runs, oom = exhaustive(subject.measure, sizes, plan.rounds)
    rows: list[dict[str, Any]] = []
    for b in sorted(runs):
        point = merge(runs[b])
        fits = point.p95_ms <= plan.latency_budget_ms and point.memory_bytes <= plan.memory_limit_bytes
        rows.append({**dataclasses.asdict(point), "fits": fits})
        print(f"{b:>6} {point.p50_ms:>10.3f} {point.p95_ms:>10.3f} {point.items_per_s:>12,.0f} "
              f"{point.memory_bytes / MIB:>10.2f}{'' if fits else '  (over the budget or memory)'}")
    if oom is not None:
        print(f"{oom.batch:>6}  out of memory: {oom.message}")
        rows.append({"batch": oom.batch, "out_of_memory": oom.message})
    measured = [r for r in rows if "items_per_s" in r]
    fitting = [r for r in measured if r["fits"]] or measured[:1]
    best = max(fitting, key=lambda r: r["items_per_s"])
    best_any = max(measured, key=lambda r: r["items_per_s"])
    at_choice = next(r for r in measured if r["batch"] == profile.best_batch)
    ratio = at_choice["items_per_s"] / best["items_per_s"]
    verdict = "meets" if ratio >= GOAL else "MISSES"
    print(f"\n{model}: b*={profile.best_batch} gives {at_choice['items_per_s']:,.0f} items/s in the sweep "
          f"(profile: {chosen.items_per_s if chosen else 0:,.0f}); best within the budget b={best['batch']} "
          f"{best['items_per_s']:,.0f} items/s; ratio {ratio:.3f} ({verdict} the {GOAL} goal); best at any "
          f"latency b={best_any['batch']} {best_any['items_per_s']:,.0f} items/s\n")
    return {
        "model": model, "where": subject.where, "profile": profile.to_dict(), "sweep": rows,
        "b_star": profile.best_batch, "b_star_items_per_s_sweep": at_choice["items_per_s"],
        "b_star_items_per_s_profile": chosen.items_per_s if chosen else None,
        "best_in_budget": {"batch": best["batch"], "items_per_s": best["items_per_s"]},
        "best_any": {"batch": best_any["batch"], "items_per_s": best_any["items_per_s"]},
        "ratio": ratio, "goal": GOAL, "meets_goal": ratio >= GOAL,
        "memory_at_b_star_bytes": mem, "weights_bytes": plan.weights_bytes, "plot": str(plot),
        "seconds": time.perf_counter() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default=None,
                        help="comma-separated ids (default: mlp,cnn on cpu; cnn,transformer on cuda)")
    parser.add_argument("--config", type=Path, default=ROOT / "workers" / "demo.toml")
    parser.add_argument("--max-batch", type=int, default=None, help="override the specs' max_batch")
    parser.add_argument("--direct", action="store_true", help="measure in this process: no Ray, no Redis")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where the PNG plots and the JSON go (default: benchmarks/results)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    models = args.models.split(",") if args.models else DEFAULT_MODELS[args.device]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        make = direct_subject if args.direct else actor_subject
        subject = make(model, args.config, args.device, args.max_batch)
        try:
            results.append(check(subject, model, args.out_dir, args.device))
        finally:
            subject.close()
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
        "torch": torch.__version__, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(), "direct": args.direct, "results": results,
    }
    name = "profile_check.json" if args.device == "cpu" else f"profile_check_{args.device}.json"
    (args.out_dir / name).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"{'model':<12}{'b*':>5}{'items/s at b*':>15}{'best in budget':>16}{'ratio':>8}")
    for r in results:
        print(f"{r['model']:<12}{r['b_star']:>5}{r['b_star_items_per_s_sweep']:>15,.0f}"
              f"{r['best_in_budget']['items_per_s']:>12,.0f} b={r['best_in_budget']['batch']:<3}{r['ratio']:>6.3f}")
    print(f"wrote {args.out_dir / name}")
    return 0 if all(r["meets_goal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
