"""Backend fixtures of the producer tests: fakeredis (unit tier) or the real Redis (integration)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from producer_fakes import FakeManager

from nosq.producer import RedisSettings


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.integration)])
def settings(request: pytest.FixtureRequest) -> RedisSettings:
    """fakeredis (unit tier) or db 9 of the real Redis (integration tier)."""
    name = "fake_settings" if request.param == "fake" else "redis_db"
    value: RedisSettings = request.getfixturevalue(name)
    return value


@pytest.fixture
def client(settings: RedisSettings) -> Iterator[redis.Redis]:
    """A plain sync client on the same backend, for setting up and inspecting Redis."""
    redis_client = settings.client()
    yield redis_client
    redis_client.close()


@pytest.fixture
def manager() -> FakeManager:
    return FakeManager()
