"""Test-only models for the manager's integration tests, built by factory strings such as
``tests.manager.models:raising`` (the Ray worker imports them: the repo root is on its path).

Every model takes a batch of 1-D float32 items, stacked as ``(n, d)``, and echoes it (so a
test knows each output) unless its hook fires. Hooks look at each item's first element:

* ``raising``: raises ``ValueError`` for a batch with a negative first element;
* ``wrong_count``: returns ``2 n`` outputs for ``n`` inputs;
* ``crashing``: kills its own process (``os._exit(1)``) on ``MAGIC``, but only the first
  ``crashes`` times (counted by marker files in ``crash_dir``), so a retry can succeed;
* ``always_crashing``: kills its own process on ``MAGIC`` every time (one marker per crash);
* ``slow``: sleeps ``delay_s`` per batch.

Each also takes ``record``: a file to which every call appends one JSON line,
``{"pid": ..., "firsts": [...]}``, which tells a test what ran, in which batch, where.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MAGIC",
    "Probe",
    "always_crashing",
    "crashing",
    "raising",
    "read_record",
    "slow",
    "wrong_count",
]

MAGIC = 666.0  # the first element that makes the crashing models kill their process


class Probe(nn.Module):
    """An echo model with the hooks described in the module docstring."""

    def __init__(
        self, *, delay_s: float = 0.0, record: str | None = None, raise_negative: bool = False,
        extra_outputs: bool = False, crash_dir: str | None = None, crashes: int | None = None,
    ) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.record = record
        self.raise_negative = raise_negative
        self.extra_outputs = extra_outputs
        self.crash_dir = crash_dir
        self.crashes = crashes  # None: every time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        firsts = [float(v) for v in x[:, 0]]
        if self.record is not None:
            with open(self.record, "a", encoding="utf-8") as file:
                file.write(json.dumps({"pid": os.getpid(), "firsts": firsts}) + "\n")
        if self.crash_dir is not None and MAGIC in firsts and self._crash_again():
            os._exit(1)
        if self.raise_negative and any(v < 0 for v in firsts):
            raise ValueError(f"negative first element {min(firsts)} in a batch of {len(firsts)}")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.extra_outputs:
            return torch.cat([x, x])
        return x.clone()

    def _crash_again(self) -> bool:
        """Leave one marker file per crash in ``crash_dir`` (tests count them)."""
        assert self.crash_dir is not None
        done = len(os.listdir(self.crash_dir))
        if self.crashes is not None and done >= self.crashes:
            return False
        Path(self.crash_dir, f"crash-{done}").touch(exist_ok=False)
        return True


def raising(*, delay_s: float = 0.0, record: str | None = None) -> Probe:
    return Probe(delay_s=delay_s, record=record, raise_negative=True).eval()


def wrong_count(*, record: str | None = None) -> Probe:
    return Probe(record=record, extra_outputs=True).eval()


def crashing(*, crash_dir: str, crashes: int = 1, delay_s: float = 0.0, record: str | None = None) -> Probe:
    return Probe(delay_s=delay_s, record=record, crash_dir=crash_dir, crashes=crashes).eval()


def always_crashing(*, crash_dir: str, delay_s: float = 0.0, record: str | None = None) -> Probe:
    return Probe(delay_s=delay_s, record=record, crash_dir=crash_dir, crashes=None).eval()


def slow(*, delay_s: float, record: str | None = None) -> Probe:
    return Probe(delay_s=delay_s, record=record).eval()


def read_record(path: Path) -> list[dict[str, object]]:
    """The calls a model appended to its ``record`` file, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
