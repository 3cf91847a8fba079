"""Scheduler and engine: token budget, chunked prefill, stall-free batching, priorities,
preemption, abort, prefix-cache hits, stop conditions and load reports."""

from __future__ import annotations

import pytest

from shunter.engine.block_manager import cdiv
from shunter.request import RequestStatus
from tests.engine.helpers import assert_all_free, assert_closed_once, drain, step, tokens_of
from tests.factories import make_engine, make_request, reference_output


def scheduled(batch) -> dict[str, tuple[int, int, bool]]:
    """request id -> (start_position, num_new_tokens, needs_sample) for one batch."""
    return {s.request.request_id: (s.start_position, s.num_new_tokens, s.needs_sample) for s in batch.scheduled}


# ---- budget, chunking, batching ------------------------------------------------------
@pytest.mark.parametrize("budget,chunk", [(16, None), (24, 8), (7, None), (20, 5)])
def test_every_step_respects_the_token_budget_and_fills_it_when_it_can(budget, chunk):
    engine = make_engine(num_blocks=400, max_num_batched_tokens=budget, max_prefill_chunk=chunk)
    requests = [make_request(prompt_len=n, max_tokens=6, arrival_time=float(i))
                for i, n in enumerate([30, 3, 17, 40, 9, 12])]
    for r in requests:
        engine.add_request(r)
    deltas: dict[str, list] = {}
    saw_full_step = False
    while engine.has_unfinished_requests:
        batch, step_deltas = step(engine)
        assert 0 < batch.num_batched_tokens <= budget
        assert all(s.num_new_tokens <= (chunk or budget) for s in batch.scheduled)
        assert len({s.request.request_id for s in batch.scheduled}) == len(batch.scheduled)
        saw_full_step |= batch.num_batched_tokens == budget
        for d in step_deltas:
            deltas.setdefault(d.request_id, []).append(d)
    assert saw_full_step  # the budget is a limit that is actually reached, not an accident
    for r in requests:
        assert tokens_of(deltas[r.request_id]) == reference_output(r.prompt_token_ids, 6)
    assert_all_free(engine)


def test_chunked_prefill_splits_the_prompt_and_only_the_last_chunk_samples():
    engine = make_engine(max_prefill_chunk=16, max_num_batched_tokens=64)
    r = make_request(prompt_len=50, max_tokens=3)
    engine.add_request(r)
    chunks = []
    for _ in range(4):
        batch, deltas = step(engine)
        chunks.append(scheduled(batch)[r.request_id])
        if len(chunks) < 4:
            assert deltas == [] and r.output_token_ids == [] and r.first_token_time is None
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert r.num_output_tokens == 1
    # The executor was told to sample exactly once, on the last chunk.
    samples = [s.needs_sample for b in engine.executor.batches for s in b.scheduled]
    assert samples == [False, False, False, True]
    # Then plain decodes of one token each.
    batch, _ = step(engine)
    assert scheduled(batch)[r.request_id] == (50, 1, True)
    assert batch.scheduled[0].is_decode
    drain(engine)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 3)


def test_without_a_chunk_limit_the_budget_chunks_the_prompt():
    engine = make_engine(max_num_batched_tokens=64, num_blocks=100)
    r = make_request(prompt_len=150, max_tokens=2)
    engine.add_request(r)
    starts = [scheduled(step(engine)[0])[r.request_id] for _ in range(3)]
    assert starts == [(0, 64, False), (64, 64, False), (128, 22, True)]
    drain(engine)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 2)


@pytest.mark.parametrize("long_priority", [0, 5], ids=["later-arrival", "higher-priority"])
def test_prefill_chunks_and_decodes_share_a_step_without_stalling_decodes(long_priority):
    # No chunk limit: a long prompt alone would take the whole budget.
    engine = make_engine(num_blocks=400, max_num_batched_tokens=16, max_num_seqs=8)
    decoders = [make_request(prompt_len=4, max_tokens=40, arrival_time=float(i)) for i in range(3)]
    for r in decoders:
        engine.add_request(r)
    step(engine)
    step(engine)
    assert all(r.num_output_tokens == 2 for r in decoders)
    long = make_request(prompt_len=100, max_tokens=4, priority=long_priority, arrival_time=10.0)
    engine.add_request(long)
    num_prefill_steps = 0
    while long.num_output_tokens == 0:
        before = [r.num_output_tokens for r in decoders]
        batch, _ = step(engine)
        sched = scheduled(batch)
        assert long.request_id in sched  # the prompt progresses every step...
        assert batch.num_batched_tokens <= 16
        for r, n in zip(decoders, before):  # ...and every decode still gets its token
            assert sched[r.request_id][1] == 1
            assert r.num_output_tokens == n + 1
        num_prefill_steps += 1
    assert num_prefill_steps == cdiv(100, 16 - len(decoders))
    drain(engine)
    for r in decoders + [long]:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)


