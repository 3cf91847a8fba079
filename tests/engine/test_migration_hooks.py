"""Migration hooks between two engines, each with its own FakeExecutor (so a bad KV copy changes tokens)."""

from __future__ import annotations

import pytest

from shunter.engine.block_manager import cdiv
from shunter.request import RequestStatus
from tests.engine.helpers import assert_all_free, drain, step, tokens_of
from tests.factories import make_engine, make_request, reference_output

BS = 4


def engines(**kw):
    return make_engine("A", block_size=BS, **kw), make_engine("B", block_size=BS, **kw)


def copy_blocks(src, dst, src_ids, dst_ids):
    assert len(src_ids) == len(dst_ids)
    dst.executor.write_blocks(dst_ids, src.executor.read_blocks(src_ids))


def migrate(src, dst, request_id, now=0.0):
    """One-shot migration: export, reserve, copy, import, release."""
    state = src.export_request(request_id)
    assert dst.reserve_blocks(request_id, state.num_computed_tokens) is not None
    n = cdiv(state.num_computed_tokens, BS)
    copy_blocks(src, dst, state.block_ids[:n], dst.reserved_block_ids(request_id)[:n])
    moved = dst.import_request(state)
    src.release_exported(request_id, now)
    src.check_invariants()
    dst.check_invariants()
    return moved


def collect(deltas, into):
    for d in deltas:
        into.setdefault(d.request_id, []).append(d)


@pytest.mark.parametrize("decode_steps", [1, 3, 6])
def test_one_shot_migration_continues_with_identical_output(decode_steps):
    a, b = engines()
    r = make_request(prompt_len=13, max_tokens=12)
    other = make_request(prompt_len=7, max_tokens=12)  # keeps A busy, so its blocks are not all r's
    a.add_request(other)
    a.add_request(r)
    out: dict[str, list] = {}
    for _ in range(1 + decode_steps):
        collect(step(a)[1], out)
    assert r.num_output_tokens == 1 + decode_steps
    moved = migrate(a, b, r.request_id)
    assert moved.request_id == r.request_id and moved.num_migrations == 1
    assert moved.status is RequestStatus.RUNNING and moved.output_token_ids == r.output_token_ids
    assert r.status is RequestStatus.FINISHED_MIGRATED and a.get_request(r.request_id) is None
    drain(b, into=out)
    drain(a, into=out)
    # The stream: no token lost, duplicated or reordered across the move.
    assert tokens_of(out[r.request_id]) == reference_output(r.prompt_token_ids, 12)
    assert moved.output_token_ids == reference_output(r.prompt_token_ids, 12)
    assert [d.finish_reason for d in out[r.request_id]].count("length") == 1
    assert other.output_token_ids == reference_output(other.prompt_token_ids, 12)
    assert_all_free(a)
    assert_all_free(b)


def test_migration_mid_prefill_continues_the_prefill_on_the_destination():
    a, b = engines(max_prefill_chunk=8)
    r = make_request(prompt_len=30, max_tokens=5)
    a.add_request(r)
    step(a)
    step(a)
    assert r.num_computed_tokens == 16 and r.num_output_tokens == 0
    moved = migrate(a, b, r.request_id)
    assert_all_free(a)
    batch, _ = step(b)
    assert [(s.start_position, s.num_new_tokens) for s in batch.scheduled] == [(16, 8)]
    drain(b)
    assert moved.output_token_ids == reference_output(r.prompt_token_ids, 5)
    assert_all_free(b)


def test_a_missing_kv_copy_changes_the_output():
    """Sanity check of the harness: without the copy, the destination generates other tokens."""
    a, b = engines()
    r = make_request(prompt_len=13, max_tokens=8)
    a.add_request(r)
    step(a)
    step(a)
    state = a.export_request(r.request_id)
    b.reserve_blocks(r.request_id, state.num_computed_tokens)
    moved = b.import_request(state)
    a.release_exported(r.request_id, 0.0)
    drain(b)
    assert moved.output_token_ids != reference_output(r.prompt_token_ids, 8)


