"""The migration state machine on its own: two engines with FakeExecutors, so a bad copy changes tokens."""

from __future__ import annotations

import pytest

from shunter.cluster.instance import InProcessInstance
from shunter.cluster.migration import (
    ABORTED, COMMITTED, LINKS, MigrationConfig, MigrationCoordinator, MigrationRefused,
)
from shunter.engine.block_manager import cdiv
from shunter.request import RequestStatus
from tests.engine.helpers import assert_all_free, copy_plan, drain, migrate, step, tokens_of
from tests.factories import make_engine, make_request, reference_output

BS = 4


def pair(**kw):
    return (InProcessInstance(make_engine("A", block_size=BS, **kw)),
            InProcessInstance(make_engine("B", block_size=BS, **kw)))


def coordinator(**kw) -> MigrationCoordinator:
    return MigrationCoordinator(MigrationConfig(**kw), BS)


def collect(deltas, into):
    for d in deltas:
        into.setdefault(d.request_id, []).append(d)


def test_stages_copy_full_blocks_only_and_the_final_stage_copies_the_partial_block():
    a, b = pair()
    coord = coordinator(final_stage_max_blocks=1)
    r = make_request(prompt_len=13, max_tokens=20)
    a.add_request(r)
    out: dict = {}
    for _ in range(2):
        collect(step(a.engine)[1], out)
    assert r.num_computed_tokens == 14  # 3 full blocks and a partial one
    m = coord.start(r.request_id, a, b, 0.0)
    plan = coord.advance(m, 0.0)
    assert not plan.is_final and plan.num_blocks == 3  # the partial block is not counted as copied
    assert r.status is RequestStatus.MIGRATING
    copy_plan(a.engine, b.engine, plan)
    for _ in range(3):  # it keeps decoding on the source: 17 computed, block 3 is full now
        collect(step(a.engine)[1], out)
    plan = coord.advance(m, 0.0)  # 2 blocks left: not yet final; only block 3 is full
    assert not plan.is_final and plan.num_blocks == 1
    assert plan.src_block_ids == a.engine.scheduler.block_manager.block_ids(r.request_id)[3:4]
    copy_plan(a.engine, b.engine, plan)
    plan = coord.advance(m, 0.0)  # 1 block left: final, and it is the partial one
    assert plan.is_final and plan.num_blocks == 1
    # Final: suspended on the source, the partial block copied, everything accounted for.
    assert r.request_id in a.engine.scheduler.suspended
    assert m.num_copied_blocks == cdiv(r.num_computed_tokens, BS) == 5 and m.blocks_per_stage == [3, 1, 1]
    assert sum(m.blocks_per_stage) == m.num_copied_blocks
    copy_plan(a.engine, b.engine, plan)
    assert coord.commit(m, 1.0)
    assert m.outcome == COMMITTED and r.status is RequestStatus.FINISHED_MIGRATED
    drain(b.engine, into=out)
    assert tokens_of(out[r.request_id]) == reference_output(r.prompt_token_ids, 20)
    assert_all_free(a.engine)
    assert_all_free(b.engine)


@pytest.mark.parametrize("steps_between", [0, 1, 3, 5])
def test_greedy_output_is_identical_with_and_without_migration(steps_between):
    a, b = pair()
    coord = coordinator()
    r = make_request(prompt_len=11, max_tokens=64)
    other = make_request(prompt_len=7, max_tokens=24)  # shares the source, so r's blocks are not 0..n
    a.add_request(other)
    a.add_request(r)
    out: dict = {}
    for _ in range(4):
        collect(step(a.engine)[1], out)
    m = migrate(coord, a, b, r.request_id, steps_between_stages=steps_between, into=out)
    assert m.outcome == COMMITTED and m.downtime == 0.0
    drain(a.engine, into=out)
    drain(b.engine, into=out)
    assert tokens_of(out[r.request_id]) == reference_output(r.prompt_token_ids, 64)
    assert [d.finish_reason for d in out[r.request_id]].count("length") == 1
    assert tokens_of(out[other.request_id]) == reference_output(other.prompt_token_ids, 24)
    assert_all_free(a.engine)
    assert_all_free(b.engine)


def test_a_missing_copy_changes_the_output():
    """The harness notices a lost block: without copying, the destination generates other tokens."""
    a, b = pair()
    r = make_request(prompt_len=13, max_tokens=8)
    a.add_request(r)
    step(a.engine)
    step(a.engine)
    before = list(r.output_token_ids)
    assert migrate(coordinator(), a, b, r.request_id, copy=False).outcome == COMMITTED
    out = drain(b.engine)
    assert before + tokens_of(out[r.request_id]) != reference_output(r.prompt_token_ids, 8)


