"""Shunter's own Llama-family forward pass over a paged KV cache.

One call of `LlamaModel.forward` runs one engine step: every scheduled
request's new tokens (prefill chunks starting anywhere, and decodes) are
flattened into a single `[T, hidden]` batch so each linear layer is one matmul.
Only attention looks at request boundaries:

- single-token requests (decodes) attend together in one call: on CPU a small
  C++ kernel reading the paged cache in place (`cpu_attention`), otherwise
  (or when it cannot be built) one padded SDPA call over their K/V gathered
  block by block from the cache;
- multi-token chunks attend one request at a time, over their freshly computed
  K/V when the chunk starts the sequence, otherwise over the cached context
  plus the chunk with a causal mask shifted by the start position.

The model is a plain object holding tensors, not an `nn.Module`: on a model this
small, Python and op-dispatch overhead weigh as much as the FLOPs, so the step
is written as a flat sequence of tensor ops with fused weights (q/k/v in one
matrix, gate/up in another) and RoPE tables computed once.

KV cache layout (`new_kv_cache`): one tensor
`[num_layers, num_blocks, block_size, 2 * num_kv_heads, head_dim]`; slot
`block_id * block_size + offset` holds the keys (first `num_kv_heads` rows) and
values (the rest) of one token. Keeping K and V of a slot adjacent means one
write per layer for the new tokens and one gather per layer for the decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shunter.model.cpu_attention import DecodeKernel, load_decode_kernel

ATTENTION_BACKENDS = ("auto", "torch", "cpu-kernel")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model: what the forward pass and the KV cache need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of KV cache one token occupies across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype.itemsize


@dataclass
class LayerWeights:
    """One decoder layer's weights, fused for fewer matmuls.

    qkv: `[(num_heads + 2 * num_kv_heads) * head_dim, hidden]`, rows q, then k, then v.
    gate_up: `[2 * intermediate, hidden]`, rows gate, then up.
    """

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class PrefillChunk:
    """A multi-token chunk of one request inside the flat batch.

    Tokens `[token_start, token_start + num_tokens)` of the batch sit at
    positions `[start_position, start_position + num_tokens)`. With
    `block_ids is None` the chunk starts the sequence and attends causally over
    its own new K/V; otherwise it attends over the first `context_len` slots of
    `block_ids` (cached and new) through `mask` (`[num_tokens, context_len]`,
    True where attention is allowed).
    """

    token_start: int
    num_tokens: int
    start_position: int
    block_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def context_len(self) -> int:
        return self.start_position + self.num_tokens


@dataclass
class StepInputs:
    """Everything one forward step needs, already as tensors on the model's device.

    The first `num_decode_tokens` tokens are single-token requests;
    `decode_block_ids[d]` is request d's block table padded to a common
    length (int64, rows contiguous) and `decode_context_lens[d]` the number of
    tokens it attends over. Multi-token chunks follow, described by
    `prefills`. `slot_mapping[t]` is the cache slot receiving token t's K/V;
    `logits_indices` picks the tokens whose next-token logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    num_decode_tokens: int = 0
    decode_block_ids: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    prefills: list[PrefillChunk] | None = None


