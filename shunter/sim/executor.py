"""`SimExecutor`: the engine's Executor for the simulator.

It runs no model: every request that needs a sample gets the same dummy token
(requests run with `ignore_eos` and `max_tokens` = their workload output
length, so the token never matters), and `elapsed` is the latency model's
prediction for the batch. It also counts tokens computed twice because of
preemption (the recompute loss).
"""

from __future__ import annotations

from collections import defaultdict

from shunter.engine import ExecOutput, SchedulerOutput
from shunter.sim.latency import LatencyModel

DUMMY_TOKEN_ID = 0


class RecomputeTracker:
    """Per request: the highest token position whose KV was ever computed, and tokens computed again below it.

    Shared by the executors of all instances so that a migrated request keeps
    its history. A request with an output token has had all but its last token
    computed at some point, so only prefill chunks need tracking; decodes never
    recompute.
    """

    def __init__(self) -> None:
        self.high_water: dict[str, int] = {}
        self.recomputed: defaultdict[str, int] = defaultdict(int)

    def observe_prefill(self, request, start: int, num_new: int) -> None:
        rid = request.request_id
        high = self.high_water.get(rid, 0)
        if request.output_token_ids:
            high = max(high, len(request.all_token_ids) - 1)
        end = start + num_new
        if start < high:
            self.recomputed[rid] += min(high, end) - start
        if end > high:
            high = end
        self.high_water[rid] = high

    def pop(self, request_id: str) -> int:
        """Recomputed tokens of a finished request (and forget it)."""
        self.high_water.pop(request_id, None)
        return self.recomputed.pop(request_id, 0)


class SimExecutor:
    """Predicts each batch's duration with a latency model and samples a dummy token."""

    def __init__(self, latency_model: LatencyModel, tracker: RecomputeTracker | None = None,
                 token_id: int = DUMMY_TOKEN_ID) -> None:
        self.latency_model = latency_model
        self.tracker = tracker if tracker is not None else RecomputeTracker()
        self.token_id = token_id

    def execute(self, batch: SchedulerOutput) -> ExecOutput:
        token = self.token_id
        tokens: list[int | None] = []
        prefills: list[tuple[int, int]] = []
        num_decodes = 0
        sum_context = 0
        observe = self.tracker.observe_prefill
        for s in batch.scheduled:
            n = s.num_new_tokens
            start = s.start_position
            request = s.request
            if n == 1 and start >= len(request.prompt_token_ids):  # ScheduledRequest.is_decode
                num_decodes += 1
                sum_context += start + 1
            else:
                prefills.append((n, start + n))
                observe(request, start, n)
            tokens.append(token if s.needs_sample else None)
        elapsed = self.latency_model.step_time(prefills, num_decodes, sum_context)
        if not elapsed > 0:
            raise ValueError(f"latency model {self.latency_model.name!r} predicted a step of {elapsed!r} s; "
                             "steps must take positive time")
        return ExecOutput(tokens, elapsed)
