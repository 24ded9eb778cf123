"""Serving a model eagerly, traced (``torch.jit.trace``) or compiled (``torch.compile``).

``CompiledModel`` wraps the eager model of one actor after load (``ModelWorker.__init__``) and
hands out one callable per method (``method``), which the actor serves and profiles: a profile
is measured on what is served, and a compiled spec has its own fingerprint.

* ``eager`` (default): the model's own methods.
* ``trace``: one ``torch.jit.trace`` per method and batch bucket (``nosq.workers.profiles.curve.batch_sizes``
  of the spec's ``max_batch``: 1, 2, 4, ..., max_batch), traced on first use of the bucket. A
  batch is padded to the next bucket by repeating its last item, and the padding's outputs
  are dropped. Tracing turns ``TracerWarning`` into errors: a trace that would bake in a
  data-dependent branch fails instead of serving wrong answers. Traces are not persisted: they
  take milliseconds, and a saved trace would freeze weights and code that the spec's
  fingerprint does not cover.
* ``compile``: ``torch.compile(method, mode=spec.compile_mode, dynamic=True)``, warmed up at
  load on the example input at batch sizes 2, 1 (dynamo specializes size 1: a second graph)
  and every bucket above 2 (a dynamic graph may guard on a size range, e.g. inductor's conv
  kernels: those graphs are compiled at load, not in a served batch). If the dynamic warm-up
  fails, the same is tried with ``dynamic=False`` per
  bucket with padding, as for ``trace``. Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``, and
  Triton's below it) is ``<compile_cache_dir>/<fingerprint>/<device kind>``, default
  ``~/.cache/nosq/compile``, so a restart of the same spec on the same device reuses the
  compiled kernels (inductor's cache keys also cover the graph, shapes and torch version).

Only a batch that is one tensor with a batch dimension, of the item dtype and shape first
traced or compiled (the example input's, if the model has one), no larger than the largest
bucket, goes through the compiled path; anything else runs eagerly.

Failure: if tracing, compiling, the warm-up, or a later call on the compiled path raises
while the eager model succeeds on the same batch, the model falls back to eager for good and
keeps serving; the failure is recorded in ``status()``. An error the eager model raises too
is the input's own: it is raised as usual and the compiled path stays. Out-of-memory errors
are raised as they are (the profiler stops its sweep on them).

Padding assumes items are independent (no batch statistics, no cross-item attention). A
model whose outputs do not all have the batch dimension first cannot be padded: it falls
back to eager the first time a padded call shows it.

``status()`` is stable, for the registry:

* ``requested``: the spec's ``compile`` ("eager", "trace" or "compile").
* ``active``: what is served now: "eager", "trace" or "compile".
* ``error``: why ``active`` differs from ``requested``, or why ``strategy`` is "buckets"
  for ``compile`` (``"<stage>: <Type>: <message>"``, at most 1000 characters), else None.
* ``mode``: the spec's ``compile_mode`` (None: torch's default).
* ``strategy``: "dynamic" (one dynamic-shape graph), "buckets" (a graph per bucket, padded)
  or None (eager).
* ``buckets``: the bucket sizes traced or compiled so far, ascending ([] for "dynamic").
* ``compile_s``: seconds spent tracing, compiling and warming up so far (load and lazy).
* ``cache_dir``: inductor's cache directory for this spec and device (compile only), else None.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.jit._trace import TracerWarning

from nosq.workers.profiles.curve import batch_sizes
from nosq.workers.profiles.measure import device_kind, is_out_of_memory
from nosq.workers.spec import ModelSpec

__all__ = ["DEFAULT_CACHE_DIR", "CompiledModel", "bucket_for", "cache_dir_for"]

DEFAULT_CACHE_DIR = "~/.cache/nosq/compile"
_MAX_ERROR_CHARS = 1000
_Fn = Callable[[Any], Any]
_trace_module: Callable[..., Any] = torch.jit.trace_module  # untyped in torch


class _Unpaddable(ValueError):
    """An output whose leaves do not all have the padded batch dimension first."""


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``n`` items, None if ``n`` is over the largest."""
    for bucket in buckets:
        if bucket >= n:
            return bucket
    return None


def cache_dir_for(spec: ModelSpec, device: torch.device) -> Path:
    """``<compile_cache_dir or ~/.cache/nosq/compile>/<fingerprint>/<device kind>``."""
    root = Path(spec.compile_cache_dir or DEFAULT_CACHE_DIR).expanduser()
    kind = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_kind(device))
    return root / spec.fingerprint() / kind


