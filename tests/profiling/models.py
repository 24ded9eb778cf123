"""Test-only models for the profiling tests, built by factory strings such as
``tests.profiling.models:paced`` (Ray workers import them: the repo root is on their path).

* ``paced``: echoes its ``(n, 4)`` batch after sleeping ``base_ms + per_item_ms * n``, or
  ``hold_ms`` when an item's first element is ``MAGIC`` (to keep its replica busy);
* ``exhausting``: echoes, but fails like a device out of memory for batches over ``limit``;
* ``no_example``: echoes, and has no ``example_input``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["MAGIC", "Exhausting", "NoExample", "Paced", "exhausting", "no_example", "paced"]

MAGIC = 666.0


class Paced(nn.Module):
    def __init__(self, base_ms: float, per_item_ms: float, hold_ms: float) -> None:
        super().__init__()
        self.base_ms = base_ms
        self.per_item_ms = per_item_ms
        self.hold_ms = hold_ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == MAGIC).any()):
            time.sleep(self.hold_ms / 1000)
        else:
            time.sleep((self.base_ms + self.per_item_ms * x.shape[0]) / 1000)
        return x

    def example_input(self) -> torch.Tensor:
        return torch.zeros(4)


class Exhausting(nn.Module):
    """Raises what a device raises when a batch does not fit: ``error`` picks which."""

    def __init__(self, limit: int, error: str) -> None:
        super().__init__()
        self.limit = limit
        self.error = error
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            if self.error == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if self.error == "cpu":
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
            raise MemoryError()
        out: torch.Tensor = self.linear(x)
        return out

    def example_input(self) -> torch.Tensor:
        return torch.ones(4)


class NoExample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def paced(*, base_ms: float = 60.0, per_item_ms: float = 40.0, hold_ms: float = 1000.0) -> Paced:
    return Paced(base_ms, per_item_ms, hold_ms)


def exhausting(*, limit: int = 8, error: str = "cuda") -> Exhausting:
    return Exhausting(limit, error)


def no_example() -> NoExample:
    return NoExample()
