"""`pip install nosq` alone: the producer imports and round-trips without torch, Ray or numpy, on
redis-py 6 or later (not held below 6 by the server extra's arq pin)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ROUND_TRIP = textwrap.dedent("""
    import asyncio, importlib.util, sys, threading
    import redis
    for heavy in ("torch", "ray", "numpy"):
        assert importlib.util.find_spec(heavy) is None, heavy + " was installed by `pip install nosq`"
    major = int(redis.__version__.split(".")[0])
    assert major >= 6, "a producer-only install got redis-py " + redis.__version__ + ": held below 6"
    assert importlib.util.find_spec("hiredis") is not None, "redis[hiredis] was not installed"
    from nosq.producer import AsyncProducer, Producer, RawTensor, RedisSettings, keys, wire
    url = sys.argv[1]
    r = redis.Redis.from_url(url)
    stream = keys.requests("noop")
    r.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)

    def manage(expect, inline_limit):
        # a minimal manager, as docs/protocol.md says: XREADGROUP, SET the envelope NX EX,
        # XADD a notice (id, and the envelope r when it is small), EXPIRE, XACK + XDEL
        served = 0
        while served < expect:
            for _, entries in r.xreadgroup(keys.GROUP, "fake", {stream: ">"}, count=10, block=5000) or []:
                for entry_id, fields in entries:
                    req = wire.parse_request(entry_id, fields)
                    env = wire.encode_envelope(req.ct, {"v": 1, "id": req.id, "ok": True, "model": "noop"},
                                               req.payload)
                    r.set(keys.result(req.id), env, nx=True, ex=req.ttl_s)
                    notice = {"id": req.id, "r": env} if len(env) <= inline_limit else {"id": req.id}
                    r.xadd(keys.reply(req.reply), notice, maxlen=100000, approximate=True)
                    r.expire(keys.reply(req.reply), req.ttl_s)
                    r.xack(stream, keys.GROUP, entry_id)
                    r.xdel(stream, entry_id)
                    served += 1

    value = {"x": [1, 2], "t": {"dtype": "float32", "shape": [2], "data": bytes(8)}}
    expected = {"x": [1, 2], "t": RawTensor("float32", (2,), bytes(8))}
    for inline_limit in (1 << 20, 0):  # notices with the envelope, then id-only notices
        with Producer(RedisSettings(url=url)) as p:
            h = p.submit("noop", value, timeout_s=30)
            manage(1, inline_limit)
            assert p.result(h, timeout_s=10) == expected
            r.script_flush()  # NOSCRIPT: the producer loads the script again
            many = p.submit_many("noop", [1, 2, 3])
            manage(3, inline_limit)
            assert p.gather(many, timeout_s=10) == [1, 2, 3]

        async def main():
            async with AsyncProducer(RedisSettings(url=url)) as p:
                server = threading.Thread(target=manage, args=(5, inline_limit))
                server.start()
                outs = await asyncio.gather(*(p.infer("noop", i, timeout_s=10) for i in range(4)),
                                            p.infer("noop", value, timeout_s=10))
                server.join()
            assert outs == [0, 1, 2, 3, expected], outs

        asyncio.run(main())
    print("ok", redis.__version__)
""")


@pytest.mark.slow
@pytest.mark.integration
def test_producer_installs_and_round_trips_alone(tmp_path: Path, redis_db: object) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                             check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    url = redis_db.url  # type: ignore[attr-defined]
    done = subprocess.run([str(python), str(script), url], capture_output=True, text=True, cwd=tmp_path,
                          check=False, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok "), done.stderr[-2000:]
