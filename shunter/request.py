"""Requests, their sampling parameters, their status, and the deltas they emit.

Torch-free and clock-free: every time stamp here is a `now` passed in by a driver
(the wall clock in real serving, the virtual clock in the simulator).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class RequestStatus(enum.IntEnum):
    """Ordered status: a request is finished iff `status > MIGRATING`."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    MIGRATING = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_MIGRATED = 7  # left this instance for another; it lives on there

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.MIGRATING

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish reason, or None while the request is alive."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_MIGRATED: "migrated",
}


# Temperatures below this sample greedily (vLLM's threshold too): dividing the logits by a smaller one
# overflows float32 (or rounds the temperature itself to 0), and sampling would pick no real token.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to sample one request's output (vLLM's names and meanings).

    `temperature=0` is greedy, and so is any temperature below `GREEDY_BELOW`.
    `top_k=-1` and `top_p=1` disable those filters.
    `seed` makes sampling reproducible per request, independent of batching,
    preemption and migration. `stop` strings are matched on detokenized text by
    the frontend; `stop_token_ids` and EOS are matched by the scheduler.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Request:
    """One generation request as the instance scheduler sees it.

    Counters, not phases: the scheduler gives the request tokens until
    `num_computed_tokens` catches up with `num_tokens`; a fresh prompt, a
    chunked prefill, a prefix-cache hit, a preempted request being recomputed
    and a migrated request all fall out of that one rule.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    priority: int = 0
    eos_token_id: int | None = None
    ttft_slo: float | None = None
    tpot_slo: float | None = None

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_migrations: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty")
        # One list for prompt + output so slicing the next tokens is cheap.
        self.all_token_ids: list[int] = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.MIGRATING

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass(slots=True)
class TokenDelta:
    """What one engine step produced for one request: new tokens and, at the end, why it stopped.

    output_index: the position of `new_token_ids[0]` in the request's output
    (for a closing delta without tokens, the number of tokens output so far),
    so a receiver can drop duplicates and detect gaps.
    """

    request_id: str
    new_token_ids: list[int]
    time: float
    finish_reason: str | None = None
    output_index: int = 0

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
