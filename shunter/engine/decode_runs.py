"""The scheduler's decode fast path, for drivers that need no token stream (the simulator).

When an instance only decodes, a run of steps is fully determined in advance:
every running request gets one token per step, blocks are allocated every
`block_size` tokens and requests stop at known lengths. These methods apply
such runs in bulk with exactly the block-manager calls, counters, stamps and
finishes that `Scheduler.schedule()` + `Scheduler.update()` would make step by
step (tests/sim/test_fast_path.py compares whole simulations both ways).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from heapq import heapify, heappop, heapreplace
from typing import Callable, Generator

from shunter.engine.block_manager import cdiv
from shunter.request import Request, RequestStatus

_NEVER = 1 << 62
_INF = float("inf")
# Step ends are computed this many at a time (or to the end of a segment): enough that most
# horizons find the next steps already timed, few enough that a run ended early wastes little.
_CHUNK_STEPS = 128


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
    quiet_until: while suspended, a horizon before this time would change
        nothing but the clock and the lagging counters (no block-manager call,
        no stop, the run does not end), so a driver may hold such horizons back
        and send only the latest one when it needs the run to move.
    """

    time: float
    num_steps: int = 0
    finished: list[Request] = field(default_factory=list)
    in_flight: list[Request] | None = None
    in_flight_end: float = 0.0
    is_blocked: bool = False
    is_done: bool = False
    quiet_until: float = 0.0


