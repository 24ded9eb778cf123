"""The one exception tree of nosq.

::

    NosqError
    ├── ProtocolError        bytes on the wire that do not follow protocol v1
    │   └── BadEntry         a stream entry the manager cannot serve (nosq.producer.wire)
    ├── NosqConnectionError  Redis could not be reached (translated from redis-py)
    │   └── RedisOutage      an outage outlasted the manager's limit (nosq.manager.runtime.redislink)
    ├── NosqTimeout          no result within the caller's timeout
    ├── QueueFull            the model's backlog is at its limit (``retry_after_s`` hint)
    ├── RemoteError          the server answered with an error envelope (``code``, ``message``)
    ├── ConfigError          a serve config or model spec that is not valid (nosq.workers.spec)
    ├── ModelLoadError       a replica could not load its model (nosq.workers.runtime)
    ├── TextModelError       a text model directory that cannot be used (nosq.workers.text; loading
    │                        reports it as the replica's ModelLoadError)
    ├── OutputMismatch       a model returned the wrong number of outputs (nosq.workers.batching)
    ├── ChannelError         a replica could not run a batch sent over its channel (nosq.workers.channel)
    ├── ChannelLost          the channel to a replica broke: it died or is gone (nosq.workers.channel)
    ├── ProfileError         a profile that cannot be measured, stored or read (nosq.workers.profiles.curve)
    └── RegistryError        the memory registry refused or failed (nosq.manager.memory.registry)
        └── ReservationLost  a model's reservation was reaped while it loaded

Only this module's classes are exported by ``producer``; the others live beside the code that
raises them, every one under ``NosqError`` (``tests/test_errors.py`` checks this list
against every module). Classes keep a builtin base where callers relied on it
(``ConfigError`` and ``TextModelError`` are ``ValueError``s, ``ChannelLost`` a
``ConnectionError``). Every message names the bad value and what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "NosqConnectionError",
    "NosqError",
    "NosqTimeout",
    "ProtocolError",
    "QueueFull",
    "RemoteError",
]


class NosqError(Exception):
    """Root of every error nosq raises on purpose."""


class ProtocolError(NosqError):
    """Data that does not follow wire protocol v1 (see docs/protocol.md)."""


class NosqConnectionError(NosqError):
    """Redis refused, dropped or timed out a connection."""


class NosqTimeout(NosqError):
    """A result did not arrive within the caller's timeout."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(
            f"no result for request {request_id!r} within {timeout_s:g} s: is a manager "
            "serving this model (`nosq serve`)? Wait longer or check `nosq status`."
        )
        self.request_id = request_id
        self.timeout_s = timeout_s


class QueueFull(NosqError):
    """The model's stream is at its configured backlog limit."""

    def __init__(self, model: str, backlog: int, retry_after_s: float | None,
                 accepted: list[Any] | None = None) -> None:
        hint = f"; retry after {retry_after_s:.2f} s" if retry_after_s is not None else ""
        super().__init__(f"queue for model {model!r} is full ({backlog} waiting){hint}")
        self.model = model
        self.backlog = backlog
        self.retry_after_s = retry_after_s
        #: handles of the requests of the same ``submit_many`` that were accepted before it filled
        self.accepted: list[Any] = accepted or []


class RemoteError(NosqError):
    """The server answered the request with an error envelope."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"request {request_id!r} failed: {code}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message
