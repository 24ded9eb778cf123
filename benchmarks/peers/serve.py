"""Ray Serve with ``@serve.batch`` (the same cap and wait as nosq), through a handle and HTTP.

In the run's private Ray on loopback (started by the harness; this process is its driver):
Serve's HTTP proxy on 127.0.0.1 at a free port, and one application per model (route
``/<model>``) whose replica hosts the model with the run's torch threads.
``max_ongoing_requests`` is raised well above the batch cap (Serve's default of 5 would cap
every batch at 5). Handle clients join that Ray from the load processes; the HTTP clients are
in ``benchmarks.peers.serve_http``. Imported only when a Serve system runs: a GPU box without
``ray[serve]`` never imports it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from benchmarks.peers.models import Target, build_model
from nosq.workers.spec import ModelSpec

__all__ = ["connect_handle", "running"]

TIMEOUT_S = 60.0


@serve.deployment
class BatchedModel:
    """One demo model behind ``@serve.batch``; ``infer`` for handles, ``__call__`` for HTTP."""

    def __init__(self, spec_json: str, batch: int, wait_s: float) -> None:
        import torch

        spec = ModelSpec.model_validate_json(spec_json)
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        self.device = torch.device(spec.device)
        self.model = build_model(spec, spec.device)
        self.batched.set_max_batch_size(batch)
        self.batched.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def batched(self, items: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        x = torch.from_numpy(np.stack(items)).to(self.device)
        with torch.inference_mode():
            out = self.model(x).cpu().numpy()
        return list(out)

    async def infer(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = await self.batched(x)
        return out

    async def __call__(self, request: Request) -> Response:
        shape = tuple(int(d) for d in request.query_params["shape"].split(","))
        x = np.frombuffer(await request.body(), dtype=np.float32).reshape(shape)
        out: np.ndarray = await self.batched(x)
        return Response(out.tobytes(), media_type="application/octet-stream")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running(targets: list[Target], *, ray_address: str) -> Iterator[dict[str, Any]]:
    """Serve with one application per target in the run's Ray (this process is its driver)
    until the block ends; then Serve is shut down, its actors with it."""
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    try:
        for target in targets:
            app = BatchedModel.options(
                name=target.id, max_ongoing_requests=max(4 * target.batch, 512),
                ray_actor_options={"num_cpus": target.spec.num_cpus,
                                   "num_gpus": 1 if target.spec.device.startswith("cuda") else 0},
            ).bind(target.spec.model_dump_json(), target.batch, target.spec.max_wait_ms / 1000)
            serve.run(app, name=target.id, route_prefix=f"/{target.id}",
                      logging_config={"log_level": "WARNING"})
        yield {"address": ray_address, "http": f"http://127.0.0.1:{port}", "apps": [t.id for t in targets]}
    finally:
        serve.shutdown()


class HandleClient:
    def __init__(self, handles: dict[str, Any]) -> None:
        self.handles = handles

    async def call(self, model: str, x: np.ndarray) -> None:
        await self.handles[model].infer.remote(x)

    async def aclose(self) -> None:
        import ray

        ray.shutdown()

    def extra(self) -> dict[str, Any]:
        return {}


async def connect_handle(params: dict[str, Any]) -> HandleClient:
    """Join the driver's Ray instance (on loopback) and take a handle to each application."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=params["address"], _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, logging_level="warning")
    return HandleClient({app: serve.get_app_handle(app) for app in params["apps"]})
