"""Least privilege with Redis ACLs: the users of ``deploy/acl.conf`` on a private redis-server.

The producer user (``nosq-producer``) enqueues, cancels and reads results through
``producer.Producer`` and ``producer.AsyncProducer``, and can do nothing else: it cannot read
request payloads, touch the registry or the manager's keys, delete or trim request streams,
forge results, or run server-wide commands. The manager user (``nosq-manager``) does the
manager's job on ``nosq:*`` but no admin command. A stand-in manager (``answer_requests``)
plays the manager's part with the manager user's credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError
from security_support import ACL_FILE, PLACEHOLDER_RE, AclUsers, RedisServer, acl_users, answer_requests, running_redis

from nosq.producer import (
    AsyncProducer,
    Handle,
    NosqConnectionError,
    NosqError,
    Producer,
    QueueFull,
    RedisSettings,
    RemoteError,
    keys,
)
from nosq.producer.enqueue import ENQUEUE_LUA, ENQUEUE_MANY_LUA
from nosq.producer.wire import decode_envelope

pytestmark = pytest.mark.integration

MODEL = "sec-mlp"
OTHER = "sec-other"
REQ = keys.requests(MODEL)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl() -> AclUsers:
    return acl_users()


@pytest.fixture(scope="module")
def server(acl: AclUsers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server that loads deploy/acl.conf (test passwords substituted)."""
    directory = tmp_path_factory.mktemp("redis-acl")
    aclfile = acl.write(directory / "users.acl")
    # DEBUG enabled, so that only the ACL stands between the users and it
    with running_redis(directory, "--aclfile", str(aclfile), "--enable-debug-command", "yes") as redis_server:
        yield redis_server


def settings_for(server: RedisServer, user: str, password: str) -> RedisSettings:
    return RedisSettings(url=server.url(), username=user, password=password, connect_timeout_s=2)


@pytest.fixture
def admin(server: RedisServer, acl: AclUsers) -> Iterator[redis.Redis]:
    """The operator's client; every test starts on an empty server."""
    client = settings_for(server, "nosq-admin", acl.passwords["admin"]).client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def producer_settings(server: RedisServer, acl: AclUsers, admin: redis.Redis) -> RedisSettings:
    return settings_for(server, "nosq-producer", acl.passwords["producer"])


@pytest.fixture
def as_producer(producer_settings: RedisSettings) -> Iterator[redis.Redis]:
    """A raw redis-py client logged in as the producer user (what any client could send)."""
    client = producer_settings.client()
    yield client
    client.close()


@pytest.fixture
def as_manager(server: RedisServer, acl: AclUsers, admin: redis.Redis) -> Iterator[redis.Redis]:
    client = settings_for(server, "nosq-manager", acl.passwords["manager"]).client()
    yield client
    client.close()


def seed_queue(as_manager: redis.Redis) -> bytes:
    """A request stream with the manager's group and one entry somebody else enqueued."""
    as_manager.xgroup_create(REQ, keys.GROUP, id="0", mkstream=True)
    entry_id: bytes = as_manager.xadd(REQ, {"v": "1", "id": "someone-else", "ct": "json", "p": b'"secret"'})
    as_manager.hset(keys.registry_served(), MODEL, "manager-1")
    as_manager.hset(keys.admission(MODEL), mapping={"max_backlog": 1000, "retry_after_ms": 100})
    return entry_id


def refused(client: redis.Redis, *command: Any) -> str:
    """Run ``command``; it must be refused by the ACL (NOPERM, or a refusal inside a script)."""
    with pytest.raises(redis.ResponseError) as caught:
        client.execute_command(*command)
    message = str(caught.value)
    assert isinstance(caught.value, NoPermissionError) or "user executing the script can't" in message, (
        f"{command!r} failed, but not for lack of permission: {message}"
    )
    return message


# -- the shipped file ------------------------------------------------------------------------


