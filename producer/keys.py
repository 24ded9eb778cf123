"""Every Redis key nosq uses, built here and nowhere else.

Keys that belong to one model carry the model id as a hash tag (``{model}``) and keys that
belong to one request carry the request id, so the layout works on Redis Cluster.
"""

from __future__ import annotations

__all__ = [
    "GROUP",
    "PREFIX",
    "admission",
    "cancel",
    "dead_letters",
    "done",
    "manager_heartbeat",
    "registry",
    "reply",
    "requests",
    "result",
    "stream_pattern",
]

PREFIX = "nosq"
GROUP = "nosq"  # the consumer group every manager reads request streams through


def requests(model: str) -> str:
    """Stream of requests for one model."""
    return f"{PREFIX}:{{{model}}}:req"


def dead_letters(model: str) -> str:
    """Stream of poison requests for one model (original fields + reason)."""
    return f"{PREFIX}:{{{model}}}:dlq"


def admission(model: str) -> str:
    """Hash the manager publishes with the model's backlog limit and drain rate."""
    return f"{PREFIX}:{{{model}}}:admission"


def result(request_id: str) -> str:
    """String holding the result envelope of one request."""
    return f"{PREFIX}:res:{{{request_id}}}"


def done(request_id: str) -> str:
    """List that receives one wake-up token when the result is written."""
    return f"{PREFIX}:done:{{{request_id}}}"


def cancel(request_id: str) -> str:
    """Flag a client sets to cancel a request that has not run yet."""
    return f"{PREFIX}:cancel:{{{request_id}}}"


def reply(client: str) -> str:
    """Stream of completions for one producer process (multiplexed waits)."""
    return f"{PREFIX}:reply:{{{client}}}"


def registry(name: str) -> str:
    """Keys of the model registry (hashes and sorted sets)."""
    return f"{PREFIX}:registry:{name}"


def manager_heartbeat(consumer: str) -> str:
    """String with a TTL that says a manager is alive."""
    return f"{PREFIX}:mgr:{consumer}"


def stream_pattern() -> str:
    """SCAN pattern that matches every model's request stream."""
    return f"{PREFIX}:{{*}}:req"
