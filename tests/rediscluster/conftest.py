"""Fixtures of the Redis Cluster tier: a 6-node cluster per module (``redisnodes``), the repo on
the managers' path (their Ray workers import ``nosq``), a serve config with the echo model, once
as is and once on 3 partitions (``hot``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rediscluster.redisnodes import RedisNodes, redis_cluster

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "rediscluster" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.rediscluster)


@pytest.fixture(scope="module")
def nodes(request: pytest.FixtureRequest) -> Iterator[RedisNodes]:
    """A fresh cluster per module: the failover module kills one of its masters."""
    base = int(getattr(request.module, "BASE_PORT", 7100))
    with redis_cluster(base) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def repo_on_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def serve_config(tmp_path: Path) -> Path:
    path = tmp_path / "serve.toml"
    model = 'factory = "nosq.workers.demo:noop"\ndevice = "cpu"\nmax_batch = 64\nnum_cpus = 0.25\nthreads = 1\n'
    path.write_text(f'[[models]]\nid = "noop"\n{model}\n[[models]]\nid = "hot"\npartitions = 3\n{model}',
                    encoding="utf-8")
    return path
