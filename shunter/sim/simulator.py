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
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from shunter.cluster.global_scheduler import GlobalScheduler, MigrationOrder
from shunter.cluster.instance import InProcessInstance
from shunter.config import SchedulerConfig
from shunter.engine import InstanceEngine, SchedulerOutput
from shunter.request import Request, RequestStatus, SamplingParams
from shunter.sim.events import (
    Arrival,
    ControlTick,
    Event,
    EventQueue,
    MigrationCommit,
    MigrationStage,
    ScalingDecision,
    StepEnd,
    StepStart,
)
from shunter.sim.executor import RecomputeTracker, SimExecutor
from shunter.sim.latency import LatencyModel
from shunter.sim.metrics import RequestRecord
from shunter.sim.migration import Migration, MigrationConfig
from shunter.sim.workloads import WorkloadRequest, prompt_token_ids

INF = float("inf")


@dataclass
class SimConfig:
    """What to simulate besides the workload and the latency model.

    scheduler: every instance's scheduler limits (num_blocks = its KV capacity).
    dispatch: the global scheduler's dispatch policy (`shunter simulate --list`).
    fast_path: advance instances lazily with decode runs (same results, much faster).
    debug: check engine invariants after every step.
    control_interval: seconds between control-loop ticks (load samples for the
        report; migration decisions once a policy exists); None: no ticks.
    scaling_interval: seconds between autoscaling decisions (a hook); None: none.
    gpus_per_instance: GPUs one instance occupies (tensor parallelism), for GPU-seconds.
    """

    num_instances: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dispatch: str = "least-load"
    fast_path: bool = True
    debug: bool = False
    control_interval: float | None = 1.0
    scaling_interval: float | None = None
    gpus_per_instance: int = 1
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_instances, int) or isinstance(self.num_instances, bool) or self.num_instances < 1:
            raise ValueError(f"the number of instances must be a positive integer, got {self.num_instances!r}")
        for name in ("control_interval", "scaling_interval"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
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

    @property
    def makespan(self) -> float:
        return self.end_time - self.start_time

    @property
    def instance_seconds(self) -> float:
        return len(self.instance_ids) * self.makespan


class SimInstance:
    """An in-process instance plus the simulator's bookkeeping of its steps."""

    def __init__(self, instance_id: str, config: SchedulerConfig, latency_model: LatencyModel,
                 tracker: RecomputeTracker) -> None:
        self.executor = SimExecutor(latency_model, tracker)
        self.engine = InstanceEngine(config, self.executor, instance_id)
        self.instance = InProcessInstance(self.engine)
        self.instance_id = instance_id
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
        self.instances = [SimInstance(str(i), config.scheduler, latency_model, self.tracker)
                          for i in range(config.num_instances)]
        self.by_id = {inst.instance_id: inst for inst in self.instances}
        self._sim_of = {id(inst.instance): inst for inst in self.instances}
        self.global_scheduler = GlobalScheduler([inst.instance for inst in self.instances], config.dispatch,
                                                seed=config.seed)
        self.lazy = config.fast_path
        self.now = 0.0
        self.records: list[RequestRecord] = []
        self.rejected: dict[str, str] = {}
        self.migrations: list[Migration] = []
        self.load_samples: dict[str, list[LoadSample]] = {inst.instance_id: [] for inst in self.instances}
        self.num_events = 0
        self.num_preemptions = 0
        self._next_arrival = 0
        self._has_run = False
        # For prefix caching "auto" (see `simulate`): give up as soon as caching could change the result.
        self._stop_if_caching_would_matter = stop_if_caching_would_matter
        self._first_prompt_tokens: set[int] = set()

    # ---- public --------------------------------------------------------------------
    def schedule_migration(self, time: float, request_id: str, src_id: str, dst_id: str) -> None:
        """Start migrating `request_id` from instance `src_id` to `dst_id` at `time` (if it is running then)."""
        if src_id == dst_id:
            raise ValueError("a migration needs two different instances")
        migration = Migration(request_id, self._instance(src_id), self._instance(dst_id), time)
        self.queue.push(MigrationStage(time, migration))

    def run(self) -> SimResult:
        """Run to completion (every request finished or rejected) and return the result."""
        if self._has_run:
            raise RuntimeError("a Simulator runs once; build a new one")
        self._has_run = True
        start = self.workload[0].arrival_time if self.workload else 0.0
        self._push_next_arrival()
        if self.config.control_interval is not None:
            self.queue.push(ControlTick(start))
        if self.config.scaling_interval is not None:
            self.queue.push(ScalingDecision(start + self.config.scaling_interval))
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
            self._on_migration_stage(event.migration, event.time)
        elif kind is MigrationCommit:
            self._on_migration_commit(event.migration, event.time)
        elif kind is ControlTick:
            self._on_control_tick(event.time)
        elif kind is ScalingDecision:
            self._on_scaling_decision(event.time)
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
        reports = self.global_scheduler.load_reports(now)
        for report in reports:
            self.load_samples[report.instance_id].append(
                LoadSample(now, report.num_used_blocks, report.num_running, report.num_waiting))
        for order in self.global_scheduler.control_step(reports, now):
            self._start_migration(order, now)
        if self._has_pending_work():
            # k * interval rather than repeated addition: tick times do not drift.
            k = round((now - self._tick_origin()) / self.config.control_interval) + 1
            self.queue.push(ControlTick(self._tick_origin() + k * self.config.control_interval))

    def _tick_origin(self) -> float:
        return self.workload[0].arrival_time if self.workload else 0.0

    def _on_scaling_decision(self, now: float) -> None:
        delta = self.global_scheduler.scaling_decision(self.global_scheduler.load_reports(now), now)
        if delta:
            raise NotImplementedError("autoscaling is not implemented in the simulator yet")
        if self._has_pending_work():
            self.queue.push(ScalingDecision(now + self.config.scaling_interval))

    def _has_pending_work(self) -> bool:
        return (self._next_arrival < len(self.workload) or any(inst.is_busy for inst in self.instances)
                or any(m.outcome == "running" for m in self.migrations))

    # ---- driving instances: step by step ------------------------------------------------
    def _wake(self, inst: SimInstance, now: float) -> None:
        """Make sure an instance with work steps again (a new request, an import, freed blocks)."""
        if inst.is_busy:
            return
        inst.is_busy = True
        inst.busy_since = now
        if self.lazy:
            inst.next_begin = now
        else:
            self.queue.push(StepStart(now, inst))

    def _go_idle(self, inst: SimInstance, now: float) -> None:
        inst.is_busy = False
        inst.next_begin = None
        inst.busy_time += now - inst.busy_since

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
        if finished:
            self._record(inst, finished)
        if self.config.debug:
            inst.engine.check_invariants()

    # ---- driving instances: lazily (fast path) --------------------------------------------
    def _advance_all(self, until: float) -> None:
        for inst in self.instances:
            if inst.is_busy:
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
        migration = Migration(order.request_id, self._instance(order.src_id), self._instance(order.dst_id), now)
        self._on_migration_stage(migration, now)

    def _on_migration_stage(self, m: Migration, now: float) -> None:
        self._end_decode_run(m.src)
        self._end_decode_run(m.dst)
        src_engine = m.src.engine
        request = src_engine.get_request(m.request_id)
        bs = self.config.scheduler.block_size
        if m.num_stages == 0:
            self.migrations.append(m)
            if request is None or request.status is not RequestStatus.RUNNING or not request.output_token_ids:
                self._abort_migration(m, now, "the request is not decoding on the source")
                return
            request.status = RequestStatus.MIGRATING
            m.num_preemptions = request.num_preemptions
        elif request is None or request.status is not RequestStatus.MIGRATING or request.num_preemptions != m.num_preemptions:
            self._abort_migration(m, now, "the request finished, was aborted or was preempted on the source")
            return
        computed = request.num_computed_tokens
        num_new_blocks = m.blocks_to_copy(computed, bs)
        is_final = m.num_stages > 0 and (num_new_blocks <= self.config.migration.final_stage_max_blocks
                                         or m.num_stages >= self.config.migration.max_stages)
        if m.dst.engine.reserve_blocks(m.request_id, computed) is None:
            self._abort_migration(m, now, "the destination has no free blocks")
            return
        m.num_stages += 1
        m.num_copied_blocks += num_new_blocks
        m.blocks_per_stage.append(num_new_blocks)
        copy_time = self.config.migration.copy_time(num_new_blocks)
        if not is_final:
            self.queue.push(MigrationStage(now + copy_time, m))
            return
        # Final stage: suspend on the source (export, release), copy the rest, commit on arrival.
        m.state = src_engine.export_request(m.request_id)
        src_engine.release_exported(m.request_id, now)
        m.final_stage_time = now
        self.queue.push(MigrationCommit(now + copy_time, m))

    def _on_migration_commit(self, m: Migration, now: float) -> None:
        self._end_decode_run(m.dst)
        m.dst.engine.import_request(m.state)
        m.outcome = "committed"
        m.end_time = now
        self._wake(m.dst, now)

    def _abort_migration(self, m: Migration, now: float, reason: str) -> None:
        m.dst.engine.cancel_reservation(m.request_id)
        request = m.src.engine.get_request(m.request_id)
        if request is not None and request.status is RequestStatus.MIGRATING:
            request.status = RequestStatus.RUNNING
        m.outcome = "aborted"
        m.abort_reason = reason
        m.end_time = now
        if m.dst.engine.has_unfinished_requests:
            self._wake(m.dst, now)  # freed reservation: queued requests may fit now

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
        )


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
