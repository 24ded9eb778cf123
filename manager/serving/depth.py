"""A model's queue depth summed over its request streams (one per partition): how many entries
wait, how many are read but not acknowledged, and when the oldest waiting one was enqueued."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nosq.producer import keys

__all__ = ["Depth", "ask", "depths"]

_PER_STREAM = 3  # XLEN, XPENDING, XRANGE COUNT 1


@dataclass(slots=True)
class Depth:
    backlog: int = 0  # entries in the streams (waiting or pending)
    pending: int = 0  # read by a manager, not yet acknowledged
    oldest_ms: int | None = None  # enqueue time (unix ms) of the oldest entry in any stream


def ask(pipe: Any, streams: Sequence[str]) -> None:
    """Queue the commands ``depths`` reads, on a sync or async pipeline (``raise_on_error=False``:
    a missing stream or group counts as empty)."""
    for stream in streams:
        pipe.xlen(stream)
        pipe.xpending(stream, keys.GROUP)
        pipe.xrange(stream, count=1)


def depths(answers: Sequence[Any], stream_counts: Sequence[int]) -> list[Depth]:
    """One Depth per model from the answers of ``ask`` (models in order, ``stream_counts[i]``
    streams for model i)."""
    out = []
    at = 0
    for count in stream_counts:
        depth = Depth()
        for length, pending, first in zip(*[iter(answers[at : at + _PER_STREAM * count])] * _PER_STREAM,
                                          strict=True):
            depth.backlog += length if isinstance(length, int) else 0
            depth.pending += int(pending.get("pending", 0)) if isinstance(pending, dict) else 0
            if isinstance(first, list) and first:
                entry_id = first[0][0]
                entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                enqueued = int(entry_id.partition("-")[0])
                depth.oldest_ms = enqueued if depth.oldest_ms is None else min(depth.oldest_ms, enqueued)
        out.append(depth)
        at += _PER_STREAM * count
    return out
