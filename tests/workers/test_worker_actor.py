"""ModelWorker used directly (no Ray): decode, batch, run, bisect, encode."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from nosq.producer.codec import decode_value, encode_value
from nosq.workers import demo
from nosq.workers.actor import ModelWorker
from nosq.workers.channel import Stage
from nosq.workers.datapath import BatchOutput, ItemResult, batch_of
from nosq.workers.runtime import ModelLoadError
from nosq.workers.spec import ModelSpec

# --- test models (factories are imported by the worker through this module's name) -------------


class Picky(nn.Module):
    """Doubles its input; raises if any item's first value is negative. Counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if bool((x[:, 0] < 0).any()):
            raise ValueError("negative input")
        return x * 2

    def total(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x.flatten(1).sum(1)

    def short(self, x: torch.Tensor) -> torch.Tensor:
        return x[:-1]

    def unencodable(self, x: torch.Tensor) -> list[Any]:
        return [object() if float(row[0]) == 13 else row for row in x]


def picky() -> Picky:
    return Picky()


def not_a_module() -> object:
    return object()


def broken(fail: bool = True) -> nn.Module:
    raise RuntimeError("weights missing")


def _worker(factory: str, **fields: Any) -> ModelWorker:
    return ModelWorker(ModelSpec(id="t", factory=f"{__name__}:{factory}", **fields), local_channel=False)


@dataclass
class Result:
    items: list[ItemResult]
    output: BatchOutput

    @property
    def exec_ms(self) -> float:
        return self.output.exec_ms


def run(worker: ModelWorker, method: str, cts: list[str], payloads: list[bytes]) -> Result:
    """One batch through ``ModelWorker.run``, the way a Ray call sends it."""
    output = worker.run(batch_of(method, cts, payloads))
    return Result(output.items(), output)


def _picky_worker() -> ModelWorker:
    return _worker("picky", methods=("forward", "total", "short", "unencodable"))


def _model(worker: ModelWorker) -> Picky:
    assert isinstance(worker.model, Picky)
    return worker.model


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _encode_all(values: list[Any], cts: list[str]) -> list[bytes]:
    return [encode_value(ct, value) for ct, value in zip(cts, values, strict=True)]


def _outputs(result: Result, cts: list[str]) -> list[Any]:
    assert all(item.ok for item in result.items), result.items
    return [decode_value(ct, item.out) for ct, item in zip(cts, result.items, strict=True)]


# --- demo models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["noop", "mlp", "cnn", "transformer"])
def test_demo_model_matches_direct_call(model_id: str) -> None:
    spec = ModelSpec(id=model_id, factory=f"nosq.workers.demo:{model_id}")
    worker = ModelWorker(spec, local_channel=False)
    assert worker.runtime.device.type == "cpu"
    model = worker.model
    assert isinstance(model, demo.DemoModel)
    assert not model.training
    example = model.example_input()
    generator = torch.Generator().manual_seed(7)
    items = [torch.randn(example.shape, generator=generator).numpy() for _ in range(5)]
    cts = ["msgpack", "json", "msgpack", "json", "msgpack"]
    result = run(worker, "forward", cts, _encode_all(items, cts))
    assert result.exec_ms > 0
    with torch.inference_mode():
        direct = model(torch.from_numpy(np.stack(items)))
    for i, out in enumerate(_outputs(result, cts)):
        assert isinstance(out, np.ndarray)
        assert torch.allclose(torch.from_numpy(out.copy()), direct[i], atol=1e-5), (model_id, i)


def test_demo_factories_are_seeded_and_shaped() -> None:
    first, second = demo.mlp(), demo.mlp()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert demo.noop().example_input().shape == (8,)
    assert demo.noop().example_input().dtype == torch.float32
    assert demo.mlp().example_input().shape == (512,)
    assert demo.cnn().example_input().shape == (3, 64, 64)
    with torch.inference_mode():
        assert demo.cnn()(demo.cnn().example_input()[None]).shape == (1, 10)
        assert demo.transformer()(torch.zeros(2, 32, 256)).shape == (2, 32, 256)
    assert [m.out_features for m in first.modules() if isinstance(m, nn.Linear)] == [2048, 2048, 512]


def test_noop_echoes_any_value() -> None:
    worker = ModelWorker(ModelSpec(id="noop", factory="nosq.workers.demo:noop"), local_channel=False)
    values: list[Any] = [{"x": 1}, "text", [1, "a"], None]
    cts = ["msgpack", "json", "msgpack", "json"]
    result = run(worker, "forward", cts, _encode_all(values, cts))
    assert _outputs(result, cts) == values


# --- failures stay with the items that caused them ------------------------------------------------


def test_bad_payload_fails_alone() -> None:
    worker = _picky_worker()
    cts = ["msgpack", "msgpack", "json", "json", "xml"]
    payloads = [encode_value("msgpack", np.ones(2, np.float32)), b"\xc1", b"{nope", b"[3.0, 4.0]", b"x"]
    result = run(worker, "forward", cts, payloads)
    codes = [item.code for item in result.items]
    assert codes == [None, "bad_request", "bad_request", None, "bad_request"]
    assert "ProtocolError" in result.items[1].message
    assert "xml" in result.items[4].message
    assert decode_value("msgpack", result.items[0].out).tolist() == [2.0, 2.0]
    assert decode_value("json", result.items[3].out).tolist() == [6.0, 8.0]


def test_model_error_fails_only_bad_items() -> None:
    worker = _picky_worker()
    values = [np.array([v, 1.0], np.float32) for v in (1, 2, -3, 4, 5, 6, -7, 8)]
    cts = ["msgpack"] * len(values)
    result = run(worker, "forward", cts, _encode_all(values, cts))
    for i, item in enumerate(result.items):
        if i in (2, 6):
            assert item == ItemResult(False, code="model_error", message="ValueError: negative input")
        else:
            assert item.ok
            assert decode_value("msgpack", item.out).tolist() == (values[i] * 2).tolist()
    assert _model(worker).calls[0] == 8  # the whole batch first, then halves
    assert max(_model(worker).calls[1:]) == 4
    assert result.exec_ms > 0


def test_mixed_shapes_run_as_one_batch_per_shape() -> None:
    worker = _picky_worker()
    values = [np.ones(2, np.float32), np.ones(3, np.float32), np.ones(2, np.float32), np.ones(3, np.float32)]
    cts = ["msgpack"] * 4
    result = run(worker, "total", cts, _encode_all(values, cts))
    assert _outputs(result, cts) == [2.0, 3.0, 2.0, 3.0]
    assert _model(worker).calls == [2, 2]


def test_output_mismatch_fails_whole_batch() -> None:
    worker = _picky_worker()
    cts = ["msgpack"] * 4
    result = run(worker, "short", cts, _encode_all([np.ones(2, np.float32)] * 4, cts))
    assert {item.code for item in result.items} == {"output_mismatch"}
    assert "model returned 3 outputs for a batch of 4" in result.items[0].message


def test_bad_output_fails_alone() -> None:
    worker = _picky_worker()
    values = [np.array([v], np.float32) for v in (1, 13, 2)]
    cts = ["msgpack", "json", "json"]
    result = run(worker, "unencodable", cts, _encode_all(values, cts))
    assert [item.code for item in result.items] == [None, "bad_output", None]
    assert "object" in result.items[1].message


def test_unknown_method() -> None:
    worker = _picky_worker()
    cts = ["msgpack", "json"]
    for method in ("predict", "_call_impl", "train"):
        result = run(worker, method, cts, [b"", b""])
        assert len(result.items) == 2
        assert {item.code for item in result.items} == {"unknown_method"}
        assert "allowed: forward, total, short, unencodable" in result.items[0].message
        assert repr(method) in result.items[0].message


def test_empty_batch() -> None:
    result = run(_picky_worker(), "forward", [], [])
    assert result.items == [] and list(result.output.offsets) == [0]


# --- loading, ready, memory ------------------------------------------------------------------------


def test_ready_and_memory() -> None:
    worker = ModelWorker(ModelSpec(id="mlp", factory="nosq.workers.demo:mlp", threads=1), local_channel=False)
    assert torch.get_num_threads() == 1
    info = worker.ready()
    assert info["device"] == "cpu"
    assert info["weights_bytes"] == 4 * (512 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 512 + 512)
    assert info["rss_bytes"] > info["weights_bytes"]
    assert info["pid"] > 0
    assert set(worker.memory()) == {"rss_bytes"}


def test_factory_options_are_passed() -> None:
    worker = ModelWorker(ModelSpec(id="mlp", factory="nosq.workers.demo:mlp", options={"d_in": 4, "d_out": 2}),
                         local_channel=False)
    cts = ["json"]
    out = _outputs(run(worker, "forward", cts, _encode_all([[1.0, 2.0, 3.0, 4.0]], cts)), cts)
    assert out[0].shape == (2,)


@pytest.mark.parametrize(
    ("factory", "fields", "match"),
    [
        ("no_such_module_xyz:f", {}, "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:absent", {}, "has no callable 'absent'"),
        (f"{__name__}:not_a_module", {}, "returned a object, not a torch.nn.Module"),
        (f"{__name__}:broken", {}, "failed with options .*RuntimeError: weights missing"),
        (f"{__name__}:broken", {"options": {"nope": 1}}, "TypeError"),
        (f"{__name__}:picky", {"methods": ("forward", "embed")}, r"no method\(s\) \['embed'\]"),
    ],
)
def test_load_errors(factory: str, fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        ModelWorker(ModelSpec(id="t", factory=factory, **fields))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        ModelWorker(ModelSpec(id="t", factory="nosq.workers.demo:noop", device="cuda"))


@pytest.mark.parametrize(("device", "match"), [("gpu", "must be 'cpu', 'cuda', 'cuda:<index>' or 'auto'"),
                                                ("cuda:x", "must be 'cpu'"), ("cuda:1234", "must be 'cpu'")])
def test_bad_device_names(device: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        ModelWorker(ModelSpec(id="t", factory="nosq.workers.demo:noop"), device=device)


def test_placed_gpu_must_exist() -> None:
    """The loader's placement (``cuda:<index>``) names a GPU this process must see."""
    beyond = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ModelLoadError, match="no CUDA device" if not torch.cuda.is_available() else "GPU"):
        ModelWorker(ModelSpec(id="t", factory="nosq.workers.demo:noop"), device=beyond)


def test_a_batch_leaves_the_model_stage_before_the_next_may_enter() -> None:
    """Over a channel the manager blames a replica's death on the batch whose stage reads
    IN_MODEL. The next slot's batch takes the model lock the moment it is released and may kill
    the process at once: the batch before must have left IN_MODEL by then (CI once saw both
    blamed, and the innocent one answered ``worker_died``)."""
    worker = ModelWorker(ModelSpec(id="noop", factory="nosq.workers.demo:noop"), local_channel=False)
    seen: list[tuple[Stage, bool]] = []
    lock = worker.runtime._model_lock
    worker.runtime.run_batch(batch_of("forward", "msgpack", [encode_value("msgpack", np.ones(4, np.float32))]),
                             lambda stage: seen.append((stage, lock.locked())))
    assert seen == [(Stage.DECODING, False), (Stage.WAITING, False), (Stage.IN_MODEL, True),
                    (Stage.FETCHING, True), (Stage.ENCODING, False)]
    assert not Stage.FETCHING.suspect
