"""`pip install nosq` alone: the producer imports and round-trips without torch, Ray or numpy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ROUND_TRIP = textwrap.dedent("""
    import importlib.util, sys
    import redis
    for heavy in ("torch", "ray", "numpy"):
        assert importlib.util.find_spec(heavy) is None, heavy + " was installed by `pip install nosq`"
    from producer import Producer, RawTensor, RedisSettings, keys, wire
    url = sys.argv[1]
    r = redis.Redis.from_url(url)
    with Producer(RedisSettings(url=url)) as p:
        h = p.submit("noop", {"x": [1, 2], "t": {"dtype": "float32", "shape": [2], "data": bytes(8)}})
        entry_id, fields = r.xrange(keys.requests("noop"))[0]
        req = wire.parse_request(entry_id, fields)          # the manager's part, by hand
        env = wire.encode_envelope(req.ct, {"v": 1, "id": req.id, "ok": True, "model": "noop"}, req.payload)
        r.set(keys.result(req.id), env)
        r.xadd(keys.reply(req.reply), {"id": req.id, "r": env})
        out = p.result(h, timeout_s=10)
    assert out["x"] == [1, 2] and out["t"] == RawTensor("float32", (2,), bytes(8)), out
    print("ok")
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
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