def test_shipped_acl_file_holds_only_placeholder_passwords() -> None:
    text = ACL_FILE.read_text(encoding="utf-8")
    users = {line.split()[1]: line for line in text.splitlines() if line.strip()}
    assert set(users) == {"default", "nosq-admin", "nosq-manager", "nosq-producer"}
    assert " off" in users["default"] and " on" not in users["default"]
    for name, line in users.items():
        assert "nopass" not in line, name
        # `reset` first: the same rules then also work as ACL SETUSER on an existing user
        assert line.split()[:3] == ["user", name, "reset"], name
        secrets_in_line = re.findall(r"(?:^|\s)([>#]\S+)", line)
        assert all(PLACEHOLDER_RE.fullmatch(s) for s in secrets_in_line), f"{name}: a password that is no placeholder"
    assert text.count("REPLACE_ME_") == 3


def test_acl_setuser_with_the_files_lines_gives_the_same_users(acl: AclUsers, server: RedisServer,
                                                               admin: redis.Redis, tmp_path: Path) -> None:
    """The documented ACL SETUSER route (no aclfile) ends with exactly the same rules."""
    with running_redis(tmp_path / "setuser") as plain:
        client = redis.Redis(port=plain.port, socket_connect_timeout=2)
        try:
            for name, rules in acl.user_lines().items():
                if name != "default":
                    client.execute_command("ACL", "SETUSER", name, *rules.split())
            client.execute_command("ACL", "SETUSER", "default", *acl.user_lines()["default"].split())
            client.close()
            client = redis.Redis(port=plain.port, socket_connect_timeout=2)
            with pytest.raises(redis.AuthenticationError):
                client.ping()  # the default user is off now
            client.close()
            client = redis.Redis(port=plain.port, username="nosq-admin", password=acl.passwords["admin"])
            via_setuser = normalized_acl_list(client)
        finally:
            client.close()
    assert via_setuser == normalized_acl_list(admin)


def normalized_acl_list(client: redis.Redis) -> dict[str, list[list[str]]]:
    """ACL LIST as user -> sorted rule words of the root and of each selector (Redis prints
    the commands it removed in no fixed order)."""
    users = {}
    for raw in client.execute_command("ACL", "LIST"):
        line = raw.decode()
        selectors = re.findall(r"\(([^)]*)\)", line)
        root = re.sub(r"\([^)]*\)", "", line).split()
        users[root[1]] = [sorted(root[2:]), *sorted(sorted(s.split()) for s in selectors)]
    return users


def test_hashed_passwords_in_the_file(tmp_path: Path) -> None:
    """The recipe of docs/operations.md: store ``#<sha256 of the password>``, not the password."""
    passwords = {role: secrets.token_hex(32) for role in ("admin", "manager", "producer")}

    def hashed(match: re.Match[str]) -> str:
        return "#" + hashlib.sha256(passwords[match.group(1)].encode()).hexdigest()

    aclfile = tmp_path / "users.acl"
    aclfile.write_text(PLACEHOLDER_RE.sub(hashed, ACL_FILE.read_text(encoding="utf-8")), encoding="utf-8")
    assert all(password not in aclfile.read_text() for password in passwords.values())
    with running_redis(tmp_path, "--aclfile", str(aclfile)) as hashed_server:
        for role, password in passwords.items():
            settings = settings_for(hashed_server, f"nosq-{role}", password)
            with Producer(settings):  # connects (AUTH + PING)
                pass


# -- the producer user can do its job --------------------------------------------------------


def test_producer_user_submits_cancels_and_receives(producer_settings: RedisSettings,
                                                    as_manager: redis.Redis) -> None:
    with Producer(producer_settings, content_type="json") as producer:
        one = producer.submit(MODEL, {"x": [1, 2, 3]}, method="forward", ttl_s=60)
        many = producer.submit_many(MODEL, [[i] for i in range(5)], timeout_s=30)
        doomed = producer.submit(MODEL, "never runs")
        producer.cancel(doomed)
        answer_requests(as_manager, MODEL, expect=7)

        assert producer.result(one, timeout_s=5) == {"echo": {"x": [1, 2, 3]}, "method": "forward"}
        assert [out["echo"] for out in producer.gather(many, timeout_s=5)] == [[i] for i in range(5)]
        with pytest.raises(RemoteError) as caught:
            producer.result(doomed, timeout_s=5)
        assert caught.value.code == "cancelled"
    assert as_manager.xlen(REQ) == 0  # acked and deleted by the manager user


