"""The limit: the model called in this process, no queue, no network.

With ``c`` clients an ideal server runs batches of ``min(c, b*)``: that batch is stacked once
from the run's input items and run back to back for the measured window. A run is what a served
batch costs on the device: the copy to the device, the model, the copy of the output back to the
host (CUDA synchronised), the same work as a profile's timed run. Latency is the batch's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.peers.load import percentiles
from benchmarks.peers.models import Target, build_model, input_items

__all__ = ["run_direct", "time_batches"]


def run_direct(target: Target, *, clients: list[int], warmup_s: float, seconds: float) -> list[dict[str, Any]]:
    """One figure set per client count: items/s and batch latency at ``min(clients, b*)``."""
    spec = target.spec
    device = torch.device(spec.device)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    model = build_model(spec, spec.device)
    items = input_items(target.shape)
    figures = []
    for n in clients:
        batch = min(n, target.batch)
        host = torch.from_numpy(np.stack([items[i % len(items)] for i in range(batch)]))
        for window, record in ((warmup_s, False), (seconds, True)):
            times = time_batches(model, host, device, window)
            if record:
                done = batch * len(times)
                figures.append({"clients": n, "batch": batch, "req_per_s": done / sum(times), "n": done,
                                "errors": 0, **percentiles(sorted(t * 1000 for t in times))})
    return figures


def time_batches(model: torch.nn.Module, host: torch.Tensor, device: torch.device, seconds: float) -> list[float]:
    """Run the batch ``host`` (copied to ``device``, output back to the host) back to back for
    ``seconds`` (at least once); each run's seconds."""
    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode():
        stop = time.perf_counter() + seconds
        while (began := time.perf_counter()) < stop or not times:
            x = host.to(device, non_blocking=True) if cuda else host
            out = model(x)
            out.cpu()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
    return times