def test_max_num_seqs_is_respected():
    engine = make_engine(max_num_seqs=3, num_blocks=200)
    requests = [make_request(prompt_len=5 + i, max_tokens=4, arrival_time=float(i)) for i in range(10)]
    for r in requests:
        engine.add_request(r)
    saw_full = False
    while engine.has_unfinished_requests:
        batch, _ = step(engine)
        assert len(batch.scheduled) <= 3 and len(engine.scheduler.running) <= 3
        saw_full |= len(engine.scheduler.running) == 3
    assert saw_full
    for r in requests:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 4)


# ---- priorities -------------------------------------------------------------------------
def test_higher_priority_is_admitted_first_then_earlier_arrival():
    engine = make_engine(max_num_seqs=1)
    spec = [("p0-t0", 0, 0.0), ("p2-t3", 2, 3.0), ("p1-t1", 1, 1.0), ("p2-t2", 2, 2.0), ("p1-t0.5", 1, 0.5)]
    for rid, priority, t in spec:  # insertion order is neither priority nor arrival order
        engine.add_request(make_request(prompt_len=6, max_tokens=2, priority=priority, arrival_time=t, request_id=rid))
    order = []
    while engine.has_unfinished_requests:
        batch, _ = step(engine)
        for s in batch.scheduled:
            if s.request.request_id not in order:
                order.append(s.request.request_id)
    assert order == ["p2-t2", "p2-t3", "p1-t0.5", "p1-t1", "p0-t0"]


def test_admission_within_one_step_follows_priority_order():
    engine = make_engine(max_num_batched_tokens=20, max_num_seqs=8)
    low = make_request(prompt_len=10, max_tokens=2, priority=0, arrival_time=0.0)
    high = make_request(prompt_len=10, max_tokens=2, priority=1, arrival_time=5.0)
    mid = make_request(prompt_len=10, max_tokens=2, priority=1, arrival_time=6.0)
    for r in (low, high, mid):
        engine.add_request(r)
    batch, _ = step(engine)
    assert [s.request.request_id for s in batch.scheduled] == [high.request_id, mid.request_id]
    assert low.status is RequestStatus.WAITING


# ---- preemption ------------------------------------------------------------------------
def _three_growing(priorities: list[int]):
    """Three requests that fill 6 blocks exactly after prefill and must grow on the next step."""
    engine = make_engine(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    requests = [make_request(prompt_len=8, max_tokens=12, priority=p, arrival_time=float(i))
                for i, p in enumerate(priorities)]
    for r in requests:
        engine.add_request(r)
    batch, _ = step(engine)
    assert len(batch.scheduled) == 3 and engine.scheduler.block_manager.num_free_blocks == 0
    return engine, requests


@pytest.mark.parametrize("priorities,victim", [
    ([1, 0, 0], 2),  # lowest priority, then the latest arrival
    ([0, 1, 2], 0),  # the lowest priority even though it arrived first
    ([0, 0, 0], 2),  # equal priorities: the latest arrival
    ([2, 0, 1], 1),
])
def test_preemption_victim_is_lowest_priority_then_latest_arrival(priorities, victim):
    engine, requests = _three_growing(priorities)
    batch, _ = step(engine)
    v = requests[victim]
    assert batch.preempted_request_ids == [v.request_id]
    assert v.status is RequestStatus.PREEMPTED and v.num_preemptions == 1 and v.num_computed_tokens == 0
    assert engine.scheduler.block_manager.block_ids(v.request_id) == []
    assert v in engine.scheduler.waiting
    assert v.request_id not in scheduled(batch)
    assert all(r.num_preemptions == 0 for r in requests if r is not v)
    report = engine.load_report(0.0)
    assert report.num_preempted == 1 and report.num_waiting == 1 and report.num_running == 2
    assert report.head_block_demand == report.waiting_block_demand == cdiv(v.num_tokens, 4)


def test_preempted_request_is_recomputed_and_generates_the_reference_output():
    engine, requests = _three_growing([0, 0, 0])
    deltas = drain(engine)
    assert sum(r.num_preemptions for r in requests) >= 1
    for r in requests:
        assert tokens_of(deltas[r.request_id]) == r.output_token_ids[1:]  # the first came before drain()
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 12)
    assert_all_free(engine)
    # Same outputs with plenty of blocks (no preemption at all).
    roomy = make_engine(num_blocks=64, block_size=4)
    twins = [make_request(prompt=list(r.prompt_token_ids), max_tokens=12, arrival_time=r.arrival_time) for r in requests]
    for r in twins:
        roomy.add_request(r)
    drain(roomy)
    assert all(t.num_preemptions == 0 for t in twins)
    assert [t.output_token_ids for t in twins] == [r.output_token_ids for r in requests]