async def test_async_producer_user_submits_cancels_and_receives(producer_settings: RedisSettings,
                                                                as_manager: redis.Redis) -> None:
    async with AsyncProducer(producer_settings) as producer:
        one = await producer.submit(MODEL, {"x": [1.5]}, ttl_s=60)
        many = await producer.submit_many(MODEL, [[i] for i in range(4)])
        doomed = await producer.submit(MODEL, "never runs")
        await producer.cancel(doomed)
        await asyncio.to_thread(answer_requests, as_manager, MODEL, expect=6)

        assert (await producer.result(one, timeout_s=5))["echo"] == {"x": [1.5]}
        assert [out["echo"] for out in await producer.gather(many, timeout_s=5)] == [[i] for i in range(4)]
        with pytest.raises(RemoteError) as caught:
            await producer.result(doomed, timeout_s=5)
        assert caught.value.code == "cancelled"


def test_producer_user_runs_the_backlog_check(producer_settings: RedisSettings, as_manager: redis.Redis) -> None:
    """HGET on the admission hash and XLEN inside the enqueue script are allowed."""
    as_manager.hset(keys.admission(MODEL), mapping={"max_backlog": 2, "retry_after_ms": 250})
    with Producer(producer_settings) as producer:
        with pytest.raises(QueueFull) as caught:
            producer.submit_many(MODEL, [1, 2, 3])
        assert len(caught.value.accepted) == 2
        assert caught.value.retry_after_s == pytest.approx(0.25)
        answer_requests(as_manager, MODEL, expect=2)
        assert [out["echo"] for out in producer.gather(caught.value.accepted, timeout_s=5)] == [1, 2]


def test_producer_user_speaks_the_protocol_from_any_client(as_producer: redis.Redis, as_manager: redis.Redis) -> None:
    """What docs/protocol.md tells other languages to send: EVAL / EVALSHA of the enqueue
    script, plain XADD, GET + BLPOP + GET, SET of the cancel flag, PING."""
    admission = keys.admission(MODEL)
    assert as_producer.ping()
    sha = as_producer.script_load(ENQUEUE_LUA)
    assert as_producer.script_exists(sha, "0" * 40) == [True, False]
    assert as_producer.eval(ENQUEUE_LUA, 2, REQ, admission, "v", 1, "id", "by-eval", "ct", "json", "p", "1")[0] == 1
    assert as_producer.evalsha(sha, 2, REQ, admission, "v", 1, "id", "by-evalsha", "ct", "json", "p", "2")[0] == 1
    assert as_producer.xadd(REQ, {"v": 1, "id": "by-xadd", "ct": "json", "p": "3"})
    many = as_producer.eval(ENQUEUE_MANY_LUA, 2, REQ, admission, 2, "v", 1, "ct", "json", "m1", "4", "m2", "5")
    assert many[0] == 2
    assert as_producer.xlen(REQ) == 5
    assert as_producer.get(keys.result("by-xadd")) is None
    assert as_producer.set(keys.cancel("m2"), 1, ex=60)

    answer_requests(as_manager, MODEL, expect=5)
    for request_id, value in [("by-eval", 1), ("by-evalsha", 2), ("by-xadd", 3), ("m1", 4)]:
        assert as_producer.blpop([keys.done(request_id)], timeout=5) is not None
        envelope = decode_envelope("json", as_producer.get(keys.result(request_id)))
        assert envelope.ok and envelope.out["echo"] == value
    results = as_producer.mget([keys.result("m1"), keys.result("m2")])
    assert decode_envelope("json", results[1]).code == "cancelled"


# -- ... and nothing else --------------------------------------------------------------------

READ_PAYLOADS = [
    ("XRANGE", REQ, "-", "+"),
    ("XREVRANGE", REQ, "+", "-"),
    ("XREAD", "STREAMS", REQ, "0"),
    ("XREADGROUP", "GROUP", keys.GROUP, "thief", "STREAMS", REQ, ">"),
    ("XREADGROUP", "GROUP", keys.GROUP, "thief", "STREAMS", REQ, "0"),
    ("XINFO", "STREAM", REQ, "FULL"),
    ("XPENDING", REQ, keys.GROUP, "-", "+", 10),
    ("XAUTOCLAIM", REQ, keys.GROUP, "thief", 0, "0-0"),
    ("XCLAIM", REQ, keys.GROUP, "thief", 0, "0-1"),
    ("DUMP", REQ),
    ("SORT", REQ),
    ("EVAL", "return redis.call('XRANGE', KEYS[1], '-', '+')", 1, REQ),
    ("EVAL", "return redis.call('XRANGE', 'nosq:{" + MODEL + "}:req', '-', '+')", 0),
]


