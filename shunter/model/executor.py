"""`ModelExecutor`: runs the scheduler's batches on the real model and owns the KV cache.

It turns a `SchedulerOutput` into the flat tensors of one forward step
(`StepInputs`), samples the requests that need a token, and copies blocks of KV
in and out for live migration. It keeps no per-request state: a request's
block table and counters arrive with every batch, and sampling is derived from
(seed, output count), so preemption and migration need nothing from here.
"""

from __future__ import annotations

import os
import time

import torch

from shunter.engine.outputs import ExecOutput, ScheduledRequest, SchedulerOutput
from shunter.model.llama import LlamaModel, ModelConfig, PrefillChunk, StepInputs
from shunter.model.sampler import Sampler
from shunter.model.shared_kv import KVShare, SharedKVCache, copy_shared_blocks, shared_memory_available

# Default CPU cache: room for 64 concurrent requests of 2k tokens, bounded by
# a quarter of the machine's memory.
CPU_DEFAULT_CONCURRENCY = 64
CPU_DEFAULT_TOKENS_PER_REQUEST = 2048
CPU_MAX_MEMORY_FRACTION = 0.25
# On a GPU, the share of the memory still free after loading the weights.
CUDA_MEMORY_FRACTION = 0.8


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return config.kv_bytes_per_token(dtype) * block_size


