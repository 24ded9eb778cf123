"""What the tests of Redis's script-key rule share (``test_registry_keys``, and the Redis Cluster
tier's ``test_cluster_registry_keys``):

* ``SCRIPTS``: every Lua script of ``nosq.manager.memory.registry`` (each module-level string that
  calls ``redis.call``, but the shared prelude), by name;
* ``key_calls(script)``: each ``redis.call`` of a script's text, with the text of its key arguments;
* ``ScriptRecorder``: MONITOR of one Redis server, in a thread: every script run (EVALSHA) with the
  KEYS it declared and the commands it ran; ``undeclared()`` asks the server (``COMMAND GETKEYS``)
  which keys each command touched and lists those not declared;
* ``every_operation(client)``: every ``Registry`` operation that runs a script, eviction and
  the reaping of a dead owner included.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio

from nosq.manager.memory import registry as registry_module
from nosq.manager.memory.registry import ModelState, Outcome, Registry
from nosq.producer import keys

NODE, GPU, CPU = "n1", "cuda:0", "cpu"

SCRIPTS: dict[str, str] = {  # _LUA_COMMON is the prelude of several, checked as part of each
    name: value for name, value in vars(registry_module).items()
    if name.startswith("_") and name != "_LUA_COMMON" and isinstance(value, str) and "redis.call(" in value
}
SHAS = {hashlib.sha1(text.encode()).hexdigest(): name for name, text in SCRIPTS.items()}

# the commands the scripts may run: how many leading arguments are keys (0: none)
KEY_ARGS = {"TIME": 0, "PUBLISH": 0, "HGET": 1, "HMGET": 1, "HSET": 1, "HSETNX": 1, "HINCRBY": 1, "SADD": 1,
            "SREM": 1, "SMEMBERS": 1, "SISMEMBER": 1, "SCARD": 1, "EXISTS": 1, "XADD": 1}


def _arguments(text: str, start: int) -> list[str]:
    """The top-level, comma-separated arguments of the call whose ``(`` is at ``text[start]``."""
    args, depth, quote, begin = [], 0, "", start + 1
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                args.append(text[begin:i].strip())
                return args
        elif ch == "," and depth == 1:
            args.append(text[begin:i].strip())
            begin = i + 1
    raise AssertionError(f"unbalanced call at {text[start - 20:start + 40]!r}")


@dataclass(frozen=True)
class KeyCall:
    command: str            # upper-cased when a literal (every call of the registry's scripts)
    args: tuple[str, ...]   # the text of each argument after the command
    keys: tuple[str, ...]   # the text of the key arguments (the first KEY_ARGS[command] of args)
    text: str


def lua_code(script: str) -> str:
    """``script`` without its ``--`` comments (none of the registry's strings holds ``--``)."""
    return re.sub(r"--[^\n]*", "", script)


def key_calls(script: str) -> list[KeyCall]:
    """Each ``redis.call``/``redis.pcall`` of ``script`` with the text of its key arguments."""
    calls = []
    code = lua_code(script)
    for match in re.finditer(r"redis\.p?call\s*\(", code):
        args = _arguments(code, match.end() - 1)
        command = args[0].strip("'").upper() if re.fullmatch(r"'\w+'", args[0]) else args[0]
        calls.append(KeyCall(command, tuple(args[1:]), tuple(args[1:1 + KEY_ARGS.get(command, 0)]),
                             ", ".join(args)))
    return calls


@dataclass
class Run:
    """One EVALSHA the server ran: which script, its declared KEYS, the commands it ran."""

    sha: str
    keys: list[str]
    commands: list[list[str]] = field(default_factory=list)


_LINE = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] (.*)$')
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_END = "nosq-test-monitor-end"


class ScriptRecorder:
    """``with ScriptRecorder(port=...) as recorder:`` run registry operations (any client), then
    read ``recorder.runs``. ``node`` kwargs are those of ``redis.Redis`` for the one server whose
    MONITOR is read (on a cluster: the master that owns the ``{registry}`` slot)."""

    def __init__(self, **node: Any) -> None:
        self._node = redis.Redis(**node, socket_timeout=30)
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self.runs: list[Run] = []

    def __enter__(self) -> ScriptRecorder:
        self._thread.start()
        assert self._ready.wait(10), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._node.echo(_END)
        self._thread.join(30)
        assert not self._thread.is_alive(), "MONITOR did not see the end marker"
        if self._error is not None:
            raise self._error
        for line in self._lines:
            match = _LINE.match(line)
            if not match:
                continue
            source, args = match.group(1), _ARG.findall(match.group(2))
            if source == "lua":
                assert self.runs, f"a script command before any script: {line}"
                self.runs[-1].commands.append(args)
            elif args and args[0].lower() in ("evalsha", "eval", "evalsha_ro", "eval_ro"):
                self.runs.append(Run(sha=args[1] if args[0].lower().startswith("evalsha") else "",
                                     keys=args[3:3 + int(args[2])]))

    def _read(self) -> None:
        try:
            with self._node.monitor() as monitor:
                self._ready.set()
                while True:
                    line = monitor.connection.read_response()
                    text = line.decode() if isinstance(line, bytes) else str(line)
                    self._lines.append(text)
                    if f'"{_END}"' in text:
                        return
        except BaseException as exc:  # re-raised by __exit__
            self._error = exc
            self._ready.set()

    def touched(self, command: list[str]) -> list[str]:
        """The keys ``command`` touches, as the server itself extracts them."""
        try:
            return [k.decode() if isinstance(k, bytes) else str(k) for k in self._node.command_getkeys(*command)]
        except redis.ResponseError:  # no key argument (TIME, PUBLISH)
            return []

    def undeclared(self) -> list[tuple[str, list[str], str]]:
        """(script, command, key) for each key a script touched without declaring it."""
        out = []
        for run in self.runs:
            declared = set(run.keys)
            for command in run.commands:
                out += [(SHAS.get(run.sha, run.sha), command, key) for key in self.touched(command)
                        if key not in declared]
        return out

    def close(self) -> None:
        self._node.close()


async def every_operation(client: redis.asyncio.Redis) -> None:
    """Each ``Registry`` operation that runs a script, at least once, with the outcomes checked."""
    a, b = Registry(client, owner="mgr-a"), Registry(client, owner="mgr-b", policy="lru")
    await client.set(keys.manager_heartbeat("mgr-a"), "{}", ex=60)
    await client.set(keys.manager_heartbeat("mgr-b"), "{}", ex=60)
    await a.set_budget(NODE, GPU, 300)
    await a.set_budget(NODE, CPU, 1000)
    for model, reg in (("m1", a), ("m2", b), ("m3", a)):
        got = await reg.reserve(model, node=NODE, device=GPU, nbytes=100)
        assert got.outcome is Outcome.RESERVED, got
        await reg.mark_ready(model, replicas=1, load_ms=5)
        assert await reg.inflight(model, +1)
        assert await reg.inflight(model, -1)
        await reg.touch(model, 1)  # served once: evictable at once
    got = await a.reserve("x", node=NODE, device=GPU, nbytes=100)
    assert got.outcome is Outcome.EVICT and [v.model for v in got.victims] == ["m1"], got
    assert (await a.reserve("x", node=NODE, device=GPU, nbytes=100)).reason == "freeing"
    assert (await a.reserve("m1", node=NODE, device=GPU, nbytes=100)).state is ModelState.DRAINING
    assert not await a.inflight("m1", +1)
    assert not await b.release("m1")  # not b's
    assert await a.release("m1")
    assert (await a.reserve("x", node=NODE, device=GPU, nbytes=100)).outcome is Outcome.RESERVED
    await a.record_error("x", "compile fallback")
    assert await a.fail("x", "load failed")
    assert (await a.reserve("y", node=NODE, device=CPU, nbytes=100)).outcome is Outcome.RESERVED
    await a.mark_ready("y", replicas=1, load_ms=5)
    assert (await a.resize("y", 3)).nbytes == 300
    assert not (await a.resize("y", 20)).ok  # 1900 more, 700 free
    assert not (await b.resize("y", 2)).ok  # not b's
    assert all(device.ok for device in await a.audit())
    await client.delete(keys.manager_heartbeat("mgr-b"))  # b died
    assert await a.reap_dead_owners() == ["m2"]
    assert await a.release_all() == ["m3", "y"]
    audits = await a.audit()
    assert [(d.device, d.used_bytes, d.ok) for d in audits] == [(CPU, 0, True), (GPU, 0, True)], audits
