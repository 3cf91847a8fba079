"""The converted-weights cache: a GGUF file is read once; later loads get the same model from a plain directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shunter.model import converted, loader


def test_the_cache_key_follows_the_file_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("SHUNTER_CONVERTED_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    first = converted.converted_dir(f)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    f.write_bytes(b"two")  # a new release of the same file name is another entry
    assert converted.converted_dir(f) != first
    assert not converted.is_complete(first)


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache root should be")

    class Unused:
        def save_pretrained(self, path):  # never reached: the directory cannot be made
            raise AssertionError

    assert converted.save_converted(blocker / "entry", Unused(), Unused()) is False


@pytest.mark.slow
def test_gguf_is_converted_once_and_the_cached_model_is_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("SHUNTER_CONVERTED_DIR", str(tmp_path))
    entry = converted.converted_dir(Path(loader.resolve_source(None).directory) / loader.BUILTIN_GGUF_FILE)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{ half written")  # a crash mid-write: no completion marker
    first = loader.load_weights(None, "float32")
    assert converted.is_complete(entry) and (entry / "model.safetensors").is_file()
    second = loader.load_weights(None, "float32")  # from the directory this time
    a, b = first.model, second.model
    assert a.config == b.config
    assert torch.equal(a.embed_tokens, b.embed_tokens) and torch.equal(a.lm_head, b.lm_head)
    assert torch.equal(a.norm, b.norm)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.qkv, lb.qkv) and torch.equal(la.gate_up, lb.gate_up) and torch.equal(la.down, lb.down)
    chat = [{"role": "user", "content": "Hi!"}]
    assert first.tokenizer.apply_chat_template(chat) == second.tokenizer.apply_chat_template(chat)
    assert first.tokenizer.eos_token_id == second.tokenizer.eos_token_id


def test_the_cpu_kv_cache_is_zero_without_being_filled():
    config = loader.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                                num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, max_model_len=16)
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny_model(config, dtype)
        kv = model.new_kv_cache(num_blocks=5, block_size=4)
        assert kv.shape == (2, 5, 4, 2, 4) and kv.dtype == dtype
        assert torch.count_nonzero(kv) == 0
        kv[0, 0, 0, 0, 0] = 1.5  # writable, and owns its memory
        assert float(kv.sum()) == 1.5


def _tiny_model(config, dtype):
    from shunter.model.llama import LayerWeights, LlamaModel

    h, i, q = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kvw = config.num_kv_heads * config.head_dim
    layer = LayerWeights(input_norm=torch.ones(h, dtype=dtype), qkv=torch.zeros(q + 2 * kvw, h, dtype=dtype),
                         qkv_bias=None, o_proj=torch.zeros(h, q, dtype=dtype), post_norm=torch.ones(h, dtype=dtype),
                         gate_up=torch.zeros(2 * i, h, dtype=dtype), down=torch.zeros(h, i, dtype=dtype))
    embed = torch.zeros(config.vocab_size, h, dtype=dtype)
    return LlamaModel(config, embed_tokens=embed, layers=[layer] * config.num_layers, norm=torch.ones(h, dtype=dtype),
                      lm_head=embed, inv_freq=torch.ones(config.head_dim // 2), attention_scaling=1.0)
