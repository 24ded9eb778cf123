"""Autoscaling decisions with a fake clock: delays, no flapping, bounds, scale to zero."""

from __future__ import annotations

import pytest

from nosq.manager.scaling.policy import Autoscaler, Observation, ScalingPolicy, recommend
from nosq.workers.spec import ModelSpec


def policy(low: int = 1, high: int = 3, up: float = 5.0, down: float = 30.0, target: float = 1.0) -> ScalingPolicy:
    return ScalingPolicy(min_replicas=low, max_replicas=high, up_delay_s=up, down_delay_s=down, target_wait_s=target)


def obs(backlog: int, replicas: int, *, age: float = 0.0, rate: float | None = 10.0,
        served: float = 0.0, startup: float = 0.0) -> Observation:
    return Observation(backlog=backlog, oldest_age_s=age, replicas=replicas, predicted_rate=rate,
                       served_per_s=served, startup_s=startup)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


def test_policy_from_spec_defaults_to_replicas_and_off() -> None:
    spec = ModelSpec(id="m", factory="a.b:c", replicas=2)
    assert ScalingPolicy.from_spec(spec).enabled is False
    on = ScalingPolicy.from_spec(ModelSpec(id="m", factory="a.b:c", min_replicas=0, max_replicas=3,
                                           scale_up_delay_s=1, scale_down_delay_s=2))
    assert (on.enabled, on.min_replicas, on.max_replicas, on.up_delay_s, on.down_delay_s) == (True, 0, 3, 1, 2)


@pytest.mark.parametrize("fields", [{"min_replicas": 2}, {"max_replicas": 0}, {"replicas": 4, "max_replicas": 3},
                                    {"min_replicas": 3, "max_replicas": 2, "replicas": 2}])
def test_spec_rejects_bounds_that_do_not_hold_replicas(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="replicas"):
        ModelSpec(id="m", factory="a.b:c", **fields)


def test_autoscaling_fields_keep_the_fingerprint() -> None:
    plain = ModelSpec(id="m", factory="a.b:c")
    scaled = ModelSpec(id="m", factory="a.b:c", min_replicas=0, max_replicas=4, scale_up_delay_s=1)
    assert plain.fingerprint() == scaled.fingerprint()


def test_recommend_drains_the_backlog_within_the_target() -> None:
    # 10 items/s per replica, target 1 s: 25 waiting need 3 replicas
    wanted, why = recommend(policy(high=5), obs(25, 1))
    assert wanted == 3
    assert "drains in 2.5 s on 1 replica(s) at the predicted 10.0/s each, over the target 1 s" in why
    assert recommend(policy(high=2), obs(25, 1))[0] == 2  # within max
    assert recommend(policy(), obs(5, 1))[0] == 1


def test_recommend_keeps_the_replicas_the_traffic_uses() -> None:
    # the queue is short, but 2 replicas are serving 18 req/s: do not go down to 1
    assert recommend(policy(), obs(3, 2, served=18.0))[0] == 2
    assert recommend(policy(), obs(3, 2, served=6.0))[0] == 1


def test_busy_past_the_target_trusts_the_measured_rate_when_slower() -> None:
    # the curve says 10/s a replica (4 drain in 0.4 s), but requests waited 3 s: the replica has
    # been busy all along and served 2/s, so the backlog really needs 2 s: 2 replicas for 1 s
    wanted, why = recommend(policy(), obs(4, 1, age=3.0, served=2.0))
    assert wanted == 2
    assert "at the measured 2.0/s each" in why
    # younger than the target: the measured rate may only be the arrival rate; the curve decides
    assert recommend(policy(), obs(4, 1, age=0.5, served=2.0))[0] == 1
    # measured faster than predicted: the prediction stands
    assert "predicted" in recommend(policy(), obs(4, 1, age=3.0, served=30.0))[1]


def test_without_any_rate_only_the_age_adds_a_replica() -> None:
    assert recommend(policy(), obs(4, 1, age=0.5, rate=None)) == (1, "no drain rate known yet")
    wanted, why = recommend(policy(), obs(4, 1, age=3.0, rate=None))
    assert wanted == 2 and "no drain rate is known" in why


