"""Autoscaling decisions, pure: how many replicas one model should have, and why. No I/O.

Each tick the caller (``manager.scaling``) hands an ``Observation`` of the model and the time;
``Autoscaler.observe`` returns a ``Decision``: the replicas to have now (``target``; equal to
``current`` means hold) and the reason in words.

The recommendation (``recommend``), clamped to ``[min_replicas, max_replicas]``:

- nothing waiting (backlog 0): ``min_replicas`` (0 with scale to zero);
- requests waiting at zero replicas: at least 1, at once (no delay: they wait for a load);
- the per-replica drain rate known (the profile's latency curve, refined by served batches;
  else the measured rate): enough replicas to drain the backlog within ``target_wait_s``, and
  never fewer than the measured traffic keeps busy (so a drained queue under steady load does
  not look idle);
- the oldest waiting request older than ``target_wait_s`` and than the predicted drain time
  (the backlog does not drain as predicted, or nothing predicts it): one more than now.

Delays: a change is made only once it has been wanted for a whole delay: more replicas for
``up_delay_s``, fewer for ``down_delay_s``, each counted from the first tick that wanted it and
restarted by any tick that did not. The step taken is the most cautious one of that window:
up to the smallest recommendation seen in it, down to the largest. A spike shorter than the
delay changes nothing, and a change restarts both windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.spec import ModelSpec

__all__ = ["Autoscaler", "Decision", "Observation", "ScalingPolicy", "recommend"]


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
    rate_per_replica: float | None = None  # items/s one replica drains; None: unknown
    served_per_s: float = 0.0  # measured answers/s of all replicas (recent)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now. ``target == current``: hold (``reason`` says why, or what is pending)."""

    current: int
    target: int
    desired: int  # this tick's recommendation, before the delays
    reason: str
    backlog: int
    oldest_age_s: float
    drain_s: float | None  # predicted time to drain the backlog with ``current`` replicas

    @property
    def changes(self) -> bool:
        return self.target != self.current


def predicted_drain_s(obs: Observation) -> float | None:
    """Seconds the backlog takes to drain on the current replicas; None when unknown."""
    if obs.backlog <= 0:
        return 0.0
    if obs.replicas <= 0:
        return math.inf
    if obs.rate_per_replica is None or obs.rate_per_replica <= 0:
        return None
    return obs.backlog / (obs.replicas * obs.rate_per_replica)


def recommend(policy: ScalingPolicy, obs: Observation) -> tuple[int, str]:
    """(replicas wanted now, why), within the policy's bounds; see the module docstring."""
    current = obs.replicas
    if obs.backlog <= 0:
        return policy.min_replicas, "idle: no request waiting"
    if current <= 0:
        return policy.clamp(1), f"{obs.backlog} request(s) waiting at zero replicas"
    drain = predicted_drain_s(obs)
    rate = obs.rate_per_replica
    wanted, why = current, "backlog drains within the target"
    if rate is not None and rate > 0 and drain is not None:
        for_backlog = math.ceil(obs.backlog / (rate * policy.target_wait_s))
        busy = min(current, math.ceil(obs.served_per_s / rate - 1e-9))  # the replicas the traffic uses
        wanted = max(1, for_backlog, busy)
        if wanted > current:
            why = (f"backlog {obs.backlog} drains in {drain:.1f} s on {current} replica(s), over the "
                   f"target {policy.target_wait_s:g} s")
        elif wanted < current:
            why = (f"backlog {obs.backlog} drains within {policy.target_wait_s:g} s on {wanted} replica(s) "
                   f"at {obs.served_per_s:.1f} req/s")
    if obs.oldest_age_s > policy.target_wait_s and (drain is None or obs.oldest_age_s > drain) \
            and wanted <= current:
        wanted = current + 1
        predicted = "nothing predicts the drain" if drain is None else f"the predicted drain is {drain:.1f} s"
        why = f"oldest request waited {obs.oldest_age_s:.1f} s, over the target {policy.target_wait_s:g} s; {predicted}"
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
                        oldest_age_s=obs.oldest_age_s, drain_s=predicted_drain_s(obs))
