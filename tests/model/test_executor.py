"""ModelExecutor on a tiny random Llama (no checkpoint): batching, ordering, KV copy, bad input."""

from __future__ import annotations

import pytest
import torch

from shunter.engine.outputs import SchedulerOutput
from shunter.model.executor import ModelExecutor, num_blocks_for_memory
from shunter.model.llama import LayerWeights, LlamaModel, ModelConfig
from tests.model.driver import allocate_blocks, apply_output, make_request, run_to_completion, schedule_step

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_model_len=256)
BLOCK_SIZE = 4


def tiny_model(attention_backend: str = "torch", seed: int = 0) -> LlamaModel:
    gen = torch.Generator().manual_seed(seed)
    c = CONFIG

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.5

    layers = [
        LayerWeights(
            input_norm=1 + 0.1 * w(c.hidden_size),
            qkv=w((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size),
            qkv_bias=None,
            o_proj=w(c.hidden_size, c.num_heads * c.head_dim),
            post_norm=1 + 0.1 * w(c.hidden_size),
            gate_up=w(2 * c.intermediate_size, c.hidden_size),
            down=w(c.hidden_size, c.intermediate_size),
        )
        for _ in range(c.num_layers)
    ]
    embed = w(c.vocab_size, c.hidden_size) * 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    return LlamaModel(c, embed, layers, torch.ones(c.hidden_size), embed, inv_freq,
                      attention_backend=attention_backend)


def prompts(lengths: list[int]) -> list[list[int]]:
    return [[(7 * i + 3 * j) % CONFIG.vocab_size for j in range(n)] for i, n in enumerate(lengths)]


def generate(model: LlamaModel, batch_prompts: list[list[int]], chunk_size: int, num_new: int = 6, seed: int = 0):
    executor = ModelExecutor(model, num_blocks=128, block_size=BLOCK_SIZE)
    requests = [make_request(f"r{i}", p, num_new) for i, p in enumerate(batch_prompts)]
    tables = allocate_blocks([len(p) + num_new for p in batch_prompts], BLOCK_SIZE, 128, seed=seed)
    return run_to_completion(executor, requests, tables, chunk_size=chunk_size)


PROMPTS = prompts([1, 3, 4, 5, 9, 17, 30])


def test_chunking_and_batching_do_not_change_greedy_output():
    model = tiny_model()
    reference = [generate(model, [p], chunk_size=512)[0] for p in PROMPTS]
    assert generate(model, PROMPTS, chunk_size=512, seed=1) == reference
    assert generate(model, PROMPTS, chunk_size=3, seed=2) == reference
    assert generate(model, PROMPTS, chunk_size=1, seed=3) == reference


def test_cpu_kernel_and_torch_backends_agree():
    try:
        kernel_model = tiny_model("cpu-kernel")
    except ValueError:
        pytest.skip("the CPU kernel cannot be built here")
    assert generate(kernel_model, PROMPTS, chunk_size=4) == generate(tiny_model("torch"), PROMPTS, chunk_size=4)


def test_tokens_come_back_in_scheduled_order():
    """Decodes are run first internally; results must still line up with `scheduled`."""
    model = tiny_model()
    executor = ModelExecutor(model, num_blocks=64, block_size=BLOCK_SIZE)
    requests = [make_request(f"r{i}", p, 4) for i, p in enumerate(prompts([12, 2, 7]))]
    tables = allocate_blocks([16, 8, 12], BLOCK_SIZE, 64)
    for _ in range(2):  # after two 4-token chunks: r0 mid-prefill, r1 and r2 at different stages
        batch = schedule_step(requests, tables, chunk_size=4)
        apply_output(batch, executor.execute(batch).sampled_token_ids)
    batch = schedule_step(requests, tables, chunk_size=4)
    kinds = [(s.num_new_tokens, s.needs_sample) for s in batch.scheduled]
    assert kinds == [(4, True), (1, True), (1, True)]
    out = executor.execute(batch)
    assert [t is not None for t in out.sampled_token_ids] == [True, True, True]
    singles = []
    for request, table in zip(requests, tables):
        alone = ModelExecutor(model, num_blocks=64, block_size=BLOCK_SIZE)
        alone.write_blocks(table, executor.read_blocks(table))
        single = schedule_step([request], [table], chunk_size=4)
        singles.append(alone.execute(single).sampled_token_ids[0])
    assert out.sampled_token_ids == singles


def test_empty_batch():
    out = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE).execute(SchedulerOutput([]))
    assert out.sampled_token_ids == []


def test_bad_block_tables_are_rejected():
    executor = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("r", prompts([9])[0], 2)
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        executor.execute(schedule_step([request], [[0, 1]], chunk_size=16))
    with pytest.raises(ValueError, match=r"block ids must lie in \[0, 8\)"):
        executor.execute(schedule_step([request], [[0, 1, 8]], chunk_size=16))


def test_write_blocks_checks_the_payload_shape():
    executor = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE)
    payload = executor.read_blocks([1, 2])
    assert payload.shape == (CONFIG.num_layers, 2, BLOCK_SIZE, 2 * CONFIG.num_kv_heads, CONFIG.head_dim)
    with pytest.raises(ValueError, match="shape"):
        executor.write_blocks([3], payload)


def test_kv_sizing():
    per_block = CONFIG.kv_bytes_per_token(torch.bfloat16) * 16
    assert per_block == 2 * 2 * 2 * 8 * 2 * 16
    assert num_blocks_for_memory(10 * per_block + 1, CONFIG, 16, torch.bfloat16) == 10
