"""A model that cannot be traced or compiled is served eagerly, and the failure is recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from torch import nn

from nosq.producer.codec import decode_value, encode_value
from nosq.workers.actor import ModelWorker
from nosq.workers.datapath import batch_of
from nosq.workers.spec import ModelSpec

# --- test models (the worker imports their factories through this module's name) ------------


class Branchy(nn.Module):
    """Data-dependent Python control flow on tensor values: a trace would bake one branch in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1

    def example_input(self) -> torch.Tensor:
        return torch.ones(4)


class Tagged(nn.Module):
    """Returns a dict with a non-tensor value: torch.jit.trace cannot output it."""

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"y": x + 1, "tag": ["item"] * x.shape[0]}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(3)


class Picky(nn.Module):
    """Doubles its input; raises on a negative item (the input's own error, eager or not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2

    def example_input(self) -> torch.Tensor:
        return torch.ones(2)


def branchy() -> Branchy:
    return Branchy()


def tagged() -> Tagged:
    return Tagged()


def picky() -> Picky:
    return Picky()


Mode = Literal["eager", "trace", "compile"]


def _worker(factory: str, compile_as: Mode, tmp_path: Path, max_batch: int = 8) -> ModelWorker:
    return ModelWorker(ModelSpec(id="t", factory=f"{__name__}:{factory}", device="cpu", max_batch=max_batch,
                                 compile=compile_as, compile_cache_dir=str(tmp_path)))


def _run(worker: ModelWorker, items: list[Any]) -> list[Any]:
    result = worker.run(batch_of("forward", "msgpack", [encode_value("msgpack", x) for x in items]))
    assert all(r.ok for r in result.items()), [r.message for r in result.items() if not r.ok]
    return [decode_value("msgpack", r.out) for r in result.items()]


def test_untraceable_control_flow_falls_back_to_eager(tmp_path: Path) -> None:
    worker = _worker("branchy", "trace", tmp_path)
    assert worker.ready()["compile"]["active"] == "trace"  # traces are made on first use
    items = [np.array([1, 2, 3, 4], np.float32), np.array([-5, 0, 0, 0], np.float32), np.ones(4, np.float32)]
    with pytest.warns(RuntimeWarning, match="serving eagerly"):
        got = _run(worker, items)
    np.testing.assert_allclose(np.asarray(got), [[2, 4, 6, 8], [-10, 0, 0, 0], [2, 2, 2, 2]])
    status = worker.ready()["compile"]
    assert status["requested"] == "trace" and status["active"] == "eager"
    assert status["error"].startswith("trace at batch 3: ") and "TracerWarning" in status["error"]
    assert status["strategy"] is None and status["buckets"] == []
    # for good: later batches are eager too (this one takes the other branch)
    got = _run(worker, [np.full(4, -1, np.float32)])
    np.testing.assert_allclose(got[0], [-2, -2, -2, -2])
    assert worker.ready()["compile"]["active"] == "eager"


def test_dict_with_a_non_tensor_falls_back_to_eager(tmp_path: Path) -> None:
    worker = _worker("tagged", "trace", tmp_path)
    with pytest.warns(RuntimeWarning, match="serving eagerly"):
        got = _run(worker, [np.zeros(3, np.float32), np.ones(3, np.float32)])
    assert [g["tag"] for g in got] == ["item", "item"]
    np.testing.assert_allclose(np.asarray([g["y"] for g in got]), [[1, 1, 1], [2, 2, 2]])
    status = worker.ready()["compile"]
    assert status["active"] == "eager" and status["error"].startswith("trace at batch 2: ")


def _fake_compile(fail_dynamic: bool, fail_static: bool, calls: list[bool]) -> Callable[..., Any]:
    """A stand-in for torch.compile (no inductor: fast) that fails as told when called."""

    def fake(fn: Callable[[Any], Any], *, mode: str | None = None, dynamic: bool = False) -> Callable[[Any], Any]:
        def compiled(x: Any) -> Any:
            calls.append(dynamic)
            if (fail_dynamic and dynamic) or (fail_static and not dynamic):
                raise RuntimeError(f"backend failed (dynamic={dynamic})")
            return fn(x)

        return compiled

    return fake


def test_compile_failure_at_warm_up_serves_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("torch.compile", _fake_compile(True, True, calls))
    with pytest.warns(RuntimeWarning, match="serving eagerly"):
        worker = _worker("picky", "compile", tmp_path)
    status = worker.ready()["compile"]
    assert status["requested"] == "compile" and status["active"] == "eager"
    assert "dynamic compile of forward: RuntimeError: backend failed (dynamic=True)" in status["error"]
    assert "compile at batch 2: RuntimeError: backend failed (dynamic=False)" in status["error"]
    assert calls == [True, False]  # dynamic at warm-up, then the bucket of 2, then eager for good
    np.testing.assert_allclose(np.asarray(_run(worker, [np.ones(2, np.float32)])), [[2, 2]])
    assert calls == [True, False]


def test_dynamic_failure_falls_back_to_buckets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("torch.compile", _fake_compile(True, False, calls))
    worker = _worker("picky", "compile", tmp_path)
    status = worker.ready()["compile"]
    assert status["active"] == "compile" and status["strategy"] == "buckets" and status["buckets"] == [1, 2, 4, 8]
    assert status["error"].startswith("dynamic compile of forward: ")
    got = _run(worker, [np.full(2, i, np.float32) for i in range(3)])  # padded to the bucket of 4
    np.testing.assert_allclose(np.asarray(got), [[0, 0], [2, 2], [4, 4]])
    assert worker.ready()["compile"]["buckets"] == [1, 2, 4, 8]  # all warmed up at load


def test_an_input_error_keeps_the_compiled_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("torch.compile", _fake_compile(False, False, calls))
    worker = _worker("picky", "compile", tmp_path)
    result = worker.run(batch_of("forward", "msgpack", [encode_value("msgpack", np.array(v, np.float32))
                                                        for v in ([1, 1], [-1, 1])]))
    assert result.items()[0].ok and not result.items()[1].ok and result.items()[1].code == "model_error"
    status = worker.ready()["compile"]
    assert status["active"] == "compile" and status["strategy"] == "dynamic" and status["error"] is None


def test_oversized_batches_run_eagerly(tmp_path: Path) -> None:
    worker = _worker("picky", "trace", tmp_path, max_batch=2)
    got = _run(worker, [np.ones(2, np.float32)] * 3)  # over the largest bucket: not traced
    np.testing.assert_allclose(np.asarray(got), [[2, 2]] * 3)
    assert worker.ready()["compile"] == {**worker.ready()["compile"], "active": "trace", "buckets": []}