def test_migrating_back_and_forth_keeps_the_stream_whole():
    a, b = pair()
    coord = coordinator()
    r = make_request(prompt_len=11, max_tokens=20)
    a.add_request(r)
    out: dict = {}
    here, there = a, b
    for hop in range(5):
        for _ in range(2):
            collect(step(here.engine)[1], out)
        m = migrate(coord, here, there, r.request_id, float(hop), steps_between_stages=1, into=out)
        assert m.outcome == COMMITTED
        here, there = there, here
    drain(here.engine, into=out)
    assert tokens_of(out[r.request_id]) == reference_output(r.prompt_token_ids, 20)
    assert not coord.active and not coord.request_to_migration
    assert_all_free(a.engine)
    assert_all_free(b.engine)


def test_a_waiting_request_moves_without_kv_in_one_step():
    a, b = pair(max_num_seqs=1)
    coord = coordinator()
    first, queued = make_request(prompt_len=9, max_tokens=6), make_request(prompt_len=9, max_tokens=6)
    a.add_request(first)
    a.add_request(queued)
    step(a.engine)
    assert queued.status is RequestStatus.WAITING
    m = migrate(coord, a, b, queued.request_id)
    assert m.outcome == COMMITTED and m.is_waiting and m.num_stages == 0 and not m.blocks_per_stage
    moved = b.engine.get_request(queued.request_id)
    assert moved.status is RequestStatus.WAITING and moved.num_migrations == 1
    out = drain(b.engine)
    assert tokens_of(out[queued.request_id]) == reference_output(queued.prompt_token_ids, 6)
    drain(a.engine)
    assert_all_free(a.engine)
    assert_all_free(b.engine)


# ---- orders that must be refused ---------------------------------------------------------------
def test_self_and_duplicate_orders_are_refused_and_leave_the_first_migration_alone():
    a, b = pair()
    c = InProcessInstance(make_engine("C", block_size=BS))
    coord = coordinator()
    r = make_request(prompt_len=13, max_tokens=12)
    a.add_request(r)
    step(a.engine)
    with pytest.raises(MigrationRefused, match="same instance"):
        coord.start(r.request_id, a, a, 0.0)
    m = coord.start(r.request_id, a, b, 0.0)
    plan = coord.advance(m, 0.0)
    copy_plan(a.engine, b.engine, plan)
    reserved = list(b.engine.reserved_block_ids(m.migration_id))
    assert reserved
    with pytest.raises(MigrationRefused, match="already migrating"):
        coord.start(r.request_id, a, c, 0.0)
    with pytest.raises(MigrationRefused, match="already migrating"):
        coord.start(r.request_id, a, b, 0.0)
    # The first migration's reservation is untouched and it still commits.
    assert b.engine.reserved_block_ids(m.migration_id) == reserved
    while plan is not None and not plan.is_final:
        plan = coord.advance(m, 0.0)
        copy_plan(a.engine, b.engine, plan)
    assert coord.commit(m, 0.0)
    before = list(r.output_token_ids)
    out = drain(b.engine)
    assert before + tokens_of(out[r.request_id]) == reference_output(r.prompt_token_ids, 12)
    assert out[r.request_id][-1].finish_reason == "length"
    assert_all_free(b.engine)
    assert_all_free(c.engine)


def test_reservations_are_keyed_by_migration_so_two_migrations_into_one_instance_do_not_collide():
    a, b = pair()
    c = InProcessInstance(make_engine("C", block_size=BS))
    coord = coordinator()
    x, y = make_request(prompt_len=9, max_tokens=10), make_request(prompt_len=9, max_tokens=10)
    a.add_request(x)
    c.add_request(y)
    step(a.engine)
    step(c.engine)
    mx, my = coord.start(x.request_id, a, b, 0.0), coord.start(y.request_id, c, b, 0.0)
    px, py = coord.advance(mx, 0.0), coord.advance(my, 0.0)
    copy_plan(a.engine, b.engine, px)
    copy_plan(c.engine, b.engine, py)
    assert set(px.dst_block_ids).isdisjoint(py.dst_block_ids)
    coord.abort(my, 0.0, "test")  # frees only y's reservation
    assert b.engine.reserved_block_ids(my.migration_id) == []
    assert b.engine.reserved_block_ids(mx.migration_id) == px.dst_block_ids
    b.engine.check_invariants()
    while True:
        plan = coord.advance(mx, 0.0)
        copy_plan(a.engine, b.engine, plan)
        if plan.is_final:
            break
    assert coord.commit(mx, 0.0)
    before = list(x.output_token_ids)  # the source's object stops at the hand-over
    out = drain(b.engine)
    drain(c.engine)
    assert before + tokens_of(out[x.request_id]) == reference_output(x.prompt_token_ids, 10)
    assert y.output_token_ids == reference_output(y.prompt_token_ids, 10)  # y ran on at its source
    for inst in (a, b, c):
        assert_all_free(inst.engine)


