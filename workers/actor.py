"""The Ray actor that hosts one model replica.

``ModelWorker`` is a plain class: the manager wraps it with ``ray.remote(ModelWorker)`` and Ray
starts, places, restarts and kills it. This module does not import torch (the manager imports
it to create replicas): the model, its device and the batch path live in
``nosq.workers.runtime.ModelRuntime``, built inside the replica's own process.

Batches reach a replica two ways (``nosq.workers.channel``): from a manager on the same host through
shared memory and a Unix socket (the channel server this actor starts; ``ready()`` says its
address), or through a Ray call to :meth:`run` with a ``BatchInput`` of numpy arrays.
"""

from __future__ import annotations

import socket
from typing import Any

from nosq.workers import channel
from nosq.workers.datapath import BatchInput, BatchOutput
from nosq.workers.profiles.curve import ProfileOptions
from nosq.workers.spec import ModelSpec

__all__ = ["ModelWorker"]


class ModelWorker:
    """One replica of ``spec``'s model (see ``nosq.workers.runtime.ModelRuntime`` for ``device``)."""

    def __init__(self, spec: ModelSpec, *, device: str | None = None, local_channel: bool = True) -> None:
        from nosq.workers.runtime import ModelRuntime  # torch is imported here, in the replica's process

        self.runtime = ModelRuntime(spec, device=device)
        self._channel: channel.ChannelServer | None = None
        if local_channel and channel.available():
            self._channel = channel.ChannelServer(self.runtime.run_batch, name=f"nosq-{spec.id}")

    @property
    def model(self) -> Any:
        return self.runtime.model

    def ready(self) -> dict[str, Any]:
        """``ModelRuntime.ready()`` plus ``channel``: the address of this replica's shared-memory
        channel (None: Ray calls only) and ``host``, so that only a manager on this host uses it."""
        info = self.runtime.ready()
        info["channel"] = self._channel.address if self._channel is not None else None
        info["host"] = socket.gethostname()
        return info

    def run(self, batch: BatchInput) -> BatchOutput:
        """Run one batch that came through Ray (outputs in a numpy array, back through Ray)."""
        return self.runtime.run_batch(batch)

    def memory(self) -> dict[str, int]:
        return self.runtime.memory()

    def example(self) -> Any:
        return self.runtime.example()

    def profile(self, max_batch: int | None = None, options: ProfileOptions | None = None) -> dict[str, Any]:
        return self.runtime.profile(max_batch, options)

    def profile_plan(self, max_batch: int | None = None, options: ProfileOptions | None = None) -> dict[str, Any]:
        return self.runtime.profile_plan(max_batch, options)

    def profile_one(self, batch: int, options: ProfileOptions | None = None) -> dict[str, Any]:
        return self.runtime.profile_one(batch, options)

    def close(self) -> None:
        """Stop the channel server (a test that builds workers in-process calls this)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
