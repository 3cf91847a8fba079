"""The dataclasses at the engine's seams: what the scheduler hands an executor and what comes back.

The real `ModelExecutor` (torch) and the simulator's `SimExecutor` consume the
same `SchedulerOutput`, so the simulator prices exactly the batches the real
engine would run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from shunter.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute `num_new_tokens` tokens starting at `start_position`.

    `block_ids` is the request's block table (read-only for executors); the KV
    of token position p lives in block `block_ids[p // block_size]` at offset
    `p % block_size`. When `needs_sample` is true the chunk reaches the end of
    the request's tokens and the executor samples the next token.
    """

    request: Request
    num_new_tokens: int
    start_position: int
    block_ids: list[int]
    needs_sample: bool

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start_position:self.start_position + self.num_new_tokens]

    @property
    def context_len(self) -> int:
        """Tokens whose KV this step attends over after it runs (cached + new)."""
        return self.start_position + self.num_new_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.start_position >= self.request.num_prompt_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch: prefill chunks and decodes together (stall-free batching)."""

    scheduled: list[ScheduledRequest]
    now: float = 0.0
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished, aborted or left since the previous step: executors drop their state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if not s.is_decode)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)


@dataclass(slots=True)
class ExecOutput:
    """What an executor returns for a `SchedulerOutput`.

    sampled_token_ids[i] is the token sampled for `scheduled[i]`, or None where
    that request did not need a sample (a prefill chunk short of the end).
    elapsed: seconds the step took (measured by a real executor, predicted by
    the simulator's).
    """

    sampled_token_ids: list[int | None]
    elapsed: float = 0.0


class Executor(Protocol):
    """Runs a batch. Real: `shunter.model.ModelExecutor`; simulated: `shunter.sim.SimExecutor`."""

    def execute(self, batch: SchedulerOutput) -> ExecOutput: ...
