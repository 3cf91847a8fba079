"""Continuous batching with chunked prefill, priorities and preemption by recompute.

One rule drives everything: each step, every scheduled request computes tokens
until its `num_computed_tokens` catches up with `num_tokens`, within a per-step
token budget shared by prefill chunks and decodes (stall-free batching as in
Sarathi-Serve: running requests are served first, so a long prompt never
stalls the decodes already in flight).

Order: running requests by (priority desc, arrival asc); when blocks run out
the last of them (lowest priority, then latest arrival) is preempted: its
blocks are freed and it goes back to the waiting queue to be recomputed (its
prefix usually still sits in the prefix cache). Waiting requests are admitted
in the same order, head of line first, until the budget, the batch size or the
blocks run out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from shunter.config import SchedulerConfig
from shunter.engine.block_manager import BlockManager, cdiv
from shunter.engine.decode_runs import DecodeRunsMixin
from shunter.engine.outputs import ExecOutput, ScheduledRequest, SchedulerOutput
from shunter.request import Request, RequestStatus, SamplingParams, TokenDelta


def _order_key(request: Request) -> tuple[int, float]:
    return (-request.priority, request.arrival_time)


@dataclass
class RequestState:
    """Everything needed to continue a request on another instance (live migration).

    `block_ids` are the exporting instance's blocks holding the KV of the first
    `num_computed_tokens` tokens; sampling needs no state beyond `sampling_params`
    and the output count (seeded draws derive from both).
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int
    eos_token_id: int | None
    ttft_slo: float | None
    tpot_slo: float | None
    num_computed_tokens: int
    num_preemptions: int
    num_migrations: int
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    block_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @classmethod
    def of(cls, request: Request, block_ids: list[int]) -> RequestState:
        return cls(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            arrival_time=request.arrival_time,
            priority=request.priority,
            eos_token_id=request.eos_token_id,
            ttft_slo=request.ttft_slo,
            tpot_slo=request.tpot_slo,
            num_computed_tokens=request.num_computed_tokens,
            num_preemptions=request.num_preemptions,
            num_migrations=request.num_migrations,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            last_token_time=request.last_token_time,
            block_ids=list(block_ids),
        )

    def to_request(self) -> Request:
        return Request(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            sampling_params=self.sampling_params,
            arrival_time=self.arrival_time,
            priority=self.priority,
            eos_token_id=self.eos_token_id,
            ttft_slo=self.ttft_slo,
            tpot_slo=self.tpot_slo,
            output_token_ids=list(self.output_token_ids),
            num_computed_tokens=self.num_computed_tokens,
            num_preemptions=self.num_preemptions,
            num_migrations=self.num_migrations,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            last_token_time=self.last_token_time,
        )


@dataclass(frozen=True, slots=True)
class MigrationSnapshot:
    """What the source says about a request it is migrating: enough to plan the next stage.

    block_ids is the source's block table (read-only; its first blocks are the
    ones to copy). is_waiting: the request waits (or was preempted) and holds no KV.
    """

    num_tokens: int
    num_computed_tokens: int
    max_num_tokens: int
    block_ids: list[int]
    is_waiting: bool = False


@dataclass(frozen=True, slots=True)
class MigrationCandidate:
    """A request the source could move away, as a migration selection policy sees it."""

    request_id: str
    priority: int
    arrival_time: float
    num_tokens: int
    num_blocks: int
    is_waiting: bool


@dataclass(frozen=True, slots=True)
class IncomingMigration:
    """A reservation on the destination of a migration: its blocks are held under the migration's key."""

    migration_id: str
    request_id: str


def fit_problem(cfg: SchedulerConfig, request_id: str, num_tokens: int, max_num_tokens: int) -> str | None:
    """Why a request of `num_tokens` tokens (`max_num_tokens` at its longest) can never run on an
    instance configured by `cfg`, or None. A frontend checks this before dispatching anything."""
    if num_tokens >= cfg.max_model_len:
        return (f"request {request_id!r}: prompt of {num_tokens} tokens does not fit the "
                f"model's context of {cfg.max_model_len} tokens (at least one output token is needed)")
    # KV for all its tokens but the last sampled one, at its longest: a request that could
    # outgrow the instance would end up preempting itself forever, wedging the queue behind it.
    needed = cdiv(max(num_tokens + 1, min(max_num_tokens, cfg.max_model_len) - 1), cfg.block_size)
    if needed > cfg.num_blocks:
        return f"request {request_id!r}: needs {needed} KV blocks, more than this instance's {cfg.num_blocks}"
    return None


