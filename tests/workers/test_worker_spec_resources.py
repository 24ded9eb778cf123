"""ModelSpec.resources: custom Ray resources per replica (placement on a multi-node cluster).

The placement itself, on a real two-node Ray, is tested in tests/cluster/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from nosq.manager.serving.replicas import ReplicaPool
from nosq.workers.spec import ConfigError, ModelSpec, load_config


def spec(**fields: object) -> ModelSpec:
    return ModelSpec(id="m", factory="nosq.workers.demo:noop", device="cpu", **fields)  # type: ignore[arg-type]


def test_resources_default_to_none_and_reach_the_actor_options() -> None:
    assert spec().resources == {}
    pool = ReplicaPool(spec(resources={"node_a": 1, "fast_disk": 0.5}), inflight_per_replica=2, dispatch_attempts=3)
    assert pool._actor_options()["resources"] == {"node_a": 1.0, "fast_disk": 0.5}
    assert ReplicaPool(spec(), inflight_per_replica=2, dispatch_attempts=3)._actor_options()["resources"] == {}


def test_resources_from_a_toml_inline_table(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[[models]]\nid = "m"\nfactory = "nosq.workers.demo:noop"\nresources = {node_a = 1}\n')
    assert load_config(path).models[0].resources == {"node_a": 1.0}


def test_placement_does_not_change_the_fingerprint() -> None:
    """Profiles are keyed by the fingerprint: moving a model to other nodes keeps them."""
    assert spec(resources={"node_a": 1}).fingerprint() == spec().fingerprint()


@pytest.mark.parametrize("name", ["CPU", "GPU", "memory", "object_store_memory"])
def test_built_in_resources_have_fields_of_their_own(name: str) -> None:
    with pytest.raises(ValidationError, match="num_cpus for CPUs and device for GPUs"):
        spec(resources={name: 1})


@pytest.mark.parametrize("amount", [-1, 1.5, float("nan"), float("inf")])
def test_bad_amounts_are_refused_with_the_value(amount: float) -> None:
    with pytest.raises(ValidationError, match=r"amounts >= 0 \(a fraction up to 1, a whole number above\)"):
        spec(resources={"node_a": amount})


def test_an_empty_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="custom resource names"):
        spec(resources={" ": 1})


def test_a_config_error_names_the_model_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[[models]]\nid = "m"\nfactory = "nosq.workers.demo:noop"\nresources = {GPU = 1}\n')
    with pytest.raises(ConfigError, match=r"models\[0\] \(id 'm'\)\.resources"):
        load_config(path)


@pytest.mark.parametrize("amount", [0, 0.25, 1, 4])
def test_good_amounts(amount: float) -> None:
    assert spec(resources={"node_a": amount}).resources == {"node_a": float(amount)}
