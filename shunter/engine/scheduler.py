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
from typing import Callable, Generator

from shunter.config import SchedulerConfig
from shunter.engine.block_manager import BlockManager, cdiv
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


_NEVER = 1 << 62


def _apply_decodes(request: Request, num_steps: int, token_id: int, now: float) -> None:
    """What `num_steps` plain decode steps ending by `now` do to a request: counters, tokens, stamp."""
    tokens = [token_id] * num_steps
    request.num_computed_tokens += num_steps
    request.output_token_ids.extend(tokens)
    request.all_token_ids.extend(tokens)
    request.last_token_time = now


@dataclass(slots=True)
class DecodeRun:
    """Progress of a run of pure decode steps (`Scheduler.decode_steps`, `Scheduler.run_decode_steps`).

    time: the end of the last completed step (when the next one begins); with a
        step in flight, that step's start.
    num_steps: steps completed so far.
    finished: requests finished so far (a driver may empty it after reading).
    is_done: the run has ended and every request object is up to date. Then
        `in_flight` is the batch of a begun step still running (ending at
        `in_flight_end`; finish it with `end_decode_step`), or None; and
        `is_blocked` says the next step needs a preemption, so `schedule()`
        must take it.
    """

    time: float
    num_steps: int = 0
    finished: list[Request] = field(default_factory=list)
    in_flight: list[Request] | None = None
    in_flight_end: float = 0.0
    is_blocked: bool = False
    is_done: bool = False


