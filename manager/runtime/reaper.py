"""Nothing of a manager's private Ray outlives the manager by more than a moment.

A manager that starts its own Ray (no ``--ray-address``) also starts this small watcher in a
session of its own: ``python -m nosq.manager.runtime.reaper <manager pid> <Ray session dir>``. When the
manager exits, however it exits (SIGKILL included, when Ray's own clean-up never runs), the
watcher kills every process that holds a file open in that Ray session's directory: the GCS,
the raylet, the dashboard and runtime-env agents, the log monitor and the actors (whose command
lines Ray rewrites to ``ray::...``, so they are found by their open log files). Left alone,
Ray's agents lived on for 60-70 s after a SIGKILLed manager and the next manager started beside
them. A manager that stops cleanly has shut Ray down already; the watcher then finds nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["alive", "session_processes", "start_reaper"]

SWEEPS = 5  # a process may start while the others are being killed: look again


def start_reaper(session_dir: str) -> subprocess.Popen[bytes]:
    """Start the watcher for this process and the Ray session in ``session_dir``."""
    return subprocess.Popen(
        [sys.executable, "-m", "nosq.manager.runtime.reaper", str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a kill of the manager's process group must not take it along
        close_fds=True,
    )


def session_processes(session_dir: str, *, exclude: int) -> list[int]:
    """pids of the live processes with a file open under ``session_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(link.startswith(session_dir) for link in links):
            found.append(int(entry.name))
    return found


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (old kernel): look twice a second
        while alive(pid):
            time.sleep(0.5)
        return
    try:
        select.select([fd], [], [])  # readable once the process has exited
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """A process with this pid exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(session_dir: str) -> int:
    killed = 0
    for _ in range(SWEEPS):
        pids = session_processes(session_dir, exclude=os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    return killed


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m nosq.manager.runtime.reaper MANAGER_PID RAY_SESSION_DIR", file=sys.stderr)
        return 2
    pid, session_dir = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the manager's to handle
    _wait_for_exit(pid)
    _reap(session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
