"""A test model whose memory is large and known: an echo that holds ``mib`` MiB of weights.

Built in a Ray actor by the factory string ``tests.registry.ballast:ballast`` (the repo root is
on the workers' path). The weights are written (``torch.full``), so every page is resident and
the actor's RSS grows by ``mib`` MiB. Before it allocates, the factory records its process's
RSS (torch and Ray imported, nothing of the model yet) in ``<record_dir>/<tag>-<pid>.json``:
the test reads which actor process hosts which model, and takes that RSS as the process's own
baseline, so ``RSS now - rss_before`` is the memory the model added.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["Ballast", "ballast", "read_records", "rss_bytes"]

MIB = 1024 * 1024


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process from ``/proc/<pid>/statm`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Ballast(nn.Module):
    """Echoes its batch; holds ``mib`` MiB of float32 weights that every page of is written."""

    def __init__(self, mib: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((mib * MIB // 4,), 0.5), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def example_input(self) -> torch.Tensor:
        """One item (the test sends 8 float32): the key its stored profile is found by."""
        return torch.zeros(8, dtype=torch.float32)


def ballast(mib: int, tag: str, record_dir: str) -> Ballast:
    """The model of ``tag``, after recording this process's RSS before the weights exist."""
    record = {"model": tag, "pid": os.getpid(), "mib": mib, "rss_before": rss_bytes()}
    path = Path(record_dir) / f"{tag}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a record
    return Ballast(mib).eval()


def read_records(record_dir: Path) -> dict[int, dict[str, object]]:
    """pid -> record of every ballast model built so far."""
    records: dict[int, dict[str, object]] = {}
    for path in record_dir.glob("*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        records[int(record["pid"])] = record
    return records
