"""A profile's data and the choice of batch size: pure Python, no torch.

A profile is the curve a sweep measured (one ``Point`` per batch size), the ``Plan`` it was
judged against (device, input signature, budget, memory limit, the spec's fingerprint), where
the sweep stopped (``Stop``), and the chosen b* with its reason in words. ``nosq.workers.profiles.measure``
measures the points in the serving process; ``sweep`` drives any ``measure(b)`` (local, or a
remote actor's ``profile_one``), so the CLI can draw progress between sizes.

b* is the size with the best throughput whose p95 latency fits the budget and whose memory
fits the limit; if none does, b* = 1 and the reason says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nosq.producer.errors import NosqError as _ErrorRoot
else:
    try:  # the producer package needs redis and msgpack; a GPU box may have torch alone
        from nosq.producer.errors import NosqError as _ErrorRoot
    except ImportError:
        _ErrorRoot = Exception

__all__ = [
    "EXAMPLE_OPTION",
    "ProfileOptions",
    "MIB",
    "PROFILE_VERSION",
    "Measurement",
    "OutOfMemory",
    "Plan",
    "Point",
    "Profile",
    "ProfileError",
    "Stop",
    "assemble",
    "batch_sizes",
    "choose",
    "measurement_from_dict",
    "merge",
    "sweep",
]

PROFILE_VERSION = 1
#: the spec ``options`` key that describes one input item for models without ``example_input()``:
#: ``{dtype = "float32", shape = [3, 64, 64]}`` or a list of numbers; it is not passed to the factory
EXAMPLE_OPTION = "example"
MIB = 1024 * 1024


class ProfileError(_ErrorRoot):
    """A model that cannot be profiled as configured (no example input, a bad cap)."""


@dataclass(frozen=True, slots=True)
class Point:
    """One batch size's figures."""

    batch: int
    p50_ms: float
    p95_ms: float
    items_per_s: float
    memory_bytes: int
    reps: int


@dataclass(frozen=True, slots=True)
class OutOfMemory:
    """A batch size that did not fit on the device."""

    batch: int
    message: str


Measurement = Point | OutOfMemory


