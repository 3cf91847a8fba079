"""The scheduler's decode fast path, for drivers that need no token stream (the simulator).

When an instance only decodes, a run of steps is fully determined in advance:
every running request gets one token per step, blocks are allocated every
`block_size` tokens and requests stop at known lengths. These methods apply
such runs in bulk with exactly the block-manager calls, counters, stamps and
finishes that `Scheduler.schedule()` + `Scheduler.update()` would make step by
step (tests/sim/test_fast_path.py compares whole simulations both ways).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator

from shunter.engine.block_manager import cdiv
from shunter.request import Request, RequestStatus

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