@pytest.mark.parametrize("recopy_partial_block", [True, False])
def test_staged_migration(recopy_partial_block):
    a, b = engines()
    r = make_request(prompt_len=13, max_tokens=16)
    a.add_request(r)
    out: dict[str, list] = {}
    for _ in range(3):
        collect(step(a)[1], out)
    # Stage 1: reserve and copy what is computed so far while the request keeps running on A.
    s1 = a.export_request(r.request_id)
    c1 = s1.num_computed_tokens
    assert c1 % BS != 0  # the last copied block is partial and will fill up on A
    assert b.reserve_blocks(r.request_id, c1) is not None
    n1 = cdiv(c1, BS)
    copy_blocks(a, b, s1.block_ids[:n1], b.reserved_block_ids(r.request_id)[:n1])
    for _ in range(4):
        collect(step(a)[1], out)
    b.check_invariants()
    # Stage 2 (last): grow the reservation, copy the blocks filled since stage 1, commit.
    s2 = a.export_request(r.request_id)
    c2 = s2.num_computed_tokens
    assert c2 > c1 and s2.block_ids[:n1] == s1.block_ids[:n1]
    grown = b.reserve_blocks(r.request_id, c2)
    assert grown is not None and len(b.reserved_block_ids(r.request_id)) == cdiv(c2, BS)
    n2 = cdiv(c2, BS)
    first = c1 // BS if recopy_partial_block else n1
    copy_blocks(a, b, s2.block_ids[first:n2], b.reserved_block_ids(r.request_id)[first:n2])
    moved = b.import_request(s2)
    a.release_exported(r.request_id, 1.0)
    assert_all_free(a)
    drain(b, into=out)
    expected = reference_output(r.prompt_token_ids, 16)
    if recopy_partial_block:
        assert moved.output_token_ids == expected
        assert tokens_of(out[r.request_id]) == expected
    else:  # the block that was partial at stage 1 is stale on B: the harness must notice
        assert moved.output_token_ids != expected
    assert_all_free(b)


def test_import_without_enough_reserved_blocks_is_refused():
    a, b = engines()
    r = make_request(prompt_len=13, max_tokens=8)
    a.add_request(r)
    step(a)
    state = a.export_request(r.request_id)
    assert state.num_computed_tokens == 13
    with pytest.raises(ValueError, match=r"0 reserved blocks.*13"):
        b.import_request(state)
    b.reserve_blocks(r.request_id, 8)
    with pytest.raises(ValueError, match=r"2 reserved blocks.*13"):
        b.import_request(state)
    assert b.get_request(r.request_id) is None and not b.scheduler.running
    assert len(b.reserved_block_ids(r.request_id)) == 2  # the reservation is left for the caller
    b.check_invariants()
    b.cancel_reservation(r.request_id)
    assert_all_free(b)
    # The source is unaffected and finishes the request itself.
    drain(a)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 8)
    assert_all_free(a)


def test_cancel_reservation_frees_every_reserved_block():
    _, b = engines()
    assert len(b.reserve_blocks("m", 10)) == 3
    assert len(b.reserve_blocks("m", 21)) == 3
    assert b.scheduler.block_manager.num_used_blocks == 6
    b.check_invariants()
    b.cancel_reservation("m")
    assert_all_free(b)
    b.cancel_reservation("m")  # twice, and for an unknown id: no-ops
    b.cancel_reservation("nobody")
    assert_all_free(b)


def test_cancel_reservation_never_frees_a_live_request():
    a, _ = engines()
    r = make_request(prompt_len=9, max_tokens=4)
    a.add_request(r)
    step(a)
    a.cancel_reservation(r.request_id)
    assert a.scheduler.block_manager.block_ids(r.request_id)
    drain(a)
    assert r.output_token_ids == reference_output(r.prompt_token_ids, 4)


def test_a_refused_reservation_changes_nothing():
    _, b = engines(num_blocks=4)
    assert b.reserve_blocks("m", 17) is None
    assert "m" not in b.scheduler.reserved_ids and b.reserved_block_ids("m") == []
    assert_all_free(b)
    assert b.reserve_blocks("m", 8) is not None
    assert b.reserve_blocks("m", 17) is None  # growing beyond capacity keeps the old reservation
    assert len(b.reserved_block_ids("m")) == 2 and "m" in b.scheduler.reserved_ids
    b.cancel_reservation("m")
    assert_all_free(b)


