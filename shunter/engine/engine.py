"""One instance's engine: `step(now)` = schedule -> execute -> update.

Plain synchronous code with no clock of its own: the real server calls it with
the wall clock and a `ModelExecutor`, the simulator with a virtual clock and a
`SimExecutor`. The simulator uses `begin_step` / `end_step` separately so that
a step occupies virtual time between the two.
"""

from __future__ import annotations

from shunter.config import SchedulerConfig
from shunter.engine.block_manager import cdiv
from shunter.engine.load_report import LoadReport
from shunter.engine.outputs import ExecOutput, Executor, SchedulerOutput
from shunter.engine.scheduler import MigrationCandidate, MigrationSnapshot, RequestState, Scheduler
from shunter.request import Request, RequestStatus, TokenDelta


class InstanceEngine:
    """A scheduler, its block manager and an executor: one serving instance."""

    def __init__(self, config: SchedulerConfig, executor: Executor, instance_id: str = "0") -> None:
        self.config = config
        self.executor = executor
        self.instance_id = instance_id
        self.scheduler = Scheduler(config)
        self.num_steps = 0

    # ---- requests ------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError (nothing allocated) if it can never run here."""
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str, now: float) -> TokenDelta | None:
        """Abort in any state; every block it held is freed. Returns the closing delta."""
        return self.scheduler.abort(request_id, now)

    def finish_request(self, request_id: str, now: float) -> bool:
        """End a request as stopped (the frontend matched a stop string)."""
        return self.scheduler.finish(request_id, RequestStatus.FINISHED_STOPPED, now)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def get_request(self, request_id: str) -> Request | None:
        return self.scheduler.requests.get(request_id)

    # ---- the step --------------------------------------------------------------
    def step(self, now: float) -> list[TokenDelta]:
        """Run one step starting at `now`; deltas are stamped with `now + elapsed`."""
        batch, result = self.begin_step(now)
        if batch.is_empty:
            return []
        return self.end_step(batch, result, now + result.elapsed)

    def begin_step(self, now: float) -> tuple[SchedulerOutput, ExecOutput]:
        """Schedule and execute a batch; its effects apply at `end_step`."""
        batch = self.schedule(now)
        if batch.is_empty:
            return batch, ExecOutput([], 0.0)
        return batch, self.execute(batch)

    def schedule(self, now: float) -> SchedulerOutput:
        """Pick the next batch (a real engine loop runs `execute` without holding the scheduler)."""
        return self.scheduler.schedule(now)

    def execute(self, batch: SchedulerOutput) -> ExecOutput:
        """Run a scheduled batch on the executor; touches no scheduler state."""
        return self.executor.execute(batch)

    def end_step(self, batch: SchedulerOutput, result: ExecOutput, now: float) -> list[TokenDelta]:
        """Apply an executed batch at time `now` (the step's end)."""
        self.num_steps += 1
        return self.scheduler.update(batch, result, now)

    # ---- load --------------------------------------------------------------------
    def load_report(self, now: float) -> LoadReport:
        """Queue lengths, block occupancy and pending prefill work, for the cluster's policies.

        Exact even while the simulator holds a decode run suspended (the queues
        and the block manager are current then; only decode counters lag, and
        those cancel out in the pending-prefill count).
        """
        s = self.scheduler
        bm = s.block_manager
        bs = self.config.block_size
        # Plain loops: this runs for every instance at every control tick.
        priority_to_num_running: dict[int, int] = {}
        num_migrating = len(s.suspended)
        pending = 0
        for r in s.running:
            p = r.priority
            priority_to_num_running[p] = priority_to_num_running.get(p, 0) + 1
            pending += len(r.all_token_ids) - r.num_computed_tokens - 1
            if r.status is RequestStatus.MIGRATING:
                num_migrating += 1
        waiting_demand = 0
        num_preempted = 0
        for r in s.waiting:
            n = len(r.all_token_ids)
            waiting_demand += -(-n // bs)
            pending += n
            if r.status is RequestStatus.PREEMPTED:
                num_preempted += 1
        waiting = s.waiting
        return LoadReport(
            instance_id=self.instance_id,
            time=now,
            num_running=len(s.running),
            num_waiting=len(waiting),
            num_preempted=num_preempted,
            num_used_blocks=bm.num_used_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            block_size=bs,
            num_reserved_blocks=sum(len(s.reserved_block_ids(m)) for m in s.incoming) if s.incoming else 0,
            head_block_demand=cdiv(waiting[0].num_tokens, bs) if waiting else 0,
            waiting_block_demand=waiting_demand,
            num_pending_prefill_tokens=pending,
            priority_to_num_running=priority_to_num_running,
            num_migrating=num_migrating,
            num_incoming=len(s.incoming),
        )

    # ---- live migration (the calls of shunter.cluster.migration) ---------------------
    def begin_migration(self, request_id: str) -> MigrationSnapshot | None:
        """Source: start moving a running or waiting request away; None if it is neither here."""
        return self.scheduler.begin_migration(request_id)

    def migration_candidates(self) -> list[MigrationCandidate]:
        """Source: requests that could start migrating now (for a selection policy)."""
        return self.scheduler.migration_candidates()

    def migration_progress(self, request_id: str) -> MigrationSnapshot | None:
        """Source: where a migrating request stands; None if it is no longer migrating here."""
        return self.scheduler.migration_progress(request_id)

    def suspend_migrating(self, request_id: str) -> RequestState | None:
        """Source, final stage: stop scheduling it, keep its blocks; its state, or None if gone."""
        return self.scheduler.suspend_migrating(request_id)

    def end_migration(self, request_id: str) -> None:
        """Source, abort: the request runs on here."""
        self.scheduler.end_migration(request_id)

    def release_migrated(self, request_id: str, now: float) -> bool:
        """Source, commit: the request lives on the destination now; free its blocks here."""
        return self.scheduler.release_migrated(request_id, now)

    def export_waiting(self, request_id: str, now: float) -> RequestState | None:
        """Source: hand over a waiting or preempted request (no KV); None if it is not waiting here."""
        return self.scheduler.export_waiting(request_id, now)

    def migration_refusal(self, request_id: str, num_tokens: int, max_num_tokens: int,
                          needs_seat: bool = True) -> str | None:
        """Destination: why it cannot take this request (None if it can)."""
        return self.scheduler.migration_refusal(request_id, num_tokens, max_num_tokens, needs_seat)

    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> list[int] | None:
        """Destination: grow the migration's reservation to `num_tokens` tokens; None if full."""
        return self.scheduler.reserve_migration(migration_id, request_id, num_tokens)

    def reserved_block_ids(self, migration_id: str) -> list[int]:
        return self.scheduler.reserved_block_ids(migration_id)

    def cancel_migration(self, migration_id: str) -> int:
        """Destination, abort: free exactly this migration's reservation."""
        return self.scheduler.cancel_migration(migration_id)

    def import_request(self, state: RequestState, migration_id: str | None = None) -> Request:
        """Destination, commit: the request lives here now (see `Scheduler.import_request`)."""
        return self.scheduler.import_request(state, migration_id)

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
