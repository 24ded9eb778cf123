"""Redis's rule for scripts: every key a script touches is passed in KEYS (Redis Cluster routes a
script by its declared keys). The registry's scripts keep it, checked three ways:

* by reading them: every ``redis.call`` key argument is ``KEYS[...]``, never built from ARGV or
  by ``..`` concatenation;
* by running them: every ``Registry`` operation on a private ``redis-server`` under MONITOR, each
  command a script ran checked against the keys that script declared (``COMMAND GETKEYS``);
* under races: a script given keys from a stale read replies "retry" and writes nothing, the
  caller reads again (at most ``_TRIES`` times, then ``RegistryError``), and two managers
  interleaving 200 operations on one device converge with the audit ok throughout.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from nosq.manager.memory import registry as registry_module
from nosq.manager.memory.registry import Outcome, Registry, RegistryError
from nosq.producer import keys
from tests.registry.keys_support import (
    KEY_ARGS,
    SCRIPTS,
    SHAS,
    ScriptRecorder,
    every_operation,
    key_calls,
    lua_code,
)

NODE, GPU = "n1", "cuda:0"
KEY_TEXT = re.compile(r"KEYS\[[A-Za-z0-9_.+\-*\s\[\]]+\]")  # KEYS[1], KEYS[at[m]], KEYS[s.d], KEYS[c[2] + 1]


# -- the scripts' text --------------------------------------------------------------------------

def test_every_script_is_checked() -> None:
    assert set(SCRIPTS) == {"_RESERVE", "_MARK_READY", "_INFLIGHT", "_TOUCH", "_RELEASE", "_RELEASE_OWNER",
                            "_RECORD_ERROR", "_RESIZE", "_SET_BUDGET", "_AUDIT"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_address_keys_only_through_KEYS(name: str) -> None:
    code = lua_code(SCRIPTS[name])
    assert set(re.findall(r"redis\.(\w+)", code)) == {"call"}, "only redis.call reaches Redis"
    assert not re.search(r"KEYS\s*\[[^\]]*\]\s*=[^=]", code), "KEYS is never assigned to"
    assert not re.search(r"KEYS(?!\s*\[)", code), "KEYS is only ever indexed, never aliased"
    calls = key_calls(code)
    assert calls
    for call in calls:
        assert call.command in KEY_ARGS, f"{name}: {call.text}: a command the test does not know the keys of"
        if call.command in ("EXISTS", "SMEMBERS", "SCARD"):
            assert len(call.args) == 1, f"{name}: {call.text}: one key only"
        assert len(call.keys) == KEY_ARGS[call.command], f"{name}: {call.text}"
        for key in call.keys:
            assert KEY_TEXT.fullmatch(key), f"{name}: {call.text}: key {key!r} is not KEYS[...]"
            assert "ARGV" not in key and ".." not in key and "'" not in key, f"{name}: {call.text}"


def test_the_parser_catches_keys_built_in_lua() -> None:
    bad = ("redis.call('HMGET', ARGV[2] .. m, 'state')\n"
           "redis.call('SREM', rprefix .. label, model)\n"
           "redis.call('HSET', KEYS[1] .. ':x', 'a', 1)\n")
    assert [bool(KEY_TEXT.fullmatch(c.keys[0])) for c in key_calls(bad)] == [False, False, False]
    assert [c.keys for c in key_calls("redis.call('HSET', KEYS[at[c.id]], 'state', 'x')")] == [("KEYS[at[c.id]]",)]


# -- the scripts run: every touched key declared ------------------------------------------------

@pytest.fixture
def private_redis() -> Iterator[Path]:
    """A redis-server of this test alone, on a unix socket: MONITOR sees only our commands."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not on PATH: install Redis 7 (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="nosq-keys-") as tmp:
        sock = Path(tmp) / "redis.sock"
        proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
                                 "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)  # a child process starting: nothing to wait on
            yield sock
        finally:
            proc.kill()
            proc.wait(10)


