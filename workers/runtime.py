"""A model on its device, and how a batch runs through it (steps 3-5 of ``nosq.workers.datapath``).

``ModelRuntime`` lives inside a replica process (``nosq.workers.actor.ModelWorker`` builds it): it
builds the model, decodes a batch into one host buffer, copies it to the device, runs the
model, copies the output back and encodes it as a batch. Batches may arrive on several threads
at once (one per in-flight slot of ``nosq.workers.channel``): each thread has its own staging
buffers and, on CUDA, its own stream, so one batch's decode, host-to-device copy and encode
overlap another's time in the model; the model itself runs one batch at a time (a lock).
On CUDA the staging buffers are page-locked and reused, and the copies are asynchronous.

One bad input fails only itself: a batch that raises is bisected until the inputs that make it
raise are alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from nosq.producer.codec import decode_value, encode_value
from nosq.producer.errors import NosqError
from nosq.producer.wire import ErrorCode
from nosq.workers.batching import OutputMismatch, collate, shape_groups, split, to_numpy
from nosq.workers.channel import Stage
from nosq.workers.compiling import CompiledModel
from nosq.workers.datapath import (
    Alloc,
    BatchInput,
    BatchOutput,
    TensorLayout,
    encode_tensor_rows,
    new_buffer,
    pack_outputs,
    uniform_tensors,
)
from nosq.workers.profiles.curve import EXAMPLE_OPTION, ProfileError, ProfileOptions
from nosq.workers.profiles.measure import Profiler, device_kind, example_from_options, input_signature, weights_bytes
from nosq.workers.spec import ItemSchema, ModelSpec

__all__ = ["ModelLoadError", "ModelRuntime"]

_MAX_MESSAGE_CHARS = 1000
_CUDA_INDEX_RE = re.compile(r"cuda:\d{1,3}", re.ASCII)


class ModelLoadError(NosqError):
    """A model spec whose factory could not be imported or did not build a usable model."""


def _no_stage(stage: Stage) -> None:
    return None


class ModelRuntime:
    """Builds ``spec``'s model on its device and runs batches of encoded inputs through it.

    ``device`` ("cpu", "cuda", "cuda:<index>" or "auto") overrides the spec's device preference
    (``nosq profile --device``; the loader's GPU placement, which starts the replica seeing every
    GPU of its node); the spec, and so its fingerprint, stay as configured."""

    def __init__(self, spec: ModelSpec, *, device: str | None = None) -> None:
        self.spec = spec
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        self.device = _resolve_device(spec, device or spec.device)
        factory = _import_factory(spec)
        kwargs = {k: v for k, v in spec.options.items() if k != EXAMPLE_OPTION}
        if _takes_device(factory):  # e.g. nosq.workers.text: loads in the device's dtype, on the device
            kwargs["device"] = self.device
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"model {spec.id!r}: factory {spec.factory} failed with options {spec.options!r}: {_describe(exc)}"
            ) from exc
        if not isinstance(model, torch.nn.Module):
            raise ModelLoadError(
                f"model {spec.id!r}: factory {spec.factory} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        missing = [m for m in spec.methods if not callable(getattr(model, m, None))]
        if missing:
            raise ModelLoadError(
                f"model {spec.id!r}: {type(model).__name__} has no method(s) {missing!r} listed in the spec's methods"
            )
        self.model = model.to(self.device).eval()
        self._example: torch.Tensor | None = None
        self.compiled = CompiledModel(self.model, spec, self.device, self._example_or_none())
        self._model_lock = threading.Lock()  # one batch (or profile) in the model at a time
        self._local = threading.local()  # per thread: staging buffers and a CUDA stream

    def ready(self) -> dict[str, Any]:
        """Where the model lives and how big it is: pid, device, weights_bytes, rss_bytes, and
        what its profile is keyed by: device_kind and signature (None without an example input);
        compile: ``nosq.workers.compiling.CompiledModel.status()`` (requested, active, error, ...)."""
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

    def memory(self) -> dict[str, int]:
        """This process's RSS and, on CUDA, torch's allocated and reserved bytes."""
        usage = {"rss_bytes": _rss_bytes()}
        if self.device.type == "cuda":
            usage["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
            usage["cuda_reserved"] = torch.cuda.memory_reserved(self.device)
        return usage

    # -- profiling ------------------------------------------------------------------------------

    def example(self) -> torch.Tensor:
        """One input item: the model's ``example_input()``, else the spec's ``input`` schema or
        ``options.example``."""
        if self._example is None:
            self._example = self._make_example()
        return self._example

    def profile(self, max_batch: int | None = None, options: ProfileOptions | None = None) -> dict[str, Any]:
        """Sweep batch sizes up to ``max_batch`` (default and ceiling: the spec's) on this
        process's device and choose b*: ``nosq.workers.profiles.curve.Profile.to_dict()``. The allocator's
        cache of the largest sizes tried is then given back: the process keeps what serving at b*
        needs, which is what the registry reserves for it."""
        with self._model_lock:
            try:
                return self._profiler(max_batch, options).run().to_dict()
            finally:
                self._release_cache()

    def profile_plan(self, max_batch: int | None = None, options: ProfileOptions | None = None) -> dict[str, Any]:
        """The plan of a sweep driven from outside, one ``profile_one`` per size (a progress bar)."""
        return self._profiler(max_batch, options).plan().to_dict()

    def profile_one(self, batch: int, options: ProfileOptions | None = None) -> dict[str, Any]:
        """One size's figures (``Point``) or ``OutOfMemory``, as a dict."""
        with self._model_lock:
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
        if self.spec.input is not None:
            return example_from_options(self.spec.id, self.spec.input.model_dump())
        if EXAMPLE_OPTION in self.spec.options:
            return example_from_options(self.spec.id, self.spec.options[EXAMPLE_OPTION])
        raise ProfileError(
            f"model {self.spec.id!r} has no example input to profile with: give {type(self.model).__name__} an "
            "example_input() method that returns one item (no batch dimension), set its spec's "
            'input = {dtype = "float32", shape = [...]}, or options.example = {dtype = "float32", shape = [...]}'
        )

    # -- serving ---------------------------------------------------------------------------------

    def run_batch(self, batch: BatchInput, stage: Callable[[Stage], None] = _no_stage,
                  alloc: Alloc = new_buffer) -> BatchOutput:
        """Decode, run ``batch.method`` on the batch, encode: one output (or failure) per item.

        ``stage`` hears where the batch is (``nosq.workers.channel.Stage``); the encoded outputs are
        written into ``alloc(size)``."""
        n = len(batch)
        spec = self.spec
        if batch.method not in spec.methods or not callable(getattr(self.model, batch.method, None)):
            message = f"model {spec.id!r} has no method {batch.method!r}; allowed: {', '.join(spec.methods)}"
            return BatchOutput(alloc(0), np.zeros(n + 1, np.int64),
                               dict.fromkeys(range(n), (ErrorCode.UNKNOWN_METHOD, message)),
                               frozenset(range(n)))
        stage(Stage.DECODING)
        clock = _Clock()
        staging = self._staging()
        runner = _Runner(self.compiled.method(batch.method), self.device, staging, n)
        uniform = uniform_tensors(batch)
        if uniform is not None and (spec.input is None or _layout_fits(uniform[0], spec.input)):
            runner.use_rows(uniform[1])
        else:
            self._decode_items(batch, runner)
        with staging.on_stream():
            ready = runner.gather(runner.pending())  # on CUDA: copied to the device asynchronously
            clock.lap("decode")
            stage(Stage.WAITING)
            with self._model_lock:
                clock.lap("wait")
                stage(Stage.IN_MODEL)
                raw = runner.launch(ready)
                if isinstance(raw, Exception):  # bisect to the items that make it raise
                    runner.bisect(runner.pending(), raw)
                provenance = self._provenance()
                clock.lap("model")
                # before the lock goes: the next slot's batch may enter the model, and kill the
                # process, at once; this one must not read as in the model then
                stage(Stage.FETCHING)
            runner.fetch(raw)  # on CUDA: waits for the device, outside the lock
            clock.lap("fetch")
        stage(Stage.ENCODING)
        output = runner.encode(batch, alloc)
        clock.lap("encode")
        output.exec_ms = runner.exec_ms
        output.stages = clock.laps
        output.provenance = provenance
        return output

    def _provenance(self) -> dict[str, Any]:
        """What the model says about the batch it just ran (its ``batch_provenance()``, e.g. a
        text model's padded length and padding share): JSON-ready numbers and strings, or {}."""
        report = getattr(self.model, "batch_provenance", None)
        if not callable(report):
            return {}
        try:
            found = report()
        except Exception:  # the model's own bug: the batch's results matter more than its provenance
            return {}
        if not isinstance(found, dict):
            return {}
        return {str(k): v for k, v in found.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}

    def _decode_items(self, batch: BatchInput, runner: _Runner) -> None:
        schema = self.spec.input
        for index in range(len(batch)):
            try:
                value = decode_value(batch.ct(index), batch.item(index))
                runner.inputs[index] = value if schema is None else _conform(self.spec.id, value, schema)
            except Exception as exc:  # ProtocolError by contract; any other failure is the same to the client
                runner.fail([index], ErrorCode.BAD_REQUEST, _message(exc), ran=False)

    def _staging(self) -> _Staging:
        staging: _Staging | None = getattr(self._local, "staging", None)
        if staging is None:
            staging = _Staging(self.device)
            self._local.staging = staging
        return staging


class _Clock:
    """The ms of each step of a batch, in order, and when it began (``at``: unix ms), so that the
    steps of batches on different slots can be laid on one timeline."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {"at": time.time() * 1000.0}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self._last) * 1000.0, 3)
        self._last = now


class _Staging:
    """One thread's host buffers (page-locked on CUDA, reused across batches) and CUDA stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]
        self._inputs: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._outputs: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def on_stream(self) -> Any:
        if self.stream is None:
            return _NoContext()
        return torch.cuda.stream(self.stream)

    def to_device(self, rows: np.ndarray[Any, Any]) -> torch.Tensor:
        """``rows`` (n, *shape) copied once into this thread's staging buffer, then to the device
        (asynchronously from page-locked memory on CUDA)."""
        n = rows.shape[0]
        key = (rows.dtype.name, tuple(rows.shape[1:]))
        buffer = self._inputs.get(key)
        if buffer is None or buffer.shape[0] < n:
            capacity = max(n, 2 * buffer.shape[0] if buffer is not None else n)
            buffer = torch.empty((capacity, *key[1]), dtype=_torch_dtype(rows.dtype), pin_memory=self.cuda)
            self._inputs[key] = buffer
        host = buffer[:n]
        np.copyto(host.numpy(), rows, casting="no")
        if not self.cuda:
            return host
        return host.to(self.device, non_blocking=True)

    def to_host(self, output: torch.Tensor) -> np.ndarray[Any, Any]:
        """A model output on the host as numpy (a staging buffer on CUDA: valid until the next batch)."""
        tensor = output.detach()
        if tensor.dtype == torch.complex32:
            tensor = tensor.to(torch.complex64)
        elif tensor.dtype in (torch.bfloat16, *_NO_NUMPY):
            tensor = tensor.float()
        if not self.cuda or tensor.device.type != "cuda":
            return tensor.cpu().numpy()
        key = (tensor.dtype, tuple(tensor.shape[1:]))
        buffer = self._outputs.get(key)
        if buffer is None or buffer.shape[0] < tensor.shape[0]:
            capacity = max(tensor.shape[0], 2 * buffer.shape[0] if buffer is not None else 0)
            buffer = torch.empty((capacity, *key[1]), dtype=tensor.dtype, pin_memory=True)
            self._outputs[key] = buffer
        host = buffer[: tensor.shape[0]]
        host.copy_(tensor, non_blocking=True)
        assert self.stream is not None
        self.stream.synchronize()
        return host.numpy()


_NO_NUMPY = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


class _NoContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Mixed:
    """Decoded values of several shapes: they run as one sub-batch per shape."""


class _MixedShapes(Exception):
    """What ``launch`` reports for a ``_Mixed`` batch, so that ``bisect`` splits it by shape."""


class _Runner:
    """The items of one batch, run as one model call and bisected on failure.

    Inputs are either one array of rows (a uniform batch, ``use_rows``) or decoded values
    (``inputs``, collated per call). The output of a first call that served every item is kept
    whole for the batch encoder; after a failure, outputs are kept per item."""

    def __init__(self, fn: Callable[[Any], Any], device: torch.device, staging: _Staging, n: int) -> None:
        self.fn = fn
        self.device = device
        self.staging = staging
        self.n = n
        self.inputs: list[Any] = [None] * n
        self.rows: np.ndarray[Any, Any] | None = None
        self.outputs: list[Any] = [None] * n
        self.whole: np.ndarray[Any, Any] | None = None
        self.failures: dict[int, tuple[ErrorCode, str]] = {}
        self.not_run: set[int] = set()
        self.exec_ms = 0.0
        self._device_rows: torch.Tensor | None = None
        self._first: list[int] = []

    def use_rows(self, rows: np.ndarray[Any, Any]) -> None:
        self.rows = rows

    def pending(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.failures]

    def fail(self, indices: list[int], code: ErrorCode, message: str, *, ran: bool = True) -> None:
        for index in indices:
            self.failures[index] = (code, message)
            if not ran:
                self.not_run.add(index)

    def gather(self, indices: list[int]) -> Any:
        """The model input for ``indices`` (every item that decoded): the first call's."""
        self._first = indices
        if not indices:
            return None
        return self._gather(indices)

    def launch(self, batch: Any) -> Any:
        """Call the model on the whole batch; its raw output, or the exception it raised."""
        if batch is None:
            return None
        start = time.perf_counter()
        try:
            if isinstance(batch, _Mixed):
                raise _MixedShapes
            with torch.inference_mode():
                return self.fn(batch)
        except Exception as exc:  # returned, not swallowed: the caller bisects or answers
            return exc
        finally:
            self.exec_ms += (time.perf_counter() - start) * 1000.0

    def fetch(self, raw: Any) -> None:
        """The first call's output on the host: kept whole when it served every item and its
        rows are the items, else split per item."""
        if raw is None or isinstance(raw, Exception):
            return
        indices = self._first
        start = time.perf_counter()
        try:
            if len(indices) == self.n and isinstance(raw, torch.Tensor) and raw.ndim >= 1 and raw.shape[0] == self.n:
                self.whole = self.staging.to_host(raw)
                return
            outcome = self._split(raw, len(indices))
            if isinstance(outcome, OutputMismatch):
                self.fail(indices, ErrorCode.OUTPUT_MISMATCH, str(outcome))
            else:
                for index, value in zip(indices, outcome, strict=True):
                    self.outputs[index] = value
        finally:
            self.exec_ms += (time.perf_counter() - start) * 1000.0

    def bisect(self, indices: list[int], error: Exception) -> None:
        """After the model raised ``error`` on ``indices``: run halves until each failing input
        is alone (decoded values of several shapes: one sub-batch per shape first)."""
        if isinstance(error, _MixedShapes):
            for group in shape_groups([self.inputs[i] for i in indices]):
                self.run([indices[g] for g in group])
        elif len(indices) == 1:
            self.fail(indices, ErrorCode.MODEL_ERROR, _message(error))
        else:
            half = len(indices) // 2
            self.run(indices[:half])
            self.run(indices[half:])

    def run(self, indices: list[int]) -> None:
        """Run ``indices`` as one sub-batch (model, then fetch), bisecting on failure."""
        if not indices:
            return
        raw = self.launch(self._gather(indices))
        if isinstance(raw, Exception):
            self.bisect(indices, raw)
            return
        start = time.perf_counter()
        try:
            outcome = self._split(raw, len(indices))
        finally:
            self.exec_ms += (time.perf_counter() - start) * 1000.0
        if isinstance(outcome, OutputMismatch):
            self.fail(indices, ErrorCode.OUTPUT_MISMATCH, str(outcome))
            return
        for index, value in zip(indices, outcome, strict=True):
            self.outputs[index] = value

    def _split(self, raw: Any, n: int) -> list[Any] | OutputMismatch:
        try:
            return split(to_numpy(raw), n)
        except OutputMismatch as exc:
            return exc

    def _gather(self, indices: list[int]) -> Any:
        if self.rows is not None:
            if self._device_rows is None:
                self._device_rows = self.staging.to_device(self.rows)
            if len(indices) == self.n:
                return self._device_rows
            return self._device_rows[torch.as_tensor(indices, device=self._device_rows.device)]
        items = [self.inputs[i] for i in indices]
        batch = collate(items)
        if len(indices) > 1 and isinstance(batch, list) and len(shape_groups(items)) > 1:
            return _Mixed()
        if isinstance(batch, torch.Tensor) and batch.device != self.device:
            batch = batch.to(self.device, non_blocking=True)
        return batch

    def encode(self, batch: BatchInput, alloc: Alloc) -> BatchOutput:
        if self.whole is not None and isinstance(batch.cts, str):
            encoded = encode_tensor_rows(batch.cts, self.whole, alloc)
            if encoded is not None:
                return BatchOutput(encoded[0], encoded[1])
            self.outputs = list(self.whole)
        elif self.whole is not None:
            self.outputs = list(self.whole)
        items: list[bytes] = []
        for index in range(self.n):
            if index in self.failures:
                items.append(b"")
                continue
            try:
                items.append(encode_value(batch.ct(index), self.outputs[index]))
            except Exception as exc:  # ProtocolError by contract; whatever else, only this item fails
                self.failures[index] = (ErrorCode.BAD_OUTPUT, _message(exc))
                items.append(b"")
        buffer, offsets = pack_outputs(items, alloc)
        return BatchOutput(buffer, offsets, dict(self.failures), frozenset(self.not_run))


def _layout_fits(layout: TensorLayout, schema: ItemSchema) -> bool:
    return layout.dtype == schema.dtype and layout.shape == schema.shape


def _conform(model: str, value: Any, schema: ItemSchema) -> Any:
    """An item checked against the model's input schema: a tensor of its dtype and shape, or a
    nested list of numbers of its shape (converted to its dtype)."""
    expected = f"{schema.dtype}[{','.join(map(str, schema.shape))}]"
    if isinstance(value, np.ndarray):
        got = f"{value.dtype.name}[{','.join(map(str, value.shape))}]"
        if got != expected:
            raise ValueError(f"model {model!r} takes {expected} items; got {got}")
        return value
    if isinstance(value, list):
        try:
            array = np.asarray(value, dtype=np.dtype(schema.dtype))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"model {model!r} takes {expected} items; got a list that is not numbers of that "
                             f"shape ({exc})") from exc
        if tuple(array.shape) != schema.shape:
            raise ValueError(f"model {model!r} takes {expected} items; got a list of shape "
                             f"[{','.join(map(str, array.shape))}]")
        return array
    raise ValueError(f"model {model!r} takes {expected} items; got a {type(value).__name__}")


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype


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
            f"model {spec.id!r}: cannot import module {module_name!r} of factory {spec.factory}: {_describe(exc)}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(
            f"model {spec.id!r}: module {module_name!r} has no callable {attr!r} (factory {spec.factory})"
        )
    return factory  # type: ignore[no-any-return]


def _takes_device(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` has a ``device`` parameter: it then gets the replica's torch.device."""
    try:
        return "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature (a builtin)
        return False


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
