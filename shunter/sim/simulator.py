"""The discrete-event simulator: real `InstanceEngine`s driven by a virtual clock.

Every instance is an `InstanceEngine` — the same scheduler and block manager
as real serving — with a `SimExecutor` that predicts step durations. The
global scheduler is the real one too. Nothing here models batching or memory.

The loop pops events in (time, kind, sequence) order; each handler may push
follow-on events. Two ways to drive the instances, with identical results:

- step by step (`fast_path=False`): every engine step is a `StepStart` and a
  `StepEnd` event in the queue. Simple and obviously right; slow.
- fast (`fast_path=True`, the default): instance steps are not queued. An
  instance's steps touch nothing but itself, so it is advanced lazily: before
  a cluster event at time T (arrival, control tick, migration stage) every
  instance runs its steps up to T — each step that ends by T is applied, the
  step under way at T is begun — exactly the state the step-by-step loop has
  when it reaches that event. Runs of pure decode steps go through
  `Scheduler.decode_steps`, which applies many steps at once with the same
  effect as single steps and stays suspended between events; before an event
  changes an instance (a request queued there, a migration stage) its run is
  ended (`_end_decode_run`), which brings every request object up to date.

`debug=True` calls `check_invariants()` on the engine after every step.

Autoscaling (`PolicyConfig.scaling`): at each `ScalingDecision` the global
scheduler's `scaling_step` says what to do. A new instance gets the next id
and is paid for from that moment; it joins dispatch at its `InstanceReady`,
`startup_delay` later. A drained instance takes no new work; the migration
policy moves its requests away (Llumnix pairing treats it as infinitely
used), and with migration "none" its requests simply finish there, since
nothing new arrives — no request is ever moved by a policy that says never.
When it stops is the cluster's rule (`cluster/drain.py`, the server's too):
once it holds no request, runs no step and has no migration in flight, it
leaves the global scheduler and stops costing. Instances that stopped stay in
`instances` (their engines can be inspected).

Prefill/decode disaggregation (`SimConfig.pd`): the cluster's rule
(`cluster/disaggregation.py`, the server's too). Instances 0..P-1 are prefill
instances, in the dispatching global scheduler; the D decode instances are in
a second one. When a step on a prefill instance gives a request its first
token, a `HandOff` event at that step's end asks the rule for a decode
instance and starts the migration there like any other. Prefill instances
are always driven step by step (their steps end in cluster events, so they
cannot be advanced lazily past them); decode instances take the fast path.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.disaggregation import MIXED, PREFILL, Disaggregation, PDSplit
from shunter.cluster.drain import stop_if_drained
from shunter.cluster.global_scheduler import GlobalScheduler, MigrationOrder
from shunter.cluster.instance import InProcessInstance, Instance
from shunter.cluster.migration import Migration, MigrationConfig, MigrationCoordinator, MigrationRefused
from shunter.cluster.scaling import ScalingAction
from shunter.config import SchedulerConfig
from shunter.engine import InstanceEngine, SchedulerOutput
from shunter.request import Request, RequestStatus, SamplingParams
from shunter.sim.events import (
    Arrival,
    ControlTick,
    Event,
    EventQueue,
    HandOff,
    InstanceReady,
    MigrationCommit,
    MigrationOrderEvent,
    MigrationStage,
    ScalingDecision,
    StepEnd,
    StepStart,
)
from shunter.sim.executor import RecomputeTracker, SimExecutor
from shunter.sim.latency import LatencyModel
from shunter.sim.metrics import RequestRecord
from shunter.sim.workloads import WorkloadRequest, prompt_token_ids

INF = float("inf")


@dataclass
class SimConfig:
    """What to simulate besides the workload and the latency model.

    scheduler: every instance's scheduler limits (num_blocks = its KV capacity).
    policy: the cluster policies: dispatch, migration (`shunter simulate --list`).
    fast_path: advance instances lazily with decode runs (same results, much faster).
    debug: check engine invariants after every step.
    control_interval: seconds between control-loop ticks, as the instances'
        load-report interval in serving: each tick the dispatcher's view is
        refreshed, load is sampled and migrations are ordered. None: no ticks,
        and the dispatcher reads every instance's report at every arrival (an
        idealised dispatcher with no staleness; no migration policy runs).
    load_sample_interval: seconds between the load samples kept for the report's
        plot (taken at control ticks); None: none kept.
    migration: how migrations run and what copies cost.
    (Autoscaling is `policy.scaling`; the run starts with `num_instances`, within its bounds.)
    gpus_per_instance: GPUs one instance occupies (tensor parallelism), for GPU-seconds.
    pd: prefill/decode disaggregation, P prefill and D decode instances (num_instances must be P + D;
        not with autoscaling); None: every instance is mixed.
    """

    num_instances: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    fast_path: bool = True
    debug: bool = False
    control_interval: float | None = 0.05
    load_sample_interval: float | None = None
    gpus_per_instance: int = 1
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    seed: int = 0
    pd: PDSplit | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_instances, int) or isinstance(self.num_instances, bool) or self.num_instances < 1:
            raise ValueError(f"the number of instances must be a positive integer, got {self.num_instances!r}")
        if self.pd is not None and self.num_instances != self.pd.num_instances:
            raise ValueError(f"P/D {self.pd} runs {self.pd.num_instances} instances, not {self.num_instances}")
        if self.control_interval is not None and not self.control_interval > 0:
            raise ValueError(f"control_interval must be > 0 or None, got {self.control_interval!r}")
        scaling = self.policy.scaling
        if scaling is not None and not scaling.contains(self.num_instances):
            raise ValueError(f"the run starts with {self.num_instances} instances, outside the autoscaling range "
                             f"{scaling.min_instances}..{scaling.max_instances}")
        if self.gpus_per_instance < 1:
            raise ValueError(f"gpus_per_instance must be >= 1, got {self.gpus_per_instance!r}")


@dataclass
class LoadSample:
    """One instance's load at a control tick."""

    time: float
    num_used_blocks: int
    num_running: int
    num_waiting: int


