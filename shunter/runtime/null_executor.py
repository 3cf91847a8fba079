"""An executor that does no model work: every request that needs a token gets one at once.

`shunter bench frontend` puts it behind real engines, loops and the HTTP
frontend to measure what they add on their own. Torch-free.
"""

from __future__ import annotations

import time
from typing import Sequence

from shunter.engine.outputs import ExecOutput, SchedulerOutput


class NullExecutor:
    """Emits `token_ids[k % len(token_ids)]` as a request's k-th output token, instantly.

    step_time: seconds each step pretends to take (slept), 0 for none.
    """

    def __init__(self, token_ids: Sequence[int], step_time: float = 0.0) -> None:
        if not token_ids:
            raise ValueError("the null executor needs at least one token id to emit")
        if step_time < 0:
            raise ValueError(f"step_time must be >= 0, got {step_time!r}")
        self.token_ids = list(token_ids)
        self.step_time = step_time

    def execute(self, batch: SchedulerOutput) -> ExecOutput:
        if self.step_time:
            time.sleep(self.step_time)
        ids = self.token_ids
        return ExecOutput(
            [ids[s.request.num_output_tokens % len(ids)] if s.needs_sample else None for s in batch.scheduled],
            self.step_time,
        )

    # Live migration moves KV blocks; the null engine keeps none, so there is nothing to carry.
    def read_blocks(self, block_ids: Sequence[int]) -> list[None]:
        return [None] * len(block_ids)

    def write_blocks(self, block_ids: Sequence[int], payload: Sequence[None]) -> None:
        if len(payload) != len(block_ids):
            raise ValueError(f"KV payload has {len(payload)} blocks for {len(block_ids)} block ids")