async def test_every_operation_touches_only_declared_keys(private_redis: Path) -> None:
    client = redis.asyncio.Redis(unix_socket_path=str(private_redis))
    recorder = ScriptRecorder(unix_socket_path=str(private_redis))
    try:
        with recorder:
            await every_operation(client)
        assert {SHAS.get(run.sha) for run in recorder.runs} == set(SCRIPTS)  # every script ran
        assert sum(len(run.commands) for run in recorder.runs) > 100
        assert recorder.undeclared() == []
        # with the heartbeat key (reap_dead_owners on a single Redis) the only one outside {registry}
        heartbeats = {keys.manager_heartbeat("mgr-a"), keys.manager_heartbeat("mgr-b")}
        for run in recorder.runs:
            assert all(k.startswith(keys.registry("")) or k in heartbeats for k in run.keys), run.keys
    finally:
        recorder.close()
        await client.aclose()


def test_the_recorder_sees_an_undeclared_key(private_redis: Path) -> None:
    client = redis.Redis(unix_socket_path=str(private_redis))
    recorder = ScriptRecorder(unix_socket_path=str(private_redis))
    try:
        with recorder:
            client.eval("redis.call('SET', KEYS[1], 'x') return redis.call('GET', ARGV[1] .. 'b')", 1,
                        "nosq:{registry}:a", "nosq:{registry}:")
        assert [(key, command[0]) for _, command, key in recorder.undeclared()] == [("nosq:{registry}:b", "GET")]
    finally:
        recorder.close()
        client.close()


# -- races: a stale read is retried, never acted on ----------------------------------------------

async def _dump(client: redis.asyncio.Redis) -> dict[bytes, Any]:
    return {key: await client.dump(key) for key in sorted(await client.keys("*"))}


