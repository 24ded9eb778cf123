"""How long a manager takes from a SIGKILL to serving again, and where the time goes.

Starts ``nosq serve`` with the demo models (CPU) until its profiles are stored, sends a request,
SIGKILLs the manager process (not its group: what ``kill -9 PID`` or the OOM killer does) and
starts it again under the same consumer name. Printed, from the restarted manager's own log
and the client: the time to its process start, its Ray started, every replica ready, serving
(its heartbeat says so), and the first request answered; and how long the killed manager's Ray
took to go.

    python -m benchmarks.restart --out benchmarks/results/restart.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from nosq.manager.ops.demo import start_manager, stop_manager
from nosq.producer import Producer, RedisSettings
from tests.procs import ray_processes_of

STAGES = {  # log line -> stage name
    "started a local Ray instance": "ray_started",
    "joined Ray cluster": "ray_started",
    "replica(s) ready": "replicas_ready",
    "serving": "serving",
}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def stage_times(log: Path) -> dict[str, float]:
    """The wall time (epoch s) of the last line of each stage in a manager's log."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for needle, stage in STAGES.items():
            if needle in line:
                found[stage] = at
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--ray-address", default=None,
                        help="managers join this long-lived Ray (a restart then skips starting Ray)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/restart.json"))
    args = parser.parse_args()
    settings = RedisSettings(url=args.redis_url)
    settings.client().flushdb()
    work = Path(tempfile.mkdtemp(prefix="nosq-restart-"))
    x = np.zeros(8, np.float32)
    extra = ["--ray-address", args.ray_address] if args.ray_address else []
    with (work / "first.log").open("wb") as log:  # profiles measured and stored once
        manager = start_manager(settings, "--log-level", "info", "--metrics-port", "-1", *extra, consumer="restart",
                                log=log)
    runs: list[dict[str, Any]] = []
    try:
        for attempt in range(args.restarts):
            with Producer(settings) as producer:
                producer.infer("noop", x, timeout_s=30)
            os.kill(manager.pid, signal.SIGKILL)
            killed = time.time()
            manager.wait(10)
            old = manager.pid
            log_path = work / f"restart-{attempt}.log"
            with log_path.open("wb") as log:
                started = time.time()
                manager = start_manager(settings, "--log-level", "info", "--metrics-port", "-1", *extra,
                                        consumer="restart", log=log)
                running = time.time()
            with Producer(settings) as producer:
                producer.infer("noop", x, timeout_s=60)
            answered = time.time()
            run = {"ray_of_killed_gone_s": None, "kill_to_start_s": started - killed}
            left = ray_processes_of(old)
            run["killed_ray_left"] = len(left)
            run.update({f"to_{k}_s": v - killed for k, v in stage_times(log_path).items()})
            run.update(to_running_s=running - killed, to_first_answer_s=answered - killed)
            runs.append(run)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}), flush=True)
    finally:
        stop_manager(manager)
    settings.client().flushdb()
    keys = [k for k in runs[0] if k.startswith("to_")]
    print(f"{'from the SIGKILL to':<28}" + "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs))))
    for key in keys:
        print(f"{key[3:-2]:<28}" + "".join(f"{run.get(key, float('nan')):>9.1f}" for run in runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "runs": runs}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
