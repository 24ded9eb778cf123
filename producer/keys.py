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
    "registry_device",
    "registry_devices",
    "registry_events",
    "registry_evictions",
    "registry_model",
    "registry_models",
    "registry_profile",
    "registry_resident",
    "registry_served",
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
    """The model registry's namespace (ACL patterns); its keys are the ``registry_*`` below.
    They share the hash tag ``{registry}``: one slot, so the registry's scripts run on Redis
    Cluster (every key a script touches is on the node that runs it)."""
    return f"{PREFIX}:{{registry}}:{name}"


def registry_model(model: str) -> str:
    """Hash of one model's residency (state, node, device, bytes, owner, replicas).
    ``registry_model("")`` is the prefix the registry's Lua scripts append model ids to."""
    return registry(f"model:{model}")


def registry_models() -> str:
    """Set of every model ever reserved."""
    return registry("models")


def registry_device(label: str) -> str:
    """Hash of one device's budget and use; ``label`` is ``<node>/<device>`` ("" for the prefix)."""
    return registry(f"device:{label}")


def registry_devices() -> str:
    """Set of every ``<node>/<device>`` with a budget."""
    return registry("devices")


def registry_resident(label: str) -> str:
    """Set of the models counted on one device ("" for the prefix)."""
    return registry(f"resident:{label}")


def registry_evictions() -> str:
    """Stream with one entry per eviction decision."""
    return registry("evictions")


def registry_events() -> str:
    """Pub/sub channel of registry events (``draining <model>``, releases)."""
    return registry("events")


def registry_served() -> str:
    """Hash: model id -> expiry (unix ms) of the manager heartbeat that serves it."""
    return registry("served")


def registry_profile(model: str, device_kind: str, signature: str) -> str:
    """String holding one stored profile; ``signature="*"`` matches every signature (SCAN)."""
    return registry(f"profile:{model}:{device_kind}:{signature}")


def manager_heartbeat(consumer: str) -> str:
    """String with a TTL that says a manager is alive."""
    return f"{PREFIX}:mgr:{consumer}"


def stream_pattern() -> str:
    """SCAN pattern that matches every model's request stream."""
    return f"{PREFIX}:{{*}}:req"
