"""One request of a workload, and the synthetic prompt token ids that stand for it.

A workload knows lengths, not text. `prompt_token_ids` invents ids that keep the
one property a KV cache can observe: two requests share exactly the leading
tokens that their common leading prefix blocks (Mooncake `hash_ids`) cover.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PREFIX_BLOCK_TOKENS = 512  # Mooncake's hash_ids each stand for 512 prompt tokens
# Tokens of requests without prefix blocks (and of a prompt's tail past its blocks)
# lie at or above this base, disjoint from prefix-block ids, which must stay below it.
PRIVATE_TOKEN_BASE = 1 << 40


@dataclass(slots=True, frozen=True)
class WorkloadRequest:
    """A request as a workload describes it: when it comes, how long it is, what it wants.

    arrival_time: seconds from the start of the workload (the first request is at 0).
    prefix_block_ids: ids of its prompt's 512-token blocks (Mooncake `hash_ids`);
        requests share KV prefix for as many leading ids as they have in common.
        None where the trace has no prefix information.
    priority: 0 normal, 1 high.
    ttft_slo / tpot_slo: latency objectives in seconds, or None.
    """

    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    prefix_block_ids: tuple[int, ...] | None = None
    priority: int = 0
    ttft_slo: float | None = None
    tpot_slo: float | None = None


def prompt_token_ids(wr: WorkloadRequest, block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[int]:
    """Synthetic prompt of `wr.num_prompt_tokens` ids.

    Prefix block `h` contributes `block_tokens` copies of the id `h`; the last
    block is cut at the prompt's length. Tokens past the blocks (all of them when
    `prefix_block_ids` is None) are one id private to the request, derived from
    its `request_id`. Repeated ids are harmless because KV block hashes chain
    over the whole prefix. The ids are not in any model's vocabulary: they feed
    the simulator's block manager, not a model.
    """
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    n = wr.num_prompt_tokens
    tokens: list[int] = []
    for block_id in wr.prefix_block_ids or ():
        if len(tokens) >= n:
            break
        tokens += [block_id] * block_tokens
    del tokens[n:]
    if len(tokens) < n:
        tokens += [_private_token(wr.request_id)] * (n - len(tokens))
    return tokens


def _private_token(request_id: str) -> int:
    digest = hashlib.blake2b(request_id.encode(), digest_size=5).digest()
    return PRIVATE_TOKEN_BASE + int.from_bytes(digest, "big")
