"""Replay a timed workload against one in-process engine on the wall clock.

The driver loop is what a server's engine loop does, minus the network: admit
every request whose arrival time has come, run one engine step, stamp the
tokens it produced with the clock when the step returns, repeat; sleep when
there is nothing to do until the next arrival. Each request's arrival time is
its scheduled time (not when the driver noticed it), so queueing behind a busy
step counts in its TTFT, as it does in the simulator.

Steps go through `begin_step` / `end_step` (what `InstanceEngine.step` does) so
that the driver also keeps each step's batch summary and wall time: the
fidelity benchmark checks the latency model against them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shunter.engine import InstanceEngine
from shunter.profiling.machine import runqueue_wait_seconds
from shunter.request import Request, SamplingParams
from shunter.sim.metrics import RequestRecord
from shunter.sim.profiled import ProfileStep


@dataclass(frozen=True)
class TimedRequest:
    """A request to replay: sent `arrival_time` seconds after the start, generating exactly `max_tokens` tokens."""

    request_id: str
    arrival_time: float
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class ReplayResult:
    """What a replay measured; every time is in seconds from the replay's start.

    records: one per request, stamped by the driver (first and last token at the
        end of the step that produced them).
    steps: every engine step's batch summary and wall time (schedule + execute + update).
    step_gaps: total time between a step's end and the next step's begin while
        requests were in the engine (the driver's own overhead).
    """

    records: list[RequestRecord]
    steps: list[ProfileStep] = field(default_factory=list)
    step_gaps: float = 0.0
    wall_seconds: float = 0.0
    cpu_wait_seconds: float | None = None

    @property
    def contention(self) -> float | None:
        """Time this process's threads waited for a CPU during steps, per second of step (0: undisturbed)."""
        busy = self.busy_seconds
        return None if self.cpu_wait_seconds is None or not busy else self.cpu_wait_seconds / busy

    @property
    def busy_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def replay(engine: InstanceEngine, requests: Sequence[TimedRequest], *,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
           on_finish: Callable[[int], None] | None = None,
           wait_seconds: Callable[[], float | None] = runqueue_wait_seconds) -> ReplayResult:
    """Send `requests` to `engine` at their arrival times and step it until all are done.

    Requests run greedily with `ignore_eos`, so each produces exactly its
    `max_tokens` tokens. `on_finish(n)` is called as n requests finish (a
    progress bar). `wait_seconds()` reads how long this process has waited
    for a CPU (see `runqueue_wait_seconds`); the difference over the replay
    is `ReplayResult.cpu_wait_seconds`. Raises RuntimeError if the engine
    schedules nothing while it has requests.
    """
    pending = sorted(requests, key=lambda r: r.arrival_time)
    if len({r.request_id for r in pending}) != len(pending):
        raise ValueError("request ids must be unique")
    start = clock()
    first_token: dict[str, float] = {}
    num_tokens: dict[str, int] = {}
    by_id: dict[str, TimedRequest] = {}
    records: list[RequestRecord] = []
    steps: list[ProfileStep] = []
    gaps = 0.0
    # Read once for the whole replay, not per step: the reads would add to the latencies measured.
    # While the driver sleeps, no thread of this process is runnable, so the total is the steps' waiting.
    waited_before = wait_seconds()
    last_end: float | None = None  # end of the previous step, while the engine had work
    i = 0
    while i < len(pending) or engine.has_unfinished_requests:
        now = clock()
        while i < len(pending) and start + pending[i].arrival_time <= now:
            tr = pending[i]
            engine.add_request(Request(
                request_id=tr.request_id,
                prompt_token_ids=list(tr.prompt_token_ids),
                sampling_params=SamplingParams(temperature=0.0, max_tokens=tr.max_tokens, ignore_eos=True),
                arrival_time=start + tr.arrival_time,
            ))
            by_id[tr.request_id] = tr
            i += 1
        if not engine.has_unfinished_requests:
            last_end = None
            sleep(max(0.0, start + pending[i].arrival_time - now))
            continue
        step_start = clock()
        if last_end is not None:
            gaps += step_start - last_end
        batch, result = engine.begin_step(step_start)
        if batch.is_empty:
            raise RuntimeError("the engine has unfinished requests but scheduled nothing")
        deltas = engine.end_step(batch, result, clock())
        end = clock()
        steps.append(ProfileStep.from_batch(batch, end - step_start))
        last_end = end
        finished = 0
        for d in deltas:
            rid = d.request_id
            if d.new_token_ids:
                first_token.setdefault(rid, end)
                num_tokens[rid] = num_tokens.get(rid, 0) + len(d.new_token_ids)
            if d.finish_reason is not None:
                tr = by_id[rid]
                records.append(RequestRecord(
                    request_id=rid, instance_id=engine.instance_id, arrival_time=tr.arrival_time,
                    first_token_time=first_token[rid] - start, finish_time=end - start,
                    num_prompt_tokens=len(tr.prompt_token_ids), num_output_tokens=num_tokens[rid]))
                finished += 1
        if finished and on_finish is not None:
            on_finish(finished)
    records.sort(key=lambda r: (r.arrival_time, r.request_id))
    wall = clock() - start
    waited_after = wait_seconds()
    cpu_wait = None if waited_before is None or waited_after is None else waited_after - waited_before
    return ReplayResult(records, steps, gaps, wall, cpu_wait)
