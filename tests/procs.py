"""This machine's process table, read from /proc: how the tests that start managers and Ray
nodes find their processes, and check that none is left behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import time
from pathlib import Path

from nosq.manager.runtime.reaper import session_processes

__all__ = ["children", "descendants", "proc_table", "ray_processes_of", "reap_ray_of"]


def proc_table(*, zombies: bool = False) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (and zombies if asked)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if zombies or stat[0] != "Z":
            table[int(entry.name)] = (int(stat[1]), cmdline)
    return table


def children(pid: int) -> dict[int, str]:
    """The live processes whose parent is ``pid``: pid -> command line."""
    return {child: cmd for child, (ppid, cmd) in proc_table().items() if ppid == pid}


def descendants(pid: int, *, zombies: bool = False) -> dict[int, str]:
    """Every process under ``pid`` (children, their children, ...): pid -> command line."""
    table = proc_table(zombies=zombies)
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                frontier.append(child)
    return found


def ray_processes_of(pid: int) -> list[int]:
    """Live processes of the private Ray that a driver (a manager) with ``pid`` started: those
    with a file open in its session directory, which Ray names after the driver's pid
    (``session_<date>_<time>_<micros>_<pid>``; actors and agents rewrite their command lines
    to ``ray::...``, so the command line alone misses them), and those naming it."""
    pattern = re.compile(rf"session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{pid}$")
    root = Path(tempfile.gettempdir()) / "ray"
    sessions = [str(d) for d in root.glob(f"session_*_{pid}") if pattern.search(d.name)] if root.is_dir() else []
    found: set[int] = set()
    for session in sessions:
        found.update(session_processes(session, exclude=pid))
        found.update(p for p, (_, cmd) in proc_table().items() if p != pid and session in cmd)
    return sorted(found)


def reap_ray_of(pid: int, timeout_s: float = 15.0) -> list[int]:
    """Wait (bounded) until that Ray is gone; SIGKILL what is left (ours) and return it."""
    deadline = time.monotonic() + timeout_s
    left = ray_processes_of(pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)  # other processes exiting: nothing to wait on
        left = ray_processes_of(pid)
    for straggler in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(straggler, signal.SIGKILL)
    return left