async def test_a_stale_read_writes_nothing_and_asks_to_retry(client: redis.asyncio.Redis) -> None:
    reg = Registry(client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 200)
    await reg.set_budget(NODE, "cpu", 200)
    for model in ("a", "b"):
        assert (await reg.reserve(model, node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
        await reg.mark_ready(model, replicas=1, load_ms=1)
        await reg.touch(model)
    model, device, resident = keys.registry_model, keys.registry_device(f"{NODE}/{GPU}"), \
        keys.registry_resident(f"{NODE}/{GPU}")
    stale = {  # each script given the keys of a read that no longer holds
        "_RESERVE": ([model("x"), device, resident, keys.registry_models(), keys.registry_evictions(), model("a")],
                     ["x", NODE, GPU, 100, "mgr-a", "fifo", registry_module.EVENTS_CHANNEL, "a"]),
        "_RELEASE": ([model("a"), keys.registry_device(f"{NODE}/cpu"), keys.registry_resident(f"{NODE}/cpu")],
                     ["a", "mgr-a", "evicted", registry_module.EVENTS_CHANNEL, "", NODE, "cpu"]),
        "_RELEASE_OWNER": ([keys.registry_models(), model("a"), device, resident],
                           ["mgr-a", registry_module.EVENTS_CHANNEL, "", 1, "a", f"{NODE}/{GPU}"]),
        "_RESIZE": ([model("a"), keys.registry_device(f"{NODE}/cpu")], ["mgr-a", 2, NODE, "cpu"]),
        "_AUDIT": ([keys.registry_devices(), device, resident, model("a")], [1, f"{NODE}/{GPU}", 1, "a"]),
    }
    for name, (keys_, args) in stale.items():
        before = await _dump(client)
        reply = await client.eval(SCRIPTS[name], len(keys_), *keys_, *args)  # type: ignore[misc]
        assert reply == [registry_module._RETRY.encode()], (name, reply)
        assert await _dump(client) == before, name
    # the same calls through Registry read again and do it
    assert [v.model for v in (await reg.reserve("x", node=NODE, device=GPU, nbytes=100)).victims] == ["a"]
    assert await reg.release("a")
    assert (await reg.resize("b", 2)).nbytes == 200  # 100 more, 100 free (x was not reserved, only a evicted)
    assert all(d.ok for d in await reg.audit())
    assert await reg.release_all() == ["b"]


async def test_a_read_gone_stale_is_read_again(client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the public API: another manager's change lands between an operation's read and its
    script; the script refuses, the operation reads again and does the right thing."""
    reg, other = Registry(client, owner="mgr-a"), Registry(client, owner="mgr-b")
    await reg.set_budget(NODE, GPU, 300)
    await reg.set_budget(NODE, "cpu", 300)
    for owner, model in ((reg, "a1"), (other, "b1")):
        assert (await owner.reserve(model, node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
        await owner.mark_ready(model, replicas=1, load_ms=1)
        await owner.touch(model)
    members, where = Registry._members, Registry._where
    meddle: list[Any] = []  # what "the other manager" does right after the next read
    reads: Counter[str] = Counter()

    async def meddle_after(read: str, got: Any) -> Any:
        reads[read] += 1
        if meddle:
            await meddle.pop(0)()
        return got

    async def members_then(self: Registry, key: str) -> list[str]:
        return await meddle_after("members", await members(self, key))  # type: ignore[no-any-return]

    async def where_then(self: Registry, model: str) -> tuple[str, str]:
        return await meddle_after("where", await where(self, model))  # type: ignore[no-any-return]

    monkeypatch.setattr(Registry, "_members", members_then)
    monkeypatch.setattr(Registry, "_where", where_then)

    # reserve must evict; b2 joins the resident set after the read: read again, b2 is a candidate
    meddle.append(lambda: other.reserve("b2", node=NODE, device=GPU, nbytes=50))
    got = await reg.reserve("x", node=NODE, device=GPU, nbytes=150)
    assert (got.outcome, [v.model for v in got.victims]) == (Outcome.EVICT, ["a1"]), got
    assert reads["members"] == 2 + 1  # the resident set twice (+1: b2's own reserve)
    # a1 moves to the cpu after the read of its device: released from the cpu
    async def move_a1() -> None:
        assert await reg.release("a1")
        assert (await reg.reserve("a1", node=NODE, device="cpu", nbytes=100)).outcome is Outcome.RESERVED
        await reg.mark_ready("a1", replicas=1, load_ms=1)

    meddle.append(move_a1)
    reads.clear()
    assert await reg.release("a1") and reads["where"] == 2 + 1  # its device twice (+1: the nested release)
    assert [(d.device, d.used_bytes, d.models) for d in await reg.audit()] == [("cpu", 0, ()), (GPU, 150, ("b1", "b2"))]
    # resize: b1 moves to the cpu after the read; grown there
    async def move_b1() -> None:
        assert await other.release("b1")
        assert (await other.reserve("b1", node=NODE, device="cpu", nbytes=100)).outcome is Outcome.RESERVED
        await other.mark_ready("b1", replicas=1, load_ms=1)

    meddle.append(move_b1)
    reads.clear()
    assert (await other.resize("b1", 2)).nbytes == 200
    assert reads["where"] == 2 + 1  # its device twice (+1: the nested release)
    # audit: a device appears after the devices set was read
    meddle.append(lambda: reg.set_budget(NODE, "cuda:1", 100))
    reads.clear()
    audits = await reg.audit()
    assert [(d.device, d.used_bytes, d.ok) for d in audits] == [("cpu", 200, True), (GPU, 50, True),
                                                                ("cuda:1", 0, True)]
    assert reads["members"] == 2  # the devices set, twice
    # release_all: a model of ours appears after the models set was read
    meddle.append(lambda: reg.reserve("a2", node=NODE, device="cuda:1", nbytes=100))
    reads.clear()
    assert await reg.release_all() == ["a2"]
    assert reads["members"] == 2 + 1  # the models set twice (+1: a2's own reserve)
    assert all(d.ok and (d.device == "cpu" or d.used_bytes == (50 if d.device == GPU else 0))
               for d in await reg.audit())


async def test_retries_are_bounded(client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(client, owner="mgr-a")
    await reg.set_budget(NODE, GPU, 100)
    assert (await reg.reserve("a", node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
    reads = 0

    async def always_stale(self: Registry, key: str) -> list[str]:
        nonlocal reads
        reads += 1
        return []  # the resident set holds "a": every script run finds it changed

    monkeypatch.setattr(Registry, "_members", always_stale)
    with pytest.raises(RegistryError, match=r"reserve 'x' on n1/cuda:0 failed: the keys it reads changed under "
                                            r"it 20 times in a row"):
        await reg.reserve("x", node=NODE, device=GPU, nbytes=100)
    assert reads == registry_module._TRIES == 20
    assert (await client.hget(keys.registry_model("a"), "state")) == b"loading"  # type: ignore[misc]
    assert not await client.exists(keys.registry_model("x"))


@pytest.fixture
async def two_clients(registry_url: str) -> AsyncIterator[tuple[redis.asyncio.Redis, redis.asyncio.Redis]]:
    first, second = redis.asyncio.Redis.from_url(registry_url), redis.asyncio.Redis.from_url(registry_url)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_two_managers_interleaved_converge(two_clients: tuple[redis.asyncio.Redis, redis.asyncio.Redis],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two managers (own connections) reserve, load, serve, evict and release on one device:
    200 operations interleaved. Reads go stale under the other's scripts; the retries converge,
    and every audit (itself racing) is ok."""
    replies: Counter[str] = Counter()
    retried: Counter[str] = Counter()  # by script
    run = registry_module._run

    async def counting(script: Any, keys_: list[str], args: list[Any]) -> Any:
        reply = await run(script, keys_, args)
        if registry_module._is_retry(reply):
            replies["retry"] += 1
            retried[SHAS[script.sha]] += 1
        else:
            replies["done"] += 1
        return reply

    monkeypatch.setattr(registry_module, "_run", counting)
    regs = [Registry(conn, owner=f"mgr-{i}", policy=policy)
            for i, (conn, policy) in enumerate(zip(two_clients, ("fifo", "lru"), strict=True))]
    await regs[0].set_budget(NODE, GPU, 300)
    stats: Counter[str] = Counter()

    async def manager(reg: Registry, seed: int, ops: int) -> None:
        rng = random.Random(seed)
        models = [f"{reg.owner}-m{i}" for i in range(4)]
        for _ in range(ops):
            mine = {r["model"]: r["state"] for r in await reg.snapshot(owner=reg.owner)}
            for model, state in mine.items():  # victims of the other's reserve: "kill", release
                if state == "draining":
                    stats["victim released"] += await reg.release(model)
            roll = rng.random()
            ready = [m for m, s in mine.items() if s == "ready"]
            if roll < 0.55:
                model = rng.choice(models)
                got = await reg.reserve(model, node=NODE, device=GPU, nbytes=rng.choice((60, 100, 140)))
                stats[got.outcome.value] += 1
                if got.outcome is Outcome.RESERVED:
                    await reg.mark_ready(model, replicas=1, load_ms=rng.uniform(1, 50))
                    await reg.touch(model, 1)  # served: evictable at once
            elif roll < 0.75 and ready:
                stats["released"] += await reg.release(rng.choice(ready))
            elif roll < 0.85 and ready:
                stats["resized"] += (await reg.resize(rng.choice(ready), rng.choice((1, 2)))).ok
            else:
                audits = await reg.audit()
                assert all(a.ok for a in audits), audits
                stats["audits"] += 1
            await asyncio.sleep(0)

    audits_ok = 0

    async def auditor(done: asyncio.Event) -> None:
        nonlocal audits_ok
        while not done.is_set():
            audits = await regs[0].audit()
            assert all(a.ok for a in audits), audits
            audits_ok += 1

    done = asyncio.Event()
    watcher = asyncio.ensure_future(auditor(done))
    try:
        async with asyncio.timeout(120):
            await asyncio.gather(manager(regs[0], 1, 100), manager(regs[1], 2, 100))
    finally:
        done.set()
        await watcher
    for reg in regs:
        for row in await reg.snapshot(owner=reg.owner):
            if row["state"] == "draining":
                await reg.release(row["model"])
    [audit] = await regs[0].audit()
    assert audit.ok and audit.used_bytes <= 300, audit
    assert sorted(await regs[0].release_all() + await regs[1].release_all()) == sorted(audit.models)
    [audit] = await regs[0].audit()
    assert audit.ok and (audit.used_bytes, audit.models) == (0, ()), audit
    print(f"\nscripts run: {replies['done']}, retried: {replies['retry']} {dict(retried)}, watcher audits: "
          f"{audits_ok}, ops: {dict(stats)}")
    for outcome in ("reserved", "evict", "victim released", "released", "audits"):
        assert stats[outcome] > 0, (outcome, stats)
    assert replies["retry"] > 0, "no read went stale: the retry path was not exercised"
    assert audits_ok > 10
