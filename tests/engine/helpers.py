"""Small drivers shared by the engine tests (no model, no clock)."""

from __future__ import annotations

from shunter.engine import InstanceEngine, SchedulerOutput
from shunter.request import TokenDelta


def step(engine: InstanceEngine, now: float = 0.0) -> tuple[SchedulerOutput, list[TokenDelta]]:
    """One step through begin/end so the test sees the batch; checks invariants after it."""
    batch, result = engine.begin_step(now)
    deltas = [] if batch.is_empty else engine.end_step(batch, result, now)
    engine.check_invariants()
    return batch, deltas


def drain(engine: InstanceEngine, now: float = 0.0, max_steps: int = 5_000,
          into: dict[str, list[TokenDelta]] | None = None) -> dict[str, list[TokenDelta]]:
    """Step until idle, checking invariants after every step; returns every delta per request."""
    deltas = {} if into is None else into
    for _ in range(max_steps):
        if not engine.has_unfinished_requests:
            return deltas
        for d in engine.step(now):
            deltas.setdefault(d.request_id, []).append(d)
        engine.check_invariants()
        now += 0.01
    raise AssertionError("engine did not finish")


def tokens_of(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def assert_closed_once(deltas: list[TokenDelta], reason: str) -> None:
    """Exactly one delta closes the stream, it is the last one, with `reason`."""
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == reason


def assert_all_free(engine: InstanceEngine) -> None:
    """Nothing is held: every block free, no per-request state left behind."""
    s = engine.scheduler
    bm = s.block_manager
    engine.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_used_blocks == 0
    assert not bm.req_to_block_ids
    assert not bm.req_to_num_cached_blocks
    assert not bm.req_to_block_hashes
    assert not s.requests and not s.waiting and not s.running and not s.reserved_ids


