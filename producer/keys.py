"""Every Redis key nosq uses, built here and nowhere else.

Keys that belong to one model carry the model id as a hash tag (``{model}``) and keys that
belong to one request carry the request id, so the layout works on Redis Cluster.
"""

from __future__ import annotations

import zlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = [
    "GROUP",
    "PREFIX",
    "admission",
    "cancel",
    "dead_letters",
    "done",
    "manager_heartbeat",
    "model_of_tag",
    "partition_of",
    "partition_tags",
    "published_tags",
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
PARTITION_MARK = "~"  # never in a model id: ``mlp~3`` is a partition of ``mlp``, never a model
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


# -- partitions: one hot model's requests over N streams on different slots ---------------------

def partition_tags(model: str, partitions: int) -> list[str]:
    """The hash tags of a model's ``partitions`` streams, partition 0 first.

    Partition 0 is the model id itself (its keys are those of an unpartitioned model). The others
    are ``<model>~<k>``, each with the smallest ``k`` whose slot falls in a part of the slot range
    (16384 slots cut in ``partitions`` equal parts) that no earlier partition has: a cluster that
    spreads its slots in contiguous ranges over its masters (``redis-cli --cluster create`` does)
    then has each partition on another master as long as there are masters. Clients need not
    compute this: the manager publishes the tags (``published_tags``)."""
    if partitions <= 1:
        return [model]
    def part_of(tag: str) -> int:
        slot: int = key_slot(tag.encode())
        return slot * partitions // REDIS_CLUSTER_HASH_SLOTS

    taken = {part_of(model)}
    tags = [model]
    k = 0
    for _ in range(partitions - 1):
        while True:
            k += 1
            tag = f"{model}{PARTITION_MARK}{k}"
            if part_of(tag) not in taken:
                break
        taken.add(part_of(tag))
        tags.append(tag)
    return tags


def published_tags(model: str, value: bytes | str | None) -> list[str]:
    """The tags a manager published in the ``tags`` field of the model's admission hash (space
    separated), or the model alone when there is no such field (one stream)."""
    if not value:
        return [model]
    text = value.decode() if isinstance(value, bytes) else value
    tags = text.split()
    return tags if tags and tags[0] == model else [model]


def partition_of(request_id: str | bytes, partitions: int) -> int:
    """The partition a request goes to: CRC-32 (zlib's, IEEE) of its id's UTF-8 bytes modulo the
    count. By id, not round robin: a request sent again with the same id lands on the same
    stream, where its first copy is (idempotent retries stay idempotent)."""
    if partitions <= 1:
        return 0
    raw = request_id.encode() if isinstance(request_id, str) else request_id
    return zlib.crc32(raw) % partitions


def model_of_tag(tag: str) -> str:
    """The model a stream's hash tag belongs to (``mlp~3`` -> ``mlp``)."""
    return tag.partition(PARTITION_MARK)[0]
