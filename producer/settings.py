"""Connection settings, built explicitly by the caller (never read from the environment)."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlparse, urlunparse

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

__all__ = ["RedisSettings"]

_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


class RedisSettings(BaseModel):
    """How to reach Redis: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs, or a Redis
    Cluster by any one of its nodes: ``redis+cluster://host:port`` (``rediss+cluster://`` with
    TLS). The cluster scheme is nosq's: redis-py takes the same URL as ``redis://`` given to
    ``RedisCluster.from_url``, which is what the clients below are built with.

    ``username``/``password``/``db`` override what the URL says (a cluster has only db 0).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: SecretStr | None = None
    db: int | None = Field(default=None, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    socket_timeout_s: float | None = Field(default=None, gt=0)
    max_connections: int = Field(default=64, ge=1)
    #: with every connection busy, a call waits this long for one (then NosqConnectionError)
    pool_timeout_s: float = Field(default=30.0, gt=0)
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    ssl_check_hostname: bool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlparse(url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"Redis URL {url!r} must start with redis://, rediss://, unix://, redis+cluster:// "
                             "or rediss+cluster://")
        return url

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme in ("rediss", "rediss+cluster")

    @property
    def cluster(self) -> bool:
        """Whether the URL names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
        return urlparse(self.url).scheme.endswith("+cluster")

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout_s,
            "socket_timeout": self.socket_timeout_s,
            "max_connections": self.max_connections,
        }
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password.get_secret_value()
        if self.db is not None:
            kwargs["db"] = self.db
        if self.tls:
            kwargs.update(ssl_ca_certs=self.ssl_ca_file, ssl_certfile=self.ssl_cert_file,
                          ssl_keyfile=self.ssl_key_file, ssl_check_hostname=self.ssl_check_hostname)
        return kwargs

    def _url_without_overrides(self) -> str:
        """The URL less what the settings override (redis-py lets the URL win otherwise)."""
        parsed = urlparse(self.url)
        if parsed.scheme == "unix":
            return self.url
        netloc = parsed.netloc.rpartition("@")[2]
        user, _, password = parsed.netloc.rpartition("@")[0].partition(":")
        if self.username is None and self.password is None and user + password:
            netloc = parsed.netloc  # credentials only in the URL: keep them
        path = "" if self.db is not None or self.cluster else parsed.path
        return urlunparse((parsed.scheme.removesuffix("+cluster"), netloc, path, "", parsed.query, ""))

    def _cluster_kwargs(self) -> dict[str, Any]:
        kwargs = self._kwargs()
        kwargs.pop("db", None)
        return kwargs

    def client(self) -> redis.Redis:
        """A synchronous client (bytes in, bytes out). More callers than ``max_connections``
        wait for a free connection (up to ``pool_timeout_s``) instead of failing.

        On a cluster URL this is a ``redis.cluster.RedisCluster`` (typed as ``redis.Redis``:
        the commands nosq uses are the same; ``nosq.producer.resp`` routes its own)."""
        if self.cluster:
            cluster = redis.cluster.RedisCluster.from_url(self._url_without_overrides(), **self._cluster_kwargs())
            return cast(redis.Redis, cluster)
        pool = redis.BlockingConnectionPool.from_url(self._url_without_overrides(), timeout=self.pool_timeout_s,
                                                     **self._kwargs())
        client: redis.Redis = redis.Redis.from_pool(pool)
        return client

    def async_client(self, *, reconnect_s: float = 0.0) -> redis.asyncio.Redis:
        """An asyncio client (bytes in, bytes out); callers beyond ``max_connections`` wait for a
        connection, as with ``client()``. With ``reconnect_s`` > 0 a dropped connection
        is retried with exponential backoff (0.1 s doubling to 2 s) for about that long: a server
        restart then costs a pause, not an error."""
        if self.cluster:  # a node lost is found again by the cluster client (slot map refreshed)
            cluster = redis.asyncio.cluster.RedisCluster.from_url(self._url_without_overrides(),
                                                                  **self._cluster_kwargs())
            return cast(redis.asyncio.Redis, cluster)
        kwargs = self._kwargs()
        if reconnect_s > 0:
            kwargs["retry"] = AsyncRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=max(1, int(reconnect_s / 2)))
            kwargs["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]
        pool = redis.asyncio.BlockingConnectionPool.from_url(self._url_without_overrides(),
                                                             timeout=self.pool_timeout_s, **kwargs)
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_pool(pool)
        return client

    def describe(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        parsed = urlparse(self.url)
        host = parsed.hostname or parsed.path
        port = f":{parsed.port}" if parsed.port else ""
        return f"{parsed.scheme}://{host}{port}"
