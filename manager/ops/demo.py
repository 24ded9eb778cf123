"""The main job in one command: a real manager with the demo models, a real burst, a summary.

``nosq demo`` starts ``nosq serve`` as a child process (Ray on loopback, the four demo
models and the text embedding model ``minilm``), waits until it is serving, sends ``requests``
per model through the AsyncProducer with ``concurrency`` in flight per model, all models at once
(``minilm``: at most ``TEXT_REQUESTS`` documents of a generated corpus, 8 to 256 tokens), prints
what happened, and stops the manager with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from nosq.producer import keys
from nosq.producer.aio import AsyncProducer
from nosq.producer.errors import NosqError
from nosq.producer.settings import RedisSettings

__all__ = ["DEMO_INPUTS", "DEMO_TEXTS", "demo_documents", "run_demo", "start_manager", "stop_manager"]

#: one input of each demo model (the shapes in workers/demo.py)
DEMO_INPUTS: dict[str, tuple[int, ...]] = {
    "noop": (8,),
    "mlp": (512,),
    "cnn": (3, 64, 64),
    "transformer": (32, 256),
}
#: the text models of the demo config: strings in, one float32[384] vector each out
DEMO_TEXTS = ("minilm",)
TEXT_REQUESTS = 500  # a CPU core embeds a few hundred short documents a second
START_TIMEOUT_S = 180.0  # the embedding model's first load imports transformers
_WORDS = ("redis", "stream", "queue", "batch", "model", "vector", "search", "document", "embedding", "the", "a",
          "of", "and", "to", "in", "is", "for", "latency", "throughput", "replica", "manager", "actor", "token",
          "length", "bucket", "padding", "serving", "request", "result", "index", "retrieval", "ingestion")


def demo_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of about 6 to 250 words, most of them short (log-normal lengths)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.0, 0.8, n), 6, 250).astype(int)
    return [" ".join(rng.choice(_WORDS, size=int(k))).capitalize() + "." for k in lengths]


def start_manager(settings: RedisSettings, *args: str, consumer: str = "demo",
                  env: Mapping[str, str] | None = None, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start ``nosq serve`` and wait until its heartbeat says it is running. ``env`` adds to
    this process's environment (e.g. ``CUDA_VISIBLE_DEVICES`` for one manager per GPU); ``log``
    receives its standard error (its log) instead of this process's."""
    command = [sys.executable, "-m", "nosq.manager.ops.cli", "--redis-url", settings.url, "serve",
               "--consumer", consumer, *args]
    process = subprocess.Popen(command, start_new_session=True, env={**os.environ, **(env or {})}, stderr=log)
    client = settings.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            beat: Any = client.get(keys.manager_heartbeat(consumer))
            state = json.loads(beat) if beat is not None else {}
            # the pid check: a SIGKILLed predecessor's heartbeat lingers until its TTL
            if state.get("state") == "running" and state.get("pid") == process.pid and process.poll() is None:
                return process
            if process.poll() is not None:
                raise NosqError(f"the manager exited with status {process.returncode} while starting")
            time.sleep(0.2)  # a child process has no event to wait on
    finally:
        client.close()
    stop_manager(process)
    raise NosqError(f"the manager did not start within {START_TIMEOUT_S:.0f} s")


def stop_manager(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """SIGTERM, wait for the drain, return the exit status (SIGKILL if it hangs)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


async def _burst(settings: RedisSettings, model: str, requests: int, concurrency: int) -> dict[str, Any]:
    inputs: list[Any]
    if model in DEMO_TEXTS:
        requests = min(requests, TEXT_REQUESTS)
        inputs = list(demo_documents(requests))
    else:
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(DEMO_INPUTS[model], dtype=np.float32) for _ in range(min(requests, 64))]
    latencies: list[float] = []
    sizes: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    paddings: list[float] = []
    started = time.perf_counter()
    async with AsyncProducer(settings) as producer:
        sent = 0
        window: set[asyncio.Task[None]] = set()

        async def one(x: Any) -> None:
            t0 = time.perf_counter()
            handle = await producer.submit(model, x, timeout_s=60)
            envelope = await producer.outcome(handle, timeout_s=60)
            latencies.append((time.perf_counter() - t0) * 1000)
            if envelope.ok:
                sizes[int(envelope.batch.get("size", 0))] += 1
                reasons[str(envelope.batch.get("reason", ""))] += 1
                if "padding" in envelope.batch:
                    paddings.append(float(envelope.batch["padding"]))
            else:
                errors[envelope.code] += 1

        while sent < requests or window:
            while sent < requests and len(window) < concurrency:
                task = asyncio.create_task(one(inputs[sent % len(inputs)]))
                window.add(task)
                task.add_done_callback(window.discard)
                sent += 1
            await asyncio.wait(set(window), return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "model": model, "requests": requests, "seconds": round(elapsed, 3),
        "req_per_s": round(requests / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "mean_batch": round(sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())), 1),
        "max_batch": max(sizes, default=0), "reasons": dict(reasons), "errors": dict(errors),
        "padding": round(statistics.mean(paddings), 3) if paddings else None,
    }


async def _all_bursts(settings: RedisSettings, requests: int, concurrency: int) -> list[dict[str, Any]]:
    models = (*DEMO_INPUTS, *DEMO_TEXTS)
    return list(await asyncio.gather(*(_burst(settings, m, requests, concurrency) for m in models)))


def run_demo(settings: RedisSettings, *, requests: int, concurrency: int) -> int:
    print(f"nosq demo: starting a manager with the demo models against {settings.describe()} ...", flush=True)
    process = start_manager(settings)
    try:
        started = time.perf_counter()
        rows = asyncio.run(_all_bursts(settings, requests, concurrency))
        wall = time.perf_counter() - started
    finally:
        status = stop_manager(process)
    total = sum(r["requests"] for r in rows)
    print(f"\n{'model':<12}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>11}"
          f"{'max batch':>10}  errors  release reasons")
    for r in rows:
        print(f"{r['model']:<12}{r['requests']:>9}{r['req_per_s']:>9.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['mean_batch']:>11.1f}{r['max_batch']:>10}  {sum(r['errors'].values()):>6}  {r['reasons']}")
    for r in rows:
        if r["model"] in DEMO_TEXTS:
            padding = "" if r["padding"] is None else f", padding {r['padding']:.0%} of the tokens computed"
            print(f"{r['model']}: {r['requests']} documents embedded (float32[384] each, 8 to 256 tokens), batched "
                  f"by token length{padding}")
    errors = sum(sum(r["errors"].values()) for r in rows)
    print(f"\n{total} requests over {len(rows)} models concurrently in {wall:.1f} s "
          f"({total / wall:.0f} req/s overall), {errors} errors; manager exited with status {status}")
    return 0 if errors == 0 and status == 0 else 1
