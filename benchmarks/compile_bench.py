"""Eager against traced against compiled, for each demo model, at b* and at batch 1.

    python benchmarks/compile_bench.py [--device cpu|cuda] [--out FILE.json] [--models mlp,cnn]
                                       [--bstar mlp=64 ...] [--seconds 1.0] [--threads N]

In-process with ``nosq.workers.actor.ModelWorker`` (no Ray, no Redis): it needs torch, numpy,
pydantic and msgpack only, so it runs on a bare GPU box. Each (model, mode) is measured in a
fresh child process, so memory figures and torch.compile's state start clean:

* ``load_s``: building the worker, which for ``compile`` includes the warm-up (compiling the
  dynamic graph at batch 2 and 1); ``compile_s``: the worker's own count of seconds spent
  tracing/compiling (``ready()["compile"]["compile_s"]``, also the lazy traces per bucket).
* per batch size: the first call (a trace or compile of a new bucket lands there), then timed
  ``ModelWorker.run`` calls on msgpack-encoded items (decode, model, encode: what a served
  batch costs) for ``--seconds`` (at least 5 runs): p50 latency, throughput = b / p50.
* memory: CUDA: peak allocated during the child's work minus allocated before the model;
  CPU: RSS at the end minus RSS before the model (it includes the compiler's own code).

``compile`` is run twice with the same cache dir: ``compile`` cold (a fresh cache) and
``compile-warm`` (a restart that finds inductor's cache). b* is the spec's ``max_batch``
unless ``--bstar model=N`` says otherwise (e.g. the profiled b*).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("eager", "trace", "compile", "compile-warm")


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one model in one mode in this process; return its figures."""
    import torch

    from nosq.producer.codec import encode_value
    from nosq.workers.actor import ModelWorker
    from nosq.workers.datapath import batch_of
    from nosq.workers.demo import demo_config_path
    from nosq.workers.runtime import _rss_bytes
    from nosq.workers.spec import load_config

    spec = load_config(demo_config_path()).model(args.model)
    update: dict[str, Any] = {"compile": args.mode.removesuffix("-warm"), "compile_cache_dir": args.cache_dir}
    if args.threads:
        update["threads"] = args.threads
    spec = spec.model_copy(update=update)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_bytes()
    start = time.perf_counter()
    worker = ModelWorker(spec, device=args.device)
    load_s = time.perf_counter() - start
    example = worker.example().cpu().numpy()
    rows = []
    for batch in (args.child_bstar, 1):
        items = [encode_value("msgpack", (example + i * 1e-3).astype(example.dtype)) for i in range(batch)]
        cts = ["msgpack"] * batch
        first = time.perf_counter()
        result = worker.run(batch_of("forward", cts, items))
        first_s = time.perf_counter() - first
        if not all(r.ok for r in result.items()):
            raise RuntimeError(f"{args.model} {args.mode} b={batch}: {result.items()[0].message}")
        times: list[float] = []
        began = time.perf_counter()
        while len(times) < 5 or time.perf_counter() - began < args.seconds:
            t0 = time.perf_counter()
            worker.run(batch_of("forward", cts, items))
            times.append(time.perf_counter() - t0)
        p50 = statistics.median(times)
        rows.append({"batch": batch, "first_call_s": first_s, "runs": len(times), "p50_ms": p50 * 1e3,
                     "throughput": batch / p50})
    if cuda:
        memory = torch.cuda.max_memory_allocated() - base
        memory_method = "cuda_peak_allocated"
    else:
        memory = _rss_bytes() - rss0
        memory_method = "cpu_rss_delta"
    status = worker.ready()["compile"]
    return {"model": args.model, "mode": args.mode, "device": args.device, "device_name": _device_name(args.device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_s": load_s,
            "compile": status, "memory_bytes": memory, "memory_method": memory_method, "points": rows}


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _run_child(model: str, mode: str, bstar: int, cache_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--child-bstar", str(bstar),
               "--cache-dir", cache_dir, "--device", args.device, "--seconds", str(args.seconds)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        return {"model": model, "mode": mode, "error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _table(results: list[dict[str, Any]]) -> str:
    header = (f"{'model':<12}{'mode':<13}{'active':<8}{'batch':>6}{'items/s':>11}{'x eager':>8}{'p50 ms':>9}"
              f"{'x eager':>8}{'load s':>8}{'compile s':>10}{'1st call s':>11}{'mem MB':>8}")
    lines = [header, "-" * len(header)]
    eager = {(r["model"], p["batch"]): p for r in results if r["mode"] == "eager" and "points" in r
             for p in r["points"]}
    for r in results:
        if "points" not in r:
            lines.append(f"{r['model']:<12}{r['mode']:<13}failed: {r.get('error')}")
            continue
        for p in r["points"]:
            base = eager.get((r["model"], p["batch"]))
            thr_x = p["throughput"] / base["throughput"] if base else float("nan")
            lat_x = p["p50_ms"] / base["p50_ms"] if base else float("nan")
            lines.append(
                f"{r['model']:<12}{r['mode']:<13}{r['compile']['active']:<8}{p['batch']:>6}{p['throughput']:>11.0f}"
                f"{thr_x:>8.2f}{p['p50_ms']:>9.3f}{lat_x:>8.2f}{r['load_s']:>8.2f}{r['compile']['compile_s']:>10.2f}"
                f"{p['first_call_s']:>11.3f}{r['memory_bytes'] / 2**20:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    parser.add_argument("--models", default="noop,mlp,cnn,transformer")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--bstar", action="append", default=[], metavar="MODEL=N",
                        help="b* of a model (default: the spec's max_batch)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the spec's)")
    parser.add_argument("--cache-dir", help="compile cache root (default: a fresh temporary dir: cold compiles)")
    # internal: one measurement in a child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--child-bstar", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    from nosq.workers.demo import demo_config_path
    from nosq.workers.spec import load_config

    config = load_config(demo_config_path())
    bstars = {k: int(v) for k, v in (item.split("=", 1) for item in args.bstar)}
    cache_root = args.cache_dir or tempfile.mkdtemp(prefix="nosq-compile-bench-")
    results = []
    for model in args.models.split(","):
        bstar = bstars.get(model, config.model(model).max_batch)
        for mode in args.modes.split(","):
            print(f"... {model} {mode} (b*={bstar})", file=sys.stderr, flush=True)
            results.append(_run_child(model, mode, bstar, cache_root, args))
    print(_table(results))
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "cache_dir": cache_root,
                                        "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
