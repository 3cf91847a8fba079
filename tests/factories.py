"""Test factories that need no model: requests, schedulers, engines and a fake executor."""

from __future__ import annotations

import itertools

from shunter.config import SchedulerConfig
from shunter.engine import ExecOutput, InstanceEngine, Scheduler, SchedulerOutput
from shunter.request import Request, SamplingParams

VOCAB = 1000
_ids = itertools.count()


def make_request(prompt_len: int = 20, max_tokens: int = 8, *, priority: int = 0, arrival_time: float = 0.0,
                 prompt: list[int] | None = None, request_id: str | None = None, eos: int | None = None,
                 **sampling) -> Request:
    """A request with a deterministic prompt (token i of request k is (k*7 + i) % VOCAB)."""
    n = next(_ids)
    if prompt is None:
        prompt = [(n * 7 + i) % VOCAB for i in range(prompt_len)]
    return Request(request_id=request_id or f"r{n}", prompt_token_ids=prompt,
                   sampling_params=SamplingParams(temperature=0, max_tokens=max_tokens, **sampling),
                   arrival_time=arrival_time, priority=priority, eos_token_id=eos)


def make_requests(n: int, prompt_len: int = 20, max_tokens: int = 8, **kw) -> list[Request]:
    return [make_request(prompt_len, max_tokens, arrival_time=float(i), **kw) for i in range(n)]


def make_config(**kw) -> SchedulerConfig:
    defaults = dict(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=16, max_model_len=512)
    defaults.update(kw)
    return SchedulerConfig(**defaults)


def make_scheduler(**kw) -> Scheduler:
    return Scheduler(make_config(**kw))


class FakeExecutor:
    """Stands in for the model: writes token ids as 'KV' into block slots and
    samples the next token as a hash of the context it reads back from the blocks.

    So the output depends on what the block tables really hold: a wrong prefix
    hit, a lost block or a bad migration copy changes the generated tokens.
    """

    def __init__(self, block_size: int, step_time: float = 0.01) -> None:
        self.block_size = block_size
        self.step_time = step_time
        self.kv: dict[int, list[int | None]] = {}
        self.batches: list[SchedulerOutput] = []

    def _slot(self, block_ids: list[int], pos: int) -> tuple[list[int | None], int]:
        block = block_ids[pos // self.block_size]
        return self.kv.setdefault(block, [None] * self.block_size), pos % self.block_size

    def execute(self, batch: SchedulerOutput) -> ExecOutput:
        self.batches.append(batch)
        tokens: list[int | None] = []
        for s in batch.scheduled:
            for i, tok in enumerate(s.token_ids):
                slots, off = self._slot(s.block_ids, s.start_position + i)
                slots[off] = tok
            if not s.needs_sample:
                tokens.append(None)
                continue
            context = []
            for pos in range(s.context_len):
                slots, off = self._slot(s.block_ids, pos)
                context.append(slots[off])
            tokens.append(next_token(context))
        return ExecOutput(tokens, self.step_time)

    def read_blocks(self, block_ids: list[int]) -> list[list[int | None]]:
        return [list(self.kv.get(b, [None] * self.block_size)) for b in block_ids]

    def write_blocks(self, block_ids: list[int], payload: list[list[int | None]]) -> None:
        for b, slots in zip(block_ids, payload):
            self.kv[b] = list(slots)


def next_token(context: list[int | None]) -> int:
    """The fake model: a deterministic function of the whole context."""
    h = 17
    for t in context:
        h = (h * 31 + (-1 if t is None else t)) % 1_000_003
    return h % VOCAB


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model generates for a prompt when nothing goes wrong."""
    context = list(prompt)
    out = []
    for _ in range(max_tokens):
        tok = next_token(context)
        out.append(tok)
        context.append(tok)
    return out


def make_engine(instance_id: str = "0", step_time: float = 0.01, **kw) -> InstanceEngine:
    config = make_config(**kw)
    return InstanceEngine(config, FakeExecutor(config.block_size, step_time), instance_id)


def run_to_completion(engine: InstanceEngine, now: float = 0.0, max_steps: int = 10_000, check: bool = True) -> dict[str, list[int]]:
    """Step until idle; returns each request's generated tokens."""
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests:
            return outputs
        for d in engine.step(now):
            outputs.setdefault(d.request_id, []).extend(d.new_token_ids)
        now += 0.01
        if check:
            engine.check_invariants()
    raise AssertionError("engine did not finish")
