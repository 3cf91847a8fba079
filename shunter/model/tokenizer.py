"""The model's own Hugging Face tokenizer behind a small interface, and incremental detokenization.

`IncrementalDetokenizer` turns a request's output tokens into text as they
arrive (for streaming and for the offline `LLM` class) and applies the
request's `stop` strings to the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """encode / decode / chat template / EOS over a Hugging Face tokenizer."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer
        # The Rust tokenizer under a "fast" HF tokenizer: the same ids and text without the Python
        # wrapper's per-call padding/truncation bookkeeping (several times faster per call; the
        # frontend encodes every prompt and decodes every streamed token).
        self._fast = getattr(hf_tokenizer, "backend_tokenizer", None)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf_tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._fast is not None:
            return self._fast.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.hf_tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of `messages` in the model's chat format, ending with the assistant's turn opening.

        Raises ValueError if the tokenizer has no chat template or a message is malformed.
        """
        try:
            ids = self.hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja and template errors come in many types
            raise ValueError(f"cannot apply the chat template to the messages: {exc}") from exc
        return list(ids)

    def detokenizer(self, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's output."""
        return IncrementalDetokenizer(self, stop, skip_special_tokens)


@dataclass(slots=True)
class DetokenizedDelta:
    """New text since the previous call; `stopped` when a stop string was reached (text ends before it)."""

    text: str
    stopped: bool = False


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text, honouring stop strings.

    Text is decoded over a short window of recent tokens, so each call costs
    O(window) and a tokenizer's context-dependent spacing comes out as in a
    full decode. A token that ends inside a multi-byte character decodes to
    U+FFFD; such text is held back until the character completes. With stop
    strings, the last `len(longest stop) - 1` characters are held back too, so
    text that turns out to begin a stop string is never streamed; `flush()`
    releases what is held when the request ends for another reason.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start: tokens before it are decoded for good
        self._read_offset = 0  # tokens before it have contributed to `_text`
        self._text = ""  # all text decoded so far (truncated at a stop string)
        self._num_emitted = 0  # characters of `_text` already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """All output text so far (before the stop string, if one was hit)."""
        return self._text

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizedDelta:
        """Append tokens; return the text that is now final and whether a stop string was hit.

        After a stop, further tokens are ignored.
        """
        if self.stopped:
            return DetokenizedDelta("", True)
        # A stop string may begin in the held-back tail of the previous text.
        search_from = max(len(self._text) - self._hold, 0)
        for token_id in token_ids:
            self.token_ids.append(token_id)
            self._text += self._decode_new()
        stop_positions = [p for s in self._stop if (p := self._text.find(s, search_from)) != -1]
        if stop_positions:
            self._text = self._text[: min(stop_positions)]
            self.stopped = True
            return DetokenizedDelta(self._take(len(self._text)), True)
        return DetokenizedDelta(self._take(len(self._text) - self._hold))

    def flush(self) -> str:
        """Text still held back, for when the request finishes without a stop string.

        An incomplete trailing character is released as U+FFFD: no more bytes will come.
        """
        if not self.stopped and self._read_offset < len(self.token_ids):
            prefix_text = self._decode_window(self._read_offset)
            self._text += self._decode_window(len(self.token_ids))[len(prefix_text):]
            self._read_offset = len(self.token_ids)
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self._num_emitted:
            return ""
        delta = self._text[self._num_emitted:end]
        self._num_emitted = end
        return delta

    def _decode_window(self, end: int) -> str:
        return self._tokenizer.decode(self.token_ids[self._prefix_offset:end], self._skip_special_tokens)

    def _decode_new(self) -> str:
        prefix_text = self._decode_window(self._read_offset)
        full_text = self._decode_window(len(self.token_ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            # Nothing new yet, or the last token split a character: wait for more bytes.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]
