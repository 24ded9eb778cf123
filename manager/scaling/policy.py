"""Autoscaling decisions, pure: how many replicas one model should have, and why. No I/O.

Each tick the caller (``nosq.manager.scaling.loop``) hands an ``Observation`` of the model and the time;
``Autoscaler.observe`` returns a ``Decision``: the replicas to have now (``target``; equal to
``current`` means hold) and the reason in words.

The recommendation (``recommend``), clamped to ``[min_replicas, max_replicas]``:

- nothing waiting (backlog 0): ``min_replicas`` (0 with scale to zero);
- requests waiting at zero replicas: at least 1, at once (no delay: they wait for a load);
- otherwise the replicas that drain the backlog within ``target_wait_s`` at the drain rate of
  one replica, and never fewer than the measured traffic keeps busy (so a short queue under
  steady load does not look idle). The rate is the predicted one (the profile's latency curve,
  refined by the batches served). Once the oldest waiting request is older than the target,
  the replicas have been busy all along, so their measured rate is a real capacity: when it is
  slower than predicted (or nothing is predicted) it is used instead (the prediction is off);
  with no rate at all, one more replica than now;
- no scale-up for a backlog that drains before a new replica would be ready (``startup_s``,
  measured on the last scale-up): the tail of a burst adds nothing.

Delays: a change is made only once it has been wanted for a whole delay: more replicas for
``up_delay_s``, fewer for ``down_delay_s``, each counted from the first tick that wanted it and
restarted by any tick that did not. The step taken is the most cautious one of that window:
up to the smallest recommendation seen in it, down to the largest. A spike shorter than the
delay changes nothing, and a change restarts both windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nosq.workers.spec import ModelSpec

__all__ = ["Autoscaler", "Decision", "Observation", "ScalingPolicy", "drain_rate", "predicted_drain_s", "recommend"]


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """One model's bounds, delays and target (from its spec)."""

    min_replicas: int
    max_replicas: int
    up_delay_s: float
    down_delay_s: float
    target_wait_s: float

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"replica bounds must satisfy 0 <= min <= max and max >= 1, "
                             f"got min {self.min_replicas}, max {self.max_replicas}")
        if self.up_delay_s < 0 or self.down_delay_s < 0 or self.target_wait_s <= 0:
            raise ValueError(f"delays must be >= 0 and the target wait > 0, got up {self.up_delay_s} s, "
                             f"down {self.down_delay_s} s, target {self.target_wait_s} s")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ScalingPolicy:
        low, high = spec.replica_bounds
        return cls(min_replicas=low, max_replicas=high, up_delay_s=spec.scale_up_delay_s,
                   down_delay_s=spec.scale_down_delay_s, target_wait_s=spec.scale_target_wait_s)

    @property
    def enabled(self) -> bool:
        """Autoscaling is on when the bounds leave room to move."""
        return self.max_replicas > self.min_replicas

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True, slots=True)
class Observation:
    """What the manager sees of one model at one tick."""

    backlog: int  # requests not yet answered: waiting in the stream or running
    oldest_age_s: float  # how long the oldest of them has waited (0 when none)
    replicas: int  # replicas serving now
    predicted_rate: float | None = None  # items/s one replica drains, from the latency curve; None: unknown
    served_per_s: float = 0.0  # measured answers/s of all replicas (recent)
    startup_s: float = 0.0  # how long the last scale-up took to get its replicas ready (0: unknown)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now. ``target == current``: hold (``reason`` says why, or what is pending)."""

    current: int
    target: int
    desired: int  # this tick's recommendation, before the delays
    reason: str
    backlog: int
    oldest_age_s: float
    drain_s: float | None  # predicted time to drain the backlog with ``current`` replicas (``drain_rate``)

    @property
    def changes(self) -> bool:
        return self.target != self.current


