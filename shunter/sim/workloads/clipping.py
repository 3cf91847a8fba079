"""Fitting a workload's lengths into the model's context, and counting what that cut off.

A trace written for a long-context model loses a lot on a short one (a
Mooncake window on Llama-2-7B's 4,096 tokens clips most of its prompts), so
the loader says how much it cut instead of doing it silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clipping:
    """What fitting a workload into `max_model_len` cut off (all counts 0 when nothing was cut)."""

    max_model_len: int | None = None
    num_prompts_clipped: int = 0
    num_prompt_tokens_clipped: int = 0
    num_outputs_clipped: int = 0
    num_output_tokens_clipped: int = 0

    @property
    def is_empty(self) -> bool:
        """Whether no request was changed."""
        return not (self.num_prompts_clipped or self.num_outputs_clipped)

    def summary(self, num_requests: int) -> str | None:
        """One line saying what was cut from `num_requests` requests, or None if nothing was."""
        if self.is_empty:
            return None
        parts = []
        if self.num_prompts_clipped:
            parts.append(f"{self.num_prompts_clipped:,} of {num_requests:,} prompts clipped to "
                         f"{self.max_model_len - 1:,} tokens ({self.num_prompt_tokens_clipped:,} prompt tokens "
                         "dropped)")
        if self.num_outputs_clipped:
            parts.append(f"{self.num_outputs_clipped:,} outputs shortened to fit "
                         f"({self.num_output_tokens_clipped:,} output tokens dropped)")
        return f"max_model_len {self.max_model_len:,}: " + "; ".join(parts)


def clip_to_context(prompts: np.ndarray, outputs: np.ndarray,
                    max_model_len: int | None) -> tuple[np.ndarray, np.ndarray, Clipping]:
    """Prompts cut to max_model_len - 1 tokens, outputs so that prompt + output <= max_model_len; what was cut.

    One token of room is kept for the output: a request must generate at least one.
    """
    if max_model_len is None:
        return prompts, outputs, Clipping()
    clipped_prompts = np.minimum(prompts, max_model_len - 1)
    clipped_outputs = np.minimum(outputs, max_model_len - clipped_prompts)
    clipping = Clipping(
        max_model_len=max_model_len,
        num_prompts_clipped=int(np.count_nonzero(clipped_prompts < prompts)),
        num_prompt_tokens_clipped=int((prompts - clipped_prompts).sum()),
        num_outputs_clipped=int(np.count_nonzero(clipped_outputs < outputs)),
        num_output_tokens_clipped=int((outputs - clipped_outputs).sum()),
    )
    return clipped_prompts, clipped_outputs, clipping
