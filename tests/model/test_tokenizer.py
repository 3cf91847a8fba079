"""The wrapper over the built-in model's own tokenizer."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_chat_template_ends_with_the_assistant_turn(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "Hello!" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_rejects_malformed_messages(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        tokenizer.apply_chat_template([{"role": "user"}])


def test_encode_decode_round_trip(tokenizer):
    text = "Grüße aus Köln: 3 × 4 = 12 🎉"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.eos_token_id == 2
    assert tokenizer.vocab_size == 49152


def test_incremental_detokenizer_matches_full_decode(tokenizer):
    text = "Streaming text: naïve café, 日本語のテキスト, emoji 🚀🔥 and code `x = 1`."
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    detok = tokenizer.detokenizer()
    deltas = [detok.add_tokens([i]).text for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == detok.text


def test_stop_string_across_real_tokens(tokenizer):
    ids = tokenizer.encode("The answer is 42. Question: what next?", add_special_tokens=False)
    detok = tokenizer.detokenizer(stop=["Question:"])
    streamed, stopped = "", False
    for i in ids:
        delta = detok.add_tokens([i])
        streamed += delta.text
        if delta.stopped:
            stopped = True
            break
    assert stopped and streamed == "The answer is 42. "