class LlamaModel:
    """Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV cache.

    Build it with `shunter.model.loader.load_weights`; the constructor takes
    tensors that are already fused and on their device.

    attention_backend: how decodes attend. "cpu-kernel" needs a CPU model and
    a C++ compiler; "torch" is gather + SDPA anywhere; "auto" takes the
    kernel when it is available.
    """

    def __init__(
        self,
        config: ModelConfig,
        embed_tokens: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        attention_backend: str = "auto",
    ) -> None:
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = embed_tokens.dtype
        self.device = embed_tokens.device
        self._init_rope(inv_freq, attention_scaling)
        self._decode_kernel: DecodeKernel | None = None
        self.attention_backend = attention_backend

    @property
    def attention_backend(self) -> str:
        """The decode-attention path in use: "cpu-kernel" or "torch"."""
        return "torch" if self._decode_kernel is None else "cpu-kernel"

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: use one of {ATTENTION_BACKENDS}")
        kernel = None
        if backend != "torch" and self.device.type == "cpu":
            kernel = load_decode_kernel()
            if kernel is not None and not kernel.supports(self.dtype):
                kernel = None
        if backend == "cpu-kernel" and kernel is None:
            raise ValueError(f"attention backend 'cpu-kernel' is not available for a {self.dtype} model on {self.device}")
        self._decode_kernel = kernel

    def _init_rope(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        # Same arithmetic as Hugging Face (float32 angles, cast to the model dtype
        # at the end) so float32 runs match it; computed once for every position.
        positions = torch.arange(self.config.max_model_len, dtype=torch.float32, device=inv_freq.device)
        freqs = positions[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = freqs.shape[-1]
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: the sign lives in the
        # table, so applying RoPE is one roll and two multiplies.
        sin = emb.sin() * attention_scaling
        sin[:, :half].neg_()
        self.rope_cos = (emb.cos() * attention_scaling).to(self.dtype).to(self.device)
        self.rope_sin = sin.to(self.dtype).to(self.device)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The KV cache's shape: `[num_layers, num_blocks, block_size, 2 * kv_heads, head_dim]`."""
        c = self.config
        return (c.num_layers, num_blocks, block_size, 2 * c.num_kv_heads, c.head_dim)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        """A zeroed KV cache for `num_blocks` blocks of `block_size` tokens.

        Zeroed, not empty: padded decode slots are masked out, but a masked
        NaN from uninitialised memory would still poison the softmax sum. On
        CPU the zeros come from calloc (numpy), whose fresh pages the OS hands
        out already zero and untouched, so a cache of gigabytes costs nothing
        until it is written, instead of seconds of filling.
        """
        shape = self.kv_cache_shape(num_blocks, block_size)
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        import numpy as np

        # Same-width integer zeros, reinterpreted: all-zero bits are 0.0 in every float format.
        raw = np.zeros(shape, dtype={2: np.uint16, 4: np.uint32}[self.dtype.itemsize])
        return torch.from_numpy(raw).view(self.dtype)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, kv_cache: torch.Tensor) -> torch.Tensor:
        """Run one step; write the new tokens' K/V into `kv_cache`.

        Returns float32 logits `[len(inputs.logits_indices), vocab_size]`.
        """
        c = self.config
        eps = c.rms_norm_eps
        hidden = (c.hidden_size,)
        x = F.embedding(inputs.input_ids, self.embed_tokens)
        cos = self.rope_cos[inputs.positions].unsqueeze(1)
        sin = self.rope_sin[inputs.positions].unsqueeze(1)
        decode_mask = None
        if inputs.num_decode_tokens and self._decode_kernel is None:
            # Shared by all layers: slot j of the padded tables is real context iff j < context length.
            num_slots = inputs.decode_block_ids.shape[1] * kv_cache.shape[2]
            decode_mask = torch.arange(num_slots, device=self.device) < inputs.decode_context_lens[:, None]
            decode_mask = decode_mask.view(inputs.num_decode_tokens, 1, 1, num_slots)
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, hidden, layer.input_norm, eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            attn = self._attention(qkv, cos, sin, kv_cache[i], inputs, decode_mask)
            x.add_(F.linear(attn, layer.o_proj))
            h = F.rms_norm(x, hidden, layer.post_norm, eps)
            gate_up = F.linear(h, layer.gate_up)
            gate, up = gate_up.split(c.intermediate_size, dim=-1)
            x.add_(F.linear(F.silu(gate).mul_(up), layer.down))
        x = F.rms_norm(x[inputs.logits_indices], hidden, self.norm, eps)
        return F.linear(x, self.lm_head).float()

    def _attention(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        inputs: StepInputs,
        decode_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        c = self.config
        num_tokens = qkv.shape[0]
        nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        q_size = nh * hd
        # RoPE on q and k together, written back in place so k and v stay
        # adjacent in `qkv` and reach the cache in a single index_copy.
        qk = qkv[:, : q_size + nkv * hd].view(num_tokens, nh + nkv, hd)
        qk.copy_(torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin))
        kv = qkv[:, q_size:].view(num_tokens, 2 * nkv, hd)
        cache.view(-1, 2 * nkv, hd).index_copy_(0, inputs.slot_mapping, kv)

        num_decodes = inputs.num_decode_tokens
        decode_out = None
        if num_decodes:
            q = qkv[:num_decodes, :q_size]
            if self._decode_kernel is not None:
                decode_out = self._decode_kernel(
                    q, cache, inputs.decode_block_ids, inputs.decode_context_lens, nkv, hd**-0.5
                )
            else:
                decode_out = self._decode_attention(q, cache, inputs.decode_block_ids, decode_mask)
            if num_decodes == num_tokens:
                return decode_out
        out = qkv.new_empty(num_tokens, q_size)
        if decode_out is not None:
            out[:num_decodes] = decode_out
        for chunk in inputs.prefills or ():
            out[chunk.token_start:chunk.token_start + chunk.num_tokens] = self._prefill_attention(qkv, cache, chunk)
        return out

    def _decode_attention(
        self, q: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        nkv, hd = c.num_kv_heads, c.head_dim
        group = c.num_heads // nkv
        num_decodes = block_ids.shape[0]
        # With one query token per request, the `group` query heads sharing a KV
        # head act as `group` query rows of one MHA head: no K/V repetition needed.
        q = q.view(num_decodes, nkv, group, hd)
        blocks = cache.view(cache.shape[0], -1).index_select(0, block_ids.reshape(-1))
        kv = blocks.view(num_decodes, -1, 2 * nkv, hd)
        k = kv[:, :, :nkv].transpose(1, 2)
        v = kv[:, :, nkv:].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.reshape(num_decodes, c.num_heads * hd)

    def _prefill_attention(self, qkv: torch.Tensor, cache: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        c = self.config
        nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        rows = qkv[chunk.token_start:chunk.token_start + chunk.num_tokens]
        q = rows[:, : nh * hd].view(-1, nh, hd).transpose(0, 1)
        if chunk.block_ids is None:
            kv = rows[:, nh * hd:].view(-1, 2 * nkv, hd)
            mask, is_causal = None, True
        else:
            kv = cache.view(cache.shape[0], -1)[chunk.block_ids].view(-1, 2 * nkv, hd)[: chunk.context_len]
            mask, is_causal = chunk.mask, False
        k = kv[:, :nkv].transpose(0, 1)
        v = kv[:, nkv:].transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return out.transpose(0, 1).reshape(chunk.num_tokens, nh * hd)
