"""Helpers of the security tests: a private ``redis-server``, the shipped ACL file with test
passwords, a stand-in manager and a throw-away certificate authority.

Nothing here touches the shared Redis on 127.0.0.1:6379: every server is started on a free
loopback port, in a temporary directory, without persistence, and stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from nosq.producer import keys
from nosq.producer.codec import decode_value, encode_value
from nosq.producer.wire import Request, encode_envelope, parse_request

ROOT = Path(__file__).resolve().parents[2]
ACL_FILE = ROOT / "deploy" / "acl.conf"
#: how deploy/acl.conf marks the passwords an operator must replace
PLACEHOLDER_RE = re.compile(r">REPLACE_ME_([a-z]+)_password\b")
START_TIMEOUT_S = 10.0
STANDIN_CONSUMER = "security-standin"


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: the security tests start private Redis servers")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """One private redis-server process on 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    log: Path

    def url(self, scheme: str = "redis") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _ready(server: RedisServer) -> bool:
    try:
        return "Ready to accept connections" in server.log.read_text(errors="replace")
    except OSError:
        return False


@contextlib.contextmanager
def running_redis(directory: Path, *args: str, tls: bool = False) -> Iterator[RedisServer]:
    """Start ``redis-server`` on a free loopback port (its TLS port when ``tls``); stop it on exit.

    ``args`` are extra ``--option value`` words. A port taken between choosing and binding it
    is retried with another.
    """
    directory.mkdir(parents=True, exist_ok=True)
    binary = redis_server_binary()
    for attempt in range(3):
        port = free_port()
        log = directory / f"redis-{port}.log"
        ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        command = [binary, "--bind", "127.0.0.1", *ports, "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--dir", str(directory), "--logfile", str(log), *args]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        server = RedisServer(port=port, process=process, directory=directory, log=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None and not _ready(server):
            time.sleep(0.02)
        if _ready(server) and process.poll() is None:
            break
        server.stop()
        if "Address already in use" not in server.log_tail() or attempt == 2:
            pytest.fail(f"redis-server did not start ({' '.join(command)}):\n{server.log_tail()}")
    try:
        yield server
    finally:
        server.stop()


# -- the shipped ACL file -------------------------------------------------------------------


@dataclass
class AclUsers:
    """deploy/acl.conf with every placeholder replaced by a fresh random password."""

    text: str
    passwords: dict[str, str] = field(default_factory=dict)  # role (admin, manager, producer) -> password

    def write(self, path: Path) -> Path:
        path.write_text(self.text, encoding="utf-8")
        path.chmod(0o600)
        return path

    def user_lines(self) -> dict[str, str]:
        """User name -> the rules after it (what ``ACL SETUSER <name>`` takes)."""
        lines = {}
        for line in self.text.splitlines():
            if line.strip():
                word, name, rules = line.split(" ", 2)
                assert word == "user", line
                lines[name] = rules
        return lines


def acl_users() -> AclUsers:
    shipped = ACL_FILE.read_text(encoding="utf-8")
    passwords: dict[str, str] = {}

    def substitute(match: re.Match[str]) -> str:
        passwords[match.group(1)] = secrets.token_hex(16)
        return ">" + passwords[match.group(1)]

    return AclUsers(text=PLACEHOLDER_RE.sub(substitute, shipped), passwords=passwords)


# -- a stand-in manager ---------------------------------------------------------------------


def echo(request: Request, value: Any) -> Any:
    return {"echo": value, "method": request.method}


def answer_requests(client: redis.Redis, model: str, *, expect: int = 1, timeout_s: float = 5.0,
                    handler: Any = echo) -> list[Request]:
    """Play the manager's part for ``model``: read entries with XREADGROUP, write each result
    (``SET NX EX``, then XADD to the reply stream or RPUSH + EXPIRE the done list), honour
    cancel flags, then XACK + XDEL. Returns the requests answered, once ``expect`` of them were."""
    stream = keys.requests(model)
    try:
        client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    answered: list[Request] = []
    deadline = time.monotonic() + timeout_s
    while len(answered) < expect and time.monotonic() < deadline:
        response: Any = client.xreadgroup(keys.GROUP, STANDIN_CONSUMER, {stream: ">"}, count=100, block=200)
        entries = response[0][1] if response else []
        if not entries:
            continue
        requests = [parse_request(entry_id, fields) for entry_id, fields in entries]
        flags: Any = client.mget([keys.cancel(r.id) for r in requests])
        pipe = client.pipeline(transaction=False)
        for request, flag in zip(requests, flags, strict=True):
            header: dict[str, Any] = {
                "v": 1, "id": request.id, "model": model, "deliveries": 1,
                "timings": {"queued_ms": 0, "wait_ms": 0, "exec_ms": 0},
            }
            out: bytes | None = None
            if flag is not None:
                header.update(ok=False, err={"code": "cancelled", "message": "cancelled before it ran"})
            else:
                header["ok"] = True
                out = encode_value(request.ct, handler(request, decode_value(request.ct, request.payload)))
            envelope = encode_envelope(request.ct, header, out)
            pipe.set(keys.result(request.id), envelope, nx=True, ex=request.ttl_s)
            if request.reply is None:
                pipe.rpush(keys.done(request.id), b"1")
                pipe.expire(keys.done(request.id), request.ttl_s)
            else:
                pipe.xadd(keys.reply(request.reply), {"id": request.id, "r": envelope},
                          maxlen=100_000, approximate=True)
                pipe.expire(keys.reply(request.reply), request.ttl_s)
        entry_ids = [entry_id for entry_id, _ in entries]
        pipe.xack(stream, keys.GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        pipe.execute()
        answered.extend(requests)
    if len(answered) < expect:
        pytest.fail(f"the stand-in manager saw {len(answered)} of {expect} requests on {stream}")
    return answered


# -- a throw-away certificate authority -----------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing of this server's


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl is not on PATH: the TLS tests generate their certificates with it")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def _new_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=nosq test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def issue_certificate(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    """A key and a certificate for ``name`` signed by ``ca`` (certificate, key), with ``extensions``."""
    cert, key, csr, ext = (directory / f"{name}.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
    ext.write_text(extensions, encoding="utf-8")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", str(cert),
             "-extfile", str(ext), cwd=directory)
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and an
    unrelated CA; EC P-256 keys, valid two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _new_ca(directory, "ca")
    other_ca, _ = _new_ca(directory, "other-ca")
    common = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    server = issue_certificate(directory, "server", ca,
                    common + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client = issue_certificate(directory, "client", ca, common + "extendedKeyUsage=clientAuth\n")
    return Certificates(ca=ca[0], ca_key=ca[1], server_cert=server[0], server_key=server[1], client_cert=client[0],
                        client_key=client[1], other_ca=other_ca)