@dataclass
class InstanceSpan:
    """One instance's life in a run, in seconds of virtual time.

    start: ordered (paid for from here; the run's start for the initial instances).
    ready: joined dispatch (None: never, the run ended first).
    drain: drained (None: never).
    stop: stopped, empty (None: still up when the run ended).
    """

    start: float
    ready: float | None = None
    drain: float | None = None
    stop: float | None = None

    def seconds(self, end: float) -> float:
        """Seconds paid for within a run that ends at `end`."""
        stop = end if self.stop is None else min(self.stop, end)
        return max(0.0, stop - min(self.start, end))


@dataclass
class SimResult:
    """Everything a run produced; `shunter.sim.report` turns it into JSON, tables and plots."""

    records: list[RequestRecord]
    rejected: dict[str, str]  # request id -> why it could not be served
    unfinished: list[str]
    migrations: list[Migration]
    instance_ids: list[str]
    load_samples: dict[str, list[LoadSample]]
    instance_num_steps: dict[str, int]
    instance_busy_time: dict[str, float]
    num_total_blocks: int
    start_time: float
    end_time: float
    gpus_per_instance: int = 1
    num_events: int = 0
    prefix_caching: bool = True  # whether the instances cached prefixes (effective, after "auto")
    instance_spans: dict[str, InstanceSpan] = field(default_factory=dict)
    autoscaling: bool = False  # whether the run scaled (`PolicyConfig.scaling`)
    scaling_actions: list[tuple[float, ScalingAction]] = field(default_factory=list)  # (time, action) taken
    pd: PDSplit | None = None  # the P/D split (None: every instance mixed)
    instance_roles: dict[str, str] = field(default_factory=dict)  # instance id -> mixed, prefill or decode
    hand_offs: list[Migration] = field(default_factory=list)  # P/D: the migrations to decode instances started
    hand_off_problems: dict[str, str] = field(default_factory=dict)  # P/D: request id -> why it was not handed off

    @property
    def makespan(self) -> float:
        return self.end_time - self.start_time

    @property
    def instance_seconds(self) -> float:
        """Σ over instances of the time each was paid for: from its order (start-up included) to its stop
        or the run's end. A fixed-size run: instances × makespan."""
        if not self.instance_spans:
            return len(self.instance_ids) * self.makespan
        return sum(span.seconds(self.end_time) for span in self.instance_spans.values())

    def instance_timeline(self) -> list[tuple[float, int, int]]:
        """(time, provisioned, serving) wherever the number of instances changes, up to the run's end.

        Provisioned: ordered and not stopped (what is paid for); serving: up and not draining.
        """
        changes: dict[float, list[int]] = {}
        for span in self.instance_spans.values():
            leaves = span.drain if span.drain is not None else span.stop
            for time, d_provisioned, d_serving in ((span.start, 1, 0), (span.stop, -1, 0), (span.ready, 0, 1),
                                                   (leaves if span.ready is not None else None, 0, -1)):
                if time is not None and time <= self.end_time:
                    change = changes.setdefault(max(time, self.start_time), [0, 0])
                    change[0] += d_provisioned
                    change[1] += d_serving
        timeline, provisioned, serving = [], 0, 0
        for time in sorted(changes):
            provisioned += changes[time][0]
            serving += changes[time][1]
            if not timeline or timeline[-1][1:] != (provisioned, serving):
                timeline.append((time, provisioned, serving))
        return timeline


