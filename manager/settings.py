"""The manager's settings: a pydantic model built by the CLI (never from the environment)."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nosq.producer.settings import RedisSettings

__all__ = ["ManagerSettings"]


class ManagerSettings(BaseModel):
    """How one manager process reads, batches, dispatches and recovers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    redis: RedisSettings = Field(default_factory=RedisSettings)
    consumer: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")
    block_ms: int = Field(default=200, ge=1, description="longest blocking XREADGROUP")
    inflight_per_replica: int = Field(default=2, ge=1, description="batches queued at each replica")
    priority_lookahead: int = Field(
        default=256, ge=0, description="entries read beyond what the replicas can take next, so that priorities "
        "reorder a backlog in the stream, not only the next batches (each costs memory and stays in this "
        "manager's pending list; managers sharing a model share its backlog less evenly)")
    janitor_interval_s: float = Field(default=2.0, gt=0)
    min_idle_ms: int = Field(default=30_000, ge=100, description="idle time before XAUTOCLAIM takes an entry")
    max_deliveries: int = Field(default=5, ge=1, description="deliveries before the dead-letter stream")
    dispatch_attempts: int = Field(default=3, ge=1, description="tries of one batch when its worker dies")
    local_channel: bool = Field(
        default=True, description="send batches to replicas on this host through shared memory and a Unix "
        "socket (nosq.workers.channel); False: every batch is a Ray call (slower; for comparison)")
    reply_inline_bytes: int = Field(
        default=4096, ge=0, description="an envelope up to this size rides in the reply-stream notice; a larger "
        "one is only in its result key, which the client fetches (docs/protocol.md section 8)")
    heartbeat_ttl_s: int = Field(default=10, ge=2)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    unknown_scan_interval_s: float = Field(default=1.0, gt=0)
    max_payload_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    max_batch_bytes: int = Field(default=32 * 1024 * 1024, ge=1, description="payload bytes of one batch")
    reply_maxlen: int = Field(default=100_000, ge=1000)
    ray_address: str | None = None
    ray_num_cpus: int | None = Field(default=None, ge=1)
    profile_on_start: bool = Field(
        default=True, description="profile a model at start when no valid stored profile exists (else serve "
        "it with its max_batch and no latency curve until one is stored, e.g. by `nosq profile --store`)")
    profile_memory_limit_bytes: int | None = Field(
        default=None, ge=1, description="most memory one batch may take when profiling picks b* (default: CUDA "
        "free memory less 10% of the card; CPU a quarter of the available RAM)")
    # -- the model registry (issue 5): on-demand loading under a memory budget ---------------
    node: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
                      description="this manager's node name in the registry")
    eviction_policy: Literal["fifo", "lru", "lfu", "cost"] = "fifo"
    cpu_budget_bytes: int | None = Field(
        default=None, ge=1, description="RAM the models of this node may take; None: no budget, every model "
        "loaded at start (no registry). Set: models load on demand and are evicted by eviction_policy")
    gpu_reserve_bytes: int = Field(default=1024**3, ge=0,
                                   description="GPU memory kept free: a GPU's budget is its total less this")
    gpu_overhead_bytes: int = Field(
        default=768 * 1024**2, ge=0, description="GPU memory each GPU actor takes beyond its model's measured "
        "bytes (its CUDA context, cuBLAS/cuDNN handles, allocator slack), reserved with them. Measured with "
        "torch 2.11 / CUDA 13 on H200: 612 MiB for a bare context, 700-750 MiB for an actor serving a small model")
    default_model_bytes: int = Field(
        default=256 * 1024**2, ge=0, description="bytes reserved per replica of a model with no stored profile")
    load_poll_ms: int = Field(default=250, ge=10,
                              description="how often unloaded models' streams are checked for backlog")
    autoscale_interval_s: float = Field(default=1.0, gt=0, description="how often the autoscaler looks at the "
                                        "models whose spec lets them scale (max_replicas > min_replicas)")
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics and /healthz")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="None: no metrics server")
    redis_outage_limit_s: float | None = Field(
        default=None, gt=0, description="stop (exit 1, with the reason) once one Redis outage has lasted this long; "
        "None: wait for Redis however long it takes, reporting unhealthy on /healthz meanwhile")