def test_a_resumed_request_recomputes_prompt_and_output_then_samples_the_next_token():
    engine = make_engine(num_blocks=6, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    requests = [make_request(prompt_len=8, max_tokens=12, arrival_time=float(i)) for i in range(3)]
    for r in requests:
        engine.add_request(r)
    step(engine)
    batch, _ = step(engine)
    (victim_id,) = batch.preempted_request_ids
    victim = next(r for r in requests if r.request_id == victim_id)
    outputs_at_preemption = list(victim.output_token_ids)
    while victim.status is not RequestStatus.RUNNING:
        batch, _ = step(engine)
    start, num_new, needs_sample = scheduled(batch)[victim_id]
    assert start == 0  # no prefix caching: recompute from scratch, prompt and output alike
    assert num_new == len(victim.prompt_token_ids) + len(outputs_at_preemption)
    assert needs_sample and victim.output_token_ids[:len(outputs_at_preemption)] == outputs_at_preemption
    drain(engine)
    assert victim.output_token_ids == reference_output(victim.prompt_token_ids, 12)


def test_a_request_using_every_kv_slot_of_the_instance_finishes():
    engine = make_engine(num_blocks=8, block_size=4, max_model_len=512)  # 32 KV slots
    r = make_request(prompt_len=20, max_tokens=13)  # 33 tokens at the end, the last one needs no KV
    engine.add_request(r)
    deltas = drain(engine, max_steps=500)
    assert_closed_once(deltas[r.request_id], "length")
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 13)
    assert_all_free(engine)


