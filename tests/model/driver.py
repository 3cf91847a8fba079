"""A minimal stand-in scheduler for driving `ModelExecutor` by hand in tests.

Requests get fixed block tables up front; each step gives every live request
its next chunk (up to `chunk_size` prompt tokens, or one decode token), all in
one batch, until each has `max_new_tokens` outputs.
"""

from __future__ import annotations

import random

from shunter.engine.outputs import ScheduledRequest, SchedulerOutput
from shunter.model.executor import ModelExecutor
from shunter.request import Request, SamplingParams


def make_request(request_id: str, prompt: list[int], max_new_tokens: int, **sampling) -> Request:
    params = SamplingParams(temperature=sampling.pop("temperature", 0.0), max_tokens=max_new_tokens, **sampling)
    return Request(request_id, list(prompt), params)


def allocate_blocks(num_tokens: list[int], block_size: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Disjoint block tables, drawn from a shuffled pool so tables are not contiguous."""
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables = []
    for n in num_tokens:
        need = -(-n // block_size)
        tables.append(pool[:need])
        pool = pool[need:]
    return tables


def schedule_step(requests: list[Request], tables: list[list[int]], chunk_size: int) -> SchedulerOutput:
    scheduled = []
    for request, table in zip(requests, tables):
        if request.num_output_tokens >= request.sampling_params.max_tokens:
            continue
        n = min(request.num_tokens - request.num_computed_tokens, chunk_size)
        start = request.num_computed_tokens
        scheduled.append(ScheduledRequest(request, n, start, table, start + n == request.num_tokens))
    return SchedulerOutput(scheduled)


def apply_output(batch: SchedulerOutput, sampled: list[int | None]) -> None:
    for s, token in zip(batch.scheduled, sampled):
        s.request.num_computed_tokens += s.num_new_tokens
        if token is not None:
            s.request.append_output_token(token)


def run_to_completion(executor: ModelExecutor, requests: list[Request], tables: list[list[int]],
                      chunk_size: int = 32) -> list[list[int]]:
    """Step until every request has its `max_tokens` outputs (EOS is not special); return the outputs."""
    while True:
        batch = schedule_step(requests, tables, chunk_size)
        if batch.is_empty:
            return [r.output_token_ids for r in requests]
        apply_output(batch, executor.execute(batch).sampled_token_ids)
