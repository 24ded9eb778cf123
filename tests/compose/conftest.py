"""The compose tier's one stack (package scope): prepared, built and brought up before its first
test, brought down (``down -v``) after its last, with the engine stopped if this run started it.

Runs one at a time on a machine (an exclusive file lock): the images' tags are the machine's.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from compose_stack import Ports, Stack  # noqa: E402

REPORT = Path(os.environ.get("NOSQ_COMPOSE_REPORT", Path(tempfile.gettempdir()) / "nosq-compose-report.json"))


@pytest.fixture(scope="package")
def stack() -> Iterator[Stack]:
    started = time.monotonic()
    lock_path = Path(tempfile.gettempdir()) / "nosq-compose-tier.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        the_stack = Stack(ports=Ports())
        try:
            the_stack.prepare()
            the_stack.build()
            the_stack.up()
            yield the_stack
        finally:
            try:
                the_stack.down()
            finally:
                the_stack.stop_engine()
                the_stack.figures["tier_s"] = round(time.monotonic() - started, 1)
                REPORT.write_text(json.dumps(the_stack.figures, indent=1) + "\n")
                print(f"\ncompose tier figures ({REPORT}):\n{json.dumps(the_stack.figures, indent=1)}")
