"""``nosq profile`` as an operator runs it: a subprocess that starts its own Ray on loopback,
and in this process for the human output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from nosq.manager.ops.cli import main
from nosq.manager.profiles.store import profile_key
from nosq.producer import RedisSettings
from nosq.workers.profiles.curve import Profile

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray


def nosq(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nosq.manager.ops.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def test_profile_json_plot_and_store(tmp_path: Path, redis_db11: RedisSettings) -> None:
    done = nosq("profile", "noop", "--json", "--store", "--redis-url", redis_db11.url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    profile = Profile.from_dict(json.loads(done.stdout))  # stdout is the JSON alone
    assert profile.plan.model == "noop" and profile.plan.sizes == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert 1 <= profile.best_batch <= 256 and profile.reason
    assert "[###" not in done.stderr  # no progress bar with --json
    png = tmp_path / "profile-noop.png"  # the default plot path, in the working directory
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = redis.Redis.from_url(redis_db11.url)
    try:
        stored: bytes | None = client.get(profile_key("noop", "cpu", "float32[8]"))  # type: ignore[assignment]
    finally:
        client.close()
    assert stored is not None and json.loads(stored)["profiled_at"] == profile.profiled_at


def test_profile_table_and_progress_bar(ray_cluster: None, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (joining the tests' Ray, which it leaves running): the human output."""
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nid = "tiny"\nfactory = "nosq.workers.demo:mlp"\ndevice = "cpu"\nmax_batch = 8\n'
                      'latency_budget_ms = 50.0\nthreads = 1\noptions = { d_in = 16, d_hidden = 32, d_out = 4 }\n')
    plot = tmp_path / "out" / "tiny.png"
    code = main(["profile", "tiny", "--config", str(config), "--device", "cpu", "--max-batch", "4",
                 "--plot", str(plot), "--log-level", "warning"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # 3 sizes, 3 rounds each: 1, 2, 4, then 4, 2, 1 twice
    assert "profiling tiny [###...........................] 1/9  b=1  p50 " in err
    assert "profiling tiny [##############################] 9/9  b=1  p50 " in err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["b", "p50", "ms"])
    assert [int(line.split()[0]) for line in lines[header + 1:header + 4]] == [1, 2, 4]
    assert any(line.startswith("b* = ") and "within the 50 ms budget" in line for line in lines)
    assert f"plot: {plot}" in out and plot.read_bytes()[:4] == b"\x89PNG"


def test_profile_help_and_unknown_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--device", "--plot", "--json", "--store", "--max-batch"):
        assert option in text
    assert main(["profile", "nope"]) == 2
    assert "unknown model 'nope'; configured models: noop, mlp, cnn, transformer" in capsys.readouterr().err
