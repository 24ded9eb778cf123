"""The production shape end to end: the real manager (``nosq serve``, its own Ray) logged in as
``nosq-manager`` and a producer logged in as ``nosq-producer``, both over TLS, against a private
redis-server that loads deploy/acl.conf. Proves the manager user's rules are enough for the
manager as it is (streams, groups, registry, profiles, unknown models, results) and that the
CLI's ``--redis-url rediss://...?ssl_ca_certs=...`` reaches a server signed by a private CA.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from security_support import ROOT, acl_users, make_certificates, running_redis

from nosq.producer import Producer, RedisSettings, RemoteError
from tests.procs import reap_ray_of

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

START_BOUND_S = 120.0  # Ray and the replica start inside this


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM the manager, wait for its drain; SIGKILL its process group if it hangs. Then make
    sure the Ray it started went with it (stragglers of ours are killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    reap_ray_of(process.pid)
    return code


@pytest.mark.timeout(300)
def test_real_manager_and_producer_with_least_privilege_over_tls(tmp_path: Path) -> None:
    acl = acl_users()
    certs = make_certificates(tmp_path / "certs")
    config = tmp_path / "serve.toml"
    config.write_text('[[models]]\nid = "noop"\nfactory = "nosq.workers.demo:noop"\ndevice = "cpu"\n'
                      "max_batch = 16\nnum_cpus = 0.25\nthreads = 1\n", encoding="utf-8")
    manager_log = tmp_path / "manager.log"
    tls = ["--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
           "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no"]
    with running_redis(tmp_path / "redis", *tls, "--aclfile", str(acl.write(tmp_path / "users.acl")),
                       tls=True) as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={quote(str(certs.ca))}"
        producer_settings = RedisSettings(url=server.url("rediss"), ssl_ca_file=str(certs.ca),
                                          username="nosq-producer", password=acl.passwords["producer"])
        with Producer(producer_settings, content_type="json") as producer:
            # queued before the manager starts: it reads them, the cancel flag already set
            first = producer.submit("noop", [1.0, 2.0], ttl_s=120)
            doomed = producer.submit("noop", [0.0], ttl_s=120)
            producer.cancel(doomed)
            stranger = producer.submit("not-served-here", [1.0])

            paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
            with manager_log.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "nosq.manager.ops.cli", "serve", "--redis-url", url,
                     "--redis-username", "nosq-manager", "--redis-password", acl.passwords["manager"],
                     "--consumer", "security-e2e", "--config", str(config), "--log-level", "info"],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            try:
                assert np.asarray(producer.result(first, timeout_s=START_BOUND_S)).tolist() == [1.0, 2.0]
                with pytest.raises(RemoteError) as caught:
                    producer.result(doomed, timeout_s=10)
                assert caught.value.code == "cancelled"
                with pytest.raises(RemoteError) as caught:
                    producer.result(stranger, timeout_s=30)
                assert caught.value.code == "unknown_model"
                many = producer.submit_many("noop", [[float(i)] for i in range(50)])
                assert [np.asarray(out).tolist() for out in producer.gather(many, timeout_s=30)] == [
                    [float(i)] for i in range(50)]
                assert process.poll() is None, "the manager exited"
            finally:
                code = stop(process)
    output = manager_log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "NOPERM" not in output and "no permissions" not in output, output[-3000:]
