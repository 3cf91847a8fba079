"""One instance's engine: `step(now)` = schedule -> execute -> update.

Plain synchronous code with no clock of its own: the real server calls it with
the wall clock and a `ModelExecutor`, the simulator with a virtual clock and a
`SimExecutor`. The simulator uses `begin_step` / `end_step` separately so that
a step occupies virtual time between the two.
"""

from __future__ import annotations

from shunter.cluster.load import LoadReport
from shunter.config import SchedulerConfig
from shunter.engine.block_manager import cdiv
from shunter.engine.outputs import ExecOutput, Executor, SchedulerOutput
from shunter.engine.scheduler import RequestState, Scheduler
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
        batch = self.scheduler.schedule(now)
        if batch.is_empty:
            return batch, ExecOutput([], 0.0)
        return batch, self.executor.execute(batch)

    def end_step(self, batch: SchedulerOutput, result: ExecOutput, now: float) -> list[TokenDelta]:
        """Apply an executed batch at time `now` (the step's end)."""
        self.num_steps += 1
        return self.scheduler.update(batch, result, now)

    # ---- load --------------------------------------------------------------------
    def load_report(self, now: float) -> LoadReport:
        """Queue lengths and block occupancy for the cluster's policies."""
        s = self.scheduler
        bm = s.block_manager
        bs = self.config.block_size
        # A plain loop: this runs on every dispatch for every instance, and Counter costs more here.
        priority_to_num_running: dict[int, int] = {}
        for r in s.running:
            priority_to_num_running[r.priority] = priority_to_num_running.get(r.priority, 0) + 1
        return LoadReport(
            instance_id=self.instance_id,
            time=now,
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_preempted=sum(1 for r in s.waiting if r.status is RequestStatus.PREEMPTED),
            num_used_blocks=bm.num_used_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            waiting_block_demands=[cdiv(r.num_tokens, bs) for r in s.waiting],
            priority_to_num_running=priority_to_num_running,
        )

    # ---- migration hooks -----------------------------------------------------------
    def export_request(self, request_id: str) -> RequestState:
        """Snapshot a live request: tokens, counters, sampling state and its block ids here."""
        return self.scheduler.export_request(request_id)

    def release_exported(self, request_id: str, now: float) -> None:
        """Drop a request that now lives elsewhere, freeing its blocks."""
        self.scheduler.release_exported(request_id, now)

    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Reserve (or grow a reservation of) blocks for an incoming request; None if full."""
        return self.scheduler.reserve_blocks(request_id, num_tokens)

    def cancel_reservation(self, request_id: str) -> None:
        self.scheduler.cancel_reservation(request_id)

    def reserved_block_ids(self, request_id: str) -> list[int]:
        return self.scheduler.block_manager.block_ids(request_id)

    def import_request(self, state: RequestState) -> Request:
        """Make an incoming request live; its KV must already be in its reserved blocks."""
        return self.scheduler.import_request(state)

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