@pytest.mark.parametrize("command", READ_PAYLOADS, ids=lambda c: " ".join(map(str, c[:2])))
def test_producer_user_cannot_read_request_payloads(command: tuple[Any, ...], as_producer: redis.Redis,
                                                    as_manager: redis.Redis) -> None:
    seed_queue(as_manager)
    refused(as_producer, *command)
    assert as_manager.xlen(REQ) == 1


def test_producer_user_cannot_read_payloads_with_a_loaded_script(as_producer: redis.Redis,
                                                                 as_manager: redis.Redis) -> None:
    seed_queue(as_manager)
    sha = as_producer.script_load("return redis.call('XRANGE', KEYS[1], '-', '+')")
    refused(as_producer, "EVALSHA", sha, 1, REQ)


MANAGER_KEYS = [
    ("HGETALL", keys.registry_served()),
    ("HSET", keys.registry_served(), MODEL, "me"),
    ("DEL", keys.registry_served()),
    ("ZRANGE", keys.registry_models(), 0, -1),
    ("SMEMBERS", keys.registry("managers")),
    ("GET", keys.manager_heartbeat("manager-1")),
    ("SET", keys.manager_heartbeat("manager-1"), "{}"),
    ("HSET", keys.admission(MODEL), "max_backlog", 1_000_000),  # lift the backlog limit
    ("HDEL", keys.admission(MODEL), "max_backlog"),
    ("XRANGE", keys.dead_letters(MODEL), "-", "+"),
    ("XADD", keys.dead_letters(MODEL), "*", "a", "b"),
    ("SET", keys.result("someone-else"), "forged"),  # forge a result
    ("DEL", keys.result("someone-else")),
    ("SET", keys.result("someone-else"), "forged", "NX", "EX", 60),
    ("RPUSH", keys.done("someone-else"), 1),  # forge a wake-up
    ("XADD", keys.reply("victim"), "*", "id", "someone-else", "r", "forged"),  # forge a completion
    ("GET", keys.cancel("someone-else")),  # cancel flags are write-only
    ("SET", keys.cancel("someone-else"), 1, "GET"),
    ("GET", "unrelated:key"),
    ("SET", "unrelated:key", 1),
    ("EVAL", "return redis.call('HGETALL', KEYS[1])", 1, keys.registry_served()),
    ("EVAL", "return redis.call('HSET', KEYS[2], 'max_backlog', 1000000)", 2, REQ, keys.admission(MODEL)),
]


@pytest.mark.parametrize("command", MANAGER_KEYS, ids=lambda c: " ".join(map(str, c[:2])))
def test_producer_user_cannot_touch_the_registry_or_the_managers_keys(
        command: tuple[Any, ...], as_producer: redis.Redis, as_manager: redis.Redis) -> None:
    seed_queue(as_manager)
    refused(as_producer, *command)
    assert as_manager.hgetall(keys.registry_served()) == {MODEL.encode(): b"manager-1"}
    assert as_manager.hget(keys.admission(MODEL), "max_backlog") == b"1000"


DESTROY_STREAMS = [
    ("DEL", REQ),
    ("UNLINK", REQ),
    ("XTRIM", REQ, "MAXLEN", 0),
    ("XTRIM", REQ, "MINID", "9999999999999"),
    ("XDEL", REQ, "0-1"),
    ("XACK", REQ, keys.GROUP, "0-1"),
    ("XSETID", REQ, "9999999999999-0"),
    ("XGROUP", "DESTROY", REQ, keys.GROUP),
    ("XGROUP", "SETID", REQ, keys.GROUP, "$"),
    ("XGROUP", "CREATE", keys.requests(OTHER), keys.GROUP, "$", "MKSTREAM"),
    ("EXPIRE", REQ, 1),
    ("RENAME", REQ, keys.requests(OTHER)),
    ("COPY", REQ, keys.reply("mine")),
    ("RESTORE", REQ, 0, b"x", "REPLACE"),
    ("SET", REQ, "clobbered"),
    ("EVAL", "return redis.call('DEL', KEYS[1])", 1, REQ),
    ("EVAL", "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)", 1, REQ),
]


