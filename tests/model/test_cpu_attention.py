"""The C++ decode-attention kernel against a plain torch reference (no model)."""

from __future__ import annotations

import pytest
import torch

from shunter.model.cpu_attention import load_decode_kernel

kernel = load_decode_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C++ compiler: the kernel cannot be built")


def reference(q, cache, tables, context_lens, num_kv_heads):
    """Textbook attention per sequence over its first context_len slots, in float64."""
    _, block_size, _, head_dim = cache.shape
    num_heads = q.shape[1] // head_dim
    out = []
    for row, table, n in zip(q, tables, context_lens.tolist()):
        slots = cache[table].reshape(-1, 2 * num_kv_heads, head_dim)[:n].double()
        k = slots[:, :num_kv_heads].repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = slots[:, num_kv_heads:].repeat_interleave(num_heads // num_kv_heads, dim=1)
        qh = row.view(num_heads, head_dim).double()
        weights = torch.einsum("hd,nhd->hn", qh, k).mul(head_dim**-0.5).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [(9, 3, 64, 16), (4, 4, 32, 8), (8, 1, 16, 5)])
def test_kernel_matches_reference(dtype, atol, num_heads, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_seqs = 128, 7
    cache = torch.randn(num_blocks, block_size, 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor([1, 2, block_size, block_size + 1, 3 * block_size - 1, 40, 77])
    max_blocks = -(-int(context_lens.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    # q as a strided slice of a wider fused qkv row, the way the model passes it.
    qkv = torch.randn(num_seqs, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : num_heads * head_dim]
    out = kernel(q, cache, tables, context_lens, num_kv_heads, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference(q, cache, tables, context_lens, num_kv_heads)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


def test_kernel_ignores_slots_beyond_the_context():
    cache = torch.randn(4, 4, 2, 8)
    tables = torch.tensor([[2, 3]])
    q = torch.randn(1, 8)
    lens = torch.tensor([5])
    before = kernel(q, cache, tables, lens, 1, 0.5)
    cache[3, 1:] = 1e6  # slots 5.. of the sequence: outside its context
    torch.testing.assert_close(kernel(q, cache, tables, lens, 1, 0.5), before)
