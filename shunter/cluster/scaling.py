"""Autoscaling policies, registered by name: when to add instances and which one to drain.

A scaling policy is one function `(view, config, load, state) -> ScalingAction`
over the global scheduler's view of its instances (the last report of each plus
what it dispatched since; draining instances flagged) and the number of
instances ordered but still starting up. It is torch-free and clock-free: the
time comes in `view.now`, and what it must remember between decisions (how long
a signal has held, when it last acted) lives in a `ScalingState` that the global
scheduler owns. The driver (simulator or server) carries the action out: it
starts the new instances, which join dispatch once up, and drains the named one
(`GlobalScheduler.drain`), which migration empties and the driver removes once
it has nothing left.

Adding a policy is one function plus its `@SCALING.register(...)` line.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from shunter.cluster.load import LoadConfig, kv_demand_blocks
from shunter.registry import Registry

if TYPE_CHECKING:
    from shunter.engine import LoadReport

INF = math.inf

# Keep the cluster's freeness within a band of decode steps, as Llumnix's auto-scaling does; these
# defaults are a starting point, not tuned here.
DEFAULT_SCALE_UP_FREENESS = 10.0
DEFAULT_SCALE_DOWN_FREENESS = 60.0
DEFAULT_SUSTAIN = 10.0  # seconds a signal must hold before the policy acts
DEFAULT_COOLDOWN = 20.0  # seconds after an action before the next one
DEFAULT_STARTUP_DELAY = 30.0  # seconds from ordering an instance to its first request (weights, warm-up)
DEFAULT_INTERVAL = 1.0  # seconds between decisions
# The `shunter` policy: size the fleet so that the KV demand fills this fraction of it. Queues form on
# Azure conversation (A10, llama-2-7b) once the cluster's usage passes ~0.9; the gap is the demand that
# can arrive while a new instance starts up.
DEFAULT_TARGET_USAGE = 0.7
DEFAULT_SCALE_DOWN_WINDOW = 120.0  # seconds: drain only below the peak need of this long a window


@dataclass
class ScalingConfig:
    """Autoscaling bounds, thresholds and timing (one run or one server).

    min_instances, max_instances: the cluster never has fewer serving
        instances than `min_instances`, nor more provisioned ones (serving,
        starting up or draining: each holds a GPU) than `max_instances`.
    policy: the scaling policy's name (`SCALING`).
    scale_up_freeness: add instances once the cluster's freeness (see
        `cluster_freeness`) stays below this for `sustain` seconds.
    scale_down_freeness: drain an instance once the cluster's freeness without
        it stays above this for `sustain` seconds. Must exceed
        `scale_up_freeness`: the band between them is what keeps the size steady.
    sustain: seconds a signal must hold, at every decision, before acting.
    cooldown: seconds after an action during which no other is taken.
    startup_delay: seconds from ordering an instance until it takes requests;
        it is paid for from the order on.
    interval: seconds between decisions.
    target_usage: (`shunter` policy) the fraction of the fleet's KV blocks the
        demand should fill; the rest is headroom for what arrives during a start-up.
    scale_down_window: (`shunter` policy) seconds of history whose peak need
        the fleet keeps: it shrinks only once a lull has lasted this long.
    """

    min_instances: int = 1
    max_instances: int = 1
    policy: str = "freeness"
    scale_up_freeness: float = DEFAULT_SCALE_UP_FREENESS
    scale_down_freeness: float = DEFAULT_SCALE_DOWN_FREENESS
    sustain: float = DEFAULT_SUSTAIN
    cooldown: float = DEFAULT_COOLDOWN
    startup_delay: float = DEFAULT_STARTUP_DELAY
    interval: float = DEFAULT_INTERVAL
    target_usage: float = DEFAULT_TARGET_USAGE
    scale_down_window: float = DEFAULT_SCALE_DOWN_WINDOW

    def __post_init__(self) -> None:
        for name in ("min_instances", "max_instances"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) must not exceed max_instances "
                             f"({self.max_instances})")
        if not (math.isfinite(self.scale_up_freeness) and math.isfinite(self.scale_down_freeness)):
            raise ValueError(f"scaling freeness thresholds must be finite, got {self.scale_up_freeness!r} and "
                             f"{self.scale_down_freeness!r}")
        if not self.scale_down_freeness > self.scale_up_freeness:
            raise ValueError(f"the scale-down freeness ({self.scale_down_freeness!r}) must exceed the scale-up "
                             f"freeness ({self.scale_up_freeness!r})")
        if not 0 < self.target_usage <= 1:
            raise ValueError(f"target_usage must lie in (0, 1], got {self.target_usage!r}")
        for name in ("sustain", "cooldown", "startup_delay", "scale_down_window"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise ValueError(f"the scaling interval must be > 0 seconds, got {self.interval!r}")
        self.policy = SCALING.canonical(self.policy)

    def contains(self, num_instances: int) -> bool:
        return self.min_instances <= num_instances <= self.max_instances


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What a scaling policy sees: the global scheduler's view of each instance, in its order.

    reports[i]: the instance's last report plus what was dispatched to it since.
    is_draining[i]: it takes no new work and is being emptied.
    num_starting: instances ordered and not yet up (not in `reports`).
    now: the decision's time.
    """

    reports: Sequence[LoadReport]
    is_draining: Sequence[bool]
    num_starting: int
    now: float


