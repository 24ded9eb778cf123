"""ModelSpec / ServeConfig validation, config loading, fingerprints, public API."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from nosq.producer.errors import NosqError
from nosq.workers.demo import demo_config_path
from nosq.workers.spec import ConfigError, ModelSpec, ServeConfig, load_config


def test_defaults() -> None:
    spec = ModelSpec(id="m", factory="nosq.workers.demo:noop")
    assert spec.methods == ("forward",)
    assert spec.device == "auto"
    assert (spec.replicas, spec.max_batch, spec.threads, spec.options) == (1, 64, None, {})
    assert spec.latency_budget_ms == 100.0
    assert spec.max_wait_ms == 2.0
    assert spec.num_cpus == 1.0


@pytest.mark.parametrize(
    "factory",
    [
        "nosq.workers.demo",
        "nosq.workers.demo:",
        ":noop",
        "workers/demo:noop",
        "nosq.workers.demo:noop:x",
        "1mod:f",
        "a..b:f",
    ],
)
def test_bad_factory(factory: str) -> None:
    with pytest.raises(ValidationError, match=r"package\.module:function"):
        ModelSpec(id="m", factory=factory)


@pytest.mark.parametrize("factory", ["m:f", "pkg.sub.mod:make_model", "_p._q:_f"])
def test_good_factory(factory: str) -> None:
    assert ModelSpec(id="m", factory=factory).factory == factory


def test_old_builtin_factory_spelling_is_read_as_nosq(caplog: pytest.LogCaptureFixture) -> None:
    old = ModelSpec(id="m", factory="workers.demo:noop")
    assert old.factory == "nosq.workers.demo:noop"
    assert old.fingerprint() == ModelSpec(id="m", factory="nosq.workers.demo:noop").fingerprint()
    assert "nosq.workers.demo:noop" in caplog.text  # the warning says what to write instead
    assert ModelSpec(id="m", factory="workers.mine:build").factory == "workers.mine:build"  # a user's own package


@pytest.mark.parametrize("model_id", ["", "has space", "a/b", "x" * 65, "é"])
def test_bad_id(model_id: str) -> None:
    with pytest.raises(ValidationError, match="id"):
        ModelSpec(id=model_id, factory="m:f")


@pytest.mark.parametrize("model_id", ["a", "resnet-50.v2_b", "x" * 64])
def test_good_id(model_id: str) -> None:
    assert ModelSpec(id=model_id, factory="m:f").id == model_id


@pytest.mark.parametrize(
    "field",
    [
        {"replicas": 0},
        {"max_batch": 0},
        {"max_batch": 65537},
        {"latency_budget_ms": 0},
        {"max_wait_ms": -1},
        {"threads": 0},
        {"device": "tpu"},
        {"methods": ()},
        {"methods": ("_private",)},
        {"methods": ("forward", "forward")},
        {"unknown": 1},
    ],
)
def test_bad_fields(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({"id": "m", "factory": "m:f", **field})


def test_spec_is_frozen() -> None:
    spec = ModelSpec(id="m", factory="m:f")
    with pytest.raises(ValidationError):
        spec.max_batch = 3


def test_fingerprint() -> None:
    base = ModelSpec(id="m", factory="m:f", options={"a": 1, "b": [1, 2]})
    same = ModelSpec(id="m", factory="m:f", options={"b": [1, 2], "a": 1})
    assert base.fingerprint() == same.fingerprint()
    assert len(base.fingerprint()) == 16
    int(base.fingerprint(), 16)
    changed = [
        base.model_copy(update={"max_batch": 65}),
        base.model_copy(update={"device": "cpu"}),
        base.model_copy(update={"options": {"a": 2, "b": [1, 2]}}),
        base.model_copy(update={"methods": ("forward", "embed")}),
        base.model_copy(update={"factory": "m:g"}),
    ]
    prints = {spec.fingerprint() for spec in changed}
    assert len(prints) == len(changed)
    assert base.fingerprint() not in prints


def test_duplicate_ids_named() -> None:
    with pytest.raises(ValidationError, match="'dup' is listed more than once"):
        ServeConfig(
            models=(
                ModelSpec(id="dup", factory="m:f"),
                ModelSpec(id="ok", factory="m:f"),
                ModelSpec(id="dup", factory="m:g"),
            )
        )


def test_model_lookup() -> None:
    config = ServeConfig(models=(ModelSpec(id="a", factory="m:f"), ModelSpec(id="b", factory="m:f")))
    assert config.model("b").id == "b"
    with pytest.raises(KeyError, match="unknown model 'c'; configured models: a, b"):
        config.model("c")


TOML = """
[[models]]
id = "a"
factory = "nosq.workers.demo:mlp"
max_batch = 128
options = { d_in = 8 }

