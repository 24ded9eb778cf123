"""TLS: ``rediss://`` against private redis-servers that listen on a TLS port only.

The certificates are made here with ``openssl`` (a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate). The producers and the stand-in manager both talk TLS;
clients that do not trust the CA, that reach a server whose certificate names another host,
or that speak plain ``redis://`` to the TLS port fail with ``NosqConnectionError``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from security_support import (
    ROOT,
    AclUsers,
    Certificates,
    RedisServer,
    acl_users,
    answer_requests,
    issue_certificate,
    make_certificates,
    running_redis,
)

from nosq.producer import AsyncProducer, NosqConnectionError, Producer, RedisSettings

pytestmark = pytest.mark.integration

MODEL = "sec-tls"
FAIL_WITHIN_S = 5.0  # a refused connection must not hang


def tls_args(certs: Certificates, *, cert: Path | None = None, key: Path | None = None,
             auth_clients: str = "no") -> list[str]:
    return ["--tls-cert-file", str(cert or certs.server_cert), "--tls-key-file", str(key or certs.server_key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", auth_clients]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def server(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """TLS only (``--port 0``), client certificates not required."""
    with running_redis(tmp_path_factory.mktemp("redis-tls"), *tls_args(certs), tls=True) as redis_server:
        yield redis_server


@pytest.fixture
def settings(server: RedisServer, certs: Certificates) -> RedisSettings:
    return RedisSettings(url=server.url("rediss"), ssl_ca_file=str(certs.ca), connect_timeout_s=2)


@pytest.fixture
def manager(settings: RedisSettings) -> Iterator[redis.Redis]:
    """The stand-in manager's client, over TLS too; the server starts empty."""
    client = settings.client()
    client.flushall()
    yield client
    client.close()


def test_the_server_has_no_plaintext_port(manager: redis.Redis) -> None:
    assert manager.config_get("port") == {"port": "0"}
    assert int(manager.config_get("tls-port")["tls-port"]) > 0


def test_producer_round_trip_over_tls(settings: RedisSettings, manager: redis.Redis) -> None:
    assert settings.tls
    with Producer(settings, content_type="json") as producer:
        one = producer.submit(MODEL, {"x": [1, 2]})
        many = producer.submit_many(MODEL, [[i] for i in range(3)])
        answer_requests(manager, MODEL, expect=4)
        assert producer.result(one, timeout_s=5)["echo"] == {"x": [1, 2]}
        assert [out["echo"] for out in producer.gather(many, timeout_s=5)] == [[0], [1], [2]]


async def test_async_producer_round_trip_over_tls(settings: RedisSettings, manager: redis.Redis) -> None:
    async with AsyncProducer(settings) as producer:
        one = await producer.submit(MODEL, {"x": [3]})
        many = await producer.submit_many(MODEL, [[i] for i in range(3)])
        await asyncio.to_thread(answer_requests, manager, MODEL, expect=4)
        assert (await producer.result(one, timeout_s=5))["echo"] == {"x": [3]}
        assert [out["echo"] for out in await producer.gather(many, timeout_s=5)] == [[0], [1], [2]]


def test_localhost_is_in_the_certificate_too(server: RedisServer, certs: Certificates, manager: redis.Redis) -> None:
    settings = RedisSettings(url=f"rediss://localhost:{server.port}/0", ssl_ca_file=str(certs.ca), connect_timeout_s=2)
    with Producer(settings) as producer:
        handle = producer.submit(MODEL, 7)
        answer_requests(manager, MODEL)
        assert producer.result(handle, timeout_s=5)["echo"] == 7


def test_the_ca_can_ride_in_the_url(server: RedisServer, certs: Certificates, manager: redis.Redis) -> None:
    """What ``nosq --redis-url`` offers: the CLI builds RedisSettings(url=...) only, and redis-py
    reads ``ssl_ca_certs`` from the URL's query string."""
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={quote(str(certs.ca))}"
    with Producer(RedisSettings(url=url, connect_timeout_s=2)) as producer:
        handle = producer.submit(MODEL, "via the url")
        answer_requests(manager, MODEL)
        assert producer.result(handle, timeout_s=5)["echo"] == "via the url"


