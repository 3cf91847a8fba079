"""One request's output stream in the frontend: ordered deltas in, text chunks out.

Deltas arrive from whichever instance owns the request, each with its output
index. The stream keeps the next index it expects: a delta wholly before it is
a duplicate and is dropped, one that overlaps it is trimmed, one beyond it
waits until the tokens before it arrive. That happens around a live
migration: the destination's first tokens can reach the frontend before the
source's last ones (two instances, two channels), and each channel delivers
everything in order, so the gap always fills. A gap that never fills (more
than `MAX_AHEAD` deltas waiting) ends the stream with an error rather than
with wrong text.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shunter.request import Request, TokenDelta

MAX_AHEAD = 4096  # deltas held for a gap to fill before the stream is declared broken


@dataclass(slots=True)
class StreamEvent:
    """New tokens for the client, and at the end why the request stopped (and an error message, if any)."""

    token_ids: list[int]
    time: float
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RequestStream:
    """The frontend's state for one live request."""

    request_id: str
    instance_id: str
    num_prompt_tokens: int
    arrival_time: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_index: int = 0
    finished: bool = False
    num_duplicates: int = 0
    ahead: dict[int, list[tuple[TokenDelta, str | None]]] = field(default_factory=dict)
    request: Request | None = None  # as dispatched (P/D picks the decode instance with it)
    last_token_time: float | None = None  # when the frontend last received tokens (inter-token latency)
    handoff_pending: bool = False  # P/D: migrate to a decode instance after the first token
    token_ids: list[int] = field(default_factory=list)  # every token streamed so far (a resume re-prefills them)
    resume_pending: bool = False  # its instance died mid-migration: the migration's end decides where it goes
    num_resumes: int = 0

    def push(self, delta: TokenDelta, error: str | None = None) -> None:
        """Take a delta from an instance (called on the event loop); deltas ahead of a gap wait for it."""
        if self.finished:
            return
        if delta.output_index > self.next_index:
            self.ahead.setdefault(delta.output_index, []).append((delta, error))
            if sum(len(v) for v in self.ahead.values()) > MAX_AHEAD:
                self.finish("error", delta.time, f"lost tokens: expected output index {self.next_index}, "
                                                 f"got up to {max(self.ahead)}")
            return
        self._take(delta, error)
        while self.ahead and not self.finished:
            waiting = [i for i in self.ahead if i <= self.next_index]
            if not waiting:
                break
            for d, e in self.ahead.pop(min(waiting)):
                self._take(d, e)

    def _take(self, delta: TokenDelta, error: str | None) -> None:
        if self.finished:
            return
        tokens = delta.new_token_ids
        skip = self.next_index - delta.output_index
        if skip and tokens:
            self.num_duplicates += min(skip, len(tokens))
            tokens = tokens[skip:]
        if not tokens and delta.finish_reason is None:
            return
        self.next_index += len(tokens)
        self.token_ids.extend(tokens)
        if delta.finish_reason is not None:
            self.finished = True
        self.queue.put_nowait(StreamEvent(list(tokens), delta.time, delta.finish_reason, error))

    def finish(self, reason: str, time: float, error: str | None = None) -> None:
        """End the stream from the frontend's side (instance lost, gap, shutdown)."""
        if not self.finished:
            self.finished = True
            self.queue.put_nowait(StreamEvent([], time, reason, error))
