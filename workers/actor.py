"""The process that hosts one model and runs batches on it.

``ModelWorker`` is a plain class: the manager wraps it with ``ray.remote(ModelWorker)`` and
calls ``ready``, ``run``, ``memory`` and ``profile`` remotely (a profile is measured here, in
the process and on the device that serve the model: see ``workers.profiler``). Bytes come in
and go out in each request's own content type, so decoding and encoding happen here, at the
edge, and never in the manager's scheduling loop. One bad input fails only itself: a failing
batch is bisected.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from producer.codec import decode_value, encode_value
from producer.errors import NosqError
from workers.batching import OutputMismatch, collate, shape_groups, split, to_numpy
from workers.compiling import CompiledModel
from workers.curve import EXAMPLE_OPTION, ProfileError
from workers.profiler import (
    ProfileOptions,
    Profiler,
    device_kind,
    example_from_options,
    input_signature,
    weights_bytes,
)
from workers.spec import ModelSpec

__all__ = ["BatchResult", "ItemResult", "ModelLoadError", "ModelWorker"]

_MAX_MESSAGE_CHARS = 1000
_CUDA_INDEX_RE = re.compile(r"cuda:\d{1,3}", re.ASCII)


class ModelLoadError(NosqError):
    """A model spec whose factory could not be imported or did not build a usable model."""


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The outcome for one input: its encoded output, or an error code and message."""

    ok: bool
    out: bytes = b""
    code: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One ``ItemResult`` per input, in input order, and the wall ms spent in the model."""

    items: list[ItemResult]
    exec_ms: float


class ModelWorker:
    """Builds ``spec``'s model on its device and runs batches of encoded inputs through it.

    ``device`` ("cpu", "cuda", "cuda:<index>" or "auto") overrides the spec's device preference
    (``nosq profile --device``; the loader's GPU placement, which starts the actor seeing every GPU
    of its node); the spec, and so its fingerprint, stay as configured."""

    def __init__(self, spec: ModelSpec, *, device: str | None = None) -> None:
        self.spec = spec
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        self.device = _resolve_device(spec, device or spec.device)
        factory = _import_factory(spec)
        kwargs = {k: v for k, v in spec.options.items() if k != EXAMPLE_OPTION}
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"model {spec.id!r}: factory {spec.factory} failed with options "
                f"{spec.options!r}: {_describe(exc)}"
            ) from exc
        if not isinstance(model, torch.nn.Module):
            raise ModelLoadError(
                f"model {spec.id!r}: factory {spec.factory} returned a {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        missing = [m for m in spec.methods if not callable(getattr(model, m, None))]
        if missing:
            raise ModelLoadError(
                f"model {spec.id!r}: {type(model).__name__} has no method(s) {missing!r} "
                "listed in the spec's methods"
            )
        self.model = model.to(self.device).eval()
        self._example: torch.Tensor | None = None
        self.compiled = CompiledModel(self.model, spec, self.device, self._example_or_none())

    def ready(self) -> dict[str, Any]:
        """Where the model lives and how big it is: pid, device, weights_bytes, rss_bytes, and
        what its profile is keyed by: device_kind and signature (None without an example input);
        compile: ``workers.compiling.CompiledModel.status()`` (requested, active, error, ...)."""
        try:
            signature: str | None = input_signature(self.example())
        except ProfileError:
            signature = None
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.device),
            "device_kind": device_kind(self.device),
            "signature": signature,
            "weights_bytes": weights_bytes(self.model),
            "rss_bytes": _rss_bytes(),
            "compile": self.compiled.status(),
        }

    # -- profiling --------------------------------------------------------------------------

    def example(self) -> torch.Tensor:
        """One input item: the model's ``example_input()``, else the spec's ``options.example``."""
        if self._example is None:
            self._example = self._make_example()
        return self._example

    def profile(self, max_batch: int | None = None, options: ProfileOptions | None = None) -> dict[str, Any]:
        """Sweep batch sizes up to ``max_batch`` (default and ceiling: the spec's) on this
        process's device and choose b*: ``workers.curve.Profile.to_dict()``. The allocator's
        cache of the largest sizes tried is then given back: the process keeps what serving at b*
        needs, which is what the registry reserves for it."""
        try:
            return self._profiler(max_batch, options).run().to_dict()
        finally:
            self._release_cache()

    def profile_plan(self, max_batch: int | None = None, options: ProfileOptions | None = None) -> dict[str, Any]:
        """The plan of a sweep driven from outside, one ``profile_one`` per size (a progress bar)."""
        return self._profiler(max_batch, options).plan().to_dict()

    def profile_one(self, batch: int, options: ProfileOptions | None = None) -> dict[str, Any]:
        """One size's figures (``Point``) or ``OutOfMemory``, as a dict."""
        try:
            return dataclasses.asdict(self._profiler(batch, options).measure(batch))
        finally:
            self._release_cache()

    def _release_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _profiler(self, max_batch: int | None, options: ProfileOptions | None) -> Profiler:
        spec = self.spec
        if max_batch is not None and not 1 <= max_batch <= spec.max_batch:
            raise ProfileError(f"model {spec.id!r}: max_batch {max_batch} is outside 1..{spec.max_batch} "
                               "(the spec's max_batch): raise the spec's max_batch to profile larger batches")
        method = spec.methods[0]
        return Profiler(
            self.compiled.method(method), model=self.model, model_id=spec.id, fingerprint=spec.fingerprint(),
            method=method, device=self.device, max_batch=max_batch or spec.max_batch,
            latency_budget_ms=spec.latency_budget_ms, example=self.example(), options=options,
        )

    def _example_or_none(self) -> torch.Tensor | None:
        if self.spec.compile == "eager":
            return None  # eager needs none: a bad example_input() is reported by profile() alone
        try:
            return self.example()
        except ProfileError:
            return None

    def _make_example(self) -> torch.Tensor:
        make = getattr(self.model, "example_input", None)
        if callable(make):
            try:
                example = make()
            except NotImplementedError:
                example = None
            except Exception as exc:  # the model's own bug: profiling says so, serving goes on
                raise ProfileError(f"model {self.spec.id!r}: example_input() failed: {_describe(exc)}") from exc
            if example is not None:
                if not isinstance(example, torch.Tensor):
                    raise ProfileError(f"model {self.spec.id!r}: example_input() returned a "
                                       f"{type(example).__name__}; return one input item as a torch.Tensor")
                return example
        if EXAMPLE_OPTION in self.spec.options:
            return example_from_options(self.spec.id, self.spec.options[EXAMPLE_OPTION])
        raise ProfileError(
            f"model {self.spec.id!r} has no example input to profile with: give {type(self.model).__name__} an "
            "example_input() method that returns one item (no batch dimension), or set "
            'options.example = {dtype = "float32", shape = [...]} in its spec'
        )

    def memory(self) -> dict[str, int]:
        """This process's RSS and, on CUDA, torch's allocated and reserved bytes."""
        usage = {"rss_bytes": _rss_bytes()}
        if self.device.type == "cuda":
            usage["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
            usage["cuda_reserved"] = torch.cuda.memory_reserved(self.device)
        return usage

    def run(self, method: str, cts: list[str], payloads: list[bytes]) -> BatchResult:
        """Decode, run ``method`` on the batch, encode: one ``ItemResult`` per payload."""
        if len(cts) != len(payloads):
            raise ValueError(
                f"run() got {len(cts)} content types for {len(payloads)} payloads: pass one each"
            )
        if method not in self.spec.methods or not callable(getattr(self.model, method, None)):
            allowed = ", ".join(self.spec.methods)
            message = f"model {self.spec.id!r} has no method {method!r}; allowed: {allowed}"
            return BatchResult([ItemResult(False, code="unknown_method", message=message)] * len(cts), 0.0)
        results: list[ItemResult | None] = [None] * len(cts)
        inputs: list[Any] = [None] * len(cts)
        for i, (ct, payload) in enumerate(zip(cts, payloads, strict=True)):
            try:
                inputs[i] = decode_value(ct, payload)
            except Exception as exc:  # ProtocolError by contract; any other failure is the same to the client
                results[i] = ItemResult(False, code="bad_request", message=_message(exc))
        batch = _Batch(self.compiled.method(method), self.device, cts, inputs, results)
        batch.run([i for i, r in enumerate(results) if r is None])
        done = [r for r in results if r is not None]
        if len(done) != len(results):  # unreachable unless _Batch has a bug; never return a short list
            raise RuntimeError(f"model {self.spec.id!r}: {len(results) - len(done)} items got no result")
        return BatchResult(done, batch.exec_ms)


class _Batch:
    """The good items of one ``run`` call, run as one batch and bisected on failure."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        device: torch.device,
        cts: list[str],
        inputs: list[Any],
        results: list[ItemResult | None],
    ) -> None:
        self.fn = fn
        self.device = device
        self.cts = cts
        self.inputs = inputs
        self.results = results
        self.exec_ms = 0.0

    def run(self, indices: list[int]) -> None:
        if not indices:
            return
        items = [self.inputs[i] for i in indices]
        batch = collate(items)
        if len(indices) > 1 and isinstance(batch, list):
            groups = shape_groups(items)
            if len(groups) > 1:  # tensors of several shapes: one sub-batch per shape
                for group in groups:
                    self.run([indices[g] for g in group])
                return
        outcome = self._call(batch, len(indices))
        if isinstance(outcome, OutputMismatch):
            self._fail(indices, "output_mismatch", str(outcome))
        elif isinstance(outcome, Exception):  # the model's own error: bisect to the bad items
            if len(indices) == 1:
                self._fail(indices, "model_error", _message(outcome))
            else:
                half = len(indices) // 2
                self.run(indices[:half])
                self.run(indices[half:])
        else:
            for index, value in zip(indices, outcome, strict=True):
                self.results[index] = _encode(self.cts[index], value)

    def _call(self, batch: Any, n: int) -> list[Any] | Exception:
        """The model's per-item outputs (numpy, on the host), or the exception it raised."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                raw = self.fn(_to_device(batch, self.device))
            return split(to_numpy(raw), n)
        except Exception as exc:  # returned, not swallowed: the caller turns it into results
            return exc
        finally:
            self.exec_ms += (time.perf_counter() - start) * 1000.0

    def _fail(self, indices: list[int], code: str, message: str) -> None:
        failure = ItemResult(False, code=code, message=message)
        for index in indices:
            self.results[index] = failure


def _encode(ct: str, value: Any) -> ItemResult:
    try:
        return ItemResult(True, out=encode_value(ct, value))
    except Exception as exc:  # ProtocolError by contract; whatever else, only this item fails
        return ItemResult(False, code="bad_output", message=_message(exc))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor) and batch.device != device:
        return batch.to(device, non_blocking=True)
    return batch


def _resolve_device(spec: ModelSpec, preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference not in ("cpu", "cuda") and not _CUDA_INDEX_RE.fullmatch(preference):
        raise ModelLoadError(f"model {spec.id!r}: device must be 'cpu', 'cuda', 'cuda:<index>' or 'auto', "
                             f"got {preference!r}")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model {spec.id!r} asks for device {preference!r} but this process sees no CUDA device: "
            "use device 'auto' or 'cpu', or give the actor a GPU (num_gpus)"
        )
    device = torch.device(preference)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"model {spec.id!r} was placed on {preference} but this process sees "
                             f"{torch.cuda.device_count()} GPU(s)")
    return device


def _import_factory(spec: ModelSpec) -> Callable[..., Any]:
    module_name, _, attr = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {spec.id!r}: cannot import module {module_name!r} of factory "
            f"{spec.factory}: {_describe(exc)}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(
            f"model {spec.id!r}: module {module_name!r} has no callable {attr!r} (factory {spec.factory})"
        )
    return factory  # type: ignore[no-any-return]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _message(exc: BaseException) -> str:
    text = _describe(exc)
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the peak RSS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