class SimInstance:
    """An in-process instance plus the simulator's bookkeeping of its steps.

    role: mixed, or prefill / decode under P/D. is_lazy: driven by the fast path (else its steps
    are events in the queue).
    """

    def __init__(self, instance_id: str, config: SchedulerConfig, latency_model: LatencyModel,
                 tracker: RecomputeTracker, role: str = MIXED, is_lazy: bool = True) -> None:
        self.executor = SimExecutor(latency_model, tracker)
        self.engine = InstanceEngine(config, self.executor, instance_id)
        self.instance = InProcessInstance(self.engine)
        self.instance_id = instance_id
        self.role = role
        self.is_lazy = is_lazy
        self.scheduler = self.engine.scheduler
        self.decode_step_ends = latency_model.decode_step_ends
        self.is_busy = False  # a step is under way or due to begin
        self.busy_since = 0.0
        self.busy_time = 0.0
        # Lazy driving (fast path): the step in flight, or when the next one begins.
        self.next_begin: float | None = None
        self.in_flight_end = INF
        self.in_flight_batch: SchedulerOutput | list[Request] | None = None
        self.in_flight_result = None
        self.force_slow_step = False
        self.decode_run = None  # a suspended `Scheduler.decode_steps` coroutine
        self.decode_progress = None  # the `DecodeRun` it yields
        self.held_horizon: float | None = None  # the latest horizon not yet sent to it (see `_advance`)
        self.num_steps_reported = 0  # of the decode run, already added to engine.num_steps
        # Autoscaling: when it was ordered, came up, was drained, stopped.
        self.span = InstanceSpan(0.0, ready=0.0)
        self.is_draining = False

    def __repr__(self) -> str:
        return f"SimInstance({self.instance_id!r})"


