"""The shared-memory KV cache: another process reads its blocks while it lives, and nothing is left when it dies."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from shunter.model.executor import ModelExecutor
from shunter.model.shared_kv import PACE_MIN_SLEEP, KVShare, SharedKVCache, block_runs, copy_shared_blocks, shared_memory_available
from tests.model.test_executor import BLOCK_SIZE, CONFIG, tiny_model

pytestmark = pytest.mark.skipif(not shared_memory_available(), reason="needs Linux memfd_create and /proc")

SHAPE = (2, 6, 4, 2, 3)  # layers, blocks, block size, 2 * kv heads, head dim

# A process that owns a shared cache whose block b holds 10 * layer + b everywhere, says where it
# is, and lives until its stdin closes.
OWNER = f"""
import dataclasses, json, sys, torch
from shunter.model.shared_kv import SharedKVCache
cache = SharedKVCache({SHAPE!r}, torch.bfloat16)
for layer in range({SHAPE[0]}):
    for block in range({SHAPE[1]}):
        cache.tensor[layer, block] = 10 * layer + block
print(json.dumps(dataclasses.asdict(cache.share)), flush=True)
sys.stdin.read()
"""


def test_another_process_reads_the_blocks_it_asks_for_and_nothing_is_left_when_the_owner_dies():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fields = json.loads(owner.stdout.readline())
        share = KVShare(**{**fields, "shape": tuple(fields["shape"])})
        dest = torch.full(SHAPE, -1.0, dtype=torch.float32)
        copy_shared_blocks(share, [4, 1], dest, [0, 5])
        for layer in range(SHAPE[0]):
            assert torch.all(dest[layer, 0] == 10 * layer + 4)
            assert torch.all(dest[layer, 5] == 10 * layer + 1)
            assert torch.all(dest[layer, 1:5] == -1)  # only the blocks asked for
    finally:
        owner.stdin.close()
        owner.wait(10)
    # The owner's cache went with it: no file names it any more.
    with pytest.raises(FileNotFoundError):
        copy_shared_blocks(share, [0], dest, [0])


def test_a_shared_cache_starts_zeroed():
    cache = SharedKVCache(SHAPE, torch.float32)
    assert cache.tensor.shape == SHAPE and torch.count_nonzero(cache.tensor) == 0


@torch.inference_mode()
def test_pulling_from_a_shared_executor_equals_reading_and_writing():
    source = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE, share_kv=True)
    assert source.kv_share is not None and source.kv_share.shape == tuple(source.kv_cache.shape)
    source.kv_cache.copy_(torch.randn(source.kv_cache.shape))
    pulled = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE)
    written = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE)
    assert pulled.kv_share is None  # private unless asked for
    pulled.pull_blocks(source.kv_share, [5, 6, 2, 7], [0, 1, 3, 4])  # a run of two, then single blocks
    written.write_blocks([0, 1, 3, 4], source.read_blocks([5, 6, 2, 7]))
    assert torch.equal(pulled.kv_cache, written.kv_cache)
    assert torch.count_nonzero(pulled.kv_cache[:, [2, 5, 6, 7]]) == 0


def test_pull_blocks_checks_the_shapes():
    source = ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE, share_kv=True)
    other_block_size = ModelExecutor(tiny_model(), num_blocks=8, block_size=2 * BLOCK_SIZE)
    with pytest.raises(ValueError, match="shape"):
        other_block_size.pull_blocks(source.kv_share, [1], [1])
    with pytest.raises(ValueError, match="pulling 2 KV blocks into 1"):
        ModelExecutor(tiny_model(), num_blocks=8, block_size=BLOCK_SIZE).pull_blocks(source.kv_share, [1, 2], [1])
    assert CONFIG.num_layers == source.kv_share.shape[0]


def test_block_runs_merge_what_is_consecutive_on_both_sides():
    assert block_runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert block_runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]  # consecutive on one side only
    assert block_runs([], []) == []


def test_a_paced_copy_goes_no_faster_than_its_rate_and_copies_the_same():
    shape = (2, 64, 4, 2, 64)  # 256 KiB of float32
    cache = SharedKVCache(shape, torch.float32)
    cache.tensor.copy_(torch.randn(shape))
    blocks = list(range(64))
    paced, unpaced = torch.zeros(shape), torch.zeros(shape)
    started = time.perf_counter()
    copy_shared_blocks(cache.share, blocks, paced, blocks, max_bytes_per_s=1e6)
    elapsed = time.perf_counter() - started
    copy_shared_blocks(cache.share, blocks, unpaced, blocks)
    assert torch.equal(paced, cache.tensor) and torch.equal(unpaced, cache.tensor)
    # The last piece may land up to PACE_MIN_SLEEP early; nothing can make a paced copy faster.
    assert elapsed >= cache.tensor.numel() * 4 / 1e6 - PACE_MIN_SLEEP
