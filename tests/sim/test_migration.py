"""Live migration in simulation through the engine's export/reserve/import/release hooks."""

import pytest

from shunter.sim.latency import ConstantLatency
from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.migration import MigrationConfig
from shunter.sim.simulator import SimConfig, Simulator
from tests.sim.builders import small_scheduler, wr

STEP = 0.125


def _sim(workload, migration=None, fast_path=True, **kw):
    config = SimConfig(num_instances=2, scheduler=small_scheduler(**kw), policy=PolicyConfig(dispatch="round-robin"), debug=True,
                       fast_path=fast_path,
                       migration=migration or MigrationConfig(kv_bytes_per_block=1 << 20, bandwidth_bytes_per_s=64 << 20,
                                                              stage_latency=0.0))
    return Simulator(config, ConstantLatency(STEP), workload)


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_request_moves_mid_decode_and_finishes_on_the_destination(fast_path):
    # "long" decodes on instance 0; at t=1.0 it moves to instance 1. 16-token blocks of 1 MiB at
    # 64 MiB/s: a block copies in 1/64 s.
    sim = _sim([wr("long", 0.0, 100, 60), wr("other", 0.0, 20, 5)], fast_path=fast_path)
    sim.schedule_migration(1.0, "long", "0", "1")
    result = sim.run()
    rec = {r.request_id: r for r in result.records}
    long = rec["long"]
    assert long.instance_id == "1" and long.num_migrations == 1
    assert long.num_output_tokens == 60
    (m,) = result.migrations
    assert m.outcome == "committed"
    # At t=1.0 the request has 100 + 8 computed tokens: 6 full blocks and a partial one. Stage 1 copies
    # the 6 full blocks in 6/64 s while it keeps decoding; then one block is left, the partial one, and
    # the final stage copies it: downtime is exactly one block's copy.
    assert m.blocks_per_stage == [6, 1] and m.num_copied_blocks == 7
    assert m.downtime == pytest.approx(1 / 64)
    # Nothing leaked on either side.
    for inst in sim.instances:
        bm = inst.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not inst.scheduler.incoming and not inst.scheduler.suspended
    # Its tokens kept coming: no gap longer than one step plus the final copy.
    assert long.e2e < 60 * STEP + STEP + m.downtime + 1e-9


def test_a_waiting_request_moves_at_once_and_a_finished_one_not_at_all():
    # One seat per instance; round robin sends "first" and "short" to 0 and "other" to 1.
    sim = _sim([wr("first", 0.0, 20, 30), wr("other", 0.0, 20, 1), wr("short", 0.0, 20, 3)], max_num_seqs=1)
    sim.schedule_migration(0.05, "short", "0", "1")  # queued behind "first": moves without KV
    sim.schedule_migration(10.0, "short", "1", "0")  # long gone
    result = sim.run()
    assert [m.outcome for m in result.migrations] == ["committed", "aborted"]
    assert result.migrations[0].is_waiting and result.migrations[0].blocks_per_stage == []
    assert "not running or waiting" in result.migrations[1].abort_reason
    short = next(r for r in result.records if r.request_id == "short")
    assert short.instance_id == "1" and short.num_migrations == 1 and short.num_output_tokens == 3
    # It no longer waited for "first" (30 steps): it ran right after "other" on instance 1.
    assert short.first_token_time < 5 * STEP
    for inst in sim.instances:
        assert not inst.scheduler.block_manager.num_used_blocks


def test_migration_aborts_when_the_destination_is_full_and_the_request_carries_on():
    # Instance 1 is nearly full with its own request (round-robin sends "hog" there).
    workload = [wr("mover", 0.0, 100, 40), wr("hog", 0.0, 180, 60)]
    sim = _sim(workload, num_blocks=16, block_size=16)
    sim.schedule_migration(1.0, "mover", "0", "1")
    result = sim.run()
    (m,) = result.migrations
    assert m.outcome == "aborted" and "no free blocks" in m.abort_reason
    mover = next(r for r in result.records if r.request_id == "mover")
    assert mover.instance_id == "0" and mover.num_output_tokens == 40
    for inst in sim.instances:
        assert inst.scheduler.block_manager.num_free_blocks == 16


def test_migration_needs_two_instances():
    sim = _sim([wr("a", 0.0, 10, 10)])
    with pytest.raises(ValueError, match="two different instances"):
        sim.schedule_migration(0.0, "a", "0", "0")
    with pytest.raises(ValueError, match="no instance"):
        sim.schedule_migration(0.0, "a", "0", "7")


def test_a_second_order_for_a_migrating_request_is_refused_and_the_first_commits():
    sim = _sim([wr("long", 0.0, 100, 60), wr("other", 0.0, 20, 5)])
    sim.schedule_migration(1.0, "long", "0", "1")
    sim.schedule_migration(1.01, "long", "0", "1")  # the first is still copying its first stage
    result = sim.run()
    (m,) = result.migrations
    assert m.outcome == "committed"
    ((order, reason),) = sim.refused_orders
    assert order.request_id == "long" and "already migrating" in reason
    rec = {r.request_id: r for r in result.records}
    assert rec["long"].instance_id == "1" and rec["long"].num_output_tokens == 60
    for inst in sim.instances:
        assert inst.scheduler.block_manager.num_free_blocks == inst.scheduler.block_manager.num_blocks
        assert not inst.scheduler.incoming and not inst.scheduler.suspended