class Simulator:
    """Replays a workload on `config.num_instances` simulated instances."""

    def __init__(self, config: SimConfig, latency_model: LatencyModel, workload: Sequence[WorkloadRequest], *,
                 counter: Iterator[int] | None = None, progress: Callable[[int], None] | None = None,
                 stop_if_caching_would_matter: bool = False) -> None:
        self.config = config
        self.latency_model = latency_model
        self.workload = sorted(workload, key=lambda w: w.arrival_time)
        self.queue = EventQueue(counter if counter is not None else itertools.count())
        self.progress = progress
        self.tracker = RecomputeTracker()
        roles = config.pd.roles() if config.pd is not None else [MIXED] * config.num_instances
        # A prefill instance's steps end in hand-offs, cluster events: it is never advanced lazily.
        self.instances = [SimInstance(str(i), config.scheduler, latency_model, self.tracker, role,
                                      is_lazy=config.fast_path and role != PREFILL)
                          for i, role in enumerate(roles)]
        self.by_id = {inst.instance_id: inst for inst in self.instances}
        self._sim_of = {id(inst.instance): inst for inst in self.instances}
        prefill_seconds = prefill_estimator(latency_model, config.scheduler)
        # P/D: the cluster's rule and its two schedulers; `global_scheduler` (dispatch) is the prefill one.
        self.pd: Disaggregation | None = None
        if config.pd is not None:
            self.pd = Disaggregation(config.pd, config.policy, config.seed, prefill_seconds)
            self.global_scheduler = self.pd.prefill
        else:
            self.global_scheduler = GlobalScheduler(policy=config.policy, seed=config.seed,
                                                    prefill_seconds=prefill_seconds)
        self.schedulers = self.pd.schedulers if self.pd is not None else (self.global_scheduler,)
        for inst in self.instances:
            self._scheduler_of(inst).add_instance(inst.instance, inst.engine.load_report(0.0))
        self.hand_offs: list[Migration] = []
        self.hand_off_problems: dict[str, str] = {}
        self.coordinator = MigrationCoordinator(config.migration, config.scheduler.block_size)
        self.refused_orders: list[tuple[MigrationOrder, str]] = []
        self._next_sample_time = -INF
        self.lazy = config.fast_path
        self.now = 0.0
        self.records: list[RequestRecord] = []
        self.rejected: dict[str, str] = {}
        self.migrations: list[Migration] = []
        self.load_samples: dict[str, list[LoadSample]] = {inst.instance_id: [] for inst in self.instances}
        self.num_events = 0
        self.num_preemptions = 0
        self.scaling_actions: list[tuple[float, ScalingAction]] = []
        self._num_starting = 0  # instances ordered, not up yet
        self._next_arrival = 0
        self._has_run = False
        # For prefix caching "auto" (see `simulate`): give up as soon as caching could change the result.
        self._stop_if_caching_would_matter = stop_if_caching_would_matter
        self._first_prompt_tokens: set[int] = set()

    # ---- public --------------------------------------------------------------------
    def schedule_migration(self, time: float, request_id: str, src_id: str, dst_id: str) -> None:
        """Order a migration of `request_id` from instance `src_id` to `dst_id` at `time`.

        ValueError now for unknown or identical instances; at `time`, an order the
        coordinator refuses (the request is already migrating) or one naming an instance
        that is not up then (starting or stopped by the autoscaler) lands in `refused_orders`,
        and one whose request is not there then is recorded as an aborted migration.
        """
        if src_id == dst_id:
            raise ValueError(f"a migration needs two different instances, got {src_id!r} twice")
        self._instance(src_id)
        self._instance(dst_id)
        self.queue.push(MigrationOrderEvent(time, MigrationOrder(request_id, src_id, dst_id)))

    def run(self) -> SimResult:
        """Run to completion (every request finished or rejected) and return the result."""
        if self._has_run:
            raise RuntimeError("a Simulator runs once; build a new one")
        self._has_run = True
        start = self.workload[0].arrival_time if self.workload else 0.0
        for inst in self.instances:
            inst.span = InstanceSpan(start, ready=start)
        self._push_next_arrival()
        if self.config.control_interval is not None:
            self.queue.push(ControlTick(start))
        if self.config.policy.scaling is not None:
            self.queue.push(ScalingDecision(start + self.config.policy.scaling.interval))
        queue = self.queue
        while queue:
            event = queue.pop()
            self.now = event.time
            self.num_events += 1
            if self.lazy and event.is_cluster:
                self._advance_all(event.time)
            self._handle(event)
        if self.lazy:
            self._advance_all(INF)
        return self._result(start)

    # ---- events ------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        kind = type(event)
        if kind is StepEnd:
            self._on_step_end(event)
        elif kind is StepStart:
            self._on_step_start(event)
        elif kind is Arrival:
            self._on_arrival(event)
        elif kind is MigrationStage:
            self._run_stage(event.migration, event.time)
        elif kind is MigrationOrderEvent:
            self._start_migration(event.order, event.time)
        elif kind is MigrationCommit:
            self._on_migration_commit(event.migration, event.time)
        elif kind is ControlTick:
            self._on_control_tick(event.time)
        elif kind is ScalingDecision:
            self._on_scaling_decision(event.time)
        elif kind is InstanceReady:
            self._on_instance_ready(event.instance, event.time)
        elif kind is HandOff:
            self._on_hand_off(event.instance, event.request_id, event.time)
        else:
            raise TypeError(f"unknown event {event!r}")

    def _push_next_arrival(self) -> None:
        if self._next_arrival < len(self.workload):
            self.queue.push(Arrival(self.workload[self._next_arrival].arrival_time, self._next_arrival))
            self._next_arrival += 1

    def _on_arrival(self, event: Arrival) -> None:
        self._push_next_arrival()
        wr = self.workload[event.index]
        if wr.num_output_tokens < 1:
            self._reject(wr.request_id, "asks for no output token")
            return
        prompt = prompt_token_ids(wr)
        if self._stop_if_caching_would_matter:
            if prompt[0] in self._first_prompt_tokens:
                raise CachingWouldMatter(f"requests share a prompt prefix (request {wr.request_id})")
            self._first_prompt_tokens.add(prompt[0])
        request = Request(
            request_id=wr.request_id,
            prompt_token_ids=prompt,
            # Outputs must be exactly the workload's length: no EOS, max_tokens = that length.
            sampling_params=SamplingParams(temperature=0.0, max_tokens=wr.num_output_tokens, ignore_eos=True),
            arrival_time=wr.arrival_time,
            priority=wr.priority,
            ttft_slo=wr.ttft_slo,
            tpot_slo=wr.tpot_slo,
        )
        if self.config.control_interval is None:
            self.global_scheduler.collect_reports(event.time)
        instance = self.global_scheduler.select_instance(request, event.time)
        inst = self._sim_of[id(instance)]
        self._end_decode_run(inst)
        try:
            self.global_scheduler.assign(request, instance)
        except ValueError as e:  # can never fit an instance (context or KV capacity)
            self._reject(wr.request_id, str(e))
            return
        self._wake(inst, event.time)

    def _reject(self, request_id: str, reason: str) -> None:
        self.rejected[request_id] = reason
        if self.progress is not None:
            self.progress(1)

    def _on_control_tick(self, now: float) -> None:
        is_sampling = self.config.load_sample_interval is not None and now >= self._next_sample_time
        if is_sampling:
            self._next_sample_time = now + self.config.load_sample_interval
        # Under P/D each role's scheduler balances its own instances; requests cross roles by hand-off only.
        for gs in self.schedulers:
            reports = gs.collect_reports(now)
            if is_sampling:
                for report in reports:
                    self.load_samples[report.instance_id].append(
                        LoadSample(now, report.num_used_blocks, report.num_running, report.num_waiting))
            for order in gs.migration_orders(now, self.coordinator.num_active):
                self._start_migration(order, now)
        if self._has_pending_work():
            # k * interval rather than repeated addition: tick times do not drift.
            k = round((now - self._tick_origin()) / self.config.control_interval) + 1
            self.queue.push(ControlTick(self._tick_origin() + k * self.config.control_interval))

    def _tick_origin(self) -> float:
        return self.workload[0].arrival_time if self.workload else 0.0

    # ---- autoscaling: instances come and go ------------------------------------------------
    def _on_scaling_decision(self, now: float) -> None:
        gs = self.global_scheduler
        scaling = gs.policy.scaling
        if self.config.control_interval is None:  # no control ticks refresh the view
            gs.collect_reports(now)
        action = gs.scaling_step(now, self._num_starting)
        if not action.is_noop:
            self.scaling_actions.append((now, action))
            for _ in range(action.num_add):
                self._start_instance(now, scaling.startup_delay)
            if action.drain_id is not None:
                self._drain(self._instance(action.drain_id), now)
        if self._has_pending_work():
            k = round((now - self._tick_origin()) / scaling.interval) + 1
            self.queue.push(ScalingDecision(self._tick_origin() + k * scaling.interval))

    def _start_instance(self, now: float, startup_delay: float) -> None:
        """Order a new instance (the next id): paid for from now, it joins dispatch `startup_delay` later."""
        inst = SimInstance(str(len(self.instances)), self.config.scheduler, self.latency_model, self.tracker,
                           is_lazy=self.lazy)
        inst.span = InstanceSpan(now)
        self.instances.append(inst)
        self.by_id[inst.instance_id] = inst
        self._sim_of[id(inst.instance)] = inst
        self.load_samples[inst.instance_id] = []
        self._num_starting += 1
        self.queue.push(InstanceReady(now + startup_delay, inst))

    def _on_instance_ready(self, inst: SimInstance, now: float) -> None:
        self._num_starting -= 1
        inst.span.ready = now
        self.global_scheduler.add_instance(inst.instance, inst.engine.load_report(now))

    def _drain(self, inst: SimInstance, now: float) -> None:
        """No new work for `inst`; it stops once empty (`_stop_if_drained`)."""
        self.global_scheduler.drain(inst.instance_id)
        inst.is_draining = True
        inst.span.drain = now
        self._stop_if_drained(inst, now)

    def _stop_if_drained(self, inst: SimInstance, now: float) -> None:
        """Stop a draining instance once the cluster's rule (`stop_if_drained`) lets it go."""
        if not stop_if_drained(self._scheduler_of(inst), inst.instance_id,
                               has_requests=inst.engine.has_unfinished_requests,
                               num_migrations=self.coordinator.num_active(inst.instance_id), is_stepping=inst.is_busy):
            return
        bm = inst.scheduler.block_manager
        if bm.num_free_blocks != bm.num_blocks:
            raise RuntimeError(f"instance {inst.instance_id} is empty but holds {bm.num_used_blocks} KV blocks")
        if self.config.debug:
            inst.engine.check_invariants()
        inst.is_draining = False
        inst.span.stop = now

    def _scheduler_of(self, inst: SimInstance) -> GlobalScheduler:
        return self.pd.scheduler_for(inst.role) if self.pd is not None else self.global_scheduler

    def _has_pending_work(self) -> bool:
        return (self._next_arrival < len(self.workload) or any(inst.is_busy for inst in self.instances)
                or bool(self.coordinator.active))

    # ---- driving instances: step by step ------------------------------------------------
    def _wake(self, inst: SimInstance, now: float) -> None:
        """Make sure an instance with work steps again (a new request, an import, freed blocks)."""
        if inst.is_busy:
            return
        inst.is_busy = True
        inst.busy_since = now
        if inst.is_lazy:
            inst.next_begin = now
        else:
            self.queue.push(StepStart(now, inst))

    def _go_idle(self, inst: SimInstance, now: float) -> None:
        inst.is_busy = False
        inst.next_begin = None
        inst.busy_time += now - inst.busy_since
        if inst.is_draining:
            self._stop_if_drained(inst, now)

    def _begin_step(self, inst: SimInstance, now: float):
        batch, result = inst.engine.begin_step(now)
        if batch.preempted_request_ids:
            self.num_preemptions += len(batch.preempted_request_ids)
            if self._stop_if_caching_would_matter:
                raise CachingWouldMatter(f"request {batch.preempted_request_ids[0]} was preempted at {now:.3f} s")
        return batch, result

    def _on_step_start(self, event: StepStart) -> None:
        inst = event.instance
        batch, result = self._begin_step(inst, event.time)
        if batch.is_empty:
            self._go_idle(inst, event.time)
            return
        self.queue.push(StepEnd(event.time + result.elapsed, inst, batch, result))

    def _on_step_end(self, event: StepEnd) -> None:
        inst = event.instance
        self._end_slow_step(inst, event.batch, event.result, event.time)
        self.queue.push(StepStart(event.time, inst))

    def _end_slow_step(self, inst: SimInstance, batch: SchedulerOutput, result, now: float) -> None:
        deltas = inst.engine.end_step(batch, result, now)
        finished = None
        for d in deltas:
            if d.finish_reason is not None:
                if finished is None:
                    by_id = {s.request.request_id: s.request for s in batch.scheduled}
                    finished = []
                finished.append(by_id[d.request_id])
            elif inst.role == PREFILL and d.output_index == 0 and d.new_token_ids:
                # Its first token (prefill instances are never lazy, so this is the step-end's own time).
                self.queue.push(HandOff(now, inst, d.request_id))
        if finished:
            self._record(inst, finished)
        if self.config.debug:
            inst.engine.check_invariants()

    # ---- driving instances: lazily (fast path) --------------------------------------------
    def _advance_all(self, until: float) -> None:
        for inst in self.instances:
            if inst.is_busy and inst.is_lazy:
                self._advance(inst, until)

    def _advance(self, inst: SimInstance, until: float) -> None:
        """Run `inst`'s steps so that it is in the state the step-by-step loop has at a cluster event at `until`.

        Steps ending at or before `until` are applied (StepEnd sorts before
        cluster events); steps beginning before `until` are begun (StepStart
        sorts after them, so one beginning exactly at `until` waits).
        """
        scheduler = inst.scheduler
        engine = inst.engine
        debug = self.config.debug
        while True:
            if inst.decode_run is not None:
                if until < inst.decode_progress.quiet_until:
                    # Nothing a load report or a handler can see changes by then: skip the
                    # coroutine's round trip; the next horizon it is sent covers this one.
                    inst.held_horizon = until
                    return
                if self._send_horizon(inst, until):
                    return
                continue
            batch = inst.in_flight_batch
            if batch is not None:
                end = inst.in_flight_end
                if end > until:
                    return
                inst.in_flight_batch = None
                inst.in_flight_end = INF
                if type(batch) is list:
                    finished = scheduler.end_decode_step(batch, inst.executor.token_id, end)
                    engine.num_steps += 1
                    if finished:
                        self._record(inst, finished)
                    if debug:
                        engine.check_invariants()
                else:
                    self._end_slow_step(inst, batch, inst.in_flight_result, end)
                    inst.in_flight_result = None
                inst.next_begin = end
            begin = inst.next_begin
            if begin is None or begin >= until:
                return
            if not inst.force_slow_step and scheduler.can_run_decodes():
                if debug:  # one step at a time, so the invariants are checked after each
                    run = scheduler.run_decode_steps(begin, until, inst.decode_step_ends, inst.executor.token_id,
                                                     max_steps=1)
                    inst.num_steps_reported = 0
                    self._collect_decode_run(inst, run)
                    if run.num_steps:
                        engine.check_invariants()
                    self._after_decode_run(inst, run)
                else:
                    inst.decode_run = scheduler.decode_steps(begin, inst.decode_step_ends, inst.executor.token_id)
                    inst.decode_progress = next(inst.decode_run)
                    inst.num_steps_reported = 0
                    inst.next_begin = None
                continue
            inst.force_slow_step = False
            batch, result = self._begin_step(inst, begin)
            if batch.is_empty:
                self._go_idle(inst, begin)
                return
            inst.in_flight_batch = batch
            inst.in_flight_result = result
            inst.in_flight_end = begin + result.elapsed
            inst.next_begin = None

    def _send_horizon(self, inst: SimInstance, until: float) -> bool:
        """Run the suspended decode run up to `until`; False if it ended there."""
        run = inst.decode_run.send(until)
        inst.held_horizon = None
        self._collect_decode_run(inst, run)
        if not run.is_done:
            return True
        inst.decode_run = None
        self._after_decode_run(inst, run)
        return False

    def _collect_decode_run(self, inst: SimInstance, run) -> None:
        if run.finished:
            self._record(inst, run.finished)
            run.finished.clear()
        inst.engine.num_steps += run.num_steps - inst.num_steps_reported
        inst.num_steps_reported = run.num_steps

    def _after_decode_run(self, inst: SimInstance, run) -> None:
        if run.in_flight is not None:
            inst.in_flight_batch = run.in_flight
            inst.in_flight_end = run.in_flight_end
            inst.next_begin = None
        else:
            inst.next_begin = run.time
            inst.force_slow_step = run.is_blocked

    def _end_decode_run(self, inst: SimInstance) -> None:
        """End a suspended decode run before anything changes the instance's requests (see `decode_steps`)."""
        if inst.decode_run is not None and inst.held_horizon is not None:
            # Where the run stands must be as of the latest horizon, not the latest one sent.
            horizon = inst.held_horizon
            if not self._send_horizon(inst, horizon):
                self._advance(inst, horizon)
        if inst.decode_run is not None:
            run = inst.decode_run.send(None)
            inst.decode_run = None
            self._collect_decode_run(inst, run)
            self._after_decode_run(inst, run)

    # ---- migration ---------------------------------------------------------------------------
    def _instance(self, instance_id: str) -> SimInstance:
        try:
            return self.by_id[instance_id]
        except KeyError:
            raise ValueError(f"no instance {instance_id!r}; instances: {', '.join(self.by_id)}") from None

    def _start_migration(self, order: MigrationOrder, now: float) -> None:
        """Start an order; one that cannot start lands in `refused_orders`."""
        try:
            self._migrate(order, now)
        except MigrationRefused as e:
            self.refused_orders.append((order, str(e)))

    def _migrate(self, order: MigrationOrder, now: float) -> Migration:
        """Start an order and run its first stage; MigrationRefused (nothing changed) if it cannot start."""
        src, dst = self._instance(order.src_id), self._instance(order.dst_id)
        for inst in (src, dst):
            if inst.span.ready is None or inst.span.stop is not None:  # an order given ahead of time
                raise MigrationRefused(f"instance {inst.instance_id} is not up")
        migration = self.coordinator.start(order.request_id, src.instance, dst.instance, now)
        self.migrations.append(migration)
        self._run_stage(migration, now)
        return migration

    def _on_hand_off(self, src: SimInstance, request_id: str, now: float) -> None:
        """P/D: a request has its first token on prefill instance `src`; the cluster's rule moves it on."""
        request = src.engine.get_request(request_id)
        if request is None or request.is_finished:
            return
        if self.config.control_interval is None:  # no control ticks refresh the decode scheduler's view
            self.pd.decode.collect_reports(now)

        def migrate(dst: Instance) -> None:
            self.hand_offs.append(self._migrate(MigrationOrder(request_id, src.instance_id, dst.instance_id), now))

        outcome = self.pd.hand_off(request, src.instance_id, now, migrate)
        if outcome.problem is not None:
            self.hand_off_problems[request_id] = outcome.problem

    def _run_stage(self, m: Migration, now: float) -> None:
        """Plan the migration's next stage; its copy takes `copy_time` of virtual time."""
        src, dst = self._sim_of[id(m.src)], self._sim_of[id(m.dst)]
        self._end_decode_run(src)
        self._end_decode_run(dst)
        plan = self.coordinator.advance(m, now)
        if plan is None:  # aborted, or a waiting request moved at once
            self._after_migration(m, now)
            return
        done = now + self.config.migration.copy_time(plan.num_blocks)
        self.queue.push(MigrationCommit(done, m) if plan.is_final else MigrationStage(done, m))

    def _on_migration_commit(self, m: Migration, now: float) -> None:
        self._end_decode_run(self._sim_of[id(m.src)])
        self._end_decode_run(self._sim_of[id(m.dst)])
        self.coordinator.commit(m, now)
        self._after_migration(m, now)

    def _after_migration(self, m: Migration, now: float) -> None:
        # Either side may have work to resume: the imported request, a request un-suspended by an
        # abort, or queued requests that fit in blocks just freed.
        for inst in (self._sim_of[id(m.src)], self._sim_of[id(m.dst)]):
            if inst.engine.has_unfinished_requests:
                self._wake(inst, now)
            elif inst.is_draining:
                self._stop_if_drained(inst, now)

    # ---- results -------------------------------------------------------------------------------
    def _record(self, inst: SimInstance, finished: list[Request]) -> None:
        pop = self.tracker.pop
        for r in finished:
            if r.status is RequestStatus.FINISHED_MIGRATED or r.status is RequestStatus.FINISHED_ABORTED:
                continue
            self.records.append(RequestRecord(
                request_id=r.request_id,
                instance_id=inst.instance_id,
                arrival_time=r.arrival_time,
                first_token_time=r.first_token_time,
                finish_time=r.finish_time,
                num_prompt_tokens=len(r.prompt_token_ids),
                num_output_tokens=len(r.output_token_ids),
                priority=r.priority,
                num_preemptions=r.num_preemptions,
                num_migrations=r.num_migrations,
                recomputed_tokens=pop(r.request_id),
                ttft_slo=r.ttft_slo,
                tpot_slo=r.tpot_slo,
            ))
        if self.progress is not None:
            self.progress(len(finished))

    def _result(self, start: float) -> SimResult:
        unfinished = sorted(rid for inst in self.instances for rid in inst.scheduler.requests)
        records = sorted(self.records, key=lambda r: (r.arrival_time, r.request_id))
        end = max((r.finish_time for r in records), default=start)
        return SimResult(
            records=records,
            rejected=self.rejected,
            unfinished=unfinished,
            migrations=self.migrations,
            instance_ids=[inst.instance_id for inst in self.instances],
            load_samples=self.load_samples,
            instance_num_steps={inst.instance_id: inst.engine.num_steps for inst in self.instances},
            instance_busy_time={inst.instance_id: inst.busy_time for inst in self.instances},
            num_total_blocks=self.config.scheduler.num_blocks,
            start_time=start,
            end_time=end,
            gpus_per_instance=self.config.gpus_per_instance,
            num_events=self.num_events,
            prefix_caching=self.config.scheduler.enable_prefix_caching,
            instance_spans={inst.instance_id: inst.span for inst in self.instances},
            autoscaling=self.config.policy.scaling is not None,
            scaling_actions=self.scaling_actions,
            pd=self.config.pd,
            instance_roles={inst.instance_id: inst.role for inst in self.instances},
            hand_offs=self.hand_offs,
            hand_off_problems=self.hand_off_problems,
        )