def test_requests_filling_the_instance_together_all_finish():
    # Each fits alone; together they preempt each other, and each must still finish.
    engine = make_engine(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    requests = [make_request(prompt_len=10 + i, max_tokens=20 - i, arrival_time=float(i)) for i in range(3)]
    for r in requests:
        engine.add_request(r)
    drain(engine, max_steps=2_000)
    assert sum(r.num_preemptions for r in requests) >= 2
    for r in requests:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert_all_free(engine)


# ---- abort -------------------------------------------------------------------------------
def _abort_and_check(engine, r, others=()):
    """Abort `r`; its blocks come back; then abort the rest and every block is free."""
    total = engine.scheduler.block_manager.num_blocks
    held_by_r = len(engine.scheduler.block_manager.block_ids(r.request_id))
    free_before = engine.scheduler.block_manager.num_free_blocks
    out_before = list(r.output_token_ids)
    delta = engine.abort_request(r.request_id, 7.0)
    assert delta is not None and delta.request_id == r.request_id
    assert delta.finish_reason == "abort" and delta.new_token_ids == [] and delta.is_finished
    assert r.status is RequestStatus.FINISHED_ABORTED and r.finish_time == 7.0
    assert r.output_token_ids == out_before
    s = engine.scheduler
    assert r.request_id not in s.requests and r not in s.waiting and r not in s.running
    assert s.block_manager.block_ids(r.request_id) == []
    assert s.block_manager.num_free_blocks == free_before + held_by_r
    engine.check_invariants()
    assert engine.abort_request(r.request_id, 8.0) is None  # idempotent
    batch, _ = step(engine)
    assert r.request_id in batch.finished_request_ids  # executors hear about it once
    assert all(x.request.request_id != r.request_id for x in batch.scheduled)
    for o in others:
        engine.abort_request(o.request_id, 9.0)
    assert_all_free(engine)
    assert s.block_manager.num_free_blocks == total


def test_abort_waiting():
    engine = make_engine(max_num_seqs=1)
    running, waiting = make_request(max_tokens=20), make_request(max_tokens=20, arrival_time=1.0)
    engine.add_request(running)
    engine.add_request(waiting)
    step(engine)
    assert waiting.status is RequestStatus.WAITING
    _abort_and_check(engine, waiting, [running])


def test_abort_running_mid_prefill():
    engine = make_engine(max_prefill_chunk=8)
    r = make_request(prompt_len=30, max_tokens=5)
    engine.add_request(r)
    step(engine)
    assert r.status is RequestStatus.RUNNING and 0 < r.num_computed_tokens < r.num_prompt_tokens
    assert engine.scheduler.block_manager.block_ids(r.request_id)
    _abort_and_check(engine, r)


def test_abort_running_decoding():
    engine = make_engine()
    r, other = make_request(prompt_len=9, max_tokens=20), make_request(prompt_len=5, max_tokens=20)
    engine.add_request(r)
    engine.add_request(other)
    for _ in range(3):
        step(engine)
    assert r.num_output_tokens == 3
    _abort_and_check(engine, r, [other])


def test_abort_preempted():
    engine, requests = _three_growing([0, 0, 0])
    step(engine)
    victim = next(r for r in requests if r.status is RequestStatus.PREEMPTED)
    _abort_and_check(engine, victim, [r for r in requests if r is not victim])


def test_a_migration_reservation_is_freed_by_cancelling_its_migration_not_by_request_abort():
    engine = make_engine()
    r = make_request(prompt_len=9, max_tokens=20)
    engine.add_request(r)
    step(engine)
    assert engine.reserve_migration("m7", "incoming", 21) is not None
    assert engine.scheduler.block_manager.num_used_blocks == cdiv(9, 4) + cdiv(21, 4)
    assert engine.load_report(0.0).num_reserved_blocks == cdiv(21, 4)
    assert engine.abort_request("incoming", 3.0) is None  # not live here: nothing to abort
    assert engine.cancel_migration("m7") == cdiv(21, 4)
    assert engine.reserved_block_ids("m7") == [] and not engine.scheduler.incoming
    assert engine.scheduler.block_manager.num_used_blocks == cdiv(9, 4)
    assert engine.cancel_migration("m7") == 0  # twice: a no-op
    engine.check_invariants()
    engine.abort_request(r.request_id, 3.0)
    assert_all_free(engine)


def test_abort_unknown_request_is_a_no_op():
    engine = make_engine()
    assert engine.abort_request("nobody", 0.0) is None
    assert_all_free(engine)


@pytest.mark.parametrize("mid_prefill", [False, True])
def test_abort_between_begin_step_and_end_step_is_skipped_by_end_step(mid_prefill):
    engine = make_engine(max_prefill_chunk=8 if mid_prefill else None)
    doomed = make_request(prompt_len=30 if mid_prefill else 9, max_tokens=10)
    other = make_request(prompt_len=5, max_tokens=10, arrival_time=1.0)
    engine.add_request(doomed)
    engine.add_request(other)
    step(engine)
    if not mid_prefill:
        step(engine)
    computed, outputs = doomed.num_computed_tokens, list(doomed.output_token_ids)
    batch, result = engine.begin_step(1.0)
    assert doomed.request_id in scheduled(batch)
    assert engine.abort_request(doomed.request_id, 1.0).finish_reason == "abort"
    deltas = engine.end_step(batch, result, 1.01)
    engine.check_invariants()
    assert [d.request_id for d in deltas] == [other.request_id]
    assert doomed.output_token_ids == outputs and doomed.num_computed_tokens == computed
    assert doomed.status is RequestStatus.FINISHED_ABORTED
    assert engine.scheduler.block_manager.block_ids(doomed.request_id) == []
    drain(engine)
    assert other.output_token_ids == reference_output(other.prompt_token_ids, 10)
    assert_all_free(engine)


def test_finish_request_closes_a_live_request_and_frees_it():
    engine = make_engine()
    r = make_request(prompt_len=9, max_tokens=20)
    engine.add_request(r)
    step(engine)
    assert engine.finish_request(r.request_id, 2.0) is True
    assert r.status is RequestStatus.FINISHED_STOPPED and r.status.finish_reason == "stop"
    assert engine.finish_request(r.request_id, 2.0) is False
    assert_all_free(engine)


# ---- prefix cache through the scheduler -------------------------------------------------
@pytest.mark.parametrize("concurrent", [False, True], ids=["after", "while-running"])
def test_a_shared_prefix_is_not_recomputed(concurrent):
    bs = 4
    engine = make_engine(block_size=bs, max_num_batched_tokens=64, max_num_seqs=8)
    prefix = [(7 * i + 3) % 1000 for i in range(40)]
    first = make_request(prompt=prefix + [1, 2, 3], max_tokens=6)
    second = make_request(prompt=prefix + [9, 9], max_tokens=6, arrival_time=1.0)
    engine.add_request(first)
    if concurrent:
        step(engine)  # 'first' has computed 43 tokens: 10 full blocks registered
        assert first.status is RequestStatus.RUNNING
    else:
        drain(engine)
    engine.add_request(second)
    batch, _ = step(engine)
    start, num_new, needs_sample = scheduled(batch)[second.request_id]
    cached = engine.scheduler.block_manager.block_ids(second.request_id)
    assert start == 40 == 10 * bs and num_new == 2 and needs_sample
    if concurrent:
        first_blocks = engine.scheduler.block_manager.block_ids(first.request_id)
        assert cached[:10] == first_blocks[:10]
        assert all(engine.scheduler.block_manager.ref_counts[b] == 2 for b in cached[:10])
    drain(engine)
    assert second.output_token_ids == reference_output(second.prompt_token_ids, 6)
    assert first.output_token_ids == reference_output(first.prompt_token_ids, 6)
    assert_all_free(engine)


def test_an_identical_prompt_hits_all_but_its_last_block():
    engine = make_engine(block_size=4)
    prompt = list(range(100, 116))  # 16 tokens = 4 full blocks
    first = make_request(prompt=prompt, max_tokens=3)
    engine.add_request(first)
    drain(engine)
    again = make_request(prompt=list(prompt), max_tokens=3)
    engine.add_request(again)
    batch, _ = step(engine)
    assert scheduled(batch)[again.request_id] == (12, 4, True)
    drain(engine)
    assert again.output_token_ids == first.output_token_ids == reference_output(prompt, 3)


def test_without_prefix_caching_everything_is_computed():
    engine = make_engine(block_size=4, enable_prefix_caching=False)
    prefix = list(range(40))
    engine.add_request(make_request(prompt=prefix + [1], max_tokens=3))
    drain(engine)
    second = make_request(prompt=prefix + [2], max_tokens=3)
    engine.add_request(second)
    batch, _ = step(engine)
    assert scheduled(batch)[second.request_id][0] == 0
    drain(engine)
    assert second.output_token_ids == reference_output(second.prompt_token_ids, 3)


def test_a_preempted_request_resumes_from_its_cached_prefix():
    # Request 'a' is preempted; its freed blocks are the most recently freed, so they
    # survive the other requests' allocations and 'a' resumes past its prefix.
    engine = make_engine(num_blocks=10, block_size=4, max_num_batched_tokens=64)
    a = make_request(prompt_len=16, max_tokens=12, priority=0, arrival_time=0.0)
    b = make_request(prompt_len=15, max_tokens=12, priority=1, arrival_time=1.0)
    engine.add_request(b)
    engine.add_request(a)
    resumed_at = None
    while engine.has_unfinished_requests:
        batch, _ = step(engine)
        sched = scheduled(batch)
        if a.num_preemptions and a.request_id in sched and resumed_at is None:
            resumed_at = sched[a.request_id][0]
    assert a.num_preemptions >= 1 and resumed_at is not None and resumed_at > 0 and resumed_at % 4 == 0
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 12)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 12)
    assert_all_free(engine)