def test_reserving_for_a_request_live_here_is_refused():
    a, _ = engines()
    r = make_request(prompt_len=5)
    a.add_request(r)
    with pytest.raises(ValueError, match=repr(r.request_id)):
        a.reserve_blocks(r.request_id, 5)
    a.check_invariants()


def test_importing_over_a_live_request_is_refused():
    a, b = engines()
    r = make_request(prompt_len=9, max_tokens=6, request_id="x")
    twin = make_request(prompt_len=20, max_tokens=6, request_id="x")  # holds blocks enough for r's KV
    a.add_request(r)
    b.add_request(twin)
    step(a)
    step(b)
    state = a.export_request("x")
    assert len(b.reserved_block_ids("x")) >= cdiv(state.num_computed_tokens, BS)
    with pytest.raises(ValueError, match="'x' is already live"):
        b.import_request(state)
    b.check_invariants()
    assert b.get_request("x") is twin


def test_release_after_the_request_already_left_is_a_no_op():
    a, b = engines()
    r = make_request(prompt_len=9, max_tokens=6)
    a.add_request(r)
    step(a)
    state = a.export_request(r.request_id)
    b.reserve_blocks(r.request_id, state.num_computed_tokens)
    # Aborted on the source mid-migration: the destination drops its reservation.
    assert a.abort_request(r.request_id, 0.5).finish_reason == "abort"
    b.cancel_reservation(r.request_id)
    a.release_exported(r.request_id, 1.0)
    assert r.status is RequestStatus.FINISHED_ABORTED
    assert_all_free(a)
    assert_all_free(b)


def test_source_step_in_flight_during_release_is_skipped():
    """The source may have a batch running while it hands the request over: that step must not touch it."""
    a, b = engines()
    r = make_request(prompt_len=9, max_tokens=8)
    a.add_request(r)
    step(a)
    state = a.export_request(r.request_id)
    b.reserve_blocks(r.request_id, state.num_computed_tokens)
    n = cdiv(state.num_computed_tokens, BS)
    copy_blocks(a, b, state.block_ids[:n], b.reserved_block_ids(r.request_id)[:n])
    batch, result = a.begin_step(1.0)
    moved = b.import_request(state)
    a.release_exported(r.request_id, 1.0)
    assert a.end_step(batch, result, 1.0) == []
    assert r.num_output_tokens == 1
    drain(b)
    assert moved.output_token_ids == reference_output(r.prompt_token_ids, 8)
    assert_all_free(a)
    assert_all_free(b)


def test_imported_blocks_serve_later_prefix_hits_on_the_destination():
    a, b = engines()
    prompt = list(range(200, 224))  # 6 full blocks
    r = make_request(prompt=prompt + [1], max_tokens=10)
    a.add_request(r)
    step(a)
    step(a)
    migrate(a, b, r.request_id)
    drain(b)
    follower = make_request(prompt=prompt + [2, 3], max_tokens=4)
    b.add_request(follower)
    batch, _ = step(b)
    assert batch.scheduled[0].start_position == 24
    drain(b)
    assert follower.output_token_ids == reference_output(follower.prompt_token_ids, 4)
    assert_all_free(b)


def test_migrating_back_and_forth():
    a, b = engines()
    r = make_request(prompt_len=11, max_tokens=20)
    a.add_request(r)
    out: dict[str, list] = {}
    here, there = a, b
    for hop in range(5):
        for _ in range(2):
            collect(step(here)[1], out)
        migrate(here, there, r.request_id, float(hop))
        here, there = there, here
    drain(here, into=out)
    assert here.get_request(r.request_id) is None
    assert tokens_of(out[r.request_id]) == reference_output(r.prompt_token_ids, 20)
    assert [d.finish_reason for d in out[r.request_id]].count("length") == 1
    assert_all_free(a)
    assert_all_free(b)
