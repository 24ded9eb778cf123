"""The autoscaler's loop, and the one place a model's replica count changes.

Every ``autoscale_interval_s`` one pipelined round trip reads, for each model whose spec lets
it scale (``max_replicas > min_replicas``) and that is loaded here:

- the backlog: the stream's length. nosq deletes an entry once it is answered, so the length
  is the stream depth plus the pending entries (read, not yet answered); ``XPENDING`` gives
  the pending part for the log;
- the age of the oldest waiting request: Redis ``TIME`` less the time in the first entry's id;

and takes from the pipeline the predicted drain rate of one replica (b* over latency(b*) of the
latency curve: the profile's, refined by the batches served,
``nosq.manager.serving.batcher.LatencyModel``) and the measured answers/s (since the replica
count last changed, at most 10 s), and from its own last scale-up how long new replicas take to
be ready. ``nosq.manager.scaling.policy`` decides; a change is applied here:

- without a memory budget: ``ReplicaPool.scale_to`` (scale to zero needs a budget: ``check_config``);
- with one: ``Loader.scale``, which grows the model's bytes in the registry first (a scale-up
  the budget cannot hold is refused and logged; nothing is evicted for it) and evicts the
  model at zero (the loader loads it again when requests wait in its stream).

Every change, applied or refused, is one log line (model, from, to, reason, backlog, pending,
oldest age, predicted drain) and the model's latest decision is published in this manager's
heartbeat (``view``), where ``nosq models`` and ``nosq status`` read it. ``nosq models scale``
goes through ``scale`` too, so it is serialized with the autoscaler and recorded the same way.

Several managers serving one model (no budget) each scale their own replicas on the shared
backlog; the prediction counts only this manager's replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio
from ray.exceptions import RayError

from nosq.manager.memory.loader import Loader
from nosq.manager.scaling.policy import Autoscaler, Decision, Observation, ScalingPolicy
from nosq.manager.serving import depth
from nosq.manager.serving.pipeline import ModelPipeline
from nosq.manager.serving.replicas import ReplicaPool
from nosq.manager.settings import ManagerSettings
from nosq.producer.errors import NosqError
from nosq.workers.spec import ServeConfig

__all__ = ["Scaling", "check_config"]

log = logging.getLogger(__name__)


def check_config(config: ServeConfig, *, on_demand: bool) -> None:
    """Scale to zero unloads the model: only on-demand loading (a memory budget) loads it back."""
    zero = [spec.id for spec in config.models if spec.replica_bounds[0] == 0]
    if zero and not on_demand:
        raise NosqError(f"model(s) {', '.join(zero)}: min_replicas = 0 (scale to zero) needs on-demand loading, "
                        "which brings a model back when requests wait: serve with --cpu-budget-mib, or set "
                        "min_replicas >= 1")


class Scaling:
    """Observes, decides, applies and records the replica count of each model of one manager."""

    def __init__(self, *, client: redis.asyncio.Redis, settings: ManagerSettings, pools: Mapping[str, ReplicaPool],
                 pipelines: Mapping[str, ModelPipeline], loader: Loader | None,
                 published: Callable[[], Awaitable[None]]) -> None:
        self._redis = client
        self._settings = settings
        self._pools = pools
        self._pipelines = pipelines
        self._loader = loader
        self._published = published  # writes the heartbeat now, so a decision shows at once
        self.policies = {model: ScalingPolicy.from_spec(pool.spec) for model, pool in pools.items()}
        self._scalers = {model: Autoscaler(policy) for model, policy in self.policies.items() if policy.enabled}
        self._locks = {model: asyncio.Lock() for model in pools}
        self._seen: dict[str, int] = {}  # replicas after the last tick or change: tells a change made elsewhere
        self._changed_at: dict[str, float] = {}  # when the replica count last changed (monotonic)
        self._desired: dict[str, int] = {}
        self._startup_s: dict[str, float] = {}  # how long the model's last scale-up took
        self.decisions: dict[str, dict[str, Any]] = {}  # model -> its latest change (applied or refused)

    @property
    def enabled(self) -> bool:
        return bool(self._scalers)

    def view(self, model: str) -> dict[str, Any] | None:
        """What the heartbeat carries for ``model``: bounds, replicas now and wanted, last decision
        (None for a model that does not autoscale and was never scaled)."""
        policy = self.policies.get(model)
        if policy is None or not (policy.enabled or model in self.decisions):
            return None
        replicas = len(self._pools[model].replicas)
        return {"enabled": policy.enabled, "min_replicas": policy.min_replicas, "max_replicas": policy.max_replicas,
                "replicas": replicas, "desired": self._desired.get(model, replicas),
                "last": self.decisions.get(model)}

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._settings.autoscale_interval_s
        while not stop.is_set():
            await self.tick()
            try:
                async with asyncio.timeout(interval):
                    await stop.wait()
            except TimeoutError:
                pass

    async def tick(self) -> list[Decision]:
        """One look at every autoscaled model loaded here; applies and returns the changes."""
        models = [m for m in self._scalers if self._settled(m)]
        await self._note_loads()
        if not models:
            return []
        observed = await self._observe(models)
        now = time.monotonic()
        changes = []
        for model, (obs, pending) in observed.items():
            scaler = self._scalers[model]
            if self._seen.get(model, obs.replicas) != obs.replicas:
                scaler.reset()  # scaled by someone else since: its windows start over
                self._changed_at[model] = now
            self._seen[model] = obs.replicas
            decision = scaler.observe(obs, now)
            self._desired[model] = decision.desired
            if decision.changes and not self._locks[model].locked():
                await self.scale(model, decision.target, decision.reason, decision=decision, pending=pending)
                changes.append(decision)
        return changes

    async def scale(self, model: str, replicas: int, reason: str, *, decision: Decision | None = None,
                    pending: int = 0) -> str:
        """Set ``model``'s replicas, log and record it; "" when done, else why not (all of it)."""
        pool = self._pools[model]
        async with self._locks[model]:
            current = len(pool.replicas)
            if replicas == current:
                return ""
            started = time.monotonic()
            try:
                if self._loader is not None:
                    reached, refused = await self._loader.scale(model, replicas)
                else:
                    await pool.scale_to(replicas)
                    reached, refused = len(pool.replicas), ""
            except (RayError, TimeoutError) as exc:  # new replicas did not start: serve on with those there are
                reached, refused = len(pool.replicas), f"replicas did not start: {type(exc).__name__}: {str(exc)[:200]}"
            self._pipelines[model].wake()
            self._seen[model] = reached
            self._changed_at[model] = time.monotonic()
            if reached > current > 0:
                self._startup_s[model] = self._changed_at[model] - started
        backlog = decision.backlog if decision is not None else 0
        oldest = decision.oldest_age_s if decision is not None else 0.0
        figures = ""  # what the decision saw (an operator's scale saw nothing)
        if decision is not None:
            drain = "unknown" if decision.drain_s is None else f"{decision.drain_s:.1f} s"
            figures = f"; backlog {backlog} (pending {pending}), oldest {oldest:.1f} s, predicted drain {drain}"
        if reached == current:
            log.warning("model %s: autoscale %d -> %d refused: %s (wanted: %s)%s", model, current, replicas, refused,
                        reason, figures)
        elif refused:
            log.warning("model %s: autoscale %d -> %d (of %d wanted: %s): %s%s", model, current, reached, replicas,
                        refused, reason, figures)
        else:
            log.info("model %s: autoscale %d -> %d: %s%s", model, current, reached, reason, figures)
        self._record(model, current, reached, reason, wanted=replicas, refused=refused, backlog=backlog,
                     pending=pending, oldest_s=oldest, drain_s=None if decision is None else decision.drain_s)
        await self._published()
        return refused

    # -- internals ------------------------------------------------------------------------------

    def _settled(self, model: str) -> bool:
        """Serving here with no load or eviction under way (the loader decides those)."""
        if self._loader is not None:
            return self._loader.settled(model) and not self._locks[model].locked()
        return bool(self._pools[model].replicas)

    async def _note_loads(self) -> None:
        """A model scaled to zero and loaded again on demand (by the loader): record it too."""
        for model, last in list(self.decisions.items()):
            replicas = len(self._pools[model].replicas)
            if last["to"] == 0 and last["applied"] and replicas > 0:
                reason = "requests waited at zero replicas: loaded on demand"
                log.info("model %s: autoscale 0 -> %d: %s", model, replicas, reason)
                self._seen[model] = replicas
                self._changed_at[model] = time.monotonic()
                self._record(model, 0, replicas, reason, wanted=replicas, refused="", backlog=0, pending=0,
                             oldest_s=0.0, drain_s=None)
                await self._published()

    def _record(self, model: str, current: int, reached: int, reason: str, *, wanted: int, refused: str,
                backlog: int, pending: int, oldest_s: float, drain_s: float | None) -> None:
        self.decisions[model] = {
            "at_ms": int(time.time() * 1000), "from": current, "to": reached, "wanted": wanted, "reason": reason,
            "applied": reached != current, "refused": refused, "backlog": backlog, "pending": pending,
            "oldest_s": round(oldest_s, 3), "drain_s": None if drain_s is None else round(drain_s, 3),
        }

    async def _observe(self, models: list[str]) -> dict[str, tuple[Observation, int]]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        for model in models:
            depth.ask(pipe, self._pipelines[model].streams)
        answers = await pipe.execute(raise_on_error=False)
        seconds, micros = answers[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        out = {}
        found = depth.depths(answers[1:], [len(self._pipelines[model].streams) for model in models])
        for model, queue in zip(models, found, strict=True):
            backlog = queue.backlog
            oldest_s = 0.0
            if backlog and queue.oldest_ms is not None:
                oldest_s = max(0.0, (now_ms - queue.oldest_ms) / 1000)
            replicas = len(self._pools[model].replicas)
            pipeline = self._pipelines[model]
            # measured since the count last changed: a rate of fewer replicas is not theirs
            served = pipeline.stats.rate(since=self._changed_at.get(model, 0.0))
            out[model] = (Observation(backlog=backlog, oldest_age_s=oldest_s, replicas=replicas,
                                      predicted_rate=_predicted_rate(pipeline), served_per_s=served,
                                      startup_s=self._startup_s.get(model, 0.0)), queue.pending)
        return out


def _predicted_rate(pipeline: ModelPipeline) -> float | None:
    """Items/s one replica drains by the latency curve: batches of the cap, back to back."""
    cap = pipeline.batcher.cap
    latency_ms = pipeline.batcher.latency.predict(cap)
    return cap * 1000.0 / latency_ms if latency_ms > 0 else None