# ---- stop conditions ---------------------------------------------------------------------
def _first_repeat_free_index(ref: list[int], at_least: int) -> int:
    """An index i >= at_least whose token does not occur before i (so stopping on it stops at i)."""
    for i in range(at_least, len(ref)):
        if ref[i] not in ref[:i]:
            return i
    raise AssertionError("no usable token")


def _run_one(engine, r):
    engine.add_request(r)
    deltas = drain(engine)[r.request_id]
    assert tokens_of(deltas) == r.output_token_ids
    assert all(len(d.new_token_ids) == 1 for d in deltas)
    assert_all_free(engine)
    return deltas


def test_eos_stops_and_ignore_eos_does_not():
    prompt = list(range(300, 312))
    ref = reference_output(prompt, 10)
    i = _first_repeat_free_index(ref, 3)
    r = make_request(prompt=prompt, max_tokens=10, eos=ref[i])
    deltas = _run_one(make_engine(), r)
    assert r.output_token_ids == ref[:i + 1]  # the eos token itself is emitted
    assert_closed_once(deltas, "stop")
    assert r.status is RequestStatus.FINISHED_STOPPED
    r2 = make_request(prompt=prompt, max_tokens=10, eos=ref[i], ignore_eos=True)
    deltas = _run_one(make_engine(), r2)
    assert r2.output_token_ids == ref
    assert_closed_once(deltas, "length")