[[models]]
id = "b"
factory = "nosq.workers.demo:noop"
methods = ["forward"]
"""

YAML = """
models:
  - id: a
    factory: nosq.workers.demo:mlp
    max_batch: 128
    options: {d_in: 8}
  - id: b
    factory: nosq.workers.demo:noop
    methods: [forward]
"""


def test_load_toml_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.yml").write_text(YAML)
    configs = [load_config(tmp_path / name) for name in ("c.toml", "c.yaml", "c.yml")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].model("a").max_batch == 128
    assert configs[0].model("a").options == {"d_in": 8}
    assert configs[0].model("b").methods == ("forward",)


def test_config_errors_name_file_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        TOML.replace('"nosq.workers.demo:noop"', '"nosq.workers.demo"').replace("max_batch = 128", "max_batch = 0")
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    text = str(info.value)
    assert str(bad) in text
    assert "2 problem(s)" in text
    assert "models[0] (id 'a').max_batch" in text
    assert "models[1] (id 'b').factory" in text
    assert "'nosq.workers.demo'" in text
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, NosqError)


def test_config_duplicate_ids_from_file(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(YAML.replace("id: b", "id: a"))
    with pytest.raises(ConfigError, match="'a' is listed more than once"):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("c.json", "{}", "unsupported config type '.json'"),
        ("c.toml", "[[models]\n", "not valid TOML"),
        ("c.yaml", "models: [\n", "not valid YAML"),
        ("c.yaml", "- 1\n- 2\n", "top level must be a mapping"),
        ("c.toml", "", "models"),
        ("c.toml", "[[models]]\nid = 'a'\nfactory = 'm:f'\nbatch = 3\n", "models\\[0\\] \\(id 'a'\\).batch"),
    ],
)
def test_config_errors(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_demo_config() -> None:
    config = load_config(demo_config_path())
    assert [m.id for m in config.models] == ["noop", "mlp", "cnn", "transformer", "minilm"]
    assert {m.id: m.max_batch for m in config.models} == {
        "noop": 256,
        "mlp": 256,
        "cnn": 64,
        "transformer": 64,
        "minilm": 128,
    }
    for spec in config.models:
        module, _, attr = spec.factory.partition(":")
        assert module == ("nosq.workers.text" if spec.id == "minilm" else "nosq.workers.demo")
        assert callable(getattr(importlib.import_module(module), attr))
        assert spec.device == "auto"


PUBLIC = {
    "nosq.workers.spec": ["Bucketing", "ConfigError", "ItemSchema", "ModelSpec", "ServeConfig", "load_config"],
    "nosq.workers.batching": ["OutputMismatch", "collate", "shape_groups", "split", "to_numpy"],
    "nosq.workers.actor": ["ModelWorker"],
    "nosq.workers.runtime": ["ModelLoadError", "ModelRuntime"],
    "nosq.workers.datapath": ["Alloc", "BatchInput", "BatchOutput", "ItemResult", "TensorLayout", "batch_of",
                         "encode_tensor_rows", "new_buffer", "pack", "pack_outputs", "uniform_tensors"],
    "nosq.workers.channel": ["ChannelClient", "ChannelError", "ChannelLost", "ChannelServer", "Segment", "Stage",
                        "available"],
    "nosq.workers.demo": [
        "CNN",
        "MLP",
        "DemoModel",
        "Noop",
        "Transformer",
        "cnn",
        "demo_config_path",
        "mlp",
        "noop",
        "transformer",
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_public_api(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in module.__all__:
        assert hasattr(module, name)
