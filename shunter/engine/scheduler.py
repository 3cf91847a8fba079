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


class Scheduler(DecodeRunsMixin):
    """Decides, each step, how many tokens every request computes; owns the block manager."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by _order_key
        self.running: list[Request] = []  # sorted by _order_key
        self._finished_ids: list[str] = []
        self.reserved_ids: set[str] = set()  # incoming migrations holding blocks before import

    # ---- admission and removal -----------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request; ValueError if it could never run here (nothing is allocated then)."""
        if request.request_id in self.requests or request.request_id in self.reserved_ids:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.validate_request(request)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_order_key)

    def validate_request(self, request: Request) -> None:
        """Raise ValueError if the request cannot fit this instance's context or KV capacity."""
        cfg = self.config
        request.sampling_params.validate()  # the dataclass may have been changed since it was built
        if request.num_tokens >= cfg.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_tokens} tokens does not fit the "
                f"model's context of {cfg.max_model_len} tokens (at least one output token is needed)"
            )
        # KV for all its tokens but the last sampled one, at its longest: a request that could
        # outgrow the instance would end up preempting itself forever, wedging the queue behind it.
        max_len = min(request.num_prompt_tokens + request.sampling_params.max_tokens, cfg.max_model_len)
        needed = cdiv(max(request.num_tokens + 1, max_len - 1), cfg.block_size)
        if needed > cfg.num_blocks:
            raise ValueError(
                f"request {request.request_id!r}: needs {needed} KV blocks, more than this instance's {cfg.num_blocks}"
            )

    def abort(self, request_id: str, now: float) -> TokenDelta | None:
        """Abort a request in any state, freeing all it holds; returns its closing delta."""
        request = self.requests.get(request_id)
        if request is not None:
            self._remove(request, RequestStatus.FINISHED_ABORTED, now)
        elif request_id in self.reserved_ids:
            self.cancel_reservation(request_id)  # an incoming migration: its reserved blocks go back
        else:
            return None
        return TokenDelta(request_id, [], now, RequestStatus.FINISHED_ABORTED.finish_reason)

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

        # Admitting new work in a step that had to preempt would only thrash.
        if not preempted_ids:
            while self.waiting and budget > 0 and len(running) < cfg.max_num_seqs:
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
            if request.status is not RequestStatus.RUNNING and request.status is not RequestStatus.MIGRATING:
                continue
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
            deltas.append(TokenDelta(request.request_id, [token], now, status.finish_reason if status else None))
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

    # ---- migration hooks ---------------------------------------------------
    def export_request(self, request_id: str) -> RequestState:
        """Snapshot a live request (it keeps running here until `release_exported`)."""
        request = self.requests[request_id]
        return RequestState.of(request, self.block_manager.block_ids(request_id))

    def release_exported(self, request_id: str, now: float) -> None:
        """The request now lives on another instance: drop it and free its blocks here."""
        request = self.requests.get(request_id)
        if request is not None:
            self._remove(request, RequestStatus.FINISHED_MIGRATED, now)

    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Pre-allocate blocks for an incoming migrated request (grows an earlier reservation)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already live on this instance")
        block_ids = self.block_manager.allocate_slots(request_id, num_tokens)
        if block_ids is not None:
            self.reserved_ids.add(request_id)
        return block_ids

    def cancel_reservation(self, request_id: str) -> None:
        if request_id in self.reserved_ids:
            self.reserved_ids.discard(request_id)
            self.block_manager.free(request_id)

    def import_request(self, state: RequestState) -> Request:
        """Make a migrated request live here; its KV must already sit in its reserved blocks."""
        if state.request_id in self.requests:
            raise ValueError(f"request id {state.request_id!r} is already live on this instance")
        held = len(self.block_manager.block_ids(state.request_id))
        if held < cdiv(state.num_computed_tokens, self.config.block_size):
            raise ValueError(
                f"request {state.request_id!r}: {held} reserved blocks cannot hold "
                f"{state.num_computed_tokens} computed tokens"
            )
        self.reserved_ids.discard(state.request_id)
        request = state.to_request()
        request.status = RequestStatus.RUNNING
        request.num_migrations += 1
        self.requests[request.request_id] = request
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
        assert len(self.waiting) + len(self.running) == len(self.requests), "queues disagree with the request table"
        assert [_order_key(r) for r in self.running] == sorted(_order_key(r) for r in self.running), "running out of order"
        assert [_order_key(r) for r in self.waiting] == sorted(_order_key(r) for r in self.waiting), "waiting out of order"
        for r in self.running:
            assert r.status in (RequestStatus.RUNNING, RequestStatus.MIGRATING), f"{r.request_id} running with {r.status}"
            assert len(bm.block_ids(r.request_id)) >= cdiv(r.num_computed_tokens, bs), f"{r.request_id}: blocks do not cover its tokens"
            assert r.num_computed_tokens < r.num_tokens or r.num_tokens == 0
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), f"{r.request_id} waiting with {r.status}"
            assert not bm.block_ids(r.request_id), f"waiting {r.request_id} holds blocks"
        for rid in bm.req_to_block_ids:
            assert rid in self.requests or rid in self.reserved_ids, f"blocks held by unknown {rid!r}"
