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
    assert not s.requests and not s.waiting and not s.running and not s.incoming and not s.suspended




def copy_plan(src: InstanceEngine, dst: InstanceEngine, plan) -> None:
    """Carry out a migration stage's copy between two FakeExecutors (the KV the fake model reads)."""
    dst.executor.write_blocks(plan.dst_block_ids, src.executor.read_blocks(plan.src_block_ids))


def migrate(coordinator, src, dst, request_id: str, now: float = 0.0, steps_between_stages: int = 0,
            copy: bool = True, into: dict[str, list[TokenDelta]] | None = None):
    """Drive one migration to its end through the cluster's state machine; returns the Migration.

    `src`/`dst` are InProcessInstances over engines with FakeExecutors; the source
    takes `steps_between_stages` steps while each non-final copy is under way
    (their deltas go `into` the given dict).
    """
    m = coordinator.start(request_id, src, dst, now)
    while True:
        plan = coordinator.advance(m, now)
        if plan is None:
            return m
        if copy:
            copy_plan(src.engine, dst.engine, plan)
        if plan.is_final:
            coordinator.commit(m, now)
            src.engine.check_invariants()
            dst.engine.check_invariants()
            return m
        for _ in range(steps_between_stages):
            for d in step(src.engine, now)[1]:
                if into is not None:
                    into.setdefault(d.request_id, []).append(d)
