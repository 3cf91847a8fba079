"""Loader: bad inputs fail with a ValueError naming the value; a local safetensors checkpoint loads."""

from __future__ import annotations

import json

import pytest
import torch

from shunter.model import loader
from shunter.model.executor import ModelExecutor
from shunter.model.loader import load_weights
from tests.model.driver import make_request, run_to_completion

TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
}


def write_config(directory, **overrides) -> None:
    (directory / "config.json").write_text(json.dumps({**TINY_LLAMA, **overrides}))


def test_unknown_model_path():
    with pytest.raises(ValueError, match="model path '/no/such/model' does not exist"):
        load_weights("/no/such/model")


def test_directory_with_garbage_weights(tmp_path):
    write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file" * 100)
    with pytest.raises(ValueError, match=f"cannot read weights from '{tmp_path}'"):
        load_weights(str(tmp_path), dtype="float32", device="cpu")


def test_garbage_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF but not really" * 50)
    with pytest.raises(ValueError, match="cannot read weights from .*model.gguf"):
        load_weights(str(path), dtype="float32", device="cpu")


def test_directory_without_weights(tmp_path):
    write_config(tmp_path)
    with pytest.raises(ValueError, match=r"cannot read weights from .*no \*\.safetensors"):
        load_weights(str(tmp_path))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read weights from .*no config.json"):
        load_weights(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    write_config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        load_weights(str(tmp_path), dtype="float32", device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float16"}, "unknown dtype 'float16'"),
    ({"dtype": "fp32"}, "unknown dtype 'fp32'"),
    ({"device": "tpu"}, "'tpu'"),
    ({"attention_backend": "flash"}, "unknown attention backend 'flash'"),
])
def test_bad_arguments_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_weights(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match="'cuda'"):
        load_weights(device="cuda")


def test_auto_dtype():
    assert loader.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    expected = torch.bfloat16 if loader.cpu_has_native_bf16() else torch.float32
    assert loader.resolve_dtype("auto", torch.device("cpu")) == expected
    assert loader.resolve_dtype("float32", torch.device("cuda")) == torch.float32


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """The built-in model's tokenizer, saved as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.hf_tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_local_safetensors_checkpoint_matches_hf(tmp_path, tokenizer_dir, model_type):
    """A tiny random checkpoint (qwen2: q/k/v biases) saved to disk loads and computes what HF computes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # initializer_range=0.5: peaked logits, so greedy tokens are no coin flips between near-ties.
    config = AutoConfig.for_model(**{**TINY_LLAMA, "model_type": model_type, "vocab_size": 49152,
                                     "tie_word_embeddings": model_type == "qwen2", "initializer_range": 0.5})
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    for f in tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())

    model, model_config, tokenizer = load_weights(str(tmp_path), dtype="float32", device="cpu")
    assert model_config.num_layers == 2 and model_config.num_kv_heads == 2
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)
    request = make_request("t", prompt, 8)
    executor = ModelExecutor(model, num_blocks=8, block_size=16)
    run_to_completion(executor, [request], [list(range(8))], chunk_size=4)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    assert request.output_token_ids == expected[0, len(prompt):].tolist()
