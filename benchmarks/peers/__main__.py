"""nosq against Ray Serve and arq (and the in-process limit), same model, same load, one run.

    python -m benchmarks.peers                                  # noop and mlp, all five systems
    python -m benchmarks.peers --quick --models noop            # a smoke run (seconds)
    python3 -m benchmarks.peers --systems direct,nosq --models cnn,transformer --device cuda \\
        --redis-server /usr/bin/redis-server                    # a GPU box: no Serve, no arq needed

Run from the repository root. Each system is started and stopped inside the run; the Redis db
of ``--redis-url`` (default db 12) is cleared of everything but stored profiles before and
after. Writes ``--out`` (JSON of every figure), ``--plots`` (PNGs), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import redis

from benchmarks.peers import report
from benchmarks.peers.models import Target, resolve
from benchmarks.support import redis_url

SYSTEMS = ("direct", "nosq", "serve-handle", "serve-http", "arq")
CONNECT = {
    "nosq": "benchmarks.peers.nosq:connect",
    "serve-handle": "benchmarks.peers.serve:connect_handle",
    "serve-http": "benchmarks.peers.serve_http:connect_http",
    "arq": "benchmarks.peers.arq_queue:connect",
}
PROFILE_PATTERN = "nosq:{registry}:profile:*"
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv(str), default=["noop", "mlp"],
                        help="demo models (noop,mlp,cnn,transformer)")
    parser.add_argument("--systems", type=_csv(str), default=list(SYSTEMS), help=",".join(SYSTEMS))
    parser.add_argument("--concurrency", type=_csv(int), default=[1, 4, 16, 64, 256, 1024],
                        help="closed loop: concurrent clients, one request in flight each (filling b* takes "
                             "2-4 x b* in flight)")
    parser.add_argument("--rates", type=_csv(float), default=[50, 200, 500, 1000, 2000, 5000, 10000],
                        help="open loop: offered requests/s; a system's sweep stops after its first saturated rate "
                             "(empty: no open loop)")
    parser.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window of each point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for answers after a window")
    parser.add_argument("--load-procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--max-inflight", type=int, default=20000, help="open loop: requests waiting at most")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every system (default: the spec's)")
    parser.add_argument("--max-batch", type=int, default=None, help="the profile's cap (default: the spec's)")
    parser.add_argument("--batch", type=int, default=None, help="use this b* for every model; skip the profile")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--redis-server", type=Path, default=None,
                        help="a redis-server binary: start it on a free loopback port for this run")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="num_cpus of the run's local Ray (default: as nosq serve, max(cores, 4))")
    parser.add_argument("--ray-worker-niceness", type=int, default=None,
                        help="nice value of Ray's worker processes, nosq's actors and Serve's replicas alike "
                             "(default: Ray's, 15; direct and arq run at the caller's, 0)")
    parser.add_argument("--serve-throughput-optimized", action="store_true",
                        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's documented high-throughput mode)")
    parser.add_argument("--arq-poll-ms", type=float, default=500.0,
                        help="arq worker and job.result() poll interval (arq's default: 500)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    parser.add_argument("--plots", type=Path, default=Path("docs/peers"), help="directory for PNGs ('' for none)")
    parser.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                        help="measure nothing: print the table and draw the plots of an earlier run's JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 0.5 s windows, concurrency 1,8, rates 50,200, a short profile")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.quick:
        args.seconds, args.warmup, args.drain = min(args.seconds, 0.5), min(args.warmup, 0.2), min(args.drain, 5.0)
        if args.concurrency == parser.get_default("concurrency"):
            args.concurrency = [1, 8]
        if args.rates == parser.get_default("rates"):
            args.rates = [50, 200]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only is not None:
        _report(json.loads(args.report_only.read_text()), args, write=False)
        return 0
    with _redis(args) as url:
        client = redis.Redis.from_url(url)
        _check_unused(client, url)
        _clear(client)
        targets: list[Target] = []
        try:
            results = run(args, url, client, targets)
        finally:
            _clear(client)
            for target in targets:  # a short or made-up profile must not serve a later full run
                if target.temporary:
                    if target.replaced is None:
                        client.delete(target.profile_key)
                    else:
                        client.set(target.profile_key, target.replaced)
            client.close()
    _report(results, args, write=True)
    return 0


def _report(results: dict[str, Any], args: argparse.Namespace, *, write: bool) -> None:
    """The table, the goal checks, the JSON (``write``) and the plots."""
    print()
    print(report.table(results))
    for goal in results["goals"]:
        verdict = "MET " if goal["met"] else "MISS"
        print(f"{verdict} {goal['goal']}: {goal['value']} (goal {goal['op']} {goal['target']})")
    if write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"figures: {args.out}")
    if str(args.plots) not in ("", "."):
        try:
            paths = report.plot(results, args.plots)
        except ImportError as exc:  # a bare GPU box: the JSON holds every figure
            print(f"no plots: {exc} (pip install matplotlib)")
            paths = []
        for path in paths:
            print(f"plot: {path}")


def run(args: argparse.Namespace, url: str, client: redis.Redis, targets: list[Target]) -> dict[str, Any]:
    """Every system on every model (``targets`` is filled as they are resolved); the results."""
    started = time.time()
    for model in args.models:
        target = resolve(model, device=args.device, threads=args.threads, max_batch=args.max_batch,
                         given_batch=args.batch, client=client, quick=args.quick)
        print(f"{model}: b*={target.batch} ({target.batch_source})", flush=True)
        targets.append(target)
    results: dict[str, Any] = {
        "meta": _meta(args, url),
        "models": {t.id: {"target": t.describe(), "systems": {}} for t in targets},
    }
    if "direct" in args.systems:
        from benchmarks.peers.direct import run_direct

        for target in targets:
            closed = run_direct(target, clients=args.concurrency, warmup_s=args.warmup, seconds=args.seconds)
            for point in closed:
                _log(target.id, "direct", f"c={point['clients']}", point)
            results["models"][target.id]["systems"]["direct"] = {"closed": closed}
    with _shared_ray(args) as ray_address:
        for group in _groups(args.systems):
            began = time.monotonic()
            with _system(group[0], targets, args, url, ray_address) as params:
                print(f"{group[0]} started in {time.monotonic() - began:.1f} s", flush=True)
                for name in group:
                    _measure(name, params, targets, args, url=url, results=results)
    for entry in results["models"].values():
        for system in entry["systems"].values():
            system["summary"] = report.summary(system)
    results["goals"] = report.goals(results)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    results["meta"]["loadavg_after"] = os.getloadavg()
    return results


def _groups(systems: list[str]) -> list[list[str]]:
    """Systems that share one running service (both Serve clients), in the order asked."""
    groups: list[list[str]] = []
    for name in systems:
        if name == "direct":
            continue
        if name in report.SERVE_SYSTEMS and groups and groups[-1][0] in report.SERVE_SYSTEMS:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


@contextmanager
def _shared_ray(args: argparse.Namespace) -> Iterator[str | None]:
    """One private Ray on loopback for the systems that run on Ray (nosq's manager joins it,
    Serve runs in it), one after the other: started once, not once per system. None if no
    system needs Ray."""
    if not {"nosq", *report.SERVE_SYSTEMS} & set(args.systems):
        yield None
        return
    import ray

    from nosq.manager.runtime.raycluster import connect, disconnect

    # set before Ray starts: its worker processes (Serve's replicas, proxy, controller) take
    # the environment of the raylet, and import this package and the demo models
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    if args.serve_throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if args.ray_worker_niceness is not None:  # Ray starts its workers (the actors) at nice 15
        os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)  # noqa: SIM112 (Ray spells it so)
    connect(None, num_cpus=args.ray_cpus)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        disconnect()


def _system(name: str, targets: list[Target], args: argparse.Namespace, url: str,
            ray_address: str | None) -> AbstractContextManager[dict[str, Any]]:
    print(f"starting {name} ...", flush=True)
    if name == "nosq":
        from benchmarks.peers import nosq
        from nosq.producer.settings import RedisSettings

        return nosq.running(targets, RedisSettings(url=url), ray_address=ray_address)
    if name in report.SERVE_SYSTEMS:
        from benchmarks.peers import serve

        return serve.running(targets, ray_address=str(ray_address))
    from benchmarks.peers import arq_queue

    return arq_queue.running(targets, url=url, poll_ms=args.arq_poll_ms)


def _measure(name: str, params: dict[str, Any], targets: list[Target], args: argparse.Namespace, *, url: str,
             results: dict[str, Any]) -> None:
    from benchmarks.peers.load import LoadPool

    shapes = {t.id: t.shape for t in targets}
    began = time.monotonic()
    with LoadPool(connect=CONNECT[name], params=params, shapes=shapes, processes=args.load_procs) as pool:
        print(f"{args.load_procs} load processes of {name} connected in {time.monotonic() - began:.1f} s", flush=True)
        for target in targets:
            entry: dict[str, Any] = {"closed": [], "open": []}
            results["models"][target.id]["systems"][name] = entry
            for clients in args.concurrency:
                point = {"clients": clients, **pool.closed(target.id, clients=clients, warmup_s=args.warmup,
                                                           seconds=args.seconds, drain_s=args.drain)}
                _log(target.id, name, f"c={clients}", point)
                entry["closed"].append(point)
                _settle(name, url, target.id)
            base_p99 = None
            for rate in sorted(args.rates):
                point = pool.open(target.id, rate=rate, arrivals=args.arrivals, warmup_s=args.warmup,
                                  seconds=args.seconds, drain_s=args.drain, max_inflight=args.max_inflight)
                base_p99 = base_p99 if base_p99 is not None else point.get("p99_ms")
                point["saturated"] = report.is_saturated(point, base_p99)
                _log(target.id, name, f"{rate:.0f}/s", point)
                entry["open"].append(point)
                _settle(name, url, target.id)
                if point["saturated"]:
                    break  # higher rates only queue more


def _settle(name: str, url: str, model: str) -> None:
    """Let a queue drain what abandoned requests left, so the next point starts clean."""
    if name == "nosq":
        from benchmarks.peers.nosq import settle
        from nosq.producer.settings import RedisSettings

        settle(RedisSettings(url=url), [model])
    elif name == "arq":
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.zcard("arq:queue"):
            time.sleep(0.2)
        client.close()


def _log(model: str, system: str, where: str, p: dict[str, Any]) -> None:
    extra = f" {p['extra']}" if p.get("extra") else ""
    sat = f" SATURATED: {p['saturated']}" if p.get("saturated") else ""
    err = f" errors={p['errors']} ({p.get('first_error', '')})" if p.get("errors") else ""
    gen = f" gen_cpu={p['gen_cpu']:.2f}" if "gen_cpu" in p else ""
    p50, p99 = p.get("p50_ms"), p.get("p99_ms")
    lat = f"p50 {p50:.2f} ms p99 {p99:.2f} ms" if p50 is not None and p99 is not None else "no latencies"
    print(f"  {model:<12}{system:<13}{where:>8}: {p['req_per_s']:>9.0f} req/s  {lat}{gen}{err}{extra}{sat}",
          flush=True)


def _meta(args: argparse.Namespace, url: str) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": args.device if args.device == "cpu" else f"cuda-{torch.cuda.get_device_name().replace(' ', '-')}",
        "host_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "loadavg_before": os.getloadavg(), "redis_url": url,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    try:
        import ray

        meta["ray"] = ray.__version__
    except ImportError:
        meta["ray"] = None
    return meta


def _check_unused(client: redis.Redis, url: str) -> None:
    """Refuse a db where a manager is serving: it would take half of our requests, and we its keys."""
    from nosq.producer import keys

    beats = sorted(k.decode() for k in client.scan_iter(keys.manager_heartbeat("*"), count=1000))
    if beats:
        raise SystemExit(f"peers: {url} is in use by running nosq manager(s) ({', '.join(beats)}); choose a free db "
                         "with --redis-url redis://127.0.0.1:6379/<db>, or --redis-server PATH for a private Redis")


def _clear(client: redis.Redis) -> None:
    """Delete every key of the benchmark's db, except stored profiles (kept for the next run)."""
    profiles = set(client.scan_iter(PROFILE_PATTERN, count=1000))
    batch = []
    for key in client.scan_iter(count=1000):
        if key not in profiles:
            batch.append(key)
        if len(batch) >= 1000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def _redis(args: argparse.Namespace) -> AbstractContextManager[str]:
    """The Redis URL to use: ``--redis-url``, or a redis-server of our own with ``--redis-server``."""
    return redis_url(args.redis_url, None if args.redis_server is None else str(args.redis_server))

if __name__ == "__main__":
    sys.exit(main())
