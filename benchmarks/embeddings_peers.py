"""The peers of ``benchmarks.embeddings``: infinity-emb (its own server, in its own venv) and Ray
Serve ``@serve.batch``, each serving all-MiniLM-L6-v2 from the same directory, one text per request.

infinity-emb pins numpy < 2 (ours is 2.x), so it lives in a venv of its own: ``ensure_infinity``
creates it (default ``/tmp/nosq-infinity-venv``) with the same CPU torch as ours and
``infinity-emb[server,torch]``; its server runs as a subprocess on a free loopback port and is
sent ``POST /embeddings`` requests (its OpenAI-style API) over HTTP with aiohttp.

Ray Serve runs in a private Ray on loopback started here (``nosq.manager.runtime.raycluster``): one replica
whose ``@serve.batch`` method calls ``SentenceTransformer.encode`` on the batch, as a user would
write it; the driver sends through a handle.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.support import free_port

__all__ = ["Client", "Send", "ensure_infinity", "infinity_server", "serve_app"]

INFINITY_VERSION = "0.0.78"
START_TIMEOUT_S = 300.0
Send = Callable[[str], Awaitable[Any]]  # one text in, its vector out
Client = Callable[[], AbstractAsyncContextManager[Send]]  # opened inside the load's event loop


def ensure_infinity(venv: Path, torch_version: str) -> Path:
    """The ``infinity_emb`` executable of ``venv``, created and installed first if missing."""
    binary = venv / "bin" / "infinity_emb"
    if binary.exists():
        return binary
    print(f"... creating {venv} for infinity-emb {INFINITY_VERSION} (it pins numpy<2)", flush=True)
    subprocess.run([os.environ.get("PYTHON", "python3.11"), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"torch=={torch_version}", f"infinity-emb[server,torch]=={INFINITY_VERSION}"], check=True)
    return binary


@contextmanager
def infinity_server(binary: Path, model_dir: Path, *, device: str, dtype: str, threads: int, batch: int,
                    log: Path) -> Iterator[Client]:
    """An infinity-emb server on loopback until the block ends; yields its client factory."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    command = [str(binary), "v2", "--model-id", str(model_dir), "--served-model-name", "minilm", "--host", "127.0.0.1",
               "--port", str(port), "--engine", "torch", "--device", device, "--dtype", dtype,
               "--batch-size", str(batch), "--log-level", "warning", "--no-model-warmup"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", process)

        @asynccontextmanager
        async def client() -> AsyncIterator[Send]:
            import aiohttp

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                async def send(text: str) -> Any:
                    async with session.post(f"{url}/embeddings", json={"model": "minilm", "input": [text]}) as reply:
                        reply.raise_for_status()
                        body = await reply.json()
                    return body["data"][0]["embedding"]

                yield send

        yield client
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_http(url: str, process: subprocess.Popen[bytes]) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)  # another process starting: nothing to wait on
    raise RuntimeError(f"{url} did not answer within {START_TIMEOUT_S:.0f} s")


@contextmanager
def serve_app(model_dir: Path, *, device: str, dtype: str, threads: int, batch: int, wait_s: float,
              max_ongoing: int) -> Iterator[Client]:
    """Ray Serve with one ``@serve.batch`` replica of the model until the block ends; its client factory."""
    import ray
    from ray import serve

    from nosq.manager.runtime import raycluster

    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray's own spelling) nice 0, as in benchmarks.embeddings
    owns = raycluster.connect(None, max(2, threads + 1))
    try:
        serve.start(logging_config={"log_level": "WARNING"})
        deployment = serve.deployment(_embedder_class()).options(
            max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": threads,
                                                                 "num_gpus": 1 if device == "cuda" else 0},
            logging_config={"log_level": "WARNING", "enable_access_log": False})
        handle = serve.run(deployment.bind(str(model_dir), device, dtype, threads, batch, wait_s), name="minilm",
                           route_prefix=None)

        @asynccontextmanager
        async def client() -> AsyncIterator[Send]:
            async def send(text: str) -> Any:
                return await handle.remote(text)

            yield send

        yield client
    finally:
        serve.shutdown()
        if owns:
            raycluster.disconnect()
        elif ray.is_initialized():
            ray.shutdown()


def _embedder_class() -> type:
    """SentenceTransformer behind ``@serve.batch`` (cap and wait set per run), as a user writes it."""
    from ray import serve

    class Embedder:
        def __init__(self, model_dir: str, device: str, dtype: str, threads: int, batch: int,  # noqa: PLR0917
                     wait_s: float) -> None:
            import torch
            from sentence_transformers import SentenceTransformer

            os.environ["HF_HUB_OFFLINE"] = "1"
            torch.set_num_threads(threads)
            self.model = SentenceTransformer(model_dir, device=device)
            if dtype == "float16":
                self.model.half()
            self.embed.set_max_batch_size(batch)
            self.embed.set_batch_wait_timeout_s(wait_s)

        async def __call__(self, text: str) -> np.ndarray:
            out: np.ndarray = await self.embed(text)
            return out

        @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
        async def embed(self, texts: list[str]) -> list[np.ndarray]:
            vectors = self.model.encode(texts, batch_size=len(texts), normalize_embeddings=True,
                                        convert_to_numpy=True)
            return list(vectors.astype(np.float32))

    return Embedder