class DecodeRunsMixin:
    """Fast-path methods mixed into `Scheduler`; they use its queues, block manager and stop rules."""

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
            if r.status is not RequestStatus.RUNNING and (
                    r.status is not RequestStatus.MIGRATING or r.request_id in self.suspended):
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

        How: the run is cut into segments between stops, in which the batch
        and so the step durations are known in advance; their step ends are
        computed a chunk at a time, independent of any horizon, and a horizon
        only finds its place among them. The block-manager calls are made
        lazily, in the order schedule()/update() make them, up to the steps
        begun (allocations) and ended (fills, stops) by the horizon.
        """
        cfg = self.config
        bs = cfg.block_size
        bm = self.block_manager
        tables = bm.req_to_block_ids
        caching = bm.enable_prefix_caching
        max_len = cfg.max_model_len
        limit = _NEVER if max_steps is None else max_steps

        members = self.running[:]
        # Per request: computed tokens at step 0, and the steps of its next block events.
        base: list[int] = []
        next_alloc: list[int] = []  # the step whose begin needs a new block
        next_fill: list[int] = []  # the step whose end fills a block (registered in the prefix cache)
        last_step: list[int] = []  # the step at whose end the request stops
        # Pending block-manager calls as (step, 0: at its begin (allocate) | 1: at its end (fill, stop),
        # member): heap order is the order schedule() and update() make them in.
        events: list[tuple[int, int, int]] = []
        for i, r in enumerate(members):
            c = r.num_computed_tokens
            base.append(c)
            next_alloc.append(len(tables[r.request_id]) * bs - c)
            next_fill.append(-(c + 1) % bs if caching else _NEVER)
            p = r.sampling_params
            if token_id in p.stop_token_ids or (token_id == r.eos_token_id and not p.ignore_eos):
                last_step.append(0)
            else:
                last_step.append(min(p.max_tokens - len(r.output_token_ids), max_len - len(r.all_token_ids)) - 1)
            events.append((next_alloc[i], 0, i))
            events.append((min(next_fill[i], last_step[i]), 1, i))
        heapify(events)
        done = [0] * len(members)  # steps applied to each request object so far
        alive = list(range(len(members)))
        run = DecodeRun(now)
        # The step whose begin hands the finished requests' ids to the executor (schedule() clears them).
        clear_at = 0 if self._finished_ids else _NEVER

        def make_calls(begun: int, ended: int) -> None:
            """The block-manager calls of the steps before `begun` (allocations) and before `ended` (fills, stops)."""
            nonlocal clear_at
            any_stopped = False
            while events:
                step, at_end, i = events[0]
                if step >= (ended if at_end else begun):
                    break
                if not at_end:
                    if step > last_step[i]:  # it stopped before this step
                        heappop(events)
                        continue
                    rid = members[i].request_id
                    bm.allocate_slots(rid, base[i] + step + 1)
                    next_alloc[i] = len(tables[rid]) * bs - base[i]
                    heapreplace(events, (next_alloc[i], 0, i))
                    continue
                r = members[i]
                t_end = ends[step - j0]
                _apply_decodes(r, step + 1 - done[i], token_id, t_end)
                done[i] = step + 1
                if next_fill[i] == step:
                    bm.cache_computed_blocks(r)
                    next_fill[i] += bs
                if last_step[i] == step:
                    heappop(events)
                    if clear_at <= step:  # a step began since the last stops: schedule() cleared them
                        self._finished_ids = []
                    self._finalize(r, self._stop_status(r, token_id), t_end)
                    run.finished.append(r)
                    clear_at = step + 1
                    any_stopped = True
                else:
                    heapreplace(events, (min(next_fill[i], last_step[i]), 1, i))
            if any_stopped:
                self.running = [r for r in self.running if not r.is_finished]
                alive[:] = [i for i in alive if not members[i].is_finished]
            if begun > clear_at:
                self._finished_ids = []
                clear_at = _NEVER

        def first_blocked_step(first: int, last: int) -> int:
            """The first step in [first, last] that needs more new blocks than are left, or _NEVER."""
            free = bm.num_free_blocks
            pending = [next_alloc[i] for i in alive]  # each request's allocations: every bs steps from here

            def num_allocations_through(e: int) -> int:
                return sum((e - a) // bs + 1 for a in pending if a <= e)

            if num_allocations_through(last) <= free:
                return _NEVER
            while first < last:
                mid = (first + last) // 2
                if num_allocations_through(mid) > free:
                    last = mid
                else:
                    first = mid + 1
            return first

        def quiet_until() -> float:
            """When the next block-manager call comes, or the end of what is timed if that is sooner."""
            timed = ends[-1] if j - j0 < len(ends) else t  # the steps after this are not timed yet
            # The step at whose end the next call comes (the next step's begin, for an allocation).
            first = min(events[0][0] - 1 + events[0][1] if events else _NEVER, clear_at - 1)
            if first < j:
                return t  # at the begin of step j, which has not begun yet
            k = first - j0
            return ends[k] if k < len(ends) else timed

        ends: list[float] = []  # ends of steps j0, j0 + 1, ... (a chunk of the current segment)
        j0 = 0
        t = now  # the end of the last completed step
        j = 0  # steps completed in this run
        seg_last = -1  # the last step of the current segment: the batch is the same up to its end
        blocked_at = _NEVER
        size = sum_base = 0
        in_flight = False
        until = yield run
        while until is not None:
            in_flight = False
            k = j - j0
            if k < len(ends):
                # Steps of the chunk ending by `until` complete; the next one is in flight if it began before.
                c = bisect_right(ends, until, k)
                if c > k:
                    j = j0 + c
                    t = ends[c - 1]
                if c < len(ends):
                    in_flight = t < until
                    make_calls(j + 1 if in_flight else j, j)
                    run.time, run.num_steps, run.quiet_until = t, j, quiet_until()
                    until = yield run
                    continue
            make_calls(j, j)  # the chunk is complete
            if j > seg_last:  # a new segment: stops changed the batch (or the run starts)
                if not alive or j >= limit:
                    break
                size = len(alive)
                sum_base = sum(base[i] for i in alive)
                seg_last = min(min(last_step[i] for i in alive), limit - 1)
                blocked_at = first_blocked_step(j, seg_last)
            if t >= until:
                run.time, run.num_steps, run.quiet_until = t, j, quiet_until()
                until = yield run
                continue
            if j == blocked_at:  # schedule() must take this step, and preempt
                run.is_blocked = True
                break
            j0 = j
            num_steps = min(seg_last + 1, blocked_at, j + _CHUNK_STEPS) - j
            ends = step_ends(t, size, sum_base + size * (j + 1), num_steps, _INF)
        # The run ends: bring every request up to date.
        for i in alive:
            if j > done[i]:
                _apply_decodes(members[i], j - done[i], token_id, t)
        run.time, run.num_steps, run.is_done = t, j, True
        if in_flight:
            run.in_flight = [members[i] for i in alive]
            run.in_flight_end = ends[j - j0]
        yield run
