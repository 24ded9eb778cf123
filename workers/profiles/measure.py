"""Latency, throughput and memory of a model against batch size, and the batch size to serve.

Runs in the process that serves the model (the Ray actor), on its real device. For each batch
size in powers of two up to the cap (the spec's ``max_batch``, itself included):

* warm-up runs, then timed runs: at least ``min_reps`` runs and ``min_time_s`` seconds
  (bounded by ``max_reps`` and ``max_time_s``); latency p50 and p95. Each size is measured in
  ``rounds`` rounds interleaved with the other sizes, and the least disturbed p50 and p95 are
  kept (``nosq.workers.profiles.curve.merge``): on a shared machine other processes only ever add time, and
  a burst of theirs then spoils one round of one size instead of the size's figures.
  Throughput = b / p50. A timed run is what a served batch's ``exec_ms`` measures: the copy to
  the device, the model, and the copy of the output back to the host (CUDA is synchronized on
  both sides of every run), so the online refinement of latency(b) folds like into like.
* the model's own memory for the batch (input, intermediates, output), apart from the runs
  that are timed: on CUDA the peak of ``torch.cuda.max_memory_reserved`` (after
  ``empty_cache`` and ``reset_peak_memory_stats``) minus the bytes reserved before: what the
  caching allocator really takes from the card for the batch, rounding and fragmentation
  included (the peak *allocated* undercounts it: docs/benchmarks.md, GPU placement and eviction);
  on CPU the peak RSS of this process minus the RSS before, sampled from ``/proc/self/statm`` by a thread every 0.5 ms
  and after each run (``VmHWM`` never resets). Freed heap memory is returned to the OS with
  glibc's ``malloc_trim(0)`` before the baseline is read, so memory a previous size left
  cached in the allocator is not taken for free. Caches a kernel keeps for good after its
  first run (oneDNN, cuBLAS workspaces) are made by the warm-up and are not part of the delta.

The sweep stops cleanly at the cap, at an out-of-memory error (CUDA's ``OutOfMemoryError``, or
``MemoryError``/a ``RuntimeError`` about memory on the CPU), at the first size over the memory
limit, or at the first size whose p50 is over the latency budget (no larger one can fit). It
records where and why.

b* is the size with the best throughput whose p95 fits ``latency_budget_ms`` and whose memory
fits the limit (CUDA: free memory minus a reserve; CPU: a fraction of the available RAM); if
none fits, b* = 1 and the reason says so. The reason is kept in words with the profile.

The profile's data, the sweep loop and the choice live in ``nosq.workers.profiles.curve`` (pure). Only torch
and the standard library are used here, so this module, ``nosq.workers.profiles.curve`` and ``nosq.workers.demo``
run on a GPU machine that has torch alone (``benchmarks/profile_check.py --direct``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nosq.workers.profiles.curve import (
    Measurement,
    OutOfMemory,
    Plan,
    Point,
    Profile,
    ProfileError,
    ProfileOptions,
    assemble,
    batch_sizes,
    sweep,
)

__all__ = [
    "ProfileOptions",
    "Profiler",
    "device_kind",
    "example_from_options",
    "input_signature",
    "is_out_of_memory",
    "weights_bytes",
]


# -- facts about a model and its device -------------------------------------------------------


def device_kind(device: torch.device) -> str:
    """``cpu`` or ``cuda:<card name>``: what a profile is valid for."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def input_signature(example: torch.Tensor) -> str:
    """dtype and shape of one input item, e.g. ``float32[3,64,64]``."""
    dtype = str(example.dtype).removeprefix("torch.")
    return f"{dtype}[{','.join(str(d) for d in example.shape)}]"


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def example_from_options(spec_id: str, example: Any) -> torch.Tensor:
    """One input item from a spec's ``options.example``: ``{dtype, shape}`` (seeded random
    values; zeros for integer and bool dtypes) or a (nested) list of numbers."""
    if isinstance(example, Mapping):
        dtype = getattr(torch, str(example.get("dtype", "float32")), None)
        shape = example.get("shape")
        if not isinstance(dtype, torch.dtype) or not isinstance(shape, (list, tuple)) or \
                not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProfileError(f"model {spec_id!r}: options.example must look like "
                               f"{{dtype = \"float32\", shape = [3, 64, 64]}}, got {example!r}")
        if dtype.is_floating_point:
            return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(1)).to(dtype)
        return torch.zeros(tuple(shape), dtype=dtype)
    if isinstance(example, (list, tuple)):
        try:
            return torch.as_tensor(example)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ProfileError(f"model {spec_id!r}: options.example is not a list of numbers: {exc}") from exc
    raise ProfileError(f"model {spec_id!r}: options.example must be {{dtype, shape}} or a list of numbers, "
                       f"got a {type(example).__name__}")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, MemoryError, or a RuntimeError about allocation failing."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# -- measuring (torch, in the serving process) ------------------------------------------------


