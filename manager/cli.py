"""``nosq``: the command line (serve, submit, demo)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manager.logs import configure
from producer.codec import tensor_parts
from producer.errors import NosqError, NosqTimeout
from producer.settings import RedisSettings

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nosq", description="Serve PyTorch models from Redis streams: batched, crash-safe, on Ray.",
        parents=[_common_options(with_defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options(with_defaults=False)  # also accepted after the subcommand

    serve = sub.add_parser("serve", parents=[common], help="run a manager: read request streams, batch, run models")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML or YAML model list (default: the four built-in demo models)")
    serve.add_argument("--consumer", default=None, help="this manager's consumer name (default: host name)")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    serve.add_argument("--min-idle-ms", type=int, default=None, help="idle time before entries are reclaimed")
    serve.add_argument("--shutdown-timeout", type=float, default=None, help="seconds to drain on SIGTERM")
    serve.set_defaults(handler=_serve)

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
    from manager.service import Manager
    from manager.settings import ManagerSettings
    from workers.demo import demo_config_path
    from workers.spec import load_config

    config = load_config(args.config or demo_config_path())
    overrides: dict[str, Any] = {"redis": redis_settings(args), "ray_address": args.ray_address}
    if args.consumer:
        overrides["consumer"] = args.consumer
    if args.min_idle_ms is not None:
        overrides["min_idle_ms"] = args.min_idle_ms
    if args.shutdown_timeout is not None:
        overrides["shutdown_timeout_s"] = args.shutdown_timeout
    manager = Manager(config, ManagerSettings(**overrides))

    asyncio.run(manager.run(handle_signals=True))
    return EXIT_ERROR if manager.failed is not None else 0


def _submit(args: argparse.Namespace) -> int:
    from producer.client import Producer

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
    from manager.demo import run_demo

    code: int = run_demo(redis_settings(args), requests=args.requests, concurrency=args.concurrency)
    return code


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