def _reservation_key(migration_id: str) -> tuple[str, str]:
    # A tuple can never equal a request id (a str): reservations and requests share the block manager.
    return ("migration", migration_id)


class Scheduler(DecodeRunsMixin):
    """Decides, each step, how many tokens every request computes; owns the block manager."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by _order_key
        self.running: list[Request] = []  # sorted by _order_key
        self._finished_ids: list[str] = []
        # Migrating away, in the final stage: not scheduled, blocks kept until commit or abort.
        self.suspended: dict[str, Request] = {}
        # Migrating here: reservations by migration id (see `reserve_migration`).
        self.incoming: dict[str, IncomingMigration] = {}

    # ---- admission and removal -----------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request; ValueError if it could never run here (nothing is allocated then)."""
        if self._is_known(request.request_id):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.validate_request(request)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_order_key)

    def validate_request(self, request: Request) -> None:
        """Raise ValueError if the request cannot fit this instance's context or KV capacity."""
        request.sampling_params.validate()  # the dataclass may have been changed since it was built
        problem = self._fit_problem(request.request_id, request.num_tokens,
                                    request.num_prompt_tokens + request.sampling_params.max_tokens)
        if problem is not None:
            raise ValueError(problem)

    def _fit_problem(self, request_id: str, num_tokens: int, max_num_tokens: int) -> str | None:
        return fit_problem(self.config, request_id, num_tokens, max_num_tokens)

    def _is_known(self, request_id: str) -> bool:
        """Live here, or the request of a migration coming in."""
        return request_id in self.requests or (
            bool(self.incoming) and any(m.request_id == request_id for m in self.incoming.values()))

    def abort(self, request_id: str, now: float) -> TokenDelta | None:
        """Abort a request in any state, freeing all it holds; returns its closing delta."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._remove(request, RequestStatus.FINISHED_ABORTED, now)
        return TokenDelta(request_id, [], now, RequestStatus.FINISHED_ABORTED.finish_reason,
                          request.num_output_tokens)

    def finish(self, request_id: str, status: RequestStatus, now: float) -> bool:
        """End a live request with `status` (e.g. a stop string matched by the frontend)."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._remove(request, status, now)
        return True

    def _remove(self, request: Request, status: RequestStatus, now: float) -> None:
        if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        elif self.suspended.pop(request.request_id, None) is not None:
            pass
        else:
            self.running.remove(request)
        self._finalize(request, status, now)

    def _finalize(self, request: Request, status: RequestStatus, now: float) -> None:
        request.status = status
        request.finish_time = now
        self.block_manager.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    # ---- the step --------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        """Pick this step's batch; may preempt running requests when blocks run out."""
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens
        chunk = cfg.prefill_chunk
        scheduled: list[ScheduledRequest] = []
        preempted_ids: list[str] = []

        running = self.running
        if self.waiting and running and self.waiting[0].priority > running[-1].priority:
            self._make_room_for_priority(self.waiting[0], preempted_ids)
        num_priority_preempted = len(preempted_ids)
        # Stall-free: a running prefill (even of higher priority) leaves one token of budget
        # to every decode behind it, so a long prompt never stalls the decodes in flight.
        num_decodes_left = sum(1 for r in running if r.num_tokens - r.num_computed_tokens == 1)
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_left = request.num_tokens - request.num_computed_tokens
            if num_left == 1:
                num_decodes_left -= 1
            num_new = min(num_left, budget if num_left == 1 else budget - num_decodes_left, chunk)
            if num_new <= 0:
                i += 1
                continue
            target = request.num_computed_tokens + num_new
            while bm.allocate_slots(request.request_id, target) is None:
                victim = running.pop()
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status is RequestStatus.PREEMPTED:
                break
            scheduled.append(ScheduledRequest(request, num_new, request.num_computed_tokens,
                                              bm.req_to_block_ids[request.request_id], target == request.num_tokens))
            budget -= num_new
            i += 1

        # Admitting new work in a step that had to preempt for growth would only thrash.
        if len(preempted_ids) == num_priority_preempted:
            # Seats held by incoming migrations count: an import must never find the batch full.
            max_running = cfg.max_num_seqs - len(self.incoming) - len(self.suspended)
            while self.waiting and budget > 0 and len(running) < max_running:
                request = self.waiting[0]
                cached = bm.find_cached_prefix(request)
                num_computed = len(cached) * cfg.block_size
                num_new = min(request.num_tokens - num_computed, budget, chunk)
                target = num_computed + num_new
                if bm.allocate_slots(request.request_id, target, cached) is None:
                    break
                self.waiting.pop(0)
                request.num_computed_tokens = num_computed
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                bisect.insort(running, request, key=_order_key)
                scheduled.append(ScheduledRequest(request, num_new, num_computed,
                                                  bm.req_to_block_ids[request.request_id], target == request.num_tokens))
                budget -= num_new

        finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(scheduled, now, preempted_ids, finished_ids)

    def _make_room_for_priority(self, head: Request, preempted_ids: list[str]) -> None:
        """Preempt strictly lower-priority running requests (last first) until the waiting head's first
        chunk fits: a high-priority request never queues behind memory held by lower priorities.
        Runs before anything is scheduled, so no victim is in this step's batch."""
        bm = self.block_manager
        first_chunk = min(head.num_tokens, self.config.prefill_chunk)
        need = cdiv(first_chunk, self.config.block_size)
        running = self.running
        while bm.num_free_blocks < need and running and running[-1].priority < head.priority:
            victim = running.pop()
            self._preempt(victim)
            preempted_ids.append(victim.request_id)

    def _preempt(self, request: Request) -> None:
        # Keep the token hashes: the request comes back with the same tokens.
        self.block_manager.free(request.request_id, forget_hashes=False)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_order_key)

    def update(self, batch: SchedulerOutput, result: ExecOutput, now: float) -> list[TokenDelta]:
        """Apply an executed batch: advance counters, append sampled tokens, finish requests.

        Requests aborted or moved away while the batch ran are skipped.
        """
        bm = self.block_manager
        bs = self.config.block_size
        deltas: list[TokenDelta] = []
        any_finished = False
        for sched, token in zip(batch.scheduled, result.sampled_token_ids):
            request = sched.request
            if request.status is not RequestStatus.RUNNING and (
                    request.status is not RequestStatus.MIGRATING or request.request_id in self.suspended):
                continue  # aborted, preempted, moved away or suspended for its final migration copy
            before = request.num_computed_tokens
            request.num_computed_tokens = before + sched.num_new_tokens
            if request.num_computed_tokens // bs > before // bs:
                bm.cache_computed_blocks(request)
            if not sched.needs_sample:
                continue
            if token is None:
                raise ValueError(f"executor returned no token for {request.request_id!r}, which needed one")
            request.append_output_token(token)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            status = self._stop_status(request, token)
            if status is not None:
                self._finalize(request, status, now)
                any_finished = True
            deltas.append(TokenDelta(request.request_id, [token], now, status.finish_reason if status else None,
                                     request.num_output_tokens - 1))
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return deltas

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if token in params.stop_token_ids or (token == request.eos_token_id and not params.ignore_eos):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- live migration (driven by shunter.cluster.migration) -----------------
    # Source side: begin -> (stages copy full blocks while it keeps decoding) ->
    # suspend -> release (commit) or resume (abort). Destination side: reserve
    # under the migration's id, grow the reservation stage by stage, then
    # import (commit) or cancel (abort). Reservations are keyed by migration id,
    # never by request id, so two orders for one request cannot touch each
    # other's blocks.

    def begin_migration(self, request_id: str) -> MigrationSnapshot | None:
        """Start moving a request away: a running one is marked migrating (it keeps decoding);
        a waiting or preempted one is left as it is (`export_waiting` hands it over).
        None if the request is not running or waiting here."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            request.status = RequestStatus.MIGRATING
            return self._snapshot(request)
        if request.status is RequestStatus.WAITING or request.status is RequestStatus.PREEMPTED:
            return self._snapshot(request, is_waiting=True)
        return None

    def migration_progress(self, request_id: str) -> MigrationSnapshot | None:
        """Where a migrating request stands now; None if it is no longer migrating here
        (it finished, was aborted or preempted, or the migration ended)."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.MIGRATING:
            return None
        return self._snapshot(request)

    def migration_candidates(self) -> list[MigrationCandidate]:
        """Requests that could start migrating now: running ones that decode (not already migrating)
        and waiting or preempted ones, in running-then-waiting order."""
        bm = self.block_manager
        out = [MigrationCandidate(r.request_id, r.priority, r.arrival_time, r.num_tokens,
                                  len(bm.block_ids(r.request_id)), False)
               for r in self.running
               if r.status is RequestStatus.RUNNING and r.num_computed_tokens == r.num_tokens - 1]
        out.extend(MigrationCandidate(r.request_id, r.priority, r.arrival_time, r.num_tokens, 0, True)
                   for r in self.waiting)
        return out

    def _snapshot(self, request: Request, is_waiting: bool = False) -> MigrationSnapshot:
        max_num_tokens = request.num_prompt_tokens + request.sampling_params.max_tokens
        return MigrationSnapshot(request.num_tokens, request.num_computed_tokens, max_num_tokens,
                                 self.block_manager.block_ids(request.request_id), is_waiting)

    def suspend_migrating(self, request_id: str) -> RequestState | None:
        """The final stage: stop scheduling a migrating request, keep its blocks; its state to copy.

        None if the request is no longer migrating here (finished, aborted, preempted).
        A step already in flight will not touch it (`update` skips suspended requests).
        """
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.MIGRATING or request_id in self.suspended:
            return None
        self.running.remove(request)
        self.suspended[request_id] = request
        return RequestState.of(request, self.block_manager.block_ids(request_id))

    def end_migration(self, request_id: str) -> None:
        """Abort on the source: a migrating (or suspended) request runs on here as before."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.MIGRATING:
            return
        request.status = RequestStatus.RUNNING
        if self.suspended.pop(request_id, None) is not None:
            bisect.insort(self.running, request, key=_order_key)

    def release_migrated(self, request_id: str, now: float) -> bool:
        """Commit on the source: the suspended request now lives elsewhere; free its blocks here."""
        request = self.suspended.get(request_id)
        if request is None:
            return False
        self._remove(request, RequestStatus.FINISHED_MIGRATED, now)
        return True

    def export_waiting(self, request_id: str, now: float) -> RequestState | None:
        """Hand over a waiting or preempted request (it holds no KV): gone from here, its state returned."""
        request = self.requests.get(request_id)
        if request is None or request.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            return None
        state = RequestState.of(request, [])
        self._remove(request, RequestStatus.FINISHED_MIGRATED, now)
        return state

    def migration_refusal(self, request_id: str, num_tokens: int, max_num_tokens: int,
                          needs_seat: bool = True) -> str | None:
        """Why this instance cannot take a migrated request (None if it can): the admission checks of
        `add_request` plus, for a request that will run at once (`needs_seat`), the batch limit,
        counting the migrations already coming in."""
        cfg = self.config
        if self._is_known(request_id):
            return f"request {request_id!r} is already on the destination"
        problem = self._fit_problem(request_id, num_tokens, max_num_tokens)
        if problem is not None:
            return problem
        if needs_seat and len(self.running) + len(self.suspended) + len(self.incoming) >= cfg.max_num_seqs:
            return f"the destination already runs max_num_seqs={cfg.max_num_seqs} requests"
        return None

    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow migration `migration_id`'s reservation to hold `num_tokens` tokens; None (nothing changed)
        if the blocks are not free. The first call opens the reservation (check `migration_refusal` first)."""
        key = _reservation_key(migration_id)
        incoming = self.incoming.get(migration_id)
        if incoming is not None and incoming.request_id != request_id:
            raise ValueError(f"migration {migration_id!r} is for request {incoming.request_id!r}, not {request_id!r}")
        block_ids = self.block_manager.allocate_slots(key, num_tokens)
        if block_ids is None:
            return None
        if incoming is None:
            self.incoming[migration_id] = IncomingMigration(migration_id, request_id)
        return block_ids

    def reserved_block_ids(self, migration_id: str) -> list[int]:
        """The blocks reserved for migration `migration_id`, in block-table order."""
        return self.block_manager.block_ids(_reservation_key(migration_id))

    def cancel_migration(self, migration_id: str) -> int:
        """Abort on the destination: free exactly this migration's reservation; returns how many blocks."""
        if self.incoming.pop(migration_id, None) is None:
            return 0
        return self.block_manager.free(_reservation_key(migration_id))

    def import_request(self, state: RequestState, migration_id: str | None = None) -> Request:
        """Commit on the destination: make a migrated request live here.

        With `migration_id`, its KV must already sit in that migration's reserved
        blocks, which become its block table, and it runs at once. Without, it
        carries no KV (it was waiting or preempted) and joins the waiting queue.
        ValueError, with nothing changed, if it cannot live here.
        """
        rid = state.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already live on this instance")
        request = state.to_request()
        request.num_migrations += 1
        if migration_id is None:
            if state.num_computed_tokens:
                raise ValueError(f"request {rid!r} has computed KV: import it through a reservation")
            self.validate_request(request)
            request.status = RequestStatus.PREEMPTED if request.output_token_ids else RequestStatus.WAITING
            self.requests[rid] = request
            bisect.insort(self.waiting, request, key=_order_key)
            return request
        incoming = self.incoming.get(migration_id)
        if incoming is None or incoming.request_id != rid:
            raise ValueError(f"no reservation of migration {migration_id!r} for request {rid!r}")
        key = _reservation_key(migration_id)
        held = len(self.block_manager.block_ids(key))
        if held < cdiv(state.num_computed_tokens, self.config.block_size):
            raise ValueError(f"request {rid!r}: {held} reserved blocks cannot hold "
                             f"{state.num_computed_tokens} computed tokens")
        del self.incoming[migration_id]
        self.block_manager.rename(key, rid)
        request.status = RequestStatus.RUNNING
        self.requests[rid] = request
        bisect.insort(self.running, request, key=_order_key)
        return request

    # ---- introspection -----------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def check_invariants(self) -> None:
        """Raise AssertionError if scheduler and block manager disagree."""
        bm = self.block_manager
        bm.check_invariants()
        bs = self.config.block_size
        assert len(self.waiting) + len(self.running) + len(self.suspended) == len(self.requests), \
            "queues disagree with the request table"
        assert [_order_key(r) for r in self.running] == sorted(_order_key(r) for r in self.running), "running out of order"
        assert [_order_key(r) for r in self.waiting] == sorted(_order_key(r) for r in self.waiting), "waiting out of order"
        for r in self.running:
            assert r.status in (RequestStatus.RUNNING, RequestStatus.MIGRATING), f"{r.request_id} running with {r.status}"
            assert len(bm.block_ids(r.request_id)) >= cdiv(r.num_computed_tokens, bs), f"{r.request_id}: blocks do not cover its tokens"
            assert r.num_computed_tokens < r.num_tokens or r.num_tokens == 0
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), f"{r.request_id} waiting with {r.status}"
            assert not bm.block_ids(r.request_id), f"waiting {r.request_id} holds blocks"
        for rid, r in self.suspended.items():
            assert r.status is RequestStatus.MIGRATING and self.requests.get(rid) is r, f"suspended {rid} is not migrating"
            assert len(bm.block_ids(rid)) >= cdiv(r.num_computed_tokens, bs), f"{rid}: blocks do not cover its tokens"
        reservation_keys = {_reservation_key(m) for m in self.incoming}
        for key in bm.req_to_block_ids:
            assert key in self.requests or key in reservation_keys, f"blocks held by unknown {key!r}"