def prefill_estimator(latency_model: LatencyModel, config: SchedulerConfig) -> Callable[[int], float]:
    """Predicted seconds to prefill n queued tokens on one instance: full-budget prefill steps.

    What the `slo` dispatch policy ranks instances by; attention over long
    contexts and interleaved decodes are left out (a lower bound).
    """
    budget = config.max_num_batched_tokens
    per_step = latency_model.step_time([(budget, 0)], 0, 0)
    return lambda num_tokens: -(-num_tokens // budget) * per_step


class CachingWouldMatter(Exception):
    """Raised inside a run without prefix caching once caching could change its outcome."""


PREFIX_CACHING_MODES = ("auto", "on", "off")


def simulate(config: SimConfig, latency_model: LatencyModel, workload: Sequence[WorkloadRequest], *,
             prefix_caching: str = "auto", progress: Callable[[int], None] | None = None) -> SimResult:
    """Run one simulation; `prefix_caching` "on"/"off" sets the instances' prefix caching, "auto" gets
    the exact result of "on" at the cost of "off" where it can.

    "auto": a workload with prefix blocks (Mooncake) runs with caching. Otherwise every
    prompt is private to its request, and a request can hit the cache only for its own
    blocks after it was preempted; until the first preemption a run with caching and one
    without make the same decisions step for step (allocation succeeds or fails alike, no
    lookup hits). So the run starts without caching (no per-block hashing) and restarts
    with caching at the first preemption, or if two prompts start with the same token.
    """
    if prefix_caching not in PREFIX_CACHING_MODES:
        raise ValueError(f"prefix_caching must be one of {', '.join(PREFIX_CACHING_MODES)}, got {prefix_caching!r}")
    if prefix_caching != "auto" or any(w.prefix_block_ids for w in workload):
        config = _with_prefix_caching(config, prefix_caching != "off")
        return Simulator(config, latency_model, workload, progress=progress).run()
    reported = 0

    def count(n: int) -> None:
        nonlocal reported
        reported += n
        if progress is not None:
            progress(n)

    try:
        return Simulator(_with_prefix_caching(config, False), latency_model, workload, progress=count,
                         stop_if_caching_would_matter=True).run()
    except CachingWouldMatter:
        if progress is not None and reported:
            progress(-reported)
        return Simulator(_with_prefix_caching(config, True), latency_model, workload, progress=progress).run()


def _with_prefix_caching(config: SimConfig, enabled: bool) -> SimConfig:
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, enable_prefix_caching=enabled))