@pytest.mark.parametrize("command", DESTROY_STREAMS, ids=lambda c: " ".join(map(str, c[:2])))
def test_producer_user_cannot_delete_or_trim_request_streams(
        command: tuple[Any, ...], as_producer: redis.Redis, as_manager: redis.Redis) -> None:
    entry_id = seed_queue(as_manager)
    refused(as_producer, *command)
    assert [e[0] for e in as_manager.xrange(REQ)] == [entry_id]
    assert as_manager.ttl(REQ) == -1


SERVER_WIDE = [
    ("FLUSHDB",), ("FLUSHALL",), ("KEYS", "*"), ("SCAN", 0), ("RANDOMKEY",), ("DBSIZE",),
    ("CONFIG", "GET", "*"), ("CONFIG", "SET", "maxmemory", "1"), ("ACL", "LIST"), ("ACL", "WHOAMI"),
    ("ACL", "SETUSER", "nosq-producer", "+@all"), ("INFO",), ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", 1),
    ("SCRIPT", "FLUSH"), ("SCRIPT", "KILL"), ("FUNCTION", "FLUSH"), ("DEBUG", "SLEEP", 0), ("SAVE",),
    ("BGSAVE",), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "NO", "ONE"), ("SWAPDB", 0, 1),
    ("PUBLISH", "nosq", "hi"), ("SLOWLOG", "GET"), ("MEMORY", "USAGE", REQ), ("OBJECT", "ENCODING", REQ),
]


@pytest.mark.parametrize("command", SERVER_WIDE, ids=lambda c: " ".join(map(str, c[:2])))
def test_producer_user_cannot_run_server_wide_commands(command: tuple[Any, ...], as_producer: redis.Redis,
                                                       as_manager: redis.Redis) -> None:
    seed_queue(as_manager)
    refused(as_producer, *command)
    assert as_manager.xlen(REQ) == 1


def test_known_limit_xadd_trimming_options_are_not_restricted(as_producer: redis.Redis,
                                                               as_manager: redis.Redis) -> None:
    """Redis 7 ACLs check commands and keys, not options: the XADD a producer needs also takes
    MAXLEN/MINID, so a hostile producer can trim a request stream it may write to (and pick
    explicit entry ids). docs/operations.md states this limit; this test keeps the statement
    true (if Redis ever refuses it, update the doc)."""
    seed_queue(as_manager)
    as_producer.execute_command("XADD", REQ, "MAXLEN", 0, "*", "v", 1)
    assert as_manager.xlen(REQ) == 0


# -- refusals through the nosq producer -------------------------------------------------------


def limited_user(acl: AclUsers, admin: redis.Redis, name: str, model: str) -> RedisSettings:
    """The producer user's rules with its request streams narrowed to one model (the recipe
    docs/operations.md gives for per-model producers)."""
    rules = acl.user_lines()["nosq-producer"].replace("nosq:{*}:", f"nosq:{{{model}}}:")
    rules = rules.replace(f">{acl.passwords['producer']}", ">limited-password")
    admin.execute_command("ACL", "SETUSER", name, *rules.split())
    port = admin.connection_pool.connection_kwargs["port"]
    return RedisSettings(url=f"redis://127.0.0.1:{port}/0", username=name, password="limited-password")


def assert_readable_refusal(exc: NosqError, where: str) -> None:
    assert not isinstance(exc, redis.RedisError)
    assert isinstance(exc.__cause__, redis.RedisError)
    message = str(exc)
    assert where in message, message
    assert "permission" in message.lower() or "can't" in message, message


