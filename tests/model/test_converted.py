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
