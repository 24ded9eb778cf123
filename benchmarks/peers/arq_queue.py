"""arq: the plain Redis job queue. One job per request; a worker process runs the model.

arq has no batching: each job runs the model on one item. The worker is a subprocess
(``python -m benchmarks.peers.arq_queue``) with arq's defaults except the poll interval, which
is ``--arq-poll-ms`` for both the worker's queue poll and the client's ``job.result()`` poll
(arq's default: 500 ms each). Imported only when arq runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

from benchmarks.peers.models import Target, input_items

__all__ = ["ArqClient", "connect", "running"]

TIMEOUT_S = 60.0
READY_TIMEOUT_S = 120.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def infer(ctx: dict[str, Any], model: str, x: np.ndarray) -> np.ndarray:
    """The job: the model on one item (a batch of 1)."""
    import torch

    device = ctx["devices"][model]
    with torch.inference_mode():
        out: np.ndarray = ctx["models"][model](torch.from_numpy(x).unsqueeze(0).to(device))[0].cpu().numpy()
    return out


def _worker_main() -> int:
    parser = argparse.ArgumentParser(description="an arq worker hosting the peers benchmark's models")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--poll-ms", type=float, required=True)
    parser.add_argument("--specs", required=True, help="JSON list of ModelSpec dicts")
    args = parser.parse_args()

    import torch

    from benchmarks.peers.models import build_model
    from nosq.workers.spec import ModelSpec

    specs = [ModelSpec.model_validate(s) for s in json.loads(args.specs)]
    threads = {s.threads for s in specs if s.threads is not None}
    if threads:
        torch.set_num_threads(max(threads))
    ctx = {"models": {s.id: build_model(s, s.device) for s in specs},
           "devices": {s.id: torch.device(s.device) for s in specs}}
    worker = Worker([func(infer, name="infer")], redis_settings=RedisSettings.from_dsn(args.redis_url),
                    poll_delay=args.poll_ms / 1000, keep_result=60, ctx=ctx)
    worker.run()
    return 0


@contextmanager
def running(targets: list[Target], *, url: str, poll_ms: float) -> Iterator[dict[str, Any]]:
    """An arq worker subprocess until the block ends; ready once a first job came back."""
    specs = json.dumps([t.spec.model_dump(mode="json") for t in targets])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.peers.arq_queue", "--redis-url", url,
                                "--poll-ms", str(poll_ms), "--specs", specs], env=env, start_new_session=True)
    params = {"url": url, "poll_s": poll_ms / 1000}
    try:
        asyncio.run(_first_job(params, targets[0], process))
        yield params
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def _first_job(params: dict[str, Any], target: Target, process: subprocess.Popen[bytes]) -> None:
    client = await connect(params)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        job = await client.pool.enqueue_job("infer", target.id, input_items(target.shape, n=1)[0])
        if job is None:
            raise RuntimeError("arq refused the first job")
        while True:
            try:
                await job.result(timeout=1.0, poll_delay=client.poll_s)
                return
            except TimeoutError:
                if process.poll() is not None:
                    raise RuntimeError(f"the arq worker exited with status {process.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the arq worker ran no job within {READY_TIMEOUT_S:.0f} s") from None
    finally:
        await client.aclose()


class ArqClient:
    def __init__(self, pool: ArqRedis, poll_s: float) -> None:
        self.pool = pool
        self.poll_s = poll_s

    async def call(self, model: str, x: np.ndarray) -> None:
        job = await self.pool.enqueue_job("infer", model, x)
        if job is None:
            raise RuntimeError("arq refused the job (an id that exists)")
        await job.result(timeout=TIMEOUT_S, poll_delay=self.poll_s)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def extra(self) -> dict[str, Any]:
        return {}


async def connect(params: dict[str, Any]) -> ArqClient:
    pool = await create_pool(RedisSettings.from_dsn(params["url"]))
    return ArqClient(pool, params["poll_s"])


if __name__ == "__main__":
    sys.exit(_worker_main())