def test_stop_token_ids_stop_even_with_ignore_eos():
    prompt = list(range(500, 509))
    ref = reference_output(prompt, 10)
    i = _first_repeat_free_index(ref, 2)
    r = make_request(prompt=prompt, max_tokens=10, stop_token_ids=[ref[i], 999_999], ignore_eos=True)
    deltas = _run_one(make_engine(), r)
    assert r.output_token_ids == ref[:i + 1]
    assert_closed_once(deltas, "stop")


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_stops_with_length(max_tokens):
    r = make_request(prompt_len=10, max_tokens=max_tokens)
    deltas = _run_one(make_engine(), r)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, max_tokens)
    assert_closed_once(deltas, "length")
    assert r.status is RequestStatus.FINISHED_LENGTH


def test_max_model_len_stops_with_length():
    r = make_request(prompt_len=20, max_tokens=100)
    deltas = _run_one(make_engine(max_model_len=25), r)
    assert r.num_tokens == 25 and r.output_token_ids == reference_output(r.prompt_token_ids, 5)
    assert_closed_once(deltas, "length")


def test_deltas_carry_the_step_end_time():
    engine = make_engine(step_time=0.5)
    r = make_request(prompt_len=5, max_tokens=2)
    engine.add_request(r)
    (d,) = engine.step(10.0)
    assert d.time == 10.5 and r.first_token_time == 10.5 and r.first_scheduled_time == 10.0