@dataclass
class ScalingState:
    """What a policy remembers between decisions (owned by the global scheduler, written by the policy).

    up_since, down_since: when the current streak of the scale-up (-down)
        signal began; None when the signal is off.
    last_action_time: when the policy last acted.
    needs: (time, instances needed) of the recent decisions, oldest first,
        kept for one scale-down window (`shunter` policy).
    first_time: the time of the first decision (`shunter` policy).
    """

    up_since: float | None = None
    down_since: float | None = None
    last_action_time: float = -INF
    needs: deque[tuple[float, int]] = field(default_factory=deque)
    first_time: float | None = None


@dataclass(frozen=True, slots=True)
class ScalingAction:
    """Start `num_add` new instances, and/or drain `drain_id`; both empty: keep the cluster as it is.

    freeness: the cluster freeness the decision was taken on (for reports).
    """

    num_add: int = 0
    drain_id: str | None = None
    freeness: float = INF

    @property
    def is_noop(self) -> bool:
        return self.num_add == 0 and self.drain_id is None


ScalingPolicy = Callable[[ClusterView, ScalingConfig, LoadConfig, ScalingState], ScalingAction]

SCALING: Registry[ScalingPolicy] = Registry("scaling policy")


def cluster_freeness(view: ClusterView, load: LoadConfig, without: int | None = None) -> float:
    """Freeness of the cluster as one pool: (capacity − usage) / requests, in decode steps.

    Per-instance freeness is +∞ on an idle instance, so its plain mean is
    useless (one idle instance makes it +∞), and capping each instance at some
    value would make the threshold depend on the cap. Pooling instead sums
    blocks and requests over the cluster, as Llumnix's own scaling code does:
    an idle instance adds its capacity and no requests, a busy one its usage
    and batch, and the quotient is "how many more decode steps every request
    could take if the cluster's memory were one pool" — which migration
    approximates. It is +∞ only when the cluster holds no request at all.

    - capacity: the KV blocks of the serving (non-draining) instances, plus
      the instances starting up, each counted at the serving ones' mean
      capacity (they will take load as soon as they are up, so a policy that
      ordered them does not order them again while they boot). `without`
      (an index into `view.reports`) leaves that instance's capacity out: the
      cluster as it would be if it were drained.
    - usage: used blocks, the blocks *every* waiting request needs (a queue
      is demand the cluster must carry, not only its head as for dispatch) and
      the priority headroom, over every instance, draining ones included:
      their requests are about to land on the others.
    - requests: running plus waiting, over every instance.

    Negative when demand exceeds capacity: the deeper, the more to add.
    """
    capacity = 0.0
    num_serving = 0
    serving_capacity = 0
    usage = 0.0
    num_requests = 0
    for i, (r, draining) in enumerate(zip(view.reports, view.is_draining)):
        if not draining:
            num_serving += 1
            serving_capacity += r.num_total_blocks
            if i != without:
                capacity += r.num_total_blocks
        usage += kv_demand_blocks(r, load)
        num_requests += r.num_running + r.num_waiting
    if num_serving:
        capacity += view.num_starting * serving_capacity / num_serving
    if num_requests == 0:
        return INF
    return (capacity - usage) / num_requests


def emptiest(view: ClusterView) -> int | None:
    """The serving instance with the fewest requests (running + waiting); None if none serves.

    Ties go to the highest index, i.e. the instance added last: the oldest
    survive, so instance ids stay low and stable and, serving for real, the
    instances with the warmest caches and longest track record stay.
    """
    best = None
    best_load = INF
    for i, (r, draining) in enumerate(zip(view.reports, view.is_draining)):
        n = r.num_running + r.num_waiting
        if not draining and n <= best_load:
            best, best_load = i, n
    return best


def _streak(since: float | None, signal: bool, now: float) -> float | None:
    if not signal:
        return None
    return now if since is None else since


