"""Slow: the offline LLM over the real built-in model matches Hugging Face greedy output token for token."""

from __future__ import annotations

import pytest

from shunter import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three reasons why the sky is blue, and explain each in one sentence. " * 2,
    "In 1969, Neil Armstrong became the first person to walk on the Moon. " * 5,
    "Translate to French: 'The weather is nice today and I would like to go for a walk in the park.'",
    "Once upon a time, in a small village at the edge of a dense forest, there lived an old clockmaker. " * 9,
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_model():
    import torch

    from shunter.model.loader import load_hf_model, resolve_source

    torch.set_num_threads(2)
    model = load_hf_model(resolve_source(None), torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def llm():
    from shunter import LLM

    # Small chunks and budget force every longer prompt through several prefill chunks.
    return LLM(dtype="float32", max_prefill_chunk=32, max_num_batched_tokens=64, num_blocks=512, num_threads=2)


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """HF greedy continuation, up to n tokens or EOS (included), as Shunter stops too."""
    import torch

    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                pad_token_id=hf_model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_prompts_have_different_lengths(llm):
    lengths = [len(llm.tokenizer.encode(p)) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)
    assert max(lengths) > 4 * 32  # several chunks


def test_greedy_equals_hf_with_small_prefill_chunks(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outputs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        expected = hf_greedy(hf_model, llm.tokenizer.encode(prompt), NEW_TOKENS)
        assert out.token_ids == expected, f"prompt {prompt[:30]!r}"
        assert out.text == llm.tokenizer.decode(expected)
        assert out.finish_reason == ("stop" if len(expected) < NEW_TOKENS else "length")
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0


def test_greedy_equals_hf_on_prefix_cache_hit(llm, hf_model):
    from shunter.request import Request

    base = PROMPTS[-1]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([base], params)
    follow_up = llm.tokenizer.encode(base) + llm.tokenizer.encode(" The clockmaker's name was")
    probe = Request("probe", follow_up)
    cached = llm.engine.scheduler.block_manager.find_cached_prefix(probe)
    assert len(cached) * llm.engine.config.block_size >= len(llm.tokenizer.encode(base)) - 16
    out = llm.generate([follow_up], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0]
    assert out.token_ids == hf_greedy(hf_model, follow_up, NEW_TOKENS)


def test_stop_string_and_chat(llm):
    out = llm.chat([{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
                   SamplingParams(temperature=0, max_tokens=40))[0]
    assert out.text and out.finish_reason in ("stop", "length")
    first_char = out.text.strip()[0]
    stopped = llm.chat([{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
                       SamplingParams(temperature=0, max_tokens=40, stop=[out.text[3:6]]))[0]
    assert stopped.finish_reason == "stop"
    assert out.text[3:6] not in stopped.text
    assert out.text.startswith(stopped.text) and stopped.text.strip().startswith(first_char)
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    a = llm.generate(["Tell me a story."], params)[0].token_ids
    b = llm.generate(["Tell me a story.", "Another prompt in the same batch"], [params, params])[0].token_ids
    assert a == b


@pytest.mark.parametrize("kwargs, bad", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
])
def test_bad_sampling_params_raise(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_leave_nothing_allocated(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""])
    too_long = [5] * llm.model_config.max_model_len
    with pytest.raises(ValueError, match="context"):
        llm.generate(["fine prompt", too_long])
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests
