"""A loop in a daemon thread that a test starts and stops: the load generators of the chaos,
cluster and compose tiers."""

from __future__ import annotations

import threading
from typing import Self

__all__ = ["Background"]


class Background:
    """Subclasses implement ``_run``, looping until ``self._stop`` is set; ``with`` starts and
    stops it, and ``stop`` fails the test if the loop does not end within 30 s."""

    name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), f"the {self.name} thread did not stop within 30 s"

    def _run(self) -> None:
        raise NotImplementedError