class Scheduler:
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

    # ---- decode fast path (simulator) ---------------------------------------
    # A driver that needs no token stream (the simulator) may replace runs of
    # pure decode steps by these methods. They make exactly the calls, in
    # exactly the order, that `schedule()` + `update()` make for such steps —
    # same block allocations, prefix-cache registrations, counters, stamps and
    # finishes — and skip only the per-step batch objects and `TokenDelta`s.
    # tests/sim/test_fast_path.py checks the equivalence on whole simulations.

    def can_run_decodes(self) -> bool:
        """Whether the next `schedule()` would give every running request one decode token and admit nothing.

        True iff nothing waits, the batch fits the token budget, and every
        running request has all but its last sampled token computed.
        """
        running = self.running
        if not running or self.waiting or len(running) > self.config.max_num_batched_tokens:
            return False
        for r in running:
            if r.num_computed_tokens != len(r.all_token_ids) - 1 or not r.output_token_ids:
                return False
        return True

    def begin_decode_step(self) -> list[Request] | None:
        """The allocation half of `schedule()` for a pure decode step (`can_run_decodes()` must hold).

        Returns the batch (the running requests, in order), or None — with
        nothing changed — when the step needs more new blocks than are free, in
        which case `schedule()` would preempt and the caller must use it instead.
        """
        bm = self.block_manager
        bs = self.config.block_size
        tables = bm.req_to_block_ids
        num_needed = 0
        growing: list[Request] = []
        for r in self.running:
            need = cdiv(r.num_computed_tokens + 1, bs) - len(tables[r.request_id])
            if need > 0:
                num_needed += need
                growing.append(r)
        if num_needed > bm.num_free_blocks:
            return None
        for r in growing:  # in running order, as schedule() allocates
            bm.allocate_slots(r.request_id, r.num_computed_tokens + 1)
        if self._finished_ids:
            self._finished_ids = []  # schedule() hands these to the executor; the simulator's ignores them
        return list(self.running)

    def end_decode_step(self, batch: list[Request], token_id: int, now: float) -> list[Request]:
        """`update()` for a pure decode batch where every request sampled `token_id`; returns the finished requests."""
        bm = self.block_manager
        bs = self.config.block_size
        finished: list[Request] = []
        for r in batch:
            if r.status is not RequestStatus.RUNNING and r.status is not RequestStatus.MIGRATING:
                continue
            before = r.num_computed_tokens
            r.num_computed_tokens = before + 1
            if (before + 1) // bs > before // bs:
                bm.cache_computed_blocks(r)
            r.append_output_token(token_id)
            if r.first_token_time is None:
                r.first_token_time = now
            r.last_token_time = now
            status = self._stop_status(r, token_id)
            if status is not None:
                self._finalize(r, status, now)
                finished.append(r)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return finished

    def run_decode_steps(self, now: float, until: float,
                         step_ends: Callable[[float, int, int, int, float], list[float]],
                         token_id: int, max_steps: int | None = None) -> DecodeRun:
        """Run pure decode steps back to back from `now`, with the effect of `schedule()`/`update()` per step.

        Step i begins at t_i (t_0 = now) and ends at t_{i+1} = t_i + its
        duration; every request samples `token_id`. `step_ends(t, size,
        sum_context, k, until)` gives the end times of up to k back-to-back
        steps from t of a batch of `size` decodes whose context lengths sum to
        `sum_context` in the first of them (growing by `size` per step),
        beginning steps only before `until` and stopping after the first end
        past it (`LatencyModel.decode_step_ends`).

        Stops, without beginning a step, when t_i >= until, when nothing runs,
        after `max_steps` steps, or when the next step needs more new blocks
        than are free (`is_blocked`: `schedule()` must take that step, and
        preempt). A begun step that would end after `until` is left in flight:
        its blocks are allocated and `in_flight` holds its batch; finish it with
        `end_decode_step(in_flight, token_id, in_flight_end)`.
        `can_run_decodes()` must hold on entry; it keeps holding while this runs.

        Why this equals single steps: in a pure decode step the only calls into
        the block manager are `allocate_slots` for requests whose next token
        starts a block (at the step's begin, in running order),
        `cache_computed_blocks` for requests whose token fills a block, and
        `free` via `_finalize` for requests that stop (at the step's end, in
        batch order). Those events fall on steps known in advance (every
        `block_size` steps per request, and at its length limit); they are made
        at exactly those steps, in that order, with the request's counters and
        tokens brought up to date first. Between them a step only moves the
        clock and each request's counters and tokens, which are applied in bulk.
        """
        run = self.decode_steps(now, step_ends, token_id, max_steps)
        next(run)
        progress = run.send(until)
        return progress if progress.is_done else run.send(None)

    def decode_steps(self, now: float, step_ends: Callable[[float, int, int, int, float], list[float]],
                     token_id: int, max_steps: int | None = None) -> Generator[DecodeRun, float | None, None]:
        """`run_decode_steps` as a coroutine that keeps its place from one horizon to the next.

        Prime it with `next()`; each `send(until)` then runs the steps up to
        `until` (as `run_decode_steps` would) and yields the `DecodeRun`. Until
        `is_done`, the run is suspended at `until`: the queues and the block
        manager are exact (a `LoadReport` may be taken), but the running
        requests' counters and tokens lag behind. `send(None)` ends the run
        where it stands, bringing them up to date and handing back the step in
        flight. Nothing may add, abort, export or import requests while a run
        is suspended: end it first.
        """
        cfg = self.config
        bs = cfg.block_size
        bm = self.block_manager
        tables = bm.req_to_block_ids
        caching = bm.enable_prefix_caching
        max_len = cfg.max_model_len
        limit = _NEVER if max_steps is None else max_steps

        members = self.running[:]
        # Per request: computed tokens at step 0, blocks held, and the steps of its next block events.
        base: list[int] = []
        held: list[int] = []
        next_alloc: list[int] = []  # the step whose begin needs a new block
        next_fill: list[int] = []  # the step whose end fills a block (registered in the prefix cache)
        last_step: list[int] = []  # the step at whose end the request stops
        for r in members:
            c = r.num_computed_tokens
            h = len(tables[r.request_id])
            base.append(c)
            held.append(h)
            next_alloc.append(h * bs - c)
            next_fill.append(-(c + 1) % bs if caching else _NEVER)
            p = r.sampling_params
            if token_id in p.stop_token_ids or (token_id == r.eos_token_id and not p.ignore_eos):
                last_step.append(0)
            else:
                last_step.append(min(p.max_tokens - len(r.output_token_ids), max_len - len(r.all_token_ids)) - 1)
        done = [0] * len(members)  # steps applied to each request object so far
        alive = list(range(len(members)))
        run = DecodeRun(now)
        clear_finished = bool(self._finished_ids)

        def end_event_step(event: int, j: int, t: float) -> None:
            """The event step ended at t: requests filling a block or stopping, in batch order, as update()."""
            nonlocal clear_finished
            any_finished = False
            for i in alive:
                is_fill = next_fill[i] == event
                is_last = last_step[i] == event
                if not (is_fill or is_last):
                    continue
                r = members[i]
                _apply_decodes(r, j - done[i], token_id, t)
                done[i] = j
                if is_fill:
                    bm.cache_computed_blocks(r)
                    next_fill[i] += bs
                if is_last:
                    self._finalize(r, self._stop_status(r, token_id), t)
                    run.finished.append(r)
                    any_finished = True
            if any_finished:
                self.running = [r for r in self.running if not r.is_finished]
                alive[:] = [i for i in alive if not members[i].is_finished]
                clear_finished = True  # the next step's begin hands them to the executor

        t = now
        j = 0  # steps completed in this run
        event = -1
        in_flight_end: float | None = None  # end of the begun step j, while it runs past the horizon
        until = yield run
        while until is not None:
            if in_flight_end is not None:
                if in_flight_end > until:
                    run.time, run.num_steps = t, j
                    until = yield run
                    continue
                t = in_flight_end
                in_flight_end = None
                j += 1
                if j - 1 == event:
                    end_event_step(event, j, t)
                continue
            if not alive or j >= limit:
                break
            if t >= until:
                run.time, run.num_steps = t, j
                until = yield run
                continue
            size = len(alive)
            sum_context = size * (j + 1)
            event = _NEVER
            for i in alive:
                sum_context += base[i]
                e = next_alloc[i]
                if next_fill[i] < e:
                    e = next_fill[i]
                if last_step[i] < e:
                    e = last_step[i]
                if e < event:
                    event = e
            # Steps j, j+1, ... up to the event step; the list stops at `until` (see step_ends).
            ends = step_ends(t, size, sum_context, min(event - j + 1, limit - j, 1024), until)
            num_begun = len(ends)
            if j + num_begun - 1 == event:
                # The event step begins: requests whose next token starts a block get one, in running order.
                growing = [i for i in alive if next_alloc[i] == event]
                if growing:
                    need = 0
                    for i in growing:
                        need += cdiv(base[i] + event + 1, bs) - held[i]
                    if need > bm.num_free_blocks:
                        num_begun -= 1  # it does not begin; the steps before it ended before `until`
                        if num_begun:
                            j += num_begun
                            t = ends[num_begun - 1]
                            if clear_finished:
                                self._finished_ids = []
                        run.is_blocked = True
                        break
                    for i in growing:
                        rid = members[i].request_id
                        bm.allocate_slots(rid, base[i] + event + 1)
                        held[i] = len(tables[rid])
                        next_alloc[i] = held[i] * bs - base[i]
            if clear_finished:
                self._finished_ids = []  # what schedule() hands the executor; the simulator's ignores it
                clear_finished = False
            last = ends[-1]
            if last > until:  # the last begun step is still running at `until`
                j += num_begun - 1
                if num_begun > 1:
                    t = ends[num_begun - 2]
                in_flight_end = last
                continue
            j += num_begun
            t = last
            if j - 1 == event:
                end_event_step(event, j, t)
        # The run ends: bring every request up to date.
        for i in alive:
            if j > done[i]:
                _apply_decodes(members[i], j - done[i], token_id, t)
        run.time, run.num_steps, run.is_done = t, j, True
        if in_flight_end is not None:
            run.in_flight = [members[i] for i in alive]
            run.in_flight_end = in_flight_end
        yield run

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