def test_refusals_surface_as_nosq_errors(acl: AclUsers, admin: redis.Redis, as_manager: redis.Redis) -> None:
    settings = limited_user(acl, admin, "nosq-producer-mlp-only", MODEL)
    with Producer(settings, content_type="json") as producer:
        handle = producer.submit(MODEL, [1])  # its own model: allowed
        answer_requests(as_manager, MODEL)
        assert producer.result(handle, timeout_s=5)["echo"] == [1]

        with pytest.raises(NosqError) as caught:
            producer.submit(OTHER, [1])
        assert_readable_refusal(caught.value, f"submitting to model {OTHER!r}")
        with pytest.raises(NosqError) as caught:
            producer.submit_many(OTHER, [[1], [2]])
        assert_readable_refusal(caught.value, f"submitting to model {OTHER!r}")

    admin.execute_command("ACL", "SETUSER", "nosq-nobody", "reset", "on", ">nobody-password", "+ping")
    port = admin.connection_pool.connection_kwargs["port"]
    nobody = RedisSettings(url=f"redis://127.0.0.1:{port}/0", username="nosq-nobody", password="nobody-password")
    foreign = Handle(id="someone-else", model=MODEL, ct="json", deadline_ms=None, ttl_s=60)
    with Producer(nobody) as producer:
        with pytest.raises(NosqError) as caught:
            producer.cancel(foreign)
        assert_readable_refusal(caught.value, "cancelling 'someone-else'")
        with pytest.raises(NosqError) as caught:
            producer.result(foreign, timeout_s=1)
        assert_readable_refusal(caught.value, "reading results")


async def test_refusals_surface_as_nosq_errors_async(acl: AclUsers, admin: redis.Redis,
                                                     as_manager: redis.Redis) -> None:
    settings = limited_user(acl, admin, "nosq-producer-mlp-only-async", MODEL)
    async with AsyncProducer(settings) as producer:
        handle = await producer.submit(MODEL, [2])
        await asyncio.to_thread(answer_requests, as_manager, MODEL)
        assert (await producer.result(handle, timeout_s=5))["echo"] == [2]
        with pytest.raises(NosqError) as caught:
            await producer.submit(OTHER, [1])
        assert_readable_refusal(caught.value, f"submitting to model {OTHER!r}")
        with pytest.raises(NosqError) as caught:
            await producer.submit_many(OTHER, [[1]] * 3)
        assert_readable_refusal(caught.value, f"submitting to model {OTHER!r}")

    admin.execute_command("ACL", "SETUSER", "nosq-nobody-async", "reset", "on", ">nobody-password", "+ping")
    port = admin.connection_pool.connection_kwargs["port"]
    nobody = RedisSettings(url=f"redis://127.0.0.1:{port}/0", username="nosq-nobody-async",
                           password="nobody-password")
    async with AsyncProducer(nobody) as producer:
        with pytest.raises(NosqError) as caught:
            await producer.cancel(Handle(id="someone-else", model=MODEL, ct="json", deadline_ms=None, ttl_s=60))
        assert_readable_refusal(caught.value, "cancelling 'someone-else'")


SECRET = "TOP-SECRET-PAYLOAD"


def test_refusal_messages_do_not_echo_payloads(acl: AclUsers, admin: redis.Redis) -> None:
    settings = limited_user(acl, admin, "nosq-producer-echo", MODEL)
    with Producer(settings) as producer, pytest.raises(NosqError) as caught:
        producer.submit(OTHER, SECRET)
    message = str(caught.value)
    assert SECRET not in message and producer._client_id not in message
    assert len(message) < 500, message


async def test_refusal_messages_do_not_echo_payloads_async(acl: AclUsers, admin: redis.Redis) -> None:
    settings = limited_user(acl, admin, "nosq-producer-echo-async", MODEL)
    async with AsyncProducer(settings) as producer:
        with pytest.raises(NosqError) as caught:
            await producer.submit_many(OTHER, [SECRET, SECRET])
        message = str(caught.value)
        assert SECRET not in message and producer._client_id not in message
        assert len(message) < 500, message


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_bad_credentials_are_connection_errors(server: RedisServer, admin: redis.Redis, password: str | None) -> None:
    """The default user is off: no credentials, or wrong ones, cannot connect at all."""
    username = None if password is None else "nosq-producer"
    settings = RedisSettings(url=server.url(), username=username, password=password, connect_timeout_s=2)
    with pytest.raises(NosqConnectionError) as caught:
        Producer(settings).start()
    assert "127.0.0.1" in str(caught.value)
    assert password is None or password not in str(caught.value)