# ---- load report ----------------------------------------------------------------------------
def test_load_report_fields():
    engine = make_engine(num_blocks=20, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    r0 = make_request(prompt_len=10, max_tokens=20, priority=1, arrival_time=0.0)
    r1 = make_request(prompt_len=6, max_tokens=20, priority=0, arrival_time=1.0)
    r2 = make_request(prompt_len=9, max_tokens=20, priority=0, arrival_time=2.0)
    for r in (r0, r1, r2):
        engine.add_request(r)
    empty = engine.load_report(0.0)
    assert (empty.num_running, empty.num_waiting, empty.num_used_blocks, empty.num_free_blocks) == (0, 3, 0, 20)
    assert (empty.head_block_demand, empty.waiting_block_demand) == (3, 3 + 2 + 3)
    assert empty.num_pending_prefill_tokens == 10 + 6 + 9 and empty.priority_to_num_running == {}
    step(engine)
    r3 = make_request(prompt_len=5, max_tokens=20, priority=2, arrival_time=3.0)
    engine.add_request(r3)
    report = engine.load_report(1.5)
    assert report.instance_id == "0" and report.time == 1.5
    assert report.num_running == 2 and report.num_waiting == 2 and report.num_preempted == 0
    assert report.num_used_blocks == cdiv(10, 4) + cdiv(6, 4) == 5
    assert report.num_free_blocks == 15 and report.num_total_blocks == 20
    assert report.block_usage == 5 / 20
    # Admission order: r3 (priority 2) is the head of line.
    assert (report.head_block_demand, report.waiting_block_demand) == (cdiv(5, 4), cdiv(5, 4) + cdiv(9, 4))
    assert report.num_pending_prefill_tokens == 5 + 9  # r0 and r1 are decoding
    assert report.num_reserved_blocks == report.num_migrating == report.num_incoming == 0
    assert report.priority_to_num_running == {1: 1, 0: 1}
    drain(engine)
    done = engine.load_report(9.0)
    assert (done.num_running, done.num_waiting, done.num_used_blocks, done.num_free_blocks) == (0, 0, 0, 20)
    assert done.priority_to_num_running == {} and done.waiting_block_demand == done.head_block_demand == 0


# ---- scheduler invariants catch corruption -----------------------------------------------------
def _busy_engine():
    engine = make_engine(max_num_seqs=2)
    requests = [make_request(prompt_len=9, max_tokens=20, arrival_time=float(i)) for i in range(3)]
    for r in requests:
        engine.add_request(r)
    step(engine)
    step(engine)
    engine.check_invariants()
    return engine, requests


def _drop_last_block(s, r):
    """Take a block away from a running request, keeping the block manager itself consistent."""
    bm = s.block_manager
    b = bm.req_to_block_ids[r.request_id].pop()
    bm.ref_counts[b] -= 1
    if bm.block_hashes[b] is None:
        bm.free_unhashed_ids.append(b)
    else:
        bm.free_cached_ids[b] = None
    bm.check_invariants()


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda s, rs: setattr(rs[0], "status", RequestStatus.WAITING), id="running-with-waiting-status"),
    pytest.param(lambda s, rs: setattr(rs[2], "status", RequestStatus.RUNNING), id="waiting-with-running-status"),
    pytest.param(lambda s, rs: s.running.reverse(), id="running-out-of-order"),
    pytest.param(lambda s, rs: s.running.remove(rs[1]), id="request-in-no-queue"),
    pytest.param(lambda s, rs: s.block_manager.allocate_slots(rs[2].request_id, 4), id="waiting-holds-blocks"),
    pytest.param(lambda s, rs: s.block_manager.allocate_slots("ghost", 4), id="blocks-held-by-unknown-id"),
    pytest.param(lambda s, rs: _drop_last_block(s, rs[0]), id="blocks-do-not-cover-tokens"),
])
def test_scheduler_check_invariants_catches_corruption(corrupt):
    engine, requests = _busy_engine()
    corrupt(engine.scheduler, requests)
    with pytest.raises(AssertionError):
        engine.check_invariants()


# ---- priority preemption at admission ---------------------------------------------------------
def test_a_high_priority_request_preempts_lower_priority_running_ones_to_start():
    engine = make_engine(num_blocks=10, block_size=4, max_num_batched_tokens=64)
    low = [make_request(prompt_len=15, max_tokens=20, arrival_time=float(i)) for i in range(2)]
    for r in low:
        engine.add_request(r)
    step(engine)
    assert engine.scheduler.block_manager.num_free_blocks == 2  # 4 blocks each
    vip = make_request(prompt_len=15, max_tokens=4, priority=1, arrival_time=5.0)
    engine.add_request(vip)
    batch, _ = step(engine)
    # The latest low-priority request made room; the high-priority one started in the same step.
    assert batch.preempted_request_ids == [low[1].request_id]
    assert vip.status is RequestStatus.RUNNING and vip.request_id in scheduled(batch)
    assert low[0].status is RequestStatus.RUNNING and low[1].status is RequestStatus.PREEMPTED
    out = drain(engine)
    for r in low + [vip]:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert_all_free(engine)
    assert out


def test_equal_priority_never_preempts_to_admit():
    engine = make_engine(num_blocks=10, block_size=4, max_num_batched_tokens=64)
    first = [make_request(prompt_len=15, max_tokens=20, arrival_time=float(i)) for i in range(2)]
    for r in first:
        engine.add_request(r)
    step(engine)
    late = make_request(prompt_len=15, max_tokens=4, arrival_time=5.0)
    engine.add_request(late)
    batch, _ = step(engine)
    assert batch.preempted_request_ids == [] and late.status is RequestStatus.WAITING
