"""This machine's process table, read from /proc: how the tests that start managers and Ray
nodes find their processes, and check that none is left behind."""

from __future__ import annotations

from pathlib import Path

__all__ = ["children", "descendants", "proc_table"]


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
