"""The compile options of a spec, its fingerprint, the cache path and the padding helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from nosq.workers.compiling import DEFAULT_CACHE_DIR, _pad, _unpad, _Unpaddable, bucket_for, cache_dir_for
from nosq.workers.spec import ModelSpec


def test_compile_defaults_and_choices() -> None:
    spec = ModelSpec(id="m", factory="a.b:c")
    assert (spec.compile, spec.compile_mode, spec.compile_cache_dir) == ("eager", None, None)
    assert ModelSpec(id="m", factory="a.b:c", compile="compile", compile_mode="max-autotune").compile_mode \
        == "max-autotune"


@pytest.mark.parametrize(("fields", "match"), [
    ({"compile": "jit"}, "compile"),
    ({"compile_mode": "reduce-overhead"}, "needs compile = \"compile\""),
    ({"compile": "trace", "compile_mode": "default"}, "needs compile = \"compile\""),
    ({"compile": "compile", "compile_mode": "fast"}, "compile_mode must be one of default, reduce-overhead"),
    ({"compile_cache_dir": " "}, "compile_cache_dir must be a directory"),
])
def test_bad_compile_options(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ModelSpec(id="m", factory="a.b:c", **fields)  # type: ignore[arg-type]


def test_fingerprint_counts_compile_not_the_cache_dir() -> None:
    base = ModelSpec(id="m", factory="a.b:c")
    # a spec that does not compile keeps the fingerprint it had before these fields existed
    assert base.fingerprint() == "aac108205a129e05"
    assert ModelSpec(id="m", factory="a.b:c", compile="eager").fingerprint() == base.fingerprint()
    assert base.model_copy(update={"compile_cache_dir": "/x"}).fingerprint() == base.fingerprint()
    prints = {
        base.fingerprint(),
        ModelSpec(id="m", factory="a.b:c", compile="trace").fingerprint(),
        ModelSpec(id="m", factory="a.b:c", compile="compile").fingerprint(),
        ModelSpec(id="m", factory="a.b:c", compile="compile", compile_mode="max-autotune").fingerprint(),
    }
    assert len(prints) == 4


def test_cache_dir_per_fingerprint_and_device(tmp_path: Path) -> None:
    spec = ModelSpec(id="m", factory="a.b:c", compile="compile", compile_cache_dir=str(tmp_path))
    assert cache_dir_for(spec, torch.device("cpu")) == tmp_path / spec.fingerprint() / "cpu"
    default = ModelSpec(id="m", factory="a.b:c", compile="compile")
    assert cache_dir_for(default, torch.device("cpu")) == \
        Path(DEFAULT_CACHE_DIR).expanduser() / default.fingerprint() / "cpu"


def test_buckets_and_padding() -> None:
    buckets = (1, 2, 4, 8, 12)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 9, 12, 13)] == [1, 2, 4, 8, 12, 12, None]
    x = torch.arange(6.0).reshape(3, 2)
    padded = _pad(x, 4)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]  # the last item repeated
    assert _pad(x, 3) is x
    out = _unpad({"a": padded, "b": (padded * 2, [padded])}, 3, 4)
    assert out["a"].tolist() == x.tolist() and out["b"][0].shape == (3, 2) and out["b"][1][0].shape == (3, 2)
    with pytest.raises(_Unpaddable, match="no batch dimension of 4"):
        _unpad(padded.sum(0), 3, 4)
    with pytest.raises(_Unpaddable, match="of type str"):
        _unpad((padded, "tag"), 3, 4)
