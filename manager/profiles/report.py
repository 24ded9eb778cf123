"""Showing a profile: a text progress bar, the curve as a table, and a PNG plot.

Needs only the standard library and, for the plot, matplotlib (Agg backend, no display), so the
benchmark can use it on a GPU machine without Ray or Redis.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from nosq.workers.profiles.curve import MIB, Measurement, OutOfMemory, Profile

__all__ = ["ProgressBar", "format_table", "write_plot"]


class ProgressBar:
    """``[#####.....] 5/9  b=16  p50 3.2 ms`` on one line of ``stream``, redrawn per size.

    On a stream that is not a terminal each size gets a line of its own instead."""

    def __init__(self, label: str, *, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self._tty = self.stream.isatty()
        self._started = time.perf_counter()

    def start(self, total: int) -> None:
        self._draw(0, total, "starting")

    def update(self, done: int, total: int, result: Measurement) -> None:
        if isinstance(result, OutOfMemory):
            note = f"b={result.batch} out of memory"
        else:
            note = f"b={result.batch}  p50 {result.p50_ms:.2f} ms  {result.items_per_s:,.0f}/s"
        self._draw(done, total, note)

    def finish(self, note: str) -> None:
        elapsed = time.perf_counter() - self._started
        line = f"{self.label}: {note} in {elapsed:.1f} s"
        self.stream.write(f"\r{line:<{self._line_width()}}\n" if self._tty else f"{line}\n")
        self.stream.flush()

    def _draw(self, done: int, total: int, note: str) -> None:
        filled = self.width * done // max(1, total)
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}  {note}"
        self.stream.write(f"\r{line:<{self._line_width()}}" if self._tty else f"{line}\n")
        self.stream.flush()

    def _line_width(self) -> int:
        return len(self.label) + self.width + 60


def format_table(profile: Profile) -> str:
    """The curve and the choice, for people."""
    plan = profile.plan
    lines = [
        f"model {plan.model} on {plan.device_kind} ({plan.device}, {plan.threads} thread(s), torch "
        f"{plan.torch_version}), input {plan.signature}, method {plan.method}",
        f"weights {plan.weights_bytes / MIB:,.1f} MiB; memory limit {plan.memory_limit_bytes / MIB:,.0f} MiB "
        f"({plan.memory_method}); latency budget {plan.latency_budget_ms:g} ms (p95); spec {plan.fingerprint}",
        "",
        f"{'b':>6} {'p50 ms':>10} {'p95 ms':>10} {'items/s':>12} {'memory MiB':>11} {'runs':>5}",
    ]
    for p in profile.points:
        mark = "  <- b*" if p.batch == profile.best_batch else ""
        lines.append(f"{p.batch:>6} {p.p50_ms:>10.3f} {p.p95_ms:>10.3f} {p.items_per_s:>12,.0f} "
                     f"{p.memory_bytes / MIB:>11.2f} {p.reps:>5}{mark}")
    lines += [
        "",
        f"stopped: {profile.stop.message}",
        f"b* = {profile.best_batch}  ({profile.reason})",
        f"profiled in {profile.seconds:.1f} s",
    ]
    return "\n".join(lines)


def write_plot(profile: Profile, path: Path) -> Path:
    """Two panels against batch size: throughput and p95 latency (with the budget line), and
    memory (with the weights' size); b* marked in both. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = profile.plan
    sizes = [p.batch for p in profile.points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    fig.suptitle(f"{plan.model} on {plan.device_kind}, input {plan.signature}: b* = {profile.best_batch}")

    left.plot(sizes, [p.items_per_s for p in profile.points], "o-", color="tab:blue", label="throughput")
    left.set_xlabel("batch size")
    left.set_ylabel("items/s", color="tab:blue")
    left.set_xscale("log", base=2)
    latency = left.twinx()
    latency.plot(sizes, [p.p95_ms for p in profile.points], "s--", color="tab:red", label="p95 latency")
    latency.plot(sizes, [p.p50_ms for p in profile.points], ".:", color="tab:red", alpha=0.5, label="p50 latency")
    latency.axhline(plan.latency_budget_ms, color="tab:red", linewidth=1, label=f"budget {plan.latency_budget_ms:g} ms")
    if profile.points and plan.latency_budget_ms > 5 * max(p.p95_ms for p in profile.points):
        latency.set_yscale("log")  # a budget far above the curve would flatten it on a linear axis
    latency.set_ylabel("latency ms", color="tab:red")
    latency.legend(loc="upper left", fontsize="small")
    left.set_title("throughput and latency")

    right.plot(sizes, [p.memory_bytes / MIB for p in profile.points], "o-", color="tab:green", label="batch memory")
    right.axhline(plan.weights_bytes / MIB, color="tab:gray", linestyle="--",
                  label=f"weights {plan.weights_bytes / MIB:,.1f} MiB")
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("MiB")
    right.set_title(f"memory ({plan.memory_method})")
    right.legend(loc="upper left", fontsize="small")

    for axis in (left, right):
        axis.axvline(profile.best_batch, color="black", linewidth=0.8, linestyle=":")
        axis.grid(True, alpha=0.3)
        if sizes:
            axis.set_xticks(sizes, [str(b) for b in sizes])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
