"""The run's figures as a table (ratios against nosq), goal checks, and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["goals", "is_saturated", "plot", "summary", "table"]

ACHIEVED_FRACTION = 0.95  # below this share of the offered rate, a system is saturated
LATENCY_BLOWUP = 10.0  # or when its p99 exceeds this many times its p99 at the lowest rate
SERVE_SYSTEMS = ("serve-handle", "serve-http")
COLORS = {"direct": "black", "nosq": "C0", "serve-handle": "C1", "serve-http": "C2", "arq": "C3"}
OFF_SCALE = 50.0  # direct is left off a throughput plot when it is this many times the best system (noop)


def is_saturated(point: dict[str, Any], base_p99_ms: float | None) -> str:
    """Why an open-loop point is past saturation ("" if it is not)."""
    offered = point.get("sent_per_s") or point["offered_per_s"]  # Poisson: what was really sent
    if point["req_per_s"] < ACHIEVED_FRACTION * offered:
        return f"achieved {point['req_per_s']:.0f}/s < {ACHIEVED_FRACTION} x sent {offered:.0f}/s"
    p99 = point.get("p99_ms")
    if p99 is not None and base_p99_ms and p99 > LATENCY_BLOWUP * base_p99_ms:
        return f"p99 {p99:.0f} ms > {LATENCY_BLOWUP:.0f} x {base_p99_ms:.1f} ms at the lowest rate"
    return ""


def summary(system: dict[str, Any]) -> dict[str, Any]:
    """Best closed-loop throughput (and where), latency with one client, highest sustained rate."""
    closed = [p for p in system.get("closed", []) if p.get("req_per_s")]
    best = max(closed, key=lambda p: p["req_per_s"], default=None)
    one = next((p for p in closed if p["clients"] == 1), None)
    sustained = [p["offered_per_s"] for p in system.get("open", []) if not p.get("saturated")]
    lowest = min(system.get("open", []), key=lambda p: p["offered_per_s"], default=None)
    return {
        "best_req_per_s": best["req_per_s"] if best else None,
        "best_clients": best["clients"] if best else None,
        "best_gen_bound": bool(best and best.get("gen_bound")),
        "p50_ms_1_client": one["p50_ms"] if one else None,
        "p99_ms_1_client": one["p99_ms"] if one else None,
        "max_sustained_rate": max(sustained, default=None),
        "p50_ms_lowest_rate": lowest["p50_ms"] if lowest else None,
        "p99_ms_lowest_rate": lowest["p99_ms"] if lowest else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    return "-" if value is None else format(value, ".0f" if value >= 100 else ".2f" if value >= 0.1 else ".3f")


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else format(value, ".0f" if value >= 100 else ".2f")


def table(results: dict[str, Any]) -> str:
    """One row per (model, system); each ratio is the system's figure over nosq's."""
    head = (f"{'model':<12}{'system':<14}{'batch':>6}{'best req/s':>13}{'at c':>6}{'x nosq':>8}"
            f"{'p50@c=1':>9}{'p99@c=1':>9}{'x nosq':>8}{'sustained/s':>13}{'x nosq':>8}  notes")
    lines = [head, "-" * len(head)]
    for model, entry in results["models"].items():
        nosq = entry["systems"].get("nosq", {}).get("summary", {})
        for name, system in entry["systems"].items():
            s = system["summary"]
            notes = []
            if s["best_gen_bound"]:
                notes.append("load generator near a full core at best c")
            errors = sum(p.get("errors", 0) for p in system.get("closed", []) + system.get("open", []))
            if errors:
                notes.append(f"{errors} errors")
            x_best = _ratio(s["best_req_per_s"], nosq.get("best_req_per_s"))
            x_p50 = _ratio(s["p50_ms_1_client"], nosq.get("p50_ms_1_client"))
            x_rate = _ratio(s["max_sustained_rate"], nosq.get("max_sustained_rate"))
            lines.append(
                f"{model:<12}{name:<14}{entry['target']['batch']:>6}{_fmt(s['best_req_per_s']):>13}"
                f"{_fmt(s['best_clients'], 'd'):>6}{_fmt_ratio(x_best):>8}"
                f"{_ms(s['p50_ms_1_client']):>9}{_ms(s['p99_ms_1_client']):>9}{_fmt_ratio(x_p50):>8}"
                f"{_fmt(s['max_sustained_rate']):>13}{_fmt_ratio(x_rate):>8}  {'; '.join(notes)}")
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals that this run's models and systems allow checking."""
    out: list[dict[str, Any]] = []

    def best(model: str, system: str, key: str = "best_req_per_s") -> float | None:
        entry = results["models"].get(model, {}).get("systems", {}).get(system)
        value = entry["summary"][key] if entry else None
        return float(value) if value is not None else None

    def check(name: str, value: float | None, goal: float, *, below: bool = False) -> None:
        if value is not None:
            met = value < goal if below else value >= goal
            out.append({"goal": name, "value": round(value, 3), "target": goal, "op": "<" if below else ">=",
                        "met": met})

    def serve_best(model: str, key: str, pick: Any = max) -> float | None:
        values = [v for v in (best(model, s, key) for s in SERVE_SYSTEMS) if v is not None]
        return pick(values) if values else None

    for model in results["models"]:
        nosq = best(model, "nosq")
        if model == "noop":
            check("noop: nosq / Ray Serve (best of handle, HTTP), best concurrency", _ratio(nosq, serve_best(model,
                  "best_req_per_s")), 10.0)
            check("noop: nosq / arq, best concurrency", _ratio(nosq, best(model, "arq")), 10.0)
        if model == "mlp":
            check("mlp: nosq / direct, best concurrency", _ratio(nosq, best(model, "direct")), 0.8)
            check("mlp: nosq / Ray Serve (best of handle, HTTP)", _ratio(nosq, serve_best(model, "best_req_per_s")),
                  2.0)
        if model in ("cnn", "transformer"):
            check(f"{model}: nosq / direct, best concurrency", _ratio(nosq, best(model, "direct")), 0.9)
        p50 = best(model, "nosq", "p50_ms_1_client")
        serve_p50 = serve_best(model, "p50_ms_1_client", min)
        if p50 is not None and serve_p50 is not None:
            check(f"{model}: nosq p50 / Ray Serve p50 (best), one client", p50 / serve_p50, 1.0, below=True)
    return out


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per model: throughput against concurrency; p50 and p99 against the offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    device = results["meta"]["device"]
    written = []
    for model, entry in results["models"].items():
        systems = entry["systems"]
        best = {name: s.get("summary", {}).get("best_req_per_s") or 0.0 for name, s in systems.items()}
        served = max((v for k, v in best.items() if k != "direct"), default=0.0)
        off_scale = best.get("direct", 0.0) > OFF_SCALE * served > 0
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, system in systems.items():
            points = [p for p in system.get("closed", []) if p.get("req_per_s")]
            if points and not (name == "direct" and off_scale):
                ax.plot([p["clients"] for p in points], [p["req_per_s"] for p in points], marker="o", label=name,
                        linestyle="--" if name == "direct" else "-", color=COLORS.get(name))
        title = f"{model} on {device}: closed-loop throughput (b*={entry['target']['batch']})"
        if off_scale:
            title += f"\ndirect (in-process, up to {best['direct']:.3g}/s) is off this scale"
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients (one request in flight each)",
               ylabel="requests/s", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / f"{device}-{model}-throughput.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        if not any(s.get("open") for s in systems.values()):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            for name, system in systems.items():
                points = [p for p in system.get("open", []) if p.get(key) is not None]
                if not points:
                    continue
                ax.plot([p["offered_per_s"] for p in points], [p[key] for p in points], marker="o", label=name,
                        color=COLORS.get(name))
                sat = [p for p in points if p.get("saturated")]
                ax.plot([p["offered_per_s"] for p in sat], [p[key] for p in sat], marker="x", markersize=12,
                        linestyle="none", color="black")
            ax.set(xscale="log", yscale="log", xlabel="offered requests/s (open loop)",
                   ylabel=f"{key[:3]} latency (ms)", title=f"{model} on {device}: {key[:3]} (x = saturated)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend()
        path = out_dir / f"{device}-{model}-latency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
