"""The client's hot path: one process, N concurrent ``AsyncProducer.infer`` calls of float32[512].

Measured in one run, side by side:

* ``redis-benchmark -c 1024 -n 200000 -d 2048 -t set,get`` (C, the ceiling): SET+GET pairs/s,
  i.e. 1 / (1/SET rps + 1/GET rps);
* N concurrent ``AsyncProducer.infer("noop", float32[512])`` for ``--seconds``: req/s, the
  ratio to the pairs/s above, and the client's CPU microseconds per request (user + system,
  ``getrusage(RUSAGE_SELF)`` deltas over the measured window: the client process only).

The requests are served by a manager (``nosq.manager.ops.demo.start_manager`` with a config holding only
``noop``), or with ``--no-manager`` by a tiny echo consumer in a separate process (XREADGROUP a
batch, SET each envelope NX EX, XADD a notice to the reply stream, XACK + XDEL, as
docs/protocol.md says), so the client's own cost shows without the manager's.

``--libraries`` measures instead the Redis client libraries at the same concurrency: SET+GET
pairs/s of redis-py asyncio, redis-py asyncio with coalescing (one pipeline per event-loop turn)
and, through ``--alt-python`` (a venv holding coredis and valkey-glide), the alternatives.

    python benchmarks/client.py --no-manager
    python benchmarks/client.py                      # through a real manager
    python benchmarks/client.py --libraries --alt-python /tmp/clientvenv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

RATE_RE = re.compile(r"^(SET|GET): ([\d.]+) requests per second", re.MULTILINE)
MANAGER_CONFIG = """
[[models]]
id = "noop"
factory = "nosq.workers.demo:noop"
device = "cpu"
max_batch = 256
num_cpus = 0.25
threads = 1
"""
GOAL_PER_S = 10_000
GOAL_RATIO = 0.5


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- redis-benchmark: the ceiling ----------------------------------------------------------------


def redis_benchmark(url: str, clients: int, n: int, size: int) -> dict[str, Any]:
    """SET and GET requests/s of redis-benchmark, and the SET+GET pairs/s they make."""
    parsed = urlparse(url)
    db = int(parsed.path.strip("/") or 0)
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark is not installed (apt-get install redis-tools)")
    command = [binary, "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 6379), "--dbnum", str(db),
               "-c", str(clients), "-n", str(n), "-d", str(size), "-t", "set,get", "-q"]
    env = {**os.environ, "REDISCLI_AUTH": parsed.password} if parsed.password else None
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    rates = {name: float(value) for name, value in RATE_RE.findall(output.replace("\r", "\n"))}
    if set(rates) != {"SET", "GET"}:
        raise RuntimeError(f"no SET/GET rates in redis-benchmark's output: {output!r}")
    pairs = 1 / (1 / rates["SET"] + 1 / rates["GET"])
    return {"command": " ".join(command), "set_per_s": rates["SET"], "get_per_s": rates["GET"],
            "pairs_per_s": pairs}


# -- the echo consumer (--no-manager) ------------------------------------------------------------


def echo_consumer(url: str, model: str, *, threshold: int, ready: Any, stop: Any, usage: Any) -> None:
    """Play the manager for ``model``: echo each payload back as a v1 envelope. Per batch: one
    XREADGROUP, then in one write SET NX EX of each envelope, one XADD notice each (``id`` and,
    up to ``threshold`` bytes, ``r``), EXPIRE of the reply stream, XACK and XDEL; commands are
    packed here and sent on one connection (redis-py's pipeline would cost this process more
    than the client it serves)."""
    import redis

    from nosq.producer import keys
    from nosq.producer.resp import pack_command
    from nosq.producer.wire import encode_envelope, parse_request

    client = redis.Redis.from_url(url)
    client.set_response_callback("XREADGROUP", lambda response, **_: response)
    stream = keys.requests(model)
    try:
        client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    connection = client.connection_pool.get_connection("XADD")
    ready.set()
    batch = 0
    while not stop.is_set():
        response: Any = client.xreadgroup(keys.GROUP, "echo", {stream: ">"}, count=512, block=100)
        if not response:
            continue
        # RESP2 (redis-py 5) or RESP3 (redis-py 8's default): a list or a map of streams
        entries = response[0][1] if isinstance(response, list) else next(iter(response.values()))
        batch += 1
        shared = {"v": 1, "ok": True, "model": model, "timings": {"queued_ms": 0, "wait_ms": 0, "exec_ms": 0},
                  "batch": {"id": f"echo:{batch}", "size": len(entries), "reason": "idle"}, "deliveries": 1}
        commands: list[bytes] = []
        replies: dict[str, int] = {}
        for entry_id, raw in entries:
            request = parse_request(entry_id, dict(zip(raw[::2], raw[1::2], strict=True)))
            envelope = encode_envelope(request.ct, {**shared, "id": request.id}, request.payload)
            ttl = str(request.ttl_s)
            commands.append(pack_command("SET", keys.result(request.id), envelope, "NX", "EX", ttl))
            if request.reply is None:
                commands.append(pack_command("RPUSH", keys.done(request.id), "1"))
                commands.append(pack_command("EXPIRE", keys.done(request.id), ttl))
                continue
            notice = ("id", request.id, "r", envelope) if len(envelope) <= threshold else ("id", request.id)
            commands.append(pack_command("XADD", keys.reply(request.reply), "MAXLEN", "~", "100000", "*", *notice))
            replies[request.reply] = max(replies.get(request.reply, 0), request.ttl_s)
        for reply, ttl_s in replies.items():
            commands.append(pack_command("EXPIRE", keys.reply(reply), str(ttl_s)))
        ids = [entry_id for entry_id, _ in entries]
        commands.append(pack_command("XACK", stream, keys.GROUP, *ids))
        commands.append(pack_command("XDEL", stream, *ids))
        connection.send_packed_command(commands)
        for _ in commands:
            connection.read_response()
    client.connection_pool.release(connection)
    client.close()
    usage.value = cpu_s()


# -- the load: N concurrent infer calls ----------------------------------------------------------


async def infer_load(url: str, model: str, *, concurrency: int, seconds: float, warmup_s: float,
                     timeout_s: float) -> dict[str, Any]:
    import numpy as np

    from nosq.producer import AsyncProducer, NosqError, RedisSettings

    x = np.random.default_rng(0).standard_normal(512, dtype=np.float32)
    counts = {"done": 0, "errors": 0}
    error_kinds: dict[str, int] = {}
    stop = False

    async def caller(producer: AsyncProducer) -> None:
        while not stop:
            try:
                y = await producer.infer(model, x, timeout_s=timeout_s)
                if y.shape != x.shape:
                    raise RuntimeError(f"echo came back with shape {y.shape}")
                counts["done"] += 1
            except NosqError as exc:
                counts["errors"] += 1
                error_kinds[type(exc).__name__] = error_kinds.get(type(exc).__name__, 0) + 1

    async with AsyncProducer(RedisSettings(url=url)) as producer:
        tasks = [asyncio.create_task(caller(producer)) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        server0 = await redis_cpu_s(producer)
        done0, cpu0, t0 = counts["done"], cpu_s(), time.perf_counter()
        await asyncio.sleep(seconds)
        done1, cpu1, t1 = counts["done"], cpu_s(), time.perf_counter()
        server1 = await redis_cpu_s(producer)
        stop = True
        await asyncio.gather(*tasks)
    requests = done1 - done0
    return {"concurrency": concurrency, "requests": requests, "seconds": t1 - t0,
            "req_per_s": requests / (t1 - t0), "cpu_us_per_request": (cpu1 - cpu0) * 1e6 / max(1, requests),
            "client_cpu_cores": (cpu1 - cpu0) / (t1 - t0), "redis_server_cpu_cores": (server1 - server0) / (t1 - t0),
            "errors": counts["errors"], "error_kinds": error_kinds}


async def redis_cpu_s(producer: Any) -> float:
    info = await producer._client().info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_infer(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The infer load, served by a manager or by the echo consumer."""
    import redis

    redis.Redis.from_url(url).flushdb()
    if args.no_manager:
        context = multiprocessing.get_context("spawn")
        ready, stop, usage = context.Event(), context.Event(), context.Value("d", 0.0)
        consumer = context.Process(target=echo_consumer, args=(url, "noop"), name="echo-consumer", daemon=True,
                                   kwargs={"threshold": args.notice_threshold, "ready": ready, "stop": stop,
                                           "usage": usage})
        consumer.start()
        try:
            if not ready.wait(30):
                raise RuntimeError("the echo consumer did not start")
            figures = asyncio.run(infer_load(url, "noop", concurrency=args.concurrency, seconds=args.seconds,
                                             warmup_s=args.warmup, timeout_s=args.timeout))
        finally:
            stop.set()
            consumer.join(10)
        figures["echo_consumer_cpu_s_total"] = usage.value
        return figures
    from nosq.manager.ops.demo import start_manager, stop_manager
    from nosq.producer import RedisSettings

    settings = RedisSettings(url=url)
    config = Path(tempfile.mkdtemp()) / "client-bench.toml"
    config.write_text(MANAGER_CONFIG)
    process = start_manager(settings, "--config", str(config), "--log-level", "warning", consumer="client-bench")
    try:
        figures = asyncio.run(infer_load(url, "noop", concurrency=args.concurrency, seconds=args.seconds,
                                          warmup_s=args.warmup, timeout_s=args.timeout))
    finally:
        figures["manager_exit_status"] = stop_manager(process)
    return figures