@SCALING.register("freeness")
def freeness_scaling(view: ClusterView, cfg: ScalingConfig, load: LoadConfig, state: ScalingState) -> ScalingAction:
    """Llumnix-style: keep the cluster's freeness between the two thresholds.

    Scale up when `cluster_freeness` stays below `scale_up_freeness` for
    `sustain` seconds: add the fewest instances (at the serving ones' mean
    capacity) that lift it to the threshold, at least one, within
    `max_instances` provisioned (serving + starting + draining). Scale down
    when the cluster's freeness *without* its emptiest serving instance stays
    above `scale_down_freeness` for `sustain` seconds — asking about the
    cluster after the drain, not before, is what keeps a drain from pushing
    it straight back below the scale-up threshold — and drain that instance,
    one at a time, never below `min_instances` serving, and not while
    instances are starting up (they were ordered because load was high).
    After any action, nothing happens for `cooldown` seconds and both
    signals start their streaks afresh.
    """
    now = view.now
    freeness = cluster_freeness(view, load)
    candidate = emptiest(view)
    freeness_without = cluster_freeness(view, load, without=candidate) if candidate is not None else -INF
    state.up_since = _streak(state.up_since, freeness < cfg.scale_up_freeness, now)
    state.down_since = _streak(state.down_since, freeness_without > cfg.scale_down_freeness, now)
    if now - state.last_action_time < cfg.cooldown:
        return ScalingAction(freeness=freeness)
    num_draining = sum(1 for d in view.is_draining if d)
    num_serving = len(view.reports) - num_draining
    action = None
    if state.up_since is not None and now - state.up_since >= cfg.sustain:
        room = cfg.max_instances - (num_serving + view.num_starting + num_draining)
        if room > 0:
            action = ScalingAction(num_add=min(room, _num_to_add(view, load, cfg.scale_up_freeness)),
                                   freeness=freeness)
    elif (state.down_since is not None and now - state.down_since >= cfg.sustain and view.num_starting == 0
          and num_serving - 1 >= cfg.min_instances):
        action = ScalingAction(drain_id=view.reports[candidate].instance_id, freeness=freeness)
    if action is None:
        return ScalingAction(freeness=freeness)
    state.up_since = state.down_since = None
    state.last_action_time = now
    return action


def _num_to_add(view: ClusterView, load: LoadConfig, target: float) -> int:
    """The fewest instances of the serving ones' mean capacity that lift the cluster's freeness to `target`."""
    serving = [r.num_total_blocks for r, d in zip(view.reports, view.is_draining) if not d]
    if not serving:
        return 1
    mean_capacity = sum(serving) / len(serving)
    num_requests = sum(r.num_running + r.num_waiting for r in view.reports)
    freeness = cluster_freeness(view, load)
    # (capacity + k·mean − usage) / requests >= target  <=>  k >= (target − freeness) · requests / mean
    return max(1, math.ceil((target - freeness) * num_requests / mean_capacity - 1e-9))


def demand_blocks(view: ClusterView, load: LoadConfig) -> float:
    """The KV blocks the cluster's requests hold or wait for: used + every waiting request's + headroom,
    over every instance, draining ones included (their requests are about to land on the others)."""
    return sum(kv_demand_blocks(r, load) for r in view.reports)


@SCALING.register("shunter")
def demand_scaling(view: ClusterView, cfg: ScalingConfig, load: LoadConfig, state: ScalingState) -> ScalingAction:
    """Size the fleet from the KV demand: up at once by as many as needed, down slowly, one at a time.

    The need is the fewest instances (at the serving ones' mean capacity)
    whose blocks the demand (`demand_blocks`) fills to `target_usage`.
    Scale up as soon as the need exceeds the instances serving or starting,
    by the difference at once, within `max_instances` provisioned: a
    start-up takes `startup_delay`, so waiting for a signal to hold only
    lets a queue build. Scale down only when the peak need over the last
    `scale_down_window` seconds is below the instances serving (and none is
    starting): a lull must last before it shrinks the fleet, since the
    demand that comes back after a short one would find it too small for a
    whole start-up. Drain the emptiest serving instance, one per `cooldown`
    seconds, never below `min_instances` serving. No drain before one window
    of history has been seen.
    """
    now = view.now
    if state.first_time is None:
        state.first_time = now
    serving = [r.num_total_blocks for r, d in zip(view.reports, view.is_draining) if not d]
    num_serving = len(serving)
    num_draining = len(view.reports) - num_serving
    mean_capacity = sum(serving) / num_serving if serving else 0
    freeness = cluster_freeness(view, load)
    if not mean_capacity:
        return ScalingAction(freeness=freeness)
    need = max(cfg.min_instances, math.ceil(demand_blocks(view, load) / (cfg.target_usage * mean_capacity) - 1e-9))
    state.needs.append((now, need))
    while state.needs and state.needs[0][0] < now - cfg.scale_down_window:
        state.needs.popleft()
    room = cfg.max_instances - (num_serving + view.num_starting + num_draining)
    if need > num_serving + view.num_starting and room > 0:
        state.last_action_time = now
        return ScalingAction(num_add=min(room, need - num_serving - view.num_starting), freeness=freeness)
    peak = max(n for _, n in state.needs)
    if (now - state.first_time >= cfg.scale_down_window and now - state.last_action_time >= cfg.cooldown
            and view.num_starting == 0 and peak < num_serving and num_serving - 1 >= cfg.min_instances):
        state.last_action_time = now
        return ScalingAction(drain_id=view.reports[emptiest(view)].instance_id, freeness=freeness)
    return ScalingAction(freeness=freeness)
