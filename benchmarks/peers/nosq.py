"""nosq: producer -> Redis -> manager -> Ray actor -> result.

The driver starts ``nosq serve`` (``nosq.manager.ops.demo.start_manager``: Ray on loopback, no metrics
port) with a config holding exactly the run's specs, so the manager finds the stored profile of
each and serves it with b*. A load process holds one ``AsyncProducer`` (one reply stream for all
its clients) and sends one request per call, as an application would.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers.models import Target
from nosq.producer import keys
from nosq.producer.aio import AsyncProducer
from nosq.producer.errors import NosqError
from nosq.producer.settings import RedisSettings

__all__ = ["NosqClient", "connect", "running", "settle"]

TIMEOUT_S = 60.0


def config_toml(targets: list[Target]) -> str:
    """A serve config of the targets' specs (a stored profile is found by the spec's fingerprint)."""
    blocks = []
    for target in targets:
        lines = ["[[models]]"]
        for key, value in target.spec.model_dump(mode="json", exclude_none=True).items():
            lines.append(f"{key} = {_toml(value)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # numbers, and strings as TOML basic strings


@contextmanager
def running(targets: list[Target], settings: RedisSettings, *, ray_address: str | None) -> Iterator[dict[str, Any]]:
    """A manager serving ``targets`` until the block ends (SIGTERM, drained); it joins the Ray at
    ``ray_address``, or starts its own."""
    from nosq.manager.ops.demo import start_manager, stop_manager

    config = Path(tempfile.mkdtemp(prefix="nosq-peers-")) / "peers.toml"
    config.write_text(config_toml(targets))
    join = ["--ray-address", ray_address] if ray_address else []
    log_path = config.with_name("manager.log")
    with log_path.open("wb") as log:
        try:
            process = start_manager(settings, "--config", str(config), "--log-level", "info", "--metrics-port", "-1",
                                    *join, consumer="peers-bench", log=log)
        except NosqError:  # why it did not start is in its log
            sys.stderr.write(log_path.read_text(errors="replace")[-8000:])
            raise
    try:
        yield {"url": settings.url}
    finally:
        stop_manager(process)


def settle(settings: RedisSettings, models: list[str], timeout_s: float = 60.0) -> None:
    """Wait until the manager has drained what abandoned requests left in the streams."""
    client = settings.client()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(client.xlen(keys.requests(m)) for m in models):
            time.sleep(0.2)  # a separate process's queue: nothing to wait on
    finally:
        client.close()


class NosqClient:
    def __init__(self, producer: AsyncProducer) -> None:
        self.producer = producer
        self.sizes: Counter[int] = Counter()

    async def call(self, model: str, x: np.ndarray) -> None:
        handle = await self.producer.submit(model, x, timeout_s=TIMEOUT_S)
        envelope = await self.producer.outcome(handle, TIMEOUT_S)
        if not envelope.ok:
            raise RuntimeError(f"nosq answered {envelope.code}: {envelope.message}")
        self.sizes[int(envelope.batch.get("size", 0))] += 1

    async def aclose(self) -> None:
        await self.producer.aclose()

    def extra(self) -> dict[str, Any]:
        """The mean batch size the answers of this run report."""
        n = sum(self.sizes.values())
        mean = sum(k * v for k, v in self.sizes.items()) / n if n else 0.0
        self.sizes.clear()
        return {"mean_batch": round(mean, 1)}


async def connect(params: dict[str, Any]) -> NosqClient:
    producer = AsyncProducer(RedisSettings(url=params["url"]))
    await producer.start()
    return NosqClient(producer)