# ---- every abort path frees exactly its reservation --------------------------------------------
def _started(**kw):
    a, b = pair(**kw)
    coord = coordinator()
    r = make_request(prompt_len=13, max_tokens=16)
    a.add_request(r)
    step(a.engine)
    step(a.engine)
    m = coord.start(r.request_id, a, b, 0.0)
    plan = coord.advance(m, 0.0)
    copy_plan(a.engine, b.engine, plan)
    assert b.engine.reserved_block_ids(m.migration_id)
    return a, b, coord, r, m


def _assert_aborted_and_clean(a, b, coord, r, m, reason):
    assert m.outcome == ABORTED and reason in m.abort_reason
    assert not coord.active and not coord.request_to_migration
    assert b.engine.reserved_block_ids(m.migration_id) == []
    assert_all_free(b.engine)
    drain(a.engine)
    assert_all_free(a.engine)


def test_abort_when_the_request_finishes_mid_migration():
    a, b, coord, r, m = _started()
    drain(a.engine)  # it finishes on the source while its KV is being copied
    assert coord.advance(m, 0.0) is None
    _assert_aborted_and_clean(a, b, coord, r, m, "finished")
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 16)


def test_abort_when_the_request_is_aborted_mid_migration():
    a, b, coord, r, m = _started()
    a.abort_request(r.request_id, 0.5)
    assert coord.advance(m, 0.0) is None
    _assert_aborted_and_clean(a, b, coord, r, m, "aborted")


def test_abort_when_the_request_is_preempted_mid_migration():
    a, b = pair(num_blocks=12)
    coord = coordinator()
    hog = make_request(prompt_len=15, max_tokens=30, priority=5)  # grows and takes r's blocks
    r = make_request(prompt_len=13, max_tokens=16)
    a.add_request(hog)
    a.add_request(r)
    step(a.engine)
    step(a.engine)
    m = coord.start(r.request_id, a, b, 0.0)
    copy_plan(a.engine, b.engine, coord.advance(m, 0.0))
    for _ in range(40):
        step(a.engine)
        if r.status is RequestStatus.PREEMPTED:
            break
    assert r.status is RequestStatus.PREEMPTED
    assert coord.advance(m, 0.0) is None
    _assert_aborted_and_clean(a, b, coord, r, m, "preempted")
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 16)


def test_abort_when_the_client_aborts_during_the_final_copy():
    a, b, coord, r, m = _started()
    plan = coord.advance(m, 0.0)
    while not plan.is_final:
        plan = coord.advance(m, 0.0)
    a.abort_request(r.request_id, 0.5)  # suspended on the source: the abort frees it there
    assert r.status is RequestStatus.FINISHED_ABORTED
    assert coord.commit(m, 1.0) is False
    _assert_aborted_and_clean(a, b, coord, r, m, "final copy")


def test_abort_when_the_destination_runs_out_of_blocks_in_the_final_stage_resumes_the_source():
    a, b, coord, r, m = _started()
    assert r.num_computed_tokens == 14 and m.num_copied_blocks == 3
    free = b.engine.scheduler.block_manager.num_free_blocks
    filler = make_request(prompt_len=4 * free - 1, max_tokens=2)
    b.add_request(filler)
    while not filler.output_token_ids:  # prefilled in chunks; then it holds every block but the reservation
        step(b.engine)
    assert b.engine.scheduler.block_manager.num_free_blocks == 0
    out: dict = {}
    for _ in range(2):
        collect(step(a.engine)[1], out)
    assert r.num_computed_tokens == 16  # 4 blocks, one left to copy: the final stage
    assert coord.advance(m, 0.0) is None
    assert "no free blocks" in m.abort_reason
    # It had been suspended for the final stage: the abort puts it back to run on the source.
    assert r.status is RequestStatus.RUNNING and r.request_id not in a.engine.scheduler.suspended
    drain(b.engine)
    _assert_aborted_and_clean(a, b, coord, r, m, "no free blocks")
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 16)


