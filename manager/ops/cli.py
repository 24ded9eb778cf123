"""``nosq``: the command line (serve, submit, demo, profile, models)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from nosq.manager.ops.logs import configure
from nosq.producer.codec import tensor_parts
from nosq.producer.enqueue import redis_errors
from nosq.producer.errors import NosqError, NosqTimeout
from nosq.producer.settings import RedisSettings

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_TIMEOUT = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    configure(args.log_level, args.log_format)
    try:
        code: int = args.handler(args)
    except NosqError as exc:
        print(f"nosq: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return code


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="run a manager: read request streams, batch, run models")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML or YAML model list (default: the four built-in demo models)")
    serve.add_argument("--consumer", default=None, help="this manager's consumer name (default: host name)")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    serve.add_argument("--min-idle-ms", type=int, default=None, help="idle time before entries are reclaimed")
    serve.add_argument("--shutdown-timeout", type=float, default=None, help="seconds to drain on SIGTERM")
    serve.add_argument("--priority-lookahead", type=int, default=None,
                       help="entries read beyond the next batches, so priorities reorder a backlog in the stream "
                            "(default 256; 0: only what the replicas can take next is reordered)")
    serve.add_argument("--node", default=None, help="this manager's node name in the registry (default: host name)")
    serve.add_argument("--cpu-budget-mib", type=float, default=None,
                       help="RAM the models may take; set: models load on demand and are evicted by policy "
                            "(default: no budget, every model loaded at start)")
    serve.add_argument("--gpu-reserve-mib", type=float, default=None,
                       help="GPU memory kept free (a GPU's budget is its total less this; default 1024)")
    serve.add_argument("--gpu-overhead-mib", type=float, default=None,
                       help="GPU memory each GPU actor takes beyond its model's measured bytes (CUDA context, "
                            "allocator slack), counted in the GPU budget (default 768)")
    serve.add_argument("--eviction-policy", choices=["fifo", "lru", "lfu", "cost"], default=None,
                       help="which loaded model leaves first when one must load and does not fit (default fifo)")
    serve.add_argument("--redis-outage-limit-s", type=float, default=None,
                       help="exit (status 1, with the reason) once one Redis outage lasts this long (default: wait "
                            "for Redis however long it takes; /healthz answers 503 meanwhile)")
    serve.add_argument("--reply-inline-bytes", type=int, default=None,
                       help="largest envelope carried in a reply-stream notice; larger ones are only in their "
                            "result key (default 4096)")
    serve.add_argument("--no-profile-on-start", action="store_true",
                       help="serve a model with no stored profile at its max_batch instead of profiling it first")
    serve.add_argument("--no-local-channel", action="store_true",
                       help="send every batch as a Ray call, not through shared memory to replicas on this host")
    serve.add_argument("--metrics-port", type=int, default=9108,
                       help="port of /metrics and /healthz on 127.0.0.1 (default: %(default)s; -1: none)")
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics server")
    serve.set_defaults(handler=_serve)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nosq", description="Serve PyTorch models from Redis streams: batched, crash-safe, on Ray.",
        parents=[_common_options(with_defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options(with_defaults=False)  # also accepted after the subcommand

    _add_serve(sub, common)

    status = sub.add_parser("status", parents=[common],
                            help="live view of managers and models: replicas, backlog, req/s, batch, p50/p99")
    status.add_argument("--once", action="store_true", help="print one view and exit")
    status.add_argument("--json", action="store_true", help="machine-readable (implies --once)")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    status.set_defaults(handler=_status)

    models = sub.add_parser("models", parents=[common],
                            help="the model registry: state, placement, bytes and use of every model")
    models.add_argument("--json", action="store_true", help="print the snapshot (models and devices) as JSON")
    models.add_argument("action", nargs="?", choices=["load", "unload", "scale", "profile"],
                        help="ask the managers (an arq job through Redis): load MODEL, unload MODEL, "
                             "scale MODEL N, profile MODEL")
    models.add_argument("target", nargs="*", help="MODEL, and N for scale")
    models.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the job's result")
    models.set_defaults(handler=_models)

    submit = sub.add_parser("submit", parents=[common], help="enqueue one request, wait, print its result")
    submit.add_argument("model", help="a configured model id, e.g. noop")
    submit.add_argument("--json", dest="payload", required=True,
                        help='the inputs as JSON, e.g. \'{"x": [1, 2]}\' (tensors: {"dtype","shape","b64"})')
    submit.add_argument("--method", default=None, help="model method (default: its first)")
    submit.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (also the deadline)")
    submit.add_argument("--envelope", action="store_true", help="print the whole result envelope")
    submit.set_defaults(handler=_submit)

    demo = sub.add_parser("demo", parents=[common],
                          help="start a manager with the demo models, send a burst, print a summary")
    demo.add_argument("--requests", type=int, default=2000, help="requests per model")
    demo.add_argument("--concurrency", type=int, default=256, help="requests in flight per model")
    demo.set_defaults(handler=_demo)

    profile = sub.add_parser(
        "profile", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="measure a model's latency, throughput and memory against batch size; choose its batch size",
        description=(
            "Profile MODEL in a Ray actor on its device, the way a manager serves it: batch sizes in powers of\n"
            "two up to the spec's max_batch (stopping at out-of-memory, the memory limit, or the first size\n"
            "whose p50 is over the latency budget), latency p50/p95, items/s and the model's own memory per\n"
            "size, each size measured in 3 interleaved rounds (the least disturbed kept). b* is the size\n"
            "with the best throughput whose p95 fits latency_budget_ms and whose memory fits the device.\n"
            "Prints the curve and b* with its reason and writes a PNG plot."
        ),
        epilog=(
            "examples:\n"
            "  nosq profile mlp                       table + profile-mlp.png (demo config)\n"
            "  nosq profile cnn --device cuda --store  on a GPU; save it for managers to reuse\n"
            "  nosq profile noop --json --no-plot      the profile as JSON on stdout"
        ),
    )
    profile.add_argument("model", help="a model id of the config, e.g. mlp")
    profile.add_argument("--config", type=Path, default=None,
                         help="TOML or YAML model list (default: the four built-in demo models)")
    profile.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None,
                         help="where to run it (default: the spec's device; the spec's fingerprint is kept)")
    profile.add_argument("--max-batch", type=int, default=None,
                         help="largest batch size to try (default and ceiling: the spec's max_batch)")
    profile.add_argument("--memory-limit-mib", type=float, default=None,
                         help="most memory one batch may take (default: CUDA free memory less 10%% of the card; "
                              "CPU a quarter of the available RAM)")
    profile.add_argument("--plot", type=Path, default=None, help="PNG to write (default: profile-MODEL.png)")
    profile.add_argument("--no-plot", action="store_true", help="write no PNG")
    profile.add_argument("--json", action="store_true",
                         help="print the whole profile as JSON on stdout (no progress bar, no table)")
    profile.add_argument("--store", action="store_true",
                         help="also save it in Redis (--redis-url), where managers look for it at start")
    profile.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    profile.set_defaults(handler=_profile)
    return parser


def _common_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=default("redis://127.0.0.1:6379/0"),
                        help="redis://, rediss:// or unix:// URL (default: redis://127.0.0.1:6379/0)")
    common.add_argument("--redis-username", default=default(None), help="Redis ACL user")
    common.add_argument("--redis-password", default=default(None), help="Redis ACL password")
    common.add_argument("--log-level", default=default("info"), choices=["debug", "info", "warning", "error"])
    common.add_argument("--log-format", default=default("text"), choices=["text", "json"])
    return common


def redis_settings(args: argparse.Namespace) -> RedisSettings:
    return RedisSettings(url=args.redis_url, username=args.redis_username, password=args.redis_password)


def _serve(args: argparse.Namespace) -> int:
    from nosq.manager.service import Manager
    from nosq.manager.settings import ManagerSettings
    from nosq.workers.demo import demo_config_path
    from nosq.workers.spec import load_config

    config = load_config(args.config or demo_config_path())
    overrides: dict[str, Any] = {"redis": redis_settings(args), "ray_address": args.ray_address}
    if args.consumer:
        overrides["consumer"] = args.consumer
    if args.min_idle_ms is not None:
        overrides["min_idle_ms"] = args.min_idle_ms
    if args.shutdown_timeout is not None:
        overrides["shutdown_timeout_s"] = args.shutdown_timeout
    if args.priority_lookahead is not None:
        overrides["priority_lookahead"] = args.priority_lookahead
    if args.node:
        overrides["node"] = args.node
    if args.cpu_budget_mib is not None:
        overrides["cpu_budget_bytes"] = int(args.cpu_budget_mib * 1024 * 1024)
    if args.gpu_reserve_mib is not None:
        overrides["gpu_reserve_bytes"] = int(args.gpu_reserve_mib * 1024 * 1024)
    if args.gpu_overhead_mib is not None:
        overrides["gpu_overhead_bytes"] = int(args.gpu_overhead_mib * 1024 * 1024)
    if args.eviction_policy:
        overrides["eviction_policy"] = args.eviction_policy
    if args.reply_inline_bytes is not None:
        overrides["reply_inline_bytes"] = args.reply_inline_bytes
    if args.no_profile_on_start:
        overrides["profile_on_start"] = False
    if args.no_local_channel:
        overrides["local_channel"] = False
    if args.redis_outage_limit_s is not None:
        overrides["redis_outage_limit_s"] = args.redis_outage_limit_s
    if args.metrics_port >= 0:
        overrides.update(metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    manager = Manager(config, ManagerSettings(**overrides))

    run_on_fast_loop(manager.run(handle_signals=True))
    return EXIT_ERROR if manager.failed is not None else 0


def run_on_fast_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the manager on uvloop when it is installed (the server extra has it): every Redis and
    channel round trip costs the event loop about half as much as on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a server install has it
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _status(args: argparse.Namespace) -> int:
    import time

    from nosq.manager.ops.status import collect, render

    client = redis_settings(args).client()
    try:
        with redis_errors(f"reading status from {redis_settings(args).describe()}"):
            if args.json or args.once:
                view = collect(client)
                print(json.dumps(view, default=str) if args.json else render(view))
                return 0
            while True:  # a terminal view: clear, draw, wait
                view = collect(client)
                print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S ") + "nosq status (Ctrl-C to quit)\n"
                      + render(view), flush=True)
                time.sleep(args.interval)
    finally:
        client.close()


def _models(args: argparse.Namespace) -> int:
    import redis

    from nosq.manager.memory.registry import Registry
    from nosq.manager.ops.status import autoscaling, heartbeats

    if args.action:
        return _control(args)

    async def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        client = redis_settings(args).async_client()
        try:
            registry = Registry(client, owner="nosq-cli")
            return await registry.snapshot(), await registry.devices()
        finally:
            await client.aclose()

    try:
        rows, devices = asyncio.run(read())
        client = redis_settings(args).client()
        try:
            scaling = autoscaling(heartbeats(client))  # per manager, from the heartbeats (also without a budget)
        finally:
            client.close()
    except redis.RedisError as exc:
        raise NosqError(f"cannot read the registry at {redis_settings(args).describe()}: {exc}") from exc
    if args.json:
        print(json.dumps({"models": rows, "devices": devices, "autoscale": scaling}, indent=2))
        return 0
    print(format_models(rows, devices, scaling))
    return 0


def _control(args: argparse.Namespace) -> int:
    from nosq.manager.ops.control import request

    wanted = 2 if args.action == "scale" else 1
    if len(args.target) != wanted:
        usage = "MODEL N" if args.action == "scale" else "MODEL"
        print(f"nosq: usage: nosq models {args.action} {usage}", file=sys.stderr)
        return 2
    params: list[Any] = [args.target[0]]
    if args.action == "scale":
        try:
            params.append(int(args.target[1]))
        except ValueError:
            print(f"nosq: replicas must be an integer, not {args.target[1]!r}", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(request(redis_settings(args), args.action, *params, timeout_s=args.timeout))
    except NosqTimeout:
        print(f"nosq: no manager answered {args.action} {' '.join(args.target)} within {args.timeout:g} s: "
              "is `nosq serve` running against this Redis?", file=sys.stderr)
        return EXIT_TIMEOUT
    except NosqError:
        raise
    except Exception as exc:  # the job's own error, raised again by arq here
        raise NosqError(f"{args.action} {' '.join(args.target)} failed: {exc}") from exc
    print(json.dumps(result, indent=2, default=str))
    return 0


def format_models(rows: list[dict[str, Any]], devices: list[dict[str, Any]],
                  scaling: list[dict[str, Any]] | None = None) -> str:
    """The registry snapshot as a plain-text table, one line per device budget, then the
    autoscaling of each model on each manager with its latest decision."""
    import time

    def stamp(ms: int) -> str:
        return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    def mib(n: int) -> str:
        return f"{n / (1024 * 1024):.1f}"

    head = ("MODEL", "STATE", "OWNER", "NODE/DEVICE", "MIB", "LOADED", "LAST USED", "USES", "INFLIGHT",
            "REPLICAS", "LAST ERROR")
    table = [head] + [
        (r["model"], r["state"], r["owner"] or "-", f"{r['node']}/{r['device']}" if r["node"] else "-",
         mib(r["bytes"]), stamp(r["loaded_at"]), stamp(r["last_used"]), str(r["uses"]), str(r["inflight"]),
         str(r["replicas"]), (r["last_error"] or "-")[:60])
        for r in rows
    ]
    errors = [f"{r['model']}: {r['last_error']}" for r in rows if r["last_error"] and len(r["last_error"]) > 60]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if not rows:
        lines.append("(no model registered: is a manager running with a memory budget?)")
    lines.extend(errors)  # the whole of a long error, below the table
    for d in devices:
        lines.append(f"device {d['node']}/{d['device']}: {mib(d['used_bytes'])} of {mib(d['budget_bytes'])} MiB "
                     f"used ({', '.join(d['models']) or 'empty'})")
    for s in scaling or []:
        last = s.get("last")
        said = "no change yet"
        if last:
            step = f"{last['from']} -> {last['to']}"
            if not last["applied"]:
                step = f"{last['from']} -> {last['wanted']} REFUSED ({last['refused']})"
            elif last["refused"]:
                step += f" (of {last['wanted']}: {last['refused']})"
            said = f"{stamp(last['at_ms'])} {step}: {last['reason']}"
        lines.append(f"autoscale {s['model']} on {s['manager']}: {s['replicas']} replica(s), wanted {s['desired']}, "
                     f"bounds {s['min_replicas']}..{s['max_replicas']}; last: {said}")
    return "\n".join(lines)


def _submit(args: argparse.Namespace) -> int:
    from nosq.producer.client import Producer

    try:
        inputs = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        print(f"nosq: --json is not valid JSON: {exc}", file=sys.stderr)
        return 2
    with Producer(redis_settings(args), content_type="json") as producer:
        handle = producer.submit(args.model, inputs, method=args.method, timeout_s=args.timeout)
        try:
            envelope = producer.outcome(handle, timeout_s=args.timeout + 1)
        except NosqTimeout:
            print(f"nosq: no result for {args.model!r} within {args.timeout:g} s: is `nosq serve` running "
                  f"against {redis_settings(args).describe()} and serving this model?", file=sys.stderr)
            return EXIT_TIMEOUT
    if args.envelope:
        print(json.dumps(_jsonable(_fields(envelope))))
    elif envelope.ok:
        print(json.dumps(_jsonable(envelope.out)))
    else:
        print(f"nosq: {envelope.code}: {envelope.message}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nosq.manager.ops.demo import run_demo

    code: int = run_demo(redis_settings(args), requests=args.requests, concurrency=args.concurrency)
    return code


def _profile(args: argparse.Namespace) -> int:
    import redis

    from nosq.manager.profiles.report import ProgressBar, format_table, write_plot
    from nosq.manager.profiles.standalone import profile_in_actor
    from nosq.manager.profiles.store import store_sync
    from nosq.workers.demo import demo_config_path
    from nosq.workers.profiles.curve import ProfileOptions
    from nosq.workers.spec import load_config

    config = load_config(args.config or demo_config_path())
    try:
        spec = config.model(args.model)
    except KeyError as exc:
        print(f"nosq: {exc.args[0]}", file=sys.stderr)
        return 2
    bar = None if args.json else ProgressBar(f"profiling {spec.id}")
    limit = None if args.memory_limit_mib is None else int(args.memory_limit_mib * 1024 * 1024)
    profile = profile_in_actor(
        spec, device=args.device, max_batch=args.max_batch, ray_address=args.ray_address,
        options=ProfileOptions(memory_limit_bytes=limit),
        on_plan=(lambda plan: bar.start(len(plan.sizes) * plan.rounds)) if bar else None,
        on_result=bar.update if bar else None,
    )
    if bar is not None:
        bar.finish(f"b*={profile.best_batch}")
    plot = None if args.no_plot else write_plot(profile, args.plot or Path(f"profile-{spec.id}.png"))
    key = None
    if args.store:
        settings = redis_settings(args)
        client = settings.client()
        try:
            key = store_sync(client, profile)
        except redis.RedisError as exc:
            raise NosqError(f"cannot store the profile in Redis at {settings.describe()}: {exc}") from exc
        finally:
            client.close()
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    print(format_table(profile))
    if plot is not None:
        print(f"plot: {plot}")
    if key is not None:
        print(f"stored: {key}")
    return 0


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def _jsonable(value: Any) -> Any:
    parts = tensor_parts(value)
    if parts is not None:
        return {"dtype": parts[0], "shape": list(parts[1]), "values": value.tolist()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