def test_nosq_submit_over_tls(server: RedisServer, certs: Certificates, manager: redis.Redis) -> None:
    """``nosq submit --redis-url rediss://...`` end to end, the stand-in manager answering."""
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={quote(str(certs.ca))}"
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            answer_requests(manager, MODEL, timeout_s=30)
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    done = subprocess.run(
        [sys.executable, "-m", "nosq.manager.ops.cli", "--log-level", "warning", "submit", "--redis-url", url, MODEL,
         "--json", '{"x": [1, 2]}', "--timeout", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    thread.join(30)
    assert not failures, failures
    assert done.returncode == 0, done.stderr
    assert '"echo": {"x": [1, 2]}' in done.stdout


# -- refusals ------------------------------------------------------------------------------


def refused_connection(settings: RedisSettings) -> NosqConnectionError:
    started = time.monotonic()
    with pytest.raises(NosqConnectionError) as caught:
        Producer(settings).start()
    assert time.monotonic() - started < FAIL_WITHIN_S
    return caught.value


async def refused_connection_async(settings: RedisSettings) -> NosqConnectionError:
    started = time.monotonic()
    producer = AsyncProducer(settings)
    with pytest.raises(NosqConnectionError) as caught:
        await producer.start()
    await producer.aclose()
    assert time.monotonic() - started < FAIL_WITHIN_S
    return caught.value


def test_a_client_without_the_ca_is_refused(server: RedisServer, certs: Certificates) -> None:
    for ca in (None, str(certs.other_ca)):  # the system's CAs, then an unrelated CA
        exc = refused_connection(RedisSettings(url=server.url("rediss"), ssl_ca_file=ca, connect_timeout_s=2))
        assert "certificate verify failed" in str(exc).lower(), exc


async def test_a_client_without_the_ca_is_refused_async(server: RedisServer, certs: Certificates) -> None:
    for ca in (None, str(certs.other_ca)):
        exc = await refused_connection_async(
            RedisSettings(url=server.url("rediss"), ssl_ca_file=ca, connect_timeout_s=2))
        assert "certificate verify failed" in str(exc).lower(), exc


def test_plain_redis_to_the_tls_port_is_refused(server: RedisServer) -> None:
    """The server drops the connection at once: an error, not a hang until a timeout."""
    settings = RedisSettings(url=server.url("redis"), connect_timeout_s=2, socket_timeout_s=3)
    exc = refused_connection(settings)
    assert f"127.0.0.1:{server.port}" in str(exc) and "timeout" not in str(exc).lower(), exc


async def test_plain_redis_to_the_tls_port_is_refused_async(server: RedisServer) -> None:
    settings = RedisSettings(url=server.url("redis"), connect_timeout_s=2, socket_timeout_s=3)
    exc = await refused_connection_async(settings)
    assert "timeout" not in str(exc).lower(), exc


def test_a_certificate_for_another_host_is_refused(certs: Certificates, tmp_path: Path) -> None:
    """Hostname checking is on by default: the right CA is not enough."""
    directory = tmp_path / "wrong-host"
    directory.mkdir()
    wrong = issue_certificate(directory, "elsewhere", (certs.ca, certs.ca_key),
                   "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:elsewhere.example,IP:192.0.2.1\n")
    with running_redis(directory, *tls_args(certs, cert=wrong[0], key=wrong[1]), tls=True) as other:
        exc = refused_connection(RedisSettings(url=other.url("rediss"), ssl_ca_file=str(certs.ca),
                                               connect_timeout_s=2))
        assert "certificate verify failed" in str(exc).lower() or "hostname" in str(exc).lower(), exc


def test_client_certificates_when_the_server_asks_for_them(certs: Certificates, tmp_path: Path) -> None:
    """``--tls-auth-clients yes``: ssl_cert_file/ssl_key_file get in, no certificate does not."""
    with running_redis(tmp_path, *tls_args(certs, auth_clients="yes"), tls=True) as mtls:
        with_cert = RedisSettings(url=mtls.url("rediss"), ssl_ca_file=str(certs.ca), connect_timeout_s=2,
                                  ssl_cert_file=str(certs.client_cert), ssl_key_file=str(certs.client_key))
        client = with_cert.client()
        try:
            with Producer(with_cert) as producer:
                handle = producer.submit(MODEL, "mutual")
                answer_requests(client, MODEL)
                assert producer.result(handle, timeout_s=5)["echo"] == "mutual"
            # the CLI's form: everything in --redis-url
            url = (f"{mtls.url('rediss')}?ssl_ca_certs={quote(str(certs.ca))}"
                   f"&ssl_certfile={quote(str(certs.client_cert))}&ssl_keyfile={quote(str(certs.client_key))}")
            with Producer(RedisSettings(url=url, connect_timeout_s=2)) as producer:
                handle = producer.submit(MODEL, "mutual, from the url")
                answer_requests(client, MODEL)
                assert producer.result(handle, timeout_s=5)["echo"] == "mutual, from the url"
        finally:
            client.close()
        refused_connection(RedisSettings(url=mtls.url("rediss"), ssl_ca_file=str(certs.ca), connect_timeout_s=2,
                                         socket_timeout_s=2))


# -- the production shape: ACL users over TLS ---------------------------------------------


@pytest.fixture(scope="module")
def acl() -> AclUsers:
    return acl_users()


def test_acl_users_over_tls(certs: Certificates, acl: AclUsers, tmp_path: Path) -> None:
    aclfile = acl.write(tmp_path / "users.acl")
    with running_redis(tmp_path, *tls_args(certs), "--aclfile", str(aclfile), tls=True) as secured:

        def settings(user: str) -> RedisSettings:
            return RedisSettings(url=secured.url("rediss"), ssl_ca_file=str(certs.ca), username=user,
                                 password=acl.passwords[user.removeprefix("nosq-")], connect_timeout_s=2)

        client = settings("nosq-manager").client()
        try:
            with Producer(settings("nosq-producer")) as producer:
                handles = producer.submit_many(MODEL, ["a", "b"])
                answer_requests(client, MODEL, expect=2)
                assert [out["echo"] for out in producer.gather(handles, timeout_s=5)] == ["a", "b"]
        finally:
            client.close()
