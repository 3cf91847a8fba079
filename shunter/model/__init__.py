"""The torch half of Shunter: Llama-family model, paged KV cache, sampler, tokenizer, executor.

Everything that imports torch lives in this package; the engine, cluster and
simulator code only sees `ModelExecutor` through the `Executor` protocol.
"""

from shunter.model.executor import ModelExecutor, default_num_blocks, kv_bytes_per_block, num_blocks_for_memory
from shunter.model.llama import LlamaModel, ModelConfig
from shunter.model.loader import LoadedModel, load_weights
from shunter.model.sampler import Sampler
from shunter.model.tokenizer import DetokenizedDelta, IncrementalDetokenizer, Tokenizer

__all__ = [
    "DetokenizedDelta",
    "IncrementalDetokenizer",
    "LlamaModel",
    "LoadedModel",
    "ModelConfig",
    "ModelExecutor",
    "Sampler",
    "Tokenizer",
    "default_num_blocks",
    "kv_bytes_per_block",
    "load_weights",
    "num_blocks_for_memory",
]
