"""The public surface of `producer`, its exception tree and its key names."""

from __future__ import annotations

import importlib
import inspect

import pytest
from redis.crc import key_slot

from nosq import producer
from nosq.producer import errors, keys
from nosq.producer.wire import MODEL_ID_RE, REQUEST_ID_RE, BadEntry

EXPECTED_ALL = [
    "PROTOCOL_VERSION",
    "AsyncProducer",
    "Envelope",
    "ErrorCode",
    "Handle",
    "NosqConnectionError",
    "NosqError",
    "NosqTimeout",
    "Producer",
    "ProtocolError",
    "QueueFull",
    "RawTensor",
    "RedisSettings",
    "RemoteError",
]
MODULES = ["keys", "codec", "wire", "errors", "settings", "enqueue", "client", "aio"]


def test_public_names_are_exactly_these() -> None:
    assert producer.__all__ == EXPECTED_ALL  # an accidental export (or removal) fails here


def test_every_public_name_exists() -> None:
    for name in producer.__all__:
        assert getattr(producer, name) is not None, name


@pytest.mark.parametrize("module", MODULES)
def test_module_exports_exist(module: str) -> None:
    loaded = importlib.import_module(f"producer.{module}")
    assert len(loaded.__all__) == len(set(loaded.__all__))
    for name in loaded.__all__:
        assert hasattr(loaded, name), f"producer.{module}.__all__ names missing {name!r}"


def test_one_exception_tree() -> None:
    assert set(errors.__all__) <= set(EXPECTED_ALL)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), producer.NosqError)
    assert issubclass(BadEntry, producer.ProtocolError)
    for name in ("ProtocolError", "NosqConnectionError", "NosqTimeout", "QueueFull", "RemoteError"):
        assert name in (errors.__doc__ or ""), f"{name} is missing from the tree in errors.py's docstring"


def test_constructors_are_keyword_only() -> None:
    for cls in (producer.Producer, producer.AsyncProducer):
        params = list(inspect.signature(cls).parameters.values())
        assert params[0].name == "settings"
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])


# -- keys ----------------------------------------------------------------------------------------


def test_key_names() -> None:
    assert keys.requests("mlp") == "nosq:{mlp}:req"
    assert keys.dead_letters("mlp") == "nosq:{mlp}:dlq"
    assert keys.admission("mlp") == "nosq:{mlp}:admission"
    assert keys.result("r1") == "nosq:res:{r1}"
    assert keys.done("r1") == "nosq:done:{r1}"
    assert keys.cancel("r1") == "nosq:cancel:{r1}"
    assert keys.reply("c1") == "nosq:reply:{c1}"
    assert keys.registry("models") == "nosq:{registry}:models"
    assert keys.registry_model("mlp") == "nosq:{registry}:model:mlp"
    assert keys.registry_models() == "nosq:{registry}:models"
    assert keys.registry_device("n1/gpu0") == "nosq:{registry}:device:n1/gpu0"
    assert keys.registry_devices() == "nosq:{registry}:devices"
    assert keys.registry_resident("n1/gpu0") == "nosq:{registry}:resident:n1/gpu0"
    assert keys.registry_evictions() == "nosq:{registry}:evictions"
    assert keys.registry_events() == "nosq:{registry}:events"
    assert keys.registry_served() == "nosq:{registry}:served"
    assert keys.registry_profile("mlp", "cpu", "float32[4]") == "nosq:{registry}:profile:mlp:cpu:float32[4]"
    assert keys.manager_heartbeat("host-1") == "nosq:mgr:host-1"
    assert keys.stream_pattern() == "nosq:{*}:req"
    assert keys.GROUP == "nosq" and keys.PREFIX == "nosq"


@pytest.mark.parametrize("model", ["mlp", "resnet-50.v2", "a" * 64])
def test_model_keys_share_one_cluster_slot(model: str) -> None:
    assert MODEL_ID_RE.fullmatch(model)
    names = [keys.requests(model), keys.dead_letters(model), keys.admission(model)]
    assert all(f"{{{model}}}" in name for name in names)
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert key_slot(names[0].encode()) == key_slot(model.encode())


@pytest.mark.parametrize("request_id", ["r1", "0f3c2a9e8b7d4c1a", "order-42:item.7", "x" * 128])
def test_request_keys_share_one_cluster_slot(request_id: str) -> None:
    assert REQUEST_ID_RE.fullmatch(request_id)
    names = [keys.result(request_id), keys.done(request_id), keys.cancel(request_id)]
    assert all(f"{{{request_id}}}" in name for name in names)
    assert {key_slot(name.encode()) for name in names} == {key_slot(request_id.encode())}


def test_ids_cannot_break_the_hash_tag() -> None:
    for pattern in (MODEL_ID_RE, REQUEST_ID_RE):
        assert not pattern.fullmatch("a{b}") and not pattern.fullmatch("a}") and not pattern.fullmatch("{")


def test_stream_pattern_matches_request_streams_only() -> None:
    import fnmatch

    pattern = keys.stream_pattern()
    assert fnmatch.fnmatchcase(keys.requests("mlp"), pattern)
    assert not fnmatch.fnmatchcase(keys.dead_letters("mlp"), pattern)
    assert not fnmatch.fnmatchcase(keys.result("r1"), pattern)
