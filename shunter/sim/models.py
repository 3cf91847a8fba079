"""Model shapes for the roofline latency model and the KV-capacity calculation.

Shapes are the `config.json` values of the Hugging Face checkpoints
(meta-llama/Llama-2-{7b,13b,70b}-hf, meta-llama/Meta-Llama-3-8B,
Qwen/Qwen2.5-7B, HuggingFaceTB/SmolLM2-135M); `num_params` is computed from
them and checked in the tests against the published parameter counts.

Tensor parallelism is part of the name: `llama-2-70b-tp4` is Llama-2-70B split
over 4 GPUs (Megatron-style: attention heads and MLP columns divided, two
all-reduces per layer); an instance of it occupies 4 GPUs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from shunter.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama family: RMSNorm, SwiGLU MLP, GQA attention)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_model_len: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    dtype_bytes: int = 2  # bf16 / fp16 weights and KV cache
    tp: int = 1  # tensor-parallel degree: GPUs per instance

    def __post_init__(self) -> None:
        if self.tp < 1 or self.num_heads % self.tp:
            raise ValueError(f"model {self.name!r}: {self.num_heads} attention heads cannot be split over tp={self.tp}")

    # ---- parameters ------------------------------------------------------------
    @property
    def params_per_layer(self) -> int:
        """Weights of one transformer layer: attention, MLP, two norms (whole model, not per GPU)."""
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_heads * d
        kv = 2 * h * self.num_kv_heads * d
        o = self.num_heads * d * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        mlp = 3 * h * self.intermediate_size
        return q + kv + o + bias + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_layers * self.params_per_layer + self.embedding_params + lm_head + self.hidden_size

    @property
    def weight_bytes_per_gpu(self) -> float:
        """Weights one GPU of the instance holds (everything split tp ways)."""
        return self.num_params * self.dtype_bytes / self.tp

    # ---- KV cache ---------------------------------------------------------------
    @property
    def kv_heads_per_gpu(self) -> int:
        # With fewer KV heads than GPUs each GPU keeps a replica of one (vLLM does the same).
        return -(-self.num_kv_heads // self.tp)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, on one GPU of the instance."""
        return 2 * self.num_layers * self.kv_heads_per_gpu * self.head_dim * self.dtype_bytes

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block holds on one GPU (what a migration stage copies per block and GPU)."""
        return self.kv_bytes_per_token * block_size

    def with_tp(self, tp: int) -> ModelSpec:
        name = self.name if tp == 1 else f"{self.name}-tp{tp}"
        return dataclasses.replace(self, name=name, tp=tp)


MODELS: Registry[ModelSpec] = Registry("model")

for _m in (
    ModelSpec("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, 4096),
    ModelSpec("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000, 4096),
    ModelSpec("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000, 4096),
    ModelSpec("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8192),
    ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, 32768, qkv_bias=True),
    ModelSpec("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, 8192, tie_word_embeddings=True),
):
    MODELS.register(_m.name, _m)

_TP_SUFFIX = re.compile(r"^(?P<base>.+)-tp(?P<tp>[1-9][0-9]*)$")


def get_model(name: str) -> ModelSpec:
    """The model named `name`, optionally with a `-tpN` suffix; ValueError listing the names otherwise."""
    match = _TP_SUFFIX.match(name) if isinstance(name, str) else None
    if match and match["base"] in MODELS:
        return MODELS.get(match["base"]).with_tp(int(match["tp"]))
    try:
        return MODELS.get(name)
    except ValueError as e:
        raise ValueError(f"{e} (append -tpN for tensor parallelism, e.g. llama-2-70b-tp4)") from None