def num_blocks_for_memory(num_bytes: int, config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """How many KV blocks fit in `num_bytes`."""
    return num_bytes // kv_bytes_per_block(config, block_size, dtype)


def default_num_blocks(config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """A sensible KV-cache size: see `CPU_DEFAULT_*` and `CUDA_MEMORY_FRACTION`."""
    device = torch.device(device)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return num_blocks_for_memory(int(free_bytes * CUDA_MEMORY_FRACTION), config, block_size, dtype)
    wanted = CPU_DEFAULT_CONCURRENCY * CPU_DEFAULT_TOKENS_PER_REQUEST * config.kv_bytes_per_token(dtype)
    return num_blocks_for_memory(min(wanted, int(_total_memory_bytes() * CPU_MAX_MEMORY_FRACTION)), config, block_size, dtype)


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelExecutor:
    """Executes batches on `model` over a KV cache of `num_blocks` blocks of `block_size` tokens.

    num_threads: torch intra-op threads (process-wide); None leaves torch's default.
    seed: seeds the generator shared by requests without their own seed.
    share_kv: on CPU, keep the cache in shared memory (`kv_share` says where), so that another
        executor on this machine can `pull_blocks` from it without this one doing any work.
    """

    def __init__(
        self,
        model: LlamaModel,
        num_blocks: int,
        block_size: int = 16,
        num_threads: int | None = None,
        seed: int | None = None,
        share_kv: bool = False,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_threads is not None:
            if num_threads <= 0:
                raise ValueError(f"num_threads must be positive, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_share: KVShare | None = None
        if share_kv and model.device.type == "cpu" and shared_memory_available():
            self._shared_cache = SharedKVCache(model.kv_cache_shape(num_blocks, block_size), model.dtype)
            self.kv_cache = self._shared_cache.tensor
            self.kv_share = self._shared_cache.share
        else:
            self.kv_cache = model.new_kv_cache(num_blocks, block_size)
        self.sampler = Sampler(seed)

    def execute(self, batch: SchedulerOutput) -> ExecOutput:
        """Run one step; return a token for each request with `needs_sample`, None for the others."""
        start = time.perf_counter()
        scheduled = batch.scheduled
        if not scheduled:
            return ExecOutput([], time.perf_counter() - start)
        # Single-token requests first: their attention is one batched call over a prefix of the batch.
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        ordered = [scheduled[i] for i in order]
        inputs = self._prepare(ordered)
        logits = self.model.forward(inputs, self.kv_cache)
        sampled_positions = [j for j, s in enumerate(ordered) if s.needs_sample]
        tokens = self.sampler.sample(
            logits,
            [ordered[j].request.sampling_params for j in sampled_positions],
            [ordered[j].request.num_output_tokens for j in sampled_positions],
        )
        sampled: list[int | None] = [None] * len(scheduled)
        for j, token in zip(sampled_positions, tokens):
            sampled[order[j]] = token
        return ExecOutput(sampled, time.perf_counter() - start)

    def _prepare(self, ordered: list[ScheduledRequest]) -> StepInputs:
        bs = self.block_size
        device = self.model.device
        num_new = [s.num_new_tokens for s in ordered]
        starts = [s.start_position for s in ordered]
        num_blocks = [-(-s.context_len // bs) for s in ordered]
        for s, n in zip(ordered, num_blocks):
            if len(s.block_ids) < n:
                raise ValueError(
                    f"request {s.request.request_id!r}: {len(s.block_ids)} blocks cannot hold {s.context_len} tokens"
                )
        max_blocks = max(num_blocks)
        input_ids: list[int] = []
        tables: list[list[int]] = []
        for s, n in zip(ordered, num_blocks):
            input_ids.extend(s.token_ids)
            tables.append(s.block_ids[:n] + [0] * (max_blocks - n))

        num_new_t = torch.tensor(num_new)
        starts_t = torch.tensor(starts)
        tables_t = torch.tensor(tables)
        if int(tables_t.min()) < 0 or int(tables_t.max()) >= self.num_blocks:
            raise ValueError(
                f"block ids must lie in [0, {self.num_blocks}), got ids from {int(tables_t.min())} to {int(tables_t.max())}"
            )
        num_tokens = len(input_ids)
        # Per-token request index and position, without a per-token Python loop.
        req_index = torch.repeat_interleave(torch.arange(len(ordered)), num_new_t)
        token_offsets = torch.cumsum(num_new_t, 0) - num_new_t
        positions = starts_t[req_index] + torch.arange(num_tokens) - token_offsets[req_index]
        slot_mapping = tables_t[req_index, positions // bs] * bs + positions % bs
        last_tokens = token_offsets + num_new_t - 1
        logits_indices = last_tokens[[j for j, s in enumerate(ordered) if s.needs_sample]]

        num_decodes = sum(1 for n in num_new if n == 1)
        decode_block_ids = decode_context_lens = None
        if num_decodes:
            decode_block_ids = tables_t[:num_decodes, : max(num_blocks[:num_decodes])].to(device)
            decode_context_lens = (starts_t[:num_decodes] + 1).to(device)
        prefills = []
        for j in range(num_decodes, len(ordered)):
            chunk = PrefillChunk(int(token_offsets[j]), num_new[j], starts[j])
            if starts[j] > 0:
                chunk.block_ids = tables_t[j, : num_blocks[j]].to(device)
                query_positions = torch.arange(starts[j], starts[j] + num_new[j])
                chunk.mask = (torch.arange(chunk.context_len)[None, :] <= query_positions[:, None]).to(device)
            prefills.append(chunk)
        return StepInputs(
            input_ids=torch.tensor(input_ids, device=device),
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            logits_indices=logits_indices.to(device),
            num_decode_tokens=num_decodes,
            decode_block_ids=decode_block_ids,
            decode_context_lens=decode_context_lens,
            prefills=prefills,
        )

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A CPU copy of the KV in `block_ids`: `[num_layers, len(block_ids), block_size, 2 * kv_heads, head_dim]`."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        return self.kv_cache.index_select(1, index).cpu()

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], payload: torch.Tensor) -> None:
        """Store a `read_blocks` payload (from this or another executor of the same model) into `block_ids`."""
        self._check_blocks_match(tuple(payload.shape), len(block_ids), "KV payload")
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        self.kv_cache.index_copy_(1, index, payload.to(device=self.kv_cache.device, dtype=self.kv_cache.dtype))

    def pull_blocks(self, share: KVShare, src_block_ids: list[int], block_ids: list[int],
                    max_bytes_per_s: float | None = None) -> None:
        """Copy blocks of another executor's shared cache (`share`, on this machine) into `block_ids`,
        no faster than `max_bytes_per_s` (None: unpaced).

        A one-sided read: the owner of `share` does nothing and keeps stepping.
        """
        if len(src_block_ids) != len(block_ids):
            raise ValueError(f"pulling {len(src_block_ids)} KV blocks into {len(block_ids)} blocks")
        self._check_blocks_match((share.shape[0], len(block_ids), *share.shape[2:]), len(block_ids), "shared KV cache")
        copy_shared_blocks(share, src_block_ids, self.kv_cache, block_ids, max_bytes_per_s)

    def blocks_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape of `num_blocks` blocks' KV as `read_blocks` returns it and `write_blocks` takes it."""
        return (self.kv_cache.shape[0], num_blocks, *self.kv_cache.shape[2:])

    def _check_blocks_match(self, shape: tuple[int, ...], num_blocks: int, what: str) -> None:
        expected = self.blocks_shape(num_blocks)
        if shape != expected:
            raise ValueError(f"{what} has shape {shape}, expected {expected}")
