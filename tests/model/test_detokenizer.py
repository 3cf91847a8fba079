"""Incremental detokenization and stop strings, over a byte-level fake tokenizer (no model)."""

from __future__ import annotations

import pytest

from shunter.model.tokenizer import Tokenizer

EOS = 0


class ByteTokenizer:
    """Hugging Face-like stand-in: token i is a fixed byte string; token 0 is a special EOS."""

    eos_token_id = EOS

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [b"<eos>"] + pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == EOS))
        return data.decode("utf-8", errors="replace")


def make_tokenizer(*pieces: bytes) -> Tokenizer:
    return Tokenizer(ByteTokenizer(list(pieces)))


def stream(detok, token_ids, flush=True) -> tuple[list[str], bool]:
    deltas, stopped = [], False
    for t in token_ids:
        delta = detok.add_tokens([t])
        deltas.append(delta.text)
        stopped = delta.stopped
        if stopped:
            break
    if flush and not stopped:
        deltas.append(detok.flush())
    return deltas, stopped


def test_streams_text_token_by_token():
    tok = make_tokenizer(b"Hello", b",", b" world", b"!")
    deltas, stopped = stream(tok.detokenizer(), [1, 2, 3, 4, EOS])
    assert deltas == ["Hello", ",", " world", "!", "", ""]
    assert not stopped


def test_multibyte_character_split_across_tokens_is_held_until_complete():
    euro = "€".encode()  # three bytes
    tok = make_tokenizer(b"price: ", euro[:1], euro[1:2], euro[2:], b"5")
    detok = tok.detokenizer()
    deltas, _ = stream(detok, [1, 2, 3, 4, 5])
    assert deltas == ["price: ", "", "", "€", "5", ""]
    assert "\ufffd" not in "".join(deltas)
    assert detok.text == "price: €5"


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    euro = "€".encode()
    tok = make_tokenizer(b"a", euro[:2])
    detok = tok.detokenizer()
    assert detok.add_tokens([1, 2]).text == "a"
    assert detok.flush() == "\ufffd"


def test_stop_string_inside_one_token():
    tok = make_tokenizer(b"one ", b"two STOP three", b" four")
    deltas, stopped = stream(tok.detokenizer(stop=["STOP"]), [1, 2, 3])
    assert stopped
    assert "".join(deltas) == "one two "


def test_stop_string_spanning_two_tokens_is_never_streamed():
    tok = make_tokenizer(b"Hello ", b"wor", b"ld", b"<|e", b"nd|>", b" more")
    detok = tok.detokenizer(stop=["<|end|>"])
    deltas, stopped = stream(detok, [1, 2, 3, 4, 5, 6])
    assert stopped
    assert "".join(deltas) == "Hello world"
    assert all("<" not in d for d in deltas)
    assert detok.text == "Hello world"
    assert detok.add_tokens([6]).stopped  # tokens after the stop are ignored


def test_earliest_of_several_stop_strings_wins():
    tok = make_tokenizer(b"abc", b"def", b"ghi")
    deltas, stopped = stream(tok.detokenizer(stop=["gh", "cd"]), [1, 2, 3])
    assert stopped
    assert "".join(deltas) == "ab"


def test_text_held_for_a_possible_stop_is_released_by_flush():
    tok = make_tokenizer(b"the end", b" is <", b"|e")
    detok = tok.detokenizer(stop=["<|end|>"])
    deltas, stopped = stream(detok, [1, 2, 3])
    assert not stopped
    assert "".join(deltas) == "the end is <|e"


@pytest.mark.parametrize("stop", [[], ["xyz"]])
def test_streamed_text_equals_full_decode(stop):
    pieces = [b"The", b" quick", b" \xc3", b"\xa9", b"clair", b" \xf0\x9f", b"\x98\x80", b" done"]
    tok = make_tokenizer(*pieces)
    ids = list(range(1, len(pieces) + 1))
    deltas, _ = stream(tok.detokenizer(stop=stop), ids)
    assert "".join(deltas) == tok.decode(ids) == "The quick éclair 😀 done"