class CompiledModel:
    """One actor's model as served: eager, traced per bucket, or compiled (module docstring).

    ``example`` is one input item (no batch dimension) to warm ``compile`` up with and to fix
    the traced item shape; without one both happen on the first batch."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: torch.device,
                 example: torch.Tensor | None = None) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.requested: str = spec.compile
        self.active: str = spec.compile
        self.error: str | None = None
        self.strategy: str | None = None if spec.compile == "eager" else (
            "dynamic" if spec.compile == "compile" else "buckets")
        self.buckets = batch_sizes(spec.max_batch)
        self.compile_s = 0.0
        self.cache_dir: Path | None = None
        self._lock = threading.RLock()
        self._item: tuple[torch.dtype, tuple[int, ...]] | None = None
        self._dynamic: dict[str, _Fn] = {}  # method -> torch.compile(dynamic=True)
        self._static: dict[str, _Fn] = {}  # method -> torch.compile(dynamic=False)
        self._traced: dict[tuple[str, int], _Fn] = {}  # (method, bucket) -> trace or compiled
        self._proven: set[str] = set()  # methods whose dynamic graph ran once
        self._methods: dict[str, _Fn] = {}
        self._depth = 0
        if example is not None:
            self._item = (example.dtype, tuple(example.shape))
        if spec.compile == "compile":
            self._setup_compile(example)

    # -- public ----------------------------------------------------------------------------

    def method(self, name: str) -> _Fn:
        """The callable that serves ``name``: eager while ``active`` is eager, else a wrapper
        that takes the compiled path when it can (and notices a later fallback)."""
        if self.requested == "eager":
            fn: _Fn = getattr(self.model, name)
            return fn
        if name not in self._methods:
            self._methods[name] = lambda batch: self(name, batch)
        return self._methods[name]

    def status(self) -> dict[str, Any]:
        """The stable dict described in the module docstring."""
        with self._lock:
            return {
                "requested": self.requested,
                "active": self.active,
                "error": self.error,
                "mode": self.spec.compile_mode,
                "strategy": self.strategy if self.active != "eager" else None,
                "buckets": sorted({bucket for _, bucket in self._traced}),
                "compile_s": round(self.compile_s, 3),
                "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None,
            }

    def __call__(self, name: str, batch: Any) -> Any:
        eager: _Fn = getattr(self.model, name)
        if self.active == "eager" or not self._fits(batch):
            return eager(batch)
        try:
            call = self._call_dynamic if self.strategy == "dynamic" else self._call_bucket
            out = call(name, batch)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            result = eager(batch)  # raises if the input is bad: then the compiled path stays
            stage = "trace" if self.active == "trace" else "compile"
            self._fall_back(f"{stage} at batch {batch.shape[0]}", exc)
            return result
        return out

    # -- compile ---------------------------------------------------------------------------

    def _setup_compile(self, example: torch.Tensor | None) -> None:
        self.cache_dir = cache_dir_for(self.spec, self.device)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir)
        except OSError as exc:  # an unwritable cache costs the persistence, not the compile
            warnings.warn(f"model {self.spec.id!r}: compile cache {self.cache_dir} is unusable ({exc}); "
                          "torch's default cache is used", RuntimeWarning, stacklevel=2)
            self.cache_dir = None
        for name in self.spec.methods:
            self._dynamic[name] = torch.compile(getattr(self.model, name), mode=self.spec.compile_mode,
                                                dynamic=True)
        if example is None:
            return  # warmed up by the first batch
        # 2 first (the dynamic graph), every bucket above it (a graph may
        # guard on a size range: inductor picks conv kernels per range), then 1 (dynamo specializes it)
        sizes = [b for b in (2, *self.buckets[2:], 1) if b <= self.spec.max_batch]
        for name in self.spec.methods:
            for size in sizes:
                # made as a served batch is (``nosq.workers.actor._Batch``): collated on the host
                # outside inference mode, moved to the device inside it; dynamo guards on that
                batch = _stack(example.cpu(), size)
                try:
                    with torch.inference_mode():
                        self(name, batch.to(self.device))
                except Exception:  # the example fails eagerly too: the first batch warms up
                    continue
                if self.active == "eager":
                    return

    def _call_dynamic(self, name: str, batch: torch.Tensor) -> Any:
        if name in self._proven:
            return self._dynamic[name](batch)
        with self._lock, self._timed():
            try:
                out = self._dynamic[name](batch)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                getattr(self.model, name)(batch)  # raises if the batch is bad: nothing is decided
                # dynamic shapes failed before ever working: a graph per bucket instead
                self.error = _describe(f"dynamic compile of {name}", exc)
                self.strategy = "buckets"
                self._dynamic.clear()
                return self._call_bucket(name, batch)
            self._proven.add(name)
        return out

    # -- buckets (trace, or compile without dynamic shapes) --------------------------------

    def _call_bucket(self, name: str, batch: torch.Tensor) -> Any:
        n = batch.shape[0]
        bucket = bucket_for(n, self.buckets)
        assert bucket is not None  # _fits checked it
        padded = _pad(batch, bucket)
        fn = self._traced.get((name, bucket))
        if fn is None:
            with self._lock, self._timed():
                fn = self._build(name, padded)
                out = fn(padded)  # the first call compiles (torch.compile) or checks (trace)
                self._traced[(name, bucket)] = fn
        else:
            out = fn(padded)
        return _unpad(out, n, bucket) if bucket != n else out

    def _build(self, name: str, padded: torch.Tensor) -> _Fn:
        if self.active == "compile":
            if name not in self._static:
                _raise_recompile_limit(len(self.buckets) + 2)
                self._static[name] = torch.compile(getattr(self.model, name), mode=self.spec.compile_mode,
                                                   dynamic=False)
            return self._static[name]
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+ deprecates torch.jit
            warnings.simplefilter("error", TracerWarning)
            example = padded.clone()
            traced = _trace_module(self.model, {name: (example,)}, check_trace=False, strict=False)
            fn: _Fn = getattr(traced, name)
        return fn

    # -- helpers ---------------------------------------------------------------------------

    def _fits(self, batch: Any) -> bool:
        if not isinstance(batch, torch.Tensor) or batch.dim() == 0 or batch.shape[0] < 1:
            return False
        if batch.shape[0] > self.buckets[-1]:
            return False
        item = (batch.dtype, tuple(batch.shape[1:]))
        if self._item is None:
            with self._lock:
                if self._item is None:
                    self._item = item
        return item == self._item

    def _fall_back(self, stage: str, exc: BaseException) -> None:
        with self._lock:
            error = _describe(stage, exc)
            self.error = error if self.error is None else _clip(f"{self.error}; then {error}")
            self.active = "eager"
            self._dynamic.clear()
            self._static.clear()
            self._traced.clear()
        warnings.warn(f"model {self.spec.id!r}: {self.requested} failed, serving eagerly: {self.error}",
                      RuntimeWarning, stacklevel=3)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:  # nested (dynamic falling back to buckets) counts once
                self.compile_s += time.perf_counter() - start


def _stack(example: torch.Tensor, size: int) -> torch.Tensor:
    return example.unsqueeze(0).expand(size, *example.shape).contiguous()


def _pad(batch: torch.Tensor, bucket: int) -> torch.Tensor:
    """``batch`` with its last item repeated up to ``bucket`` items."""
    missing = bucket - batch.shape[0]
    if missing == 0:
        return batch
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])])


def _unpad(out: Any, n: int, bucket: int) -> Any:
    """``out`` with every tensor cut to its first ``n`` items (tuples, lists and dicts walked)."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != bucket:
            raise _Unpaddable(f"an output of shape {tuple(out.shape)} has no batch dimension of {bucket} "
                              "first, so padding a batch cannot be undone")
        return out[:n]
    if isinstance(out, (tuple, list)):
        return type(out)(_unpad(v, n, bucket) for v in out)
    if isinstance(out, dict):
        return {k: _unpad(v, n, bucket) for k, v in out.items()}
    raise _Unpaddable(f"an output of type {type(out).__name__} cannot be cut back to the batch")


def _raise_recompile_limit(graphs: int) -> None:
    config: Any = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        current = getattr(config, key, None)
        if isinstance(current, int):
            if current < graphs:
                setattr(config, key, graphs)
            return


def _describe(stage: str, exc: BaseException) -> str:
    cause: BaseException | None = exc
    for _ in range(8):  # a TracerWarning raised inside Tensor.__bool__ arrives as a SystemError
        if cause is None or isinstance(cause, TracerWarning):
            exc = cause or exc
            break
        cause = cause.__cause__ or cause.__context__
    return _clip(f"{stage}: {type(exc).__name__}: {exc}")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