async def test_bad_credentials_are_connection_errors_async(server: RedisServer, admin: redis.Redis) -> None:
    settings = RedisSettings(url=server.url(), username="nosq-producer", password="wrong-password",
                             connect_timeout_s=2)
    producer = AsyncProducer(settings)
    with pytest.raises(NosqConnectionError):
        await producer.start()
    await producer.aclose()


# -- the manager user --------------------------------------------------------------------------


def test_manager_user_can_do_its_job(as_manager: redis.Redis, as_producer: redis.Redis) -> None:
    m = as_manager
    assert m.ping() and m.time() and "redis_version" in m.info("server")
    m.execute_command("CLIENT", "SETNAME", "nosq-manager-test")
    m.xgroup_create(REQ, keys.GROUP, id="0", mkstream=True)
    as_producer.xadd(REQ, {"v": 1, "id": "r1", "ct": "json", "p": "1"})
    assert list(m.scan_iter(match=keys.stream_pattern(), _type="STREAM")) == [REQ.encode()]
    assert m.xlen(REQ) == 1 and m.xinfo_groups(REQ)[0]["name"] == keys.GROUP.encode()
    assert m.xreadgroup(keys.GROUP, "c1", {REQ: ">"}, count=10, block=10)
    assert m.xpending_range(REQ, keys.GROUP, min="-", max="+", count=10)[0]["consumer"] == b"c1"
    _, claimed, _ = m.xautoclaim(REQ, keys.GROUP, "c2", min_idle_time=0, start_id="0-0")
    assert len(claimed) == 1
    entry_id = claimed[0][0]
    assert m.xclaim(REQ, keys.GROUP, "c1", 0, [entry_id], justid=True) == [entry_id]
    m.xadd(keys.dead_letters(MODEL), {"reason": "test"}, maxlen=100_000, approximate=True)
    assert m.set(keys.result("r1"), b"{}", nx=True, ex=60)
    m.rpush(keys.done("r1"), 1)
    m.expire(keys.done("r1"), 60)
    m.xadd(keys.reply("client"), {"id": "r1", "r": b"{}"}, maxlen=1000, approximate=True)
    assert m.xack(REQ, keys.GROUP, entry_id) == 1 and m.xdel(REQ, entry_id) == 1
    m.hset(keys.admission(MODEL), mapping={"max_backlog": 10, "retry_after_ms": 5})
    m.hset(keys.registry_served(), MODEL, "c1")
    m.sadd(keys.registry("managers"), "c1")
    m.zadd(keys.registry("load"), {"c1": 1.0})
    assert m.set(keys.manager_heartbeat("c1"), b'{"state":"running"}', ex=10)
    script = m.register_script("return redis.call('HINCRBY', KEYS[1], 'n', 1)")
    assert script(keys=[keys.registry("counter")]) == 1
    assert m.eval("return redis.call('XLEN', KEYS[1])", 1, REQ) == 0
    assert m.delete(keys.manager_heartbeat("c1"), keys.dead_letters(MODEL)) == 2
    assert m.get(keys.cancel("r1")) is None and m.mget([keys.result("r1")])[0] == b"{}"


MANAGER_FORBIDDEN = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "GET", "maxmemory"),
    ("ACL", "SETUSER", "nosq-manager", "+@all"), ("ACL", "LIST"), ("ACL", "DELUSER", "nosq-producer"),
    ("SHUTDOWN", "NOSAVE"), ("DEBUG", "SLEEP", 0), ("KEYS", "*"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", 1),
    ("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH"), ("REPLICAOF", "NO", "ONE"), ("SAVE",), ("BGSAVE",),
    ("SWAPDB", 0, 1), ("MODULE", "LIST"), ("MIGRATE", "127.0.0.1", 1, "", 0, 1, "KEYS", REQ),
    ("PUBLISH", "nosq", "hi"), ("SORT", REQ), ("GET", "unrelated:key"), ("SET", "unrelated:key", 1),
    ("RENAME", REQ, "unrelated:key"),
]


@pytest.mark.parametrize("command", MANAGER_FORBIDDEN, ids=lambda c: " ".join(map(str, c[:2])))
def test_manager_user_has_no_admin_commands(command: tuple[Any, ...], as_manager: redis.Redis) -> None:
    seed_queue(as_manager)
    refused(as_manager, *command)
    assert as_manager.xlen(REQ) == 1