# -- client libraries: SET+GET pairs/s at the same concurrency ------------------------------------


async def _pairs(set_get: Any, concurrency: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    """``concurrency`` coroutines, each SET then GET of its own 2048-byte key, in a loop."""
    value = os.urandom(1024).hex().encode()
    counts = [0]
    stop = False

    async def caller(i: int) -> None:
        key = f"bench:pair:{i}".encode()
        while not stop:
            await set_get(key, value)
            counts[0] += 1

    tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup_s)
    done0, cpu0, t0 = counts[0], cpu_s(), time.perf_counter()
    await asyncio.sleep(seconds)
    done1, cpu1, t1 = counts[0], cpu_s(), time.perf_counter()
    stop = True
    await asyncio.gather(*tasks)
    pairs = done1 - done0
    return {"pairs_per_s": pairs / (t1 - t0), "cpu_us_per_pair": (cpu1 - cpu0) * 1e6 / max(1, pairs)}


class Coalescer:
    """Commands issued in one event-loop turn go out as one redis-py pipeline."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def call(self, *args: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        if not self.pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self.pending.append((args, future))
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        try:
            replies = await pipe.execute()
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            future.set_result(reply)


async def measure_library(name: str, url: str, concurrency: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    parsed = urlparse(url)
    host, port, db = parsed.hostname or "127.0.0.1", parsed.port or 6379, int(parsed.path.strip("/") or 0)
    if name.startswith("redis-py"):
        import redis
        import redis.asyncio

        if name.endswith("pool64"):  # what RedisSettings builds: callers wait for one of 64 connections
            client = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool(
                host=host, port=port, db=db, max_connections=64))
        else:  # a connection per caller (redis-py 8's default pool stops at 100 and raises past it)
            client = redis.asyncio.Redis(host=host, port=port, db=db, max_connections=max(100, concurrency))
        if "coalesced" in name:
            coalescer = Coalescer(client)

            async def set_get(key: bytes, value: bytes) -> None:
                await coalescer.call("SET", key, value)
                await coalescer.call("GET", key)
        else:
            async def set_get(key: bytes, value: bytes) -> None:
                await client.set(key, value)
                await client.get(key)
        figures = await _pairs(set_get, concurrency, seconds, warmup_s)
        await client.aclose()
        return {**figures, "version": redis.__version__}
    if name == "coredis":
        import coredis

        async with coredis.Redis(host=host, port=port, db=db) as client:
            async def set_get(key: bytes, value: bytes) -> None:
                await client.set(key, value)
                await client.get(key)
            figures = await _pairs(set_get, concurrency, seconds, warmup_s)
        return {**figures, "version": coredis.__version__}
    if name == "valkey-glide":
        from importlib.metadata import version

        from glide import GlideClient, GlideClientConfiguration, NodeAddress

        config = GlideClientConfiguration([NodeAddress(host, port)], database_id=db,
                                          inflight_requests_limit=max(1000, 2 * concurrency))  # default 1000
        glide = await GlideClient.create(config)

        async def set_get(key: bytes, value: bytes) -> None:
            await glide.set(key, value)
            await glide.get(key)
        figures = await _pairs(set_get, concurrency, seconds, warmup_s)
        await glide.close()
        return {**figures, "version": version("valkey-glide")}
    raise SystemExit(f"unknown library {name!r}")


def run_libraries(url: str, args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in ("redis-py", "redis-py-pool64", "redis-py-coalesced"):
        rows[name] = asyncio.run(measure_library(name, url, args.concurrency, args.seconds, args.warmup))
        print(f"  {name:<28} {rows[name]['pairs_per_s']:>9,.0f} pairs/s  {rows[name]['cpu_us_per_pair']:>6.1f} "
              "CPU us/pair", flush=True)
    if args.alt_python:
        for name in ("redis-py", "redis-py-coalesced", "coredis", "valkey-glide"):
            command = [args.alt_python, __file__, "--one-library", name, "--redis-url", url, "--concurrency",
                       str(args.concurrency), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            label = f"{name} (alt venv)"
            if done.returncode != 0:
                rows[label] = {"error": done.stderr[-2000:]}
                print(f"  {label}: failed: {done.stderr[-300:]}", flush=True)
                continue
            rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {label:<28} {rows[label]['pairs_per_s']:>9,.0f} pairs/s  "
                  f"{rows[label]['cpu_us_per_pair']:>6.1f} CPU us/pair", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="a dedicated db, flushed first")
    parser.add_argument("--concurrency", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="infer timeout_s")
    parser.add_argument("--no-manager", action="store_true", help="serve with the in-benchmark echo consumer")
    parser.add_argument("--notice-threshold", type=int, default=4096,
                        help="echo consumer: envelopes larger than this go as id-only notices")
    parser.add_argument("--libraries", action="store_true", help="measure the Redis client libraries instead")
    parser.add_argument("--alt-python", help="a python whose venv holds coredis and valkey-glide")
    parser.add_argument("--one-library", help=argparse.SUPPRESS)
    parser.add_argument("--bench-n", type=int, default=200_000, help="redis-benchmark -n")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/client.json"))
    args = parser.parse_args(argv)
    url = args.redis_url
    if urlparse(url).path.strip("/") in ("", "0"):
        parser.error("--redis-url must name a dedicated db (it is flushed), e.g. redis://127.0.0.1:6379/13")
    if args.one_library:
        print(json.dumps(asyncio.run(measure_library(args.one_library, url, args.concurrency, args.seconds,
                                                     args.warmup))))
        return 0

    print(f"redis-benchmark -c {args.concurrency} -n {args.bench_n} -d 2048 -t set,get ...", flush=True)
    baseline = redis_benchmark(url, args.concurrency, args.bench_n, 2048)
    print(f"  SET {baseline['set_per_s']:,.0f}/s  GET {baseline['get_per_s']:,.0f}/s  "
          f"pairs {baseline['pairs_per_s']:,.0f}/s", flush=True)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
        "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()},
        "redis_benchmark": baseline,
    }
    if args.libraries:
        report["libraries"] = run_libraries(url, args)
    else:
        mode = "echo consumer (no manager)" if args.no_manager else "manager serving noop"
        print(f"{args.concurrency} concurrent AsyncProducer.infer(float32[512]) for {args.seconds:g} s, {mode} ...",
              flush=True)
        figures = run_infer(url, args)
        figures["mode"] = mode
        figures["ratio_to_pairs"] = figures["req_per_s"] / baseline["pairs_per_s"]
        figures["goal_met"] = figures["req_per_s"] >= GOAL_PER_S and figures["ratio_to_pairs"] >= GOAL_RATIO
        report["infer"] = figures
        print(f"{'':<36}{'req/s':>10}{'SET+GET pairs/s':>17}{'ratio':>7}{'client CPU us/req':>19}  errors")
        print(f"{mode:<36}{figures['req_per_s']:>10,.0f}{baseline['pairs_per_s']:>17,.0f}"
              f"{figures['ratio_to_pairs']:>7.2f}{figures['cpu_us_per_request']:>19.1f}  {figures['errors']}")
        print(f"CPU cores busy in the window: client {figures['client_cpu_cores']:.2f}, "
              f"redis-server {figures['redis_server_cpu_cores']:.2f}")
        verdict = "met" if figures["goal_met"] else "NOT met"
        print(f"goal >= {GOAL_PER_S:,} req/s and >= {GOAL_RATIO} x pairs/s: {verdict}")
    report["load_avg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
