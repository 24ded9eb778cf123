"""A tiny producer for the compose stack: sends requests to the demo models and prints results.

    python examples/producer.py --redis-url redis://127.0.0.1:6379/0 --requests 100
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from nosq.producer import AsyncProducer, RedisSettings


async def main(url: str, requests: int) -> None:
    async with AsyncProducer(RedisSettings(url=url)) as producer:
        for model, shape in (("noop", (8,)), ("mlp", (512,)), ("cnn", (3, 64, 64))):
            started = time.perf_counter()
            handles = await producer.submit_many(
                model, [np.ones(shape, np.float32) for _ in range(requests)], timeout_s=30
            )
            sizes = []
            async for _, envelope in producer.as_completed(handles, timeout_s=60):
                sizes.append(envelope.batch.get("size", 0))
            elapsed = time.perf_counter() - started
            print(f"{model}: {requests} results in {elapsed:.2f} s, mean batch {sum(sizes) / len(sizes):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.redis_url, args.requests))
