"""Small, validated configuration dataclasses, one per concern. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerConfig:
    """Limits of one instance's continuous-batching scheduler.

    num_blocks: KV-cache capacity in blocks of `block_size` tokens.
    max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
    max_num_seqs: most requests running at once.
    max_prefill_chunk: most prompt tokens one request computes in a step
        (None: up to the whole budget). Small chunks keep decodes flowing.
    max_model_len: the model's context; a request stops when it reaches it.
    enable_prefix_caching: share KV blocks of identical prefixes.
    """

    num_blocks: int = 2048
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_prefill_chunk: int | None = None
    max_model_len: int = 8192
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_prefill_chunk is not None and (not isinstance(self.max_prefill_chunk, int) or self.max_prefill_chunk <= 0):
            raise ValueError(f"max_prefill_chunk must be a positive integer or None, got {self.max_prefill_chunk!r}")

    @property
    def prefill_chunk(self) -> int:
        return self.max_prefill_chunk or self.max_num_batched_tokens