def test_the_destination_refuses_what_it_could_never_run():
    a, _ = pair()
    small = InProcessInstance(make_engine("S", block_size=BS, num_blocks=4, max_num_seqs=1))
    coord = coordinator()
    big = make_request(prompt_len=9, max_tokens=30)  # needs 10 blocks at its longest
    a.add_request(big)
    step(a.engine)
    m = migrate(coord, a, small, big.request_id)
    assert m.outcome == ABORTED and "KV blocks" in m.abort_reason
    assert big.status is RequestStatus.RUNNING
    busy = make_request(prompt_len=3, max_tokens=2)
    small.add_request(busy)
    step(small.engine)
    fits = make_request(prompt_len=5, max_tokens=3)
    a.add_request(fits)
    step(a.engine)
    m = migrate(coord, a, small, fits.request_id)
    assert m.outcome == ABORTED and "max_num_seqs" in m.abort_reason  # an import must never wedge it
    drain(a.engine)
    drain(small.engine)
    assert_all_free(a.engine)
    assert_all_free(small.engine)


def test_an_order_for_a_request_that_is_not_there_aborts():
    a, b = pair()
    coord = coordinator()
    m = migrate(coord, a, b, "ghost")
    assert m.outcome == ABORTED and "not running or waiting" in m.abort_reason
    assert not coord.active


def test_the_stage_limit_forces_the_final_stage():
    a, b = pair()
    coord = coordinator(max_stages=2, final_stage_max_blocks=0)
    r = make_request(prompt_len=30, max_tokens=30)
    a.add_request(r)
    for _ in range(2):
        step(a.engine)
    m = migrate(coord, a, b, r.request_id, steps_between_stages=4)
    assert m.outcome == COMMITTED and m.num_stages == 2


def test_config_validation_and_link_bandwidths():
    cfg = MigrationConfig(bandwidth_bytes_per_s=1e9, kv_bytes_per_block=1_000_000, stage_latency=1e-3)
    assert cfg.copy_time(10) == pytest.approx(1e-3 + 10e-3)
    assert MigrationConfig.for_link("nvlink").bandwidth_bytes_per_s > MigrationConfig.for_link("pcie-gen4").bandwidth_bytes_per_s
    assert LINKS.get("eth-25g") < LINKS.get("eth-100g") < LINKS.get("eth-400g")
    for bad in (dict(bandwidth_bytes_per_s=0), dict(stage_latency=-1), dict(max_stages=0),
                dict(final_stage_max_blocks=-1), dict(kv_bytes_per_block=-1)):
        with pytest.raises(ValueError):
            MigrationConfig(**bad)
    with pytest.raises(ValueError, match="choose from: pcie-gen4"):
        MigrationConfig.for_link("carrier-pigeon")


class Unreachable:
    """An endpoint whose instance is gone: every call raises."""

    def __init__(self, instance):
        self.instance_id = instance.instance_id

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError(f"instance {self.instance_id} is gone")
        return fail


def test_abort_with_a_dead_destination_still_gives_the_request_back_to_the_source():
    a, b, coord, r, m = _started()
    plan = coord.advance(m, 0.0)
    while not plan.is_final:
        plan = coord.advance(m, 0.0)
    assert r.request_id in a.engine.scheduler.suspended
    m.dst = Unreachable(b)
    with pytest.raises(ConnectionError):
        coord.abort(m, 1.0, "the destination died")
    assert m.outcome == ABORTED and not coord.active and not coord.request_to_migration
    assert r.status is RequestStatus.RUNNING and r.request_id not in a.engine.scheduler.suspended
    drain(a.engine)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 16)
    assert_all_free(a.engine)


def test_a_commit_stands_when_the_source_dies_after_the_destination_took_the_request():
    a, b, coord, r, m = _started()
    plan = coord.advance(m, 0.0)
    while not plan.is_final:
        copy_plan(a.engine, b.engine, plan)
        plan = coord.advance(m, 0.0)
    copy_plan(a.engine, b.engine, plan)
    real_src, dead = m.src, Unreachable(a)
    m.src = type("DiesAfterProgress", (), {
        "instance_id": "A",
        "migration_progress": lambda self, rid: real_src.migration_progress(rid),
        "release_migrated": lambda self, rid, now: dead.release_migrated(rid, now)})()
    with pytest.raises(ConnectionError):
        coord.commit(m, 1.0)
    assert m.outcome == COMMITTED and not coord.active  # the destination owns it: never aborted, never twice
    assert r.request_id in b.engine.scheduler.requests
    drain(b.engine)
    assert_all_free(b.engine)
