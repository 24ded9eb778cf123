"""Starting or joining Ray, kept on loopback unless an address is given."""

from __future__ import annotations

import logging
import os

import ray
from ray._private import ray_constants

from nosq.manager.runtime.reaper import start_reaper

__all__ = ["connect", "disconnect"]

log = logging.getLogger(__name__)
# batches up to this size travel inline with the call instead of through the object store
DIRECT_CALL_BYTES = 4 * 1024 * 1024


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a private one bound to 127.0.0.1.

    Returns False when Ray was already initialised in this process (the caller then leaves
    it running when it stops)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's abseil handler turns SIGTERM into a stack dump and an abort 3 s later; the
    # manager drains on SIGTERM itself
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if address:
        if _on_loopback(address):
            # else Ray rewrites 127.0.0.1 to the machine's routable address, where a cluster
            # started with --node-ip-address 127.0.0.1 does not answer
            ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        log.info("joined Ray cluster at %s", address)
        return True
    # Ray starts its workers at nice 15: on a busy host the replicas, which are the work, then
    # lose the CPU to everything else (docs/benchmarks.md, embeddings). An operator's setting wins.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; without it a "local"
    # instance binds the machine's non-loopback address. A private instance stays on loopback.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=num_cpus or max(os.cpu_count() or 1, 4),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=True,
        _system_config={"max_direct_call_object_size": DIRECT_CALL_BYTES},
    )
    node = ray._private.worker._global_node
    if node is not None:  # nothing of this Ray outlives this process (nosq.manager.runtime.reaper)
        start_reaper(node.get_session_dir_path())
    log.info("started a local Ray instance on 127.0.0.1")
    return True


def _on_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def disconnect() -> None:
    if ray.is_initialized():
        ray.shutdown()
