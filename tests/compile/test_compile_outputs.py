"""Traced and compiled demo models answer as the eager ones do, through ModelWorker.run.

Small variants of the demo models (same classes, smaller options) and max_batch 8 (buckets
1, 2, 4, 8) keep torch.compile's CPU compile time down. ``noop`` is the identity: its trace
returns its input and its compiled graph has no kernels, so it checks the plumbing (padding
dropped, encoding) rather than a compiler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from nosq.producer.codec import decode_value, encode_value
from nosq.workers.actor import ModelWorker
from nosq.workers.datapath import batch_of
from nosq.workers.spec import ModelSpec

SMALL: dict[str, dict[str, Any]] = {
    "noop": {},
    "mlp": {"d_in": 16, "d_hidden": 32, "d_out": 8},
    "cnn": {"channels": 3, "size": 16, "classes": 4},
    "transformer": {"d_model": 32, "nhead": 2, "layers": 1, "seq": 8},
}
SIZES = (1, 3, 8)  # 3 is no bucket: padded to 4, the padding's output dropped
MAX_BATCH = 8

Mode = Literal["eager", "trace", "compile"]


def _spec(name: str, compile_as: Mode, cache: Path) -> ModelSpec:
    return ModelSpec(id=name, factory=f"nosq.workers.demo:{name}", device="cpu", max_batch=MAX_BATCH, threads=1,
                     options=SMALL[name], compile=compile_as, compile_cache_dir=str(cache))


def _items(worker: ModelWorker, n: int, seed: int) -> list[np.ndarray[Any, Any]]:
    shape = tuple(worker.example().shape)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _run(worker: ModelWorker, items: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    result = worker.run(batch_of("forward", "msgpack", [encode_value("msgpack", x) for x in items]))
    assert all(r.ok for r in result.items()), [r.message for r in result.items() if not r.ok]
    return [np.asarray(decode_value("msgpack", r.out)) for r in result.items()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compile-cache")


@pytest.mark.parametrize("compile_as", ["trace", "compile"])
@pytest.mark.parametrize("name", list(SMALL))
def test_compiled_matches_eager(name: str, compile_as: Mode, cache: Path) -> None:
    eager = ModelWorker(_spec(name, "eager", cache))
    compiled = ModelWorker(_spec(name, compile_as, cache))
    status = compiled.ready()["compile"]
    assert status["requested"] == compile_as and status["active"] == compile_as, status
    assert status["error"] is None
    for n in SIZES:
        items = _items(eager, n, seed=n)
        want, got = _run(eager, items), _run(compiled, items)
        assert len(got) == n
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    status = compiled.ready()["compile"]
    assert status["active"] == compile_as and status["error"] is None, status
    if compile_as == "trace":
        assert status["strategy"] == "buckets" and status["buckets"] == [1, 4, 8]
        assert status["cache_dir"] is None
    else:
        assert status["strategy"] == "dynamic" and status["buckets"] == []
        assert status["cache_dir"] is not None and Path(status["cache_dir"]).is_relative_to(cache)
        assert status["compile_s"] > 0 or name == "noop"


def test_eager_status_and_untouched_model(cache: Path) -> None:
    worker = ModelWorker(_spec("mlp", "eager", cache))
    assert worker.ready()["compile"] == {
        "requested": "eager", "active": "eager", "error": None, "mode": None, "strategy": None,
        "buckets": [], "compile_s": 0.0, "cache_dir": None,
    }
    assert worker.runtime.compiled.method("forward") == worker.model.forward  # no wrapper on the eager path


def test_trace_profiles_the_traced_model(cache: Path) -> None:
    from nosq.workers.profiles.measure import ProfileOptions

    worker = ModelWorker(_spec("mlp", "trace", cache))
    options = ProfileOptions(rounds=1, warmup=1, min_reps=2, max_reps=3, min_time_s=0.0, max_time_s=0.05)
    profile = worker.profile(max_batch=4, options=options)
    assert profile["fingerprint"] == worker.runtime.spec.fingerprint() != _spec("mlp", "eager", cache).fingerprint()
    assert worker.ready()["compile"]["buckets"] == [1, 2, 4]  # the sweep ran on the traces


def test_inputs_off_the_compiled_path_run_eagerly(cache: Path) -> None:
    worker = ModelWorker(_spec("noop", "trace", cache))
    items = [{"a": 1}, "text", [1.0, 2.0]]
    result = worker.run(batch_of("forward", "msgpack", [encode_value("msgpack", x) for x in items]))
    assert [decode_value("msgpack", r.out) for r in result.items()] == items
    wide = [np.ones(5, dtype=np.float32)] * 2  # not the example's item shape (8,)
    assert [g.shape for g in _run(worker, wide)] == [(5,), (5,)]
    assert worker.ready()["compile"]["active"] == "trace"