def test_no_scale_up_for_a_backlog_that_drains_before_a_replica_starts() -> None:
    wanted, why = recommend(policy(), obs(15, 1, startup=3.0))  # 1.5 s of work, 3 s to start one
    assert wanted == 1 and "before a new replica would be ready (3.0 s)" in why
    assert recommend(policy(), obs(15, 1, startup=1.0))[0] == 2


def test_scale_up_only_after_the_delay() -> None:
    clock, scaler = Clock(), Autoscaler(policy(up=5.0))
    first = scaler.observe(obs(30, 1), clock.now)
    assert (first.changes, first.desired) == (False, 3)
    assert "up in 5.0 s" in first.reason
    for _ in range(4):
        assert not scaler.observe(obs(30, 1), clock.tick()).changes
    decision = scaler.observe(obs(30, 1), clock.tick())
    assert (decision.current, decision.target) == (1, 3)
    assert decision.drain_s == pytest.approx(3.0)


def test_a_spike_shorter_than_the_delay_changes_nothing() -> None:
    clock, scaler = Clock(), Autoscaler(policy(up=5.0, down=5.0))
    for backlog in (30, 30, 30, 30, 0, 30, 30, 30, 30, 0, 0, 0):
        decision = scaler.observe(obs(backlog, 1), clock.tick())
        assert not decision.changes, decision


def test_scale_up_takes_the_most_cautious_step_of_the_window() -> None:
    clock, scaler = Clock(), Autoscaler(policy(high=5, up=2.0))
    scaler.observe(obs(50, 1), clock.now)  # wants 5
    scaler.observe(obs(20, 1), clock.tick())  # wants 2
    assert scaler.observe(obs(50, 1), clock.tick()).target == 2


def test_scale_down_after_the_delay_to_the_largest_need_of_the_window() -> None:
    clock, scaler = Clock(), Autoscaler(policy(down=10.0))
    assert not scaler.observe(obs(15, 3), clock.now).changes  # wants 2
    for _ in range(9):
        assert not scaler.observe(obs(0, 3), clock.tick()).changes
    decision = scaler.observe(obs(0, 3), clock.tick())
    assert (decision.target, decision.reason) == (2, "idle: no request waiting")
    # the window restarts after a change: counted from the next tick that wants it
    for _ in range(10):
        assert not scaler.observe(obs(0, 2), clock.tick()).changes
    assert scaler.observe(obs(0, 2), clock.tick()).target == 1


def test_a_tick_that_no_longer_wants_it_restarts_the_delay() -> None:
    clock, scaler = Clock(), Autoscaler(policy(down=3.0))
    scaler.observe(obs(0, 2), clock.now)
    scaler.observe(obs(0, 2), clock.tick())
    scaler.observe(obs(20, 2), clock.tick())  # busy again (needs 2): holds, and the delay starts over
    scaler.observe(obs(0, 2), clock.tick())
    scaler.observe(obs(0, 2), clock.tick(2.0))
    assert not scaler.observe(obs(0, 2), clock.tick(0.5)).changes
    assert scaler.observe(obs(0, 2), clock.tick(0.5)).target == 1


def test_bounds_hold_at_max_and_min() -> None:
    clock, scaler = Clock(), Autoscaler(policy(high=2, up=0.0, down=0.0))
    assert scaler.observe(obs(1000, 2), clock.now).target == 2  # already at max
    assert scaler.observe(obs(0, 1), clock.tick()).target == 1  # already at min
    assert scaler.observe(obs(1000, 5), clock.tick()).target == 2  # set above max by hand: back within


def test_scale_to_zero_and_back() -> None:
    clock, scaler = Clock(), Autoscaler(policy(low=0, high=2, up=5.0, down=2.0))
    assert not scaler.observe(obs(0, 1), clock.now).changes
    assert not scaler.observe(obs(0, 1), clock.tick()).changes
    assert scaler.observe(obs(0, 1), clock.tick()).target == 0
    # a request at zero replicas: back to one at once, without the up delay
    decision = scaler.observe(obs(1, 0, age=0.1), clock.tick())
    assert (decision.target, decision.reason) == (1, "1 request(s) waiting at zero replicas")


def test_without_scale_to_zero_idle_stays_at_min() -> None:
    clock, scaler = Clock(), Autoscaler(policy(low=1, down=0.0))
    assert scaler.observe(obs(0, 1), clock.now).target == 1


def test_policy_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="min"):
        policy(low=3, high=2)
    with pytest.raises(ValueError, match="target"):
        policy(target=0)
