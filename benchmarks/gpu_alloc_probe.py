"""What a GPU actor's process really holds after serving batches of random sizes up to b*
(issue 5): run once without and once with expandable allocator segments, on a GPU machine.

    python -m benchmarks.gpu_alloc_probe
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m benchmarks.gpu_alloc_probe

Prints the process's memory by nvidia-smi and torch's reserved bytes, as one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

from nosq.producer.codec import encode_value
from nosq.workers.actor import ModelWorker
from nosq.workers.datapath import batch_of
from nosq.workers.spec import ModelSpec

BATCHES = 300


def main() -> None:
    spec = ModelSpec(id="cnn-large", factory="nosq.workers.demo:cnn", device="cuda", max_batch=128,
                     options={"size": 128})
    worker = ModelWorker(spec)
    item = encode_value("msgpack", worker.example().numpy())
    rng = random.Random(0)
    for _ in range(BATCHES):
        n = rng.randint(1, spec.max_batch)
        worker.run(batch_of("forward", "msgpack", [item] * n))
    smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    used = {int(pid): int(mib) for pid, mib in (line.split(", ") for line in smi.strip().splitlines())}
    print(json.dumps({"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "process_mib": used.get(os.getpid()),
                      "reserved_mib": worker.memory()["cuda_reserved"] / 2**20}))


if __name__ == "__main__":
    main()
