"""Live migration in simulation through the engine's export/reserve/import/release hooks."""

import pytest

from shunter.sim.latency import ConstantLatency
from shunter.sim.migration import MigrationConfig
from shunter.sim.simulator import SimConfig, Simulator
from tests.sim.builders import small_scheduler, wr

STEP = 0.125


def _sim(workload, migration=None, fast_path=True, **kw):
    config = SimConfig(num_instances=2, scheduler=small_scheduler(**kw), dispatch="round-robin", debug=True,
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
    # At t=1.0 the request has 100 + 8 computed tokens (7 blocks): stage 1 copies them in 7/64 s; meanwhile
    # no new block fills, so the next stage is final and copies nothing but finishes the handshake.
    assert m.blocks_per_stage[0] == 7 and m.num_stages >= 2
    assert m.downtime is not None and 0 <= m.downtime < STEP
    # Nothing leaked on either side.
    for inst in sim.instances:
        bm = inst.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not inst.scheduler.reserved_ids
    # Its tokens kept coming: no gap longer than one step plus the final copy.
    assert long.e2e < 60 * STEP + STEP + m.downtime + 1e-9


def test_migration_aborts_when_the_request_finished_first():
    sim = _sim([wr("short", 0.0, 20, 3)])
    sim.schedule_migration(0.1, "short", "0", "1")  # still prefilling at 0.1: not decoding yet
    sim.schedule_migration(10.0, "short", "0", "1")  # long gone
    result = sim.run()
    assert [m.outcome for m in result.migrations] == ["aborted", "aborted"]
    assert result.records[0].instance_id == "0" and result.records[0].num_migrations == 0
    assert not sim.instances[1].scheduler.block_manager.num_used_blocks


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
    with pytest.raises(ValueError):
        sim.schedule_migration(0.0, "a", "0", "0")
    with pytest.raises(ValueError, match="no instance"):
        sim.schedule_migration(0.0, "a", "0", "7")


def test_migration_config_validation_and_copy_time():
    cfg = MigrationConfig(bandwidth_bytes_per_s=1e9, kv_bytes_per_block=1_000_000, stage_latency=1e-3)
    assert cfg.copy_time(10) == pytest.approx(1e-3 + 10e-3)
    with pytest.raises(ValueError):
        MigrationConfig(bandwidth_bytes_per_s=0)