class Profiler:
    """Measures one model's method on its device with batches of ``example`` stacked b times."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        model: torch.nn.Module,
        model_id: str,
        fingerprint: str,
        method: str,
        device: torch.device,
        max_batch: int,
        latency_budget_ms: float,
        example: torch.Tensor,
        options: ProfileOptions | None = None,
    ) -> None:
        self.fn = fn
        self.model = model
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.method = method
        self.device = device
        self.max_batch = max_batch
        self.latency_budget_ms = latency_budget_ms
        self.example = example.detach().cpu()
        self.options = options or ProfileOptions()
        self._cuda = device.type == "cuda"

    def plan(self) -> Plan:
        """Sizes to sweep and the facts every size is judged against."""
        gc.collect()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated(self.device)
            method = "cuda_max_reserved"
        else:
            _trim_heap()
            baseline = _rss_bytes() or 0
            method = "rss_sampled" if _rss_bytes() is not None else "none"
        return Plan(
            model=self.model_id, fingerprint=self.fingerprint, method=self.method, device=str(self.device),
            device_kind=device_kind(self.device), signature=input_signature(self.example),
            max_batch=self.max_batch, sizes=batch_sizes(self.max_batch),
            latency_budget_ms=self.latency_budget_ms, weights_bytes=weights_bytes(self.model),
            baseline_bytes=baseline, memory_limit_bytes=self._memory_limit(), memory_method=method,
            threads=torch.get_num_threads(), torch_version=torch.__version__,
            stop_over_budget=self.options.stop_over_budget, rounds=self.options.rounds,
        )

    def run(self, on_result: Callable[[int, int, Measurement], None] | None = None) -> Profile:
        """The whole profile: plan, sweep, choice."""
        started, clock = time.time(), time.perf_counter()
        plan = self.plan()
        points, stop = sweep(plan, self.measure, on_result=on_result)
        return assemble(plan, points, stop, profiled_at=started, seconds=time.perf_counter() - clock)

    def measure(self, batch: int) -> Measurement:
        """Figures for one batch size, or ``OutOfMemory`` (memory is given back first)."""
        try:
            host = self._stack(batch)
            for _ in range(self.options.warmup):
                self._once(host)
            memory = self._memory(batch)
            times = self._time(host)
        except (RuntimeError, MemoryError) as exc:  # only out-of-memory is caught: others are the model's bugs
            if not is_out_of_memory(exc):
                raise
            message = _first_line(exc)
        else:
            p50 = statistics.median(times)
            p95 = sorted(times)[max(0, math.ceil(0.95 * len(times)) - 1)]
            return Point(batch=batch, p50_ms=p50, p95_ms=p95, items_per_s=batch * 1000.0 / p50,
                         memory_bytes=memory, reps=len(times))
        # past the except block, so the traceback no longer holds the batch's tensors
        gc.collect()
        if self._cuda:
            torch.cuda.empty_cache()
        return OutOfMemory(batch, message)

    # -- internals --------------------------------------------------------------------------

    def _stack(self, batch: int) -> torch.Tensor:
        return self.example.unsqueeze(0).repeat(batch, *([1] * self.example.dim()))

    def _once(self, host: torch.Tensor) -> Any:
        """One served batch's work: to the device, the model, the output back to the host."""
        x = host.to(self.device, non_blocking=True) if self._cuda else host
        with torch.inference_mode():
            out = self.fn(x)
        return _to_host(out)

    def _time(self, host: torch.Tensor) -> list[float]:
        opts = self.options
        times: list[float] = []
        began = time.perf_counter()
        while True:
            self._sync()
            start = time.perf_counter()
            self._once(host)
            self._sync()
            end = time.perf_counter()
            times.append((end - start) * 1000.0)
            elapsed = end - began
            if len(times) >= opts.max_reps or (len(times) >= opts.min_reps and elapsed >= opts.min_time_s) or \
                    (len(times) >= 3 and elapsed >= opts.max_time_s):
                return times

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def _memory(self, batch: int) -> int:
        """Peak bytes a batch adds over the bytes in use before it (see the module docstring)."""
        reps = max(1, self.options.memory_reps)
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(reps):
                out = self._once(self._stack(batch))
                del out
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_reserved(self.device) - before)
        gc.collect()
        _trim_heap()
        with _RssSampler(self.options.sample_interval_s) as sampler:
            for _ in range(reps):
                out = self._once(self._stack(batch))
                sampler.sample()  # the output is still alive here
                del out
        return sampler.delta

    def _memory_limit(self) -> int:
        opts = self.options
        if opts.memory_limit_bytes is not None:
            return opts.memory_limit_bytes
        if self._cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            return max(0, int(free - opts.cuda_reserve_fraction * total))
        return int(_available_ram_bytes() * opts.cpu_memory_fraction)


class _RssSampler:
    """Peak RSS while a block runs, sampled by a thread and by ``sample()``; ``delta`` over the start."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.baseline = _rss_bytes() or 0
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nosq-rss-sampler", daemon=True)

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)

    def sample(self) -> None:
        rss = _rss_bytes()
        if rss is not None and rss > self.peak:
            self.peak = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):  # periodic by nature: RSS has no event to wait on
            self.sample()

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _to_host(value: Any) -> Any:
    """Every tensor in ``value`` copied to the host and cut into items, as a served batch's is."""
    if isinstance(value, torch.Tensor):
        host = value.detach().cpu()
        return list(host.unbind(0)) if host.dim() else host
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_host(v) for v in value]
    return value


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):  # not Linux: no RSS deltas
        return None


def _available_ram_bytes() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES")) * _PAGE_SIZE


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so an RSS baseline is not inflated."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