def drain_rate(policy: ScalingPolicy, obs: Observation) -> tuple[float | None, str]:
    """(items/s one replica drains, where that figure comes from); see the module docstring."""
    predicted = obs.predicted_rate if obs.predicted_rate is not None and obs.predicted_rate > 0 else None
    measured = obs.served_per_s / obs.replicas if obs.served_per_s > 0 and obs.replicas > 0 else None
    busy_all_along = obs.oldest_age_s > policy.target_wait_s
    if busy_all_along and measured is not None and (predicted is None or measured < predicted):
        return measured, "measured"
    return predicted, "predicted"


def predicted_drain_s(policy: ScalingPolicy, obs: Observation) -> float | None:
    """Seconds the backlog takes to drain on the current replicas; None when unknown."""
    if obs.backlog <= 0:
        return 0.0
    if obs.replicas <= 0:
        return math.inf
    rate, _ = drain_rate(policy, obs)
    return None if rate is None else obs.backlog / (obs.replicas * rate)


def recommend(policy: ScalingPolicy, obs: Observation) -> tuple[int, str]:
    """(replicas wanted now, why), within the policy's bounds; see the module docstring."""
    current = obs.replicas
    target = policy.target_wait_s
    if obs.backlog <= 0:
        return policy.min_replicas, "idle: no request waiting"
    if current <= 0:
        return policy.clamp(1), f"{obs.backlog} request(s) waiting at zero replicas"
    rate, source = drain_rate(policy, obs)
    if rate is None:
        if obs.oldest_age_s <= target:
            return policy.clamp(current), "no drain rate known yet"
        wanted = current + 1
        why = (f"oldest request waited {obs.oldest_age_s:.1f} s, over the target {target:g} s, and no drain rate "
               "is known")
    else:
        drain = obs.backlog / (current * rate)
        busy = min(current, math.ceil(obs.served_per_s / rate - 1e-9))  # the replicas the traffic uses
        wanted = max(1, math.ceil(obs.backlog / (rate * target)), busy)
        why = f"backlog {obs.backlog} drains in {drain:.1f} s on {current} replica(s) at the {source} {rate:.1f}/s each"
        if wanted > current and drain < obs.startup_s:
            wanted = current
            why += f", before a new replica would be ready ({obs.startup_s:.1f} s)"
        elif wanted > current:
            why += f", over the target {target:g} s"
        elif wanted < current:
            why += f"; {wanted} replica(s) drain it within {target:g} s at {obs.served_per_s:.1f} req/s"
    clamped = policy.clamp(wanted)
    if clamped != wanted:
        why += f" (kept within {policy.min_replicas}..{policy.max_replicas})"
    return clamped, why


class Autoscaler:
    """The delays around ``recommend`` for one model (see the module docstring)."""

    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy
        self._up_since: float | None = None
        self._up_floor = 0  # smallest recommendation since _up_since
        self._down_since: float | None = None
        self._down_ceiling = 0  # largest recommendation since _down_since

    def reset(self) -> None:
        """Forget the windows (after a change, or one made by someone else)."""
        self._up_since = self._down_since = None

    def observe(self, obs: Observation, now_s: float) -> Decision:
        current = obs.replicas
        desired, why = recommend(self.policy, obs)
        target = current
        if desired > current:
            self._down_since = None
            if self._up_since is None:
                self._up_since, self._up_floor = now_s, desired
            self._up_floor = min(self._up_floor, desired)
            waited = now_s - self._up_since
            if current <= 0 or waited >= self.policy.up_delay_s:
                target = self._up_floor
            else:
                why += f"; up in {self.policy.up_delay_s - waited:.1f} s if still wanted"
        elif desired < current:
            self._up_since = None
            if self._down_since is None:
                self._down_since, self._down_ceiling = now_s, desired
            self._down_ceiling = max(self._down_ceiling, desired)
            waited = now_s - self._down_since
            if waited >= self.policy.down_delay_s:
                target = self._down_ceiling
            else:
                why += f"; down in {self.policy.down_delay_s - waited:.1f} s if still wanted"
        else:
            self.reset()
        if target != current:
            self.reset()
        return Decision(current=current, target=target, desired=desired, reason=why, backlog=obs.backlog,
                        oldest_age_s=obs.oldest_age_s, drain_s=predicted_drain_s(self.policy, obs))