@dataclass(frozen=True, slots=True)
class Stop:
    """Where the sweep stopped: ``cap``, ``out_of_memory``, ``over_memory`` or ``over_budget``."""

    reason: str
    batch: int
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What a sweep needs to know before its first size, measured in the serving process."""

    model: str
    fingerprint: str
    method: str
    device: str
    device_kind: str
    signature: str
    max_batch: int
    sizes: tuple[int, ...]
    latency_budget_ms: float
    weights_bytes: int
    baseline_bytes: int
    memory_limit_bytes: int
    memory_method: str  # "cuda_max_reserved" ("cuda_max_allocated" in older profiles), "rss_sampled", "none"
    threads: int
    torch_version: str
    stop_over_budget: bool = True
    rounds: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["sizes"] = tuple(values["sizes"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Profile:
    """A finished profile: the plan's facts, the curve, where it stopped, and the choice."""

    plan: Plan
    points: tuple[Point, ...]
    stop: Stop
    best_batch: int
    reason: str
    profiled_at: float
    seconds: float
    version: int = PROFILE_VERSION

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint

    def point(self, batch: int) -> Point | None:
        return next((p for p in self.points if p.batch == batch), None)

    def latency_curve(self) -> dict[int, float]:
        """{batch: p50 ms}: the batcher's prediction of a batch's run time."""
        return {p.batch: p.p50_ms for p in self.points}

    def tail_curve(self) -> dict[int, float]:
        """{batch: p95 ms}."""
        return {p.batch: p.p95_ms for p in self.points}

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready: the plan's fields, then points, stopped, best_batch, reason, ..."""
        return {
            "v": self.version,
            **self.plan.to_dict(),
            "points": [dataclasses.asdict(p) for p in self.points],
            "stopped": dataclasses.asdict(self.stop),
            "best_batch": self.best_batch,
            "reason": self.reason,
            "profiled_at": self.profiled_at,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """The inverse of ``to_dict``; ``ProfileError`` for another version or missing fields."""
        version = data.get("v")
        if version != PROFILE_VERSION:
            raise ProfileError(f"profile format v{version!r} is not v{PROFILE_VERSION}: profile the model again")
        try:
            return cls(
                plan=Plan.from_dict(data),
                points=tuple(Point(**p) for p in data["points"]),
                stop=Stop(**data["stopped"]),
                best_batch=int(data["best_batch"]),
                reason=str(data["reason"]),
                profiled_at=float(data["profiled_at"]),
                seconds=float(data["seconds"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile ({type(exc).__name__}: {exc}): profile the model again") from exc


# -- the sweep and the choice (pure) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    """How long to measure and how much memory a batch may take."""

    rounds: int = 3  # each size is measured this many times, interleaved (``nosq.workers.profiles.curve.sweep``)
    warmup: int = 2
    min_reps: int = 10  # per round
    max_reps: int = 300
    min_time_s: float = 0.1
    max_time_s: float = 2.0  # per size; at least 3 timed runs whatever it says
    memory_reps: int = 2
    sample_interval_s: float = 0.0005
    cpu_memory_fraction: float = 0.25  # of the RAM available when profiling starts
    cuda_reserve_fraction: float = 0.1  # of the card's memory, kept out of the headroom
    memory_limit_bytes: int | None = None  # overrides both of the above
    stop_over_budget: bool = True


def batch_sizes(cap: int) -> tuple[int, ...]:
    """Powers of two below ``cap``, then ``cap`` itself: 1, 2, 4, ..., cap."""
    if cap < 1:
        raise ProfileError(f"the batch cap must be at least 1, got {cap}")
    sizes = [1 << i for i in range(cap.bit_length()) if 1 << i < cap]
    return (*sizes, cap)


def sweep(
    plan: Plan,
    measure: Callable[[int], Measurement],
    *,
    on_result: Callable[[int, int, Measurement], None] | None = None,
) -> tuple[list[Point], Stop]:
    """Measure ``plan.sizes`` in order until one of the stops in the module docstring, then
    measure the sizes kept ``plan.rounds - 1`` more times (largest first) and keep the least
    disturbed figures of each (``merge``). ``on_result(done, total, result)`` after each call;
    ``total`` is exact once the first round is over."""
    rounds = max(1, plan.rounds)
    done, total = 0, len(plan.sizes) * rounds

    def step(batch: int) -> Measurement:
        nonlocal done
        result = measure(batch)
        done += 1
        if on_result is not None:
            on_result(done, total, result)
        return result

    points, stop = _first_round(plan, step)
    total = done + len(points) * (rounds - 1)
    runs: dict[int, list[Point]] = {p.batch: [p] for p in points}
    for _ in range(rounds - 1):
        for batch in sorted(runs, reverse=True):  # a drift in the machine's load favours neither end
            result = step(batch)
            if isinstance(result, OutOfMemory):  # it fitted before: memory got short; keep what is below
                stop = Stop("out_of_memory", batch, f"b={batch} ran out of memory: {result.message}")
                runs = {b: r for b, r in runs.items() if b < batch}
                total = done
                break
            runs[batch].append(result)
    return [merge(runs[b]) for b in sorted(runs)], stop


def _first_round(plan: Plan, step: Callable[[int], Measurement]) -> tuple[list[Point], Stop]:
    points: list[Point] = []
    for batch in plan.sizes:
        result = step(batch)
        if isinstance(result, OutOfMemory):
            return points, Stop("out_of_memory", batch, f"b={batch} ran out of memory: {result.message}")
        points.append(result)
        if result.memory_bytes > plan.memory_limit_bytes:
            return points, Stop("over_memory", batch, f"b={batch} needs {_mib(result.memory_bytes)} MiB, over "
                                                      f"the {_mib(plan.memory_limit_bytes)} MiB memory limit")
        if plan.stop_over_budget and result.p50_ms > plan.latency_budget_ms and batch != plan.sizes[-1]:
            return points, Stop("over_budget", batch, f"b={batch} p50 {result.p50_ms:.1f} ms is over the "
                                                      f"{plan.latency_budget_ms:g} ms budget: no larger batch fits")
    return points, Stop("cap", plan.sizes[-1], f"reached the cap b={plan.max_batch}")


def merge(runs: Sequence[Point]) -> Point:
    """One size measured in several rounds: the least disturbed p50 and p95 (other processes only
    ever add time), the largest memory, all the runs counted."""
    p50 = min(p.p50_ms for p in runs)
    return Point(batch=runs[0].batch, p50_ms=p50, p95_ms=min(p.p95_ms for p in runs),
                 items_per_s=runs[0].batch * 1000.0 / p50, memory_bytes=max(p.memory_bytes for p in runs),
                 reps=sum(p.reps for p in runs))


def choose(
    points: Sequence[Point], *, budget_ms: float, memory_limit_bytes: int, stop: Stop | None = None
) -> tuple[int, str]:
    """(b*, the reason in words): the best throughput within the budget (p95) and the memory."""
    def over(p: Point) -> str | None:
        if p.p95_ms > budget_ms:
            return f"b={p.batch} p95 {p.p95_ms:.1f} ms > the {budget_ms:g} ms budget"
        if p.memory_bytes > memory_limit_bytes:
            return f"b={p.batch} needs {_mib(p.memory_bytes)} MiB > the {_mib(memory_limit_bytes)} MiB memory limit"
        return None

    fitting = [p for p in points if over(p) is None]
    if not fitting:
        if not points:
            cause = stop.message if stop is not None else "nothing was measured"
            return 1, f"b=1: no batch size could be measured ({cause}); serving one request at a time"
        why = over(points[0]) if points[0].batch == 1 else f"no size fits ({over(points[0])})"
        return 1, f"b=1: even the smallest batch misses: {why}; serving one request at a time"
    best = max(fitting, key=lambda p: (p.items_per_s, -p.batch))
    reason = f"b={best.batch}: best throughput ({best.items_per_s:,.0f}/s) within the {budget_ms:g} ms budget"
    larger = [p for p in points if p.batch > best.batch]
    if larger:
        nxt = larger[0]
        reason += f"; {over(nxt) or f'b={nxt.batch} gives no more ({nxt.items_per_s:,.0f}/s)'}"
    elif stop is not None and stop.reason == "cap":
        reason += f"; b={best.batch} is the cap (max_batch)"
    elif stop is not None:
        reason += f"; {stop.message}"
    return best.batch, reason


def assemble(plan: Plan, points: Sequence[Point], stop: Stop, *, profiled_at: float, seconds: float) -> Profile:
    """The finished profile of a sweep, with its choice."""
    best, reason = choose(points, budget_ms=plan.latency_budget_ms, memory_limit_bytes=plan.memory_limit_bytes,
                          stop=stop)
    return Profile(plan=plan, points=tuple(points), stop=stop, best_batch=min(best, plan.max_batch),
                   reason=reason, profiled_at=profiled_at, seconds=seconds)


def measurement_from_dict(data: Mapping[str, Any]) -> Measurement:
    """A measurement sent as ``dataclasses.asdict`` (a remote ``profile_one``'s answer)."""
    if "message" in data:
        return OutOfMemory(int(data["batch"]), str(data["message"]))
    return Point(**data)


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f}"
