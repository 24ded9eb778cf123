"""``nosq status``: what every manager is doing, read from Redis (heartbeats, streams, registry).

Works from any machine that reaches Redis; no Ray needed.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from nosq.manager.serving import depth
from nosq.producer import keys

__all__ = ["autoscaling", "collect", "heartbeats", "render"]


def heartbeats(client: redis.Redis) -> list[dict[str, Any]]:
    """The live managers' heartbeats, each with its ``consumer`` name."""
    managers = []
    for key in client.scan_iter(match=keys.manager_heartbeat("*"), count=500):
        raw: Any = client.get(key)
        if raw is not None:
            beat = json.loads(raw)
            beat["consumer"] = key.decode().removeprefix(keys.manager_heartbeat(""))
            managers.append(beat)
    return sorted(managers, key=lambda beat: str(beat["consumer"]))


def autoscaling(managers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and manager: replica bounds, replicas now and wanted, the latest scaling decision."""
    rows = []
    for beat in managers:
        for model, figures in (beat.get("stats") or {}).items():
            view = figures.get("autoscale")
            if view:
                rows.append({"model": model, "manager": beat["consumer"], **view})
    return sorted(rows, key=lambda row: (row["model"], row["manager"]))


def collect(client: redis.Redis) -> dict[str, Any]:
    """Managers (from their heartbeats) and models (backlog, pending, traffic, registry state)."""
    managers = heartbeats(client)
    models: dict[str, dict[str, Any]] = {}
    for beat in managers:
        for model, figures in (beat.get("stats") or {}).items():
            row = models.setdefault(model, {"model": model, "managers": [], "req_per_s": 0.0, "served": 0})
            row["managers"].append(beat["consumer"])
            row["req_per_s"] += figures.get("req_per_s", 0.0)
            row["served"] += figures.get("served", 0)
            for name in ("mean_batch", "p50_ms", "p99_ms", "replicas"):
                if name in figures:
                    row[name] = max(row.get(name, 0), figures[name])
            for problem in ("compile_problem", "load_error"):
                if figures.get(problem):
                    row[problem] = figures[problem]
        for model in beat.get("models", []):
            models.setdefault(model, {"model": model, "managers": [beat["consumer"]], "req_per_s": 0.0, "served": 0})
    registry: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(match=keys.registry_model("*"), count=500):
        fields: Any = client.hgetall(key)
        record = {k.decode(): v.decode() for k, v in fields.items()}
        registry[key.decode().removeprefix(keys.registry_model(""))] = record
    names = sorted(models)
    pipe = client.pipeline(transaction=False)
    for model in names:  # the partitions its managers published
        pipe.hget(keys.admission(model), "tags")
    tags = [keys.published_tags(model, value if isinstance(value, bytes) else None)
            for model, value in zip(names, pipe.execute(raise_on_error=False), strict=True)]
    pipe = client.pipeline(transaction=False)
    for model_tags in tags:
        depth.ask(pipe, [keys.requests(tag) for tag in model_tags])
    found = depth.depths(pipe.execute(raise_on_error=False), [len(t) for t in tags])
    for model, model_tags, queue in zip(names, tags, found, strict=True):
        row = models[model]
        row["backlog"] = queue.backlog
        row["pending"] = queue.pending
        if len(model_tags) > 1:
            row["partitions"] = len(model_tags)
        if model in registry:
            row["state"] = registry[model].get("state", "")
            row["resident_mib"] = round(int(registry[model].get("bytes", 0) or 0) / 2**20, 1)
    devices = []
    members: Any = client.smembers(keys.registry_devices())
    for label in sorted(m.decode() for m in members):
        raw_device: Any = client.hgetall(keys.registry_device(label))
        device = {k.decode(): v.decode() for k, v in raw_device.items()}
        devices.append({"device": label, "budget_mib": round(int(device.get("budget_bytes", 0)) / 2**20, 1),
                        "used_mib": round(int(device.get("used_bytes", 0)) / 2**20, 1)})
    return {"managers": managers, "models": [models[m] for m in names], "devices": devices}


def render(view: dict[str, Any]) -> str:
    """A fixed-width table of the view."""
    lines = [f"{'model':<14}{'state':<9}{'replicas':>9}{'backlog':>9}{'pending':>9}{'req/s':>9}"
             f"{'batch':>7}{'p50 ms':>9}{'p99 ms':>9}{'MiB':>8}  managers"]
    for row in view["models"]:
        lines.append(
            f"{row['model']:<14}{row.get('state', 'ready'):<9}{row.get('replicas', ''):>9}{row['backlog']:>9}"
            f"{row['pending']:>9}{row['req_per_s']:>9.0f}{row.get('mean_batch', 0):>7.1f}"
            f"{row.get('p50_ms', 0):>9.1f}{row.get('p99_ms', 0):>9.1f}{row.get('resident_mib', 0):>8.1f}"
            f"  {','.join(row['managers'])}"
        )
    for row in view["models"]:
        if row.get("load_error"):
            lines.append(f"{row['model']}: load failed, retrying: {row['load_error']}")
        if row.get("compile_problem"):
            lines.append(f"{row['model']}: {row['compile_problem']}")
    for device in view.get("devices", []):
        lines.append(f"device {device['device']}: {device['used_mib']:.1f} of {device['budget_mib']:.1f} MiB used")
    alive = ", ".join(f"{m['consumer']} ({m.get('state', '?')}, pid {m.get('pid')})" for m in view["managers"])
    lines.append(f"managers: {alive or 'none alive'}")
    return "\n".join(lines)
