"""Autoscaling in the simulator: new instances serve after their start-up delay, drained ones empty and stop,
no request is lost, and the cost counts each instance's own life."""

import json

import pytest

from shunter.cluster.bundles import build_policy
from shunter.cluster.migration import MigrationConfig
from shunter.cluster.scaling import ScalingConfig
from shunter.sim.latency import ConstantLatency
from shunter.sim.report import build_report
from shunter.sim.simulator import SimConfig, Simulator
from tests.sim.builders import bursty_workload, roofline, small_scheduler, wr
from tests.sim.test_fast_path import _assert_same, _run_both

SCALING = ScalingConfig(1, 4, sustain=1.0, cooldown=2.0, startup_delay=2.0, interval=0.25)


def _assert_nothing_left(sim):
    for inst in sim.instances:  # stopped ones included
        s = inst.scheduler
        assert s.block_manager.num_free_blocks == s.block_manager.num_blocks, inst
        assert not s.requests and not s.incoming and not s.suspended, inst
        s.check_invariants()


def _assert_every_request_finished_whole(result, workload):
    assert not result.rejected and not result.unfinished
    lengths = {w.request_id: w.num_output_tokens for w in workload}
    assert {r.request_id: r.num_output_tokens for r in result.records} == lengths


@pytest.mark.parametrize("migration, control_interval", [("llumnix", 0.05), ("none", 0.05), ("none", None)])
def test_a_burst_scales_up_then_down_loses_nothing_and_costs_less_than_the_maximum(migration, control_interval):
    workload = bursty_workload(0)
    burst = [w.arrival_time for w in workload if w.request_id.startswith("b")]
    config = dict(scheduler=small_scheduler(num_blocks=200), control_interval=control_interval, debug=True)
    fast, slow = _run_both(workload, roofline(), num_instances=1,
                           policy=build_policy("llumnix", migration=migration, scaling=SCALING), **config)
    _assert_same(fast, slow)
    (sim, result), (_, slow_result) = fast, slow
    assert result.instance_spans == slow_result.instance_spans
    assert result.scaling_actions == slow_result.scaling_actions

    # Up during the burst, back down after it.
    ups = [t for t, a in result.scaling_actions if a.num_add]
    drains = [(t, a.drain_id) for t, a in result.scaling_actions if a.drain_id is not None]
    assert ups and burst[0] < ups[0] < burst[-1]
    assert drains and drains[-1][0] > burst[-1]
    timeline = result.instance_timeline()
    assert max(p for _, p, _ in timeline) == SCALING.max_instances
    assert timeline[-1][1] < SCALING.max_instances
    assert all(SCALING.min_instances <= s <= p <= SCALING.max_instances for _, p, s in timeline)

    _assert_every_request_finished_whole(result, workload)
    _assert_nothing_left(sim)

    spans = result.instance_spans
    gs_ids = {i.instance_id for i in sim.global_scheduler.instances}
    for iid, span in spans.items():
        if iid != "0":  # added: paid for from its order, serving startup_delay later
            assert span.ready == span.start + SCALING.startup_delay
        if span.stop is not None:
            assert iid not in gs_ids and span.drain is not None and span.stop >= span.drain
    # Nothing reached an instance before it was up or, but for migrations, after it was drained.
    for m in result.migrations:
        assert m.start_time >= spans[m.dst_id].ready
        assert spans[m.dst_id].drain is None or m.start_time < spans[m.dst_id].drain
    for r in result.records:
        if r.num_migrations == 0:
            span = spans[r.instance_id]
            assert span.ready <= r.arrival_time and (span.drain is None or r.arrival_time < span.drain)

    assert result.instance_seconds == pytest.approx(sum(s.seconds(result.end_time) for s in spans.values()))
    fixed = Simulator(SimConfig(num_instances=SCALING.max_instances, fast_path=True,
                                policy=build_policy("llumnix", migration=migration), **config),
                      roofline(), workload).run()
    assert result.instance_seconds < 0.9 * fixed.instance_seconds


def _drain_scenario(migration, fast_path=True):
    """Two instances, two long requests each (round robin); the cluster is nearly idle, so the first
    decision drains instance 1 while its requests are mid-decode. A block copies in 1/64 s, longer than
    a step: the source is idle, its last request suspended, when the last migration commits."""
    workload = [wr(f"r{i}", 0.0, 40, 120) for i in range(4)]
    scaling = ScalingConfig(1, 2, scale_up_freeness=5.0, scale_down_freeness=20.0, sustain=0.0, cooldown=0.0,
                            interval=0.5)
    policy = build_policy("llumnix", dispatch="round-robin", migration=migration, scaling=scaling)
    migration_config = MigrationConfig(kv_bytes_per_block=1 << 20, bandwidth_bytes_per_s=64 << 20, stage_latency=0.0)
    sim = Simulator(SimConfig(num_instances=2, scheduler=small_scheduler(num_blocks=256), policy=policy,
                              fast_path=fast_path, debug=True, migration=migration_config),
                    ConstantLatency(0.01), workload)
    return workload, sim, sim.run()


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_drained_instance_migrates_its_requests_away_and_stops_at_once(fast_path):
    workload, sim, result = _drain_scenario("llumnix", fast_path)
    assert [(t, a.drain_id) for t, a in result.scaling_actions] == [(0.5, "1")]
    span = result.instance_spans["1"]
    moved = [m for m in result.migrations if m.outcome == "committed"]
    assert span.drain == 0.5 and span.stop == max(m.end_time for m in moved)  # it stopped as its last request left
    assert sorted(m.request_id for m in moved) == ["r1", "r3"] and {m.src_id for m in moved} == {"1"}
    assert all(r.instance_id == "0" for r in result.records)
    assert span.stop < min(r.finish_time for r in result.records)  # long before its requests were done
    _assert_every_request_finished_whole(result, workload)
    _assert_nothing_left(sim)
    assert result.instance_seconds == pytest.approx(result.makespan + span.stop)


@pytest.mark.parametrize("fast_path", [True, False])
def test_with_migration_none_a_drain_still_moves_the_requests_away_as_serving_does(fast_path):
    # No migration policy: the cluster's drain_step (Llumnix's pairing, draining sources only) empties it.
    workload, sim, result = _drain_scenario("none", fast_path)
    assert [(t, a.drain_id) for t, a in result.scaling_actions] == [(0.5, "1")]
    moved = [m for m in result.migrations if m.outcome == "committed"]
    assert sorted(m.request_id for m in moved) == ["r1", "r3"] and {m.src_id for m in moved} == {"1"}
    assert all(r.instance_id == "0" for r in result.records)
    assert result.instance_spans["1"].stop == max(m.end_time for m in moved)
    _assert_every_request_finished_whole(result, workload)
    _assert_nothing_left(sim)


def test_a_fixed_size_run_pays_every_instance_for_the_whole_run():
    workload = bursty_workload(1, num_burst=40)
    result = Simulator(SimConfig(num_instances=3, scheduler=small_scheduler()), ConstantLatency(0.01), workload).run()
    assert result.instance_seconds == pytest.approx(3 * result.makespan)
    assert all((s.start, s.ready, s.drain, s.stop) == (result.start_time, result.start_time, None, None)
               for s in result.instance_spans.values())
    assert result.instance_timeline() == [(result.start_time, 3, 3)]
    report = build_report(result, len(workload))
    assert report["scaling"] is None
    assert [i["seconds"] for i in report["instances"]] == [pytest.approx(result.makespan)] * 3


def test_same_seed_same_report_and_the_report_is_strict_json():
    def report():
        workload = bursty_workload(2)
        policy = build_policy("llumnix", scaling=SCALING)
        result = Simulator(SimConfig(num_instances=2, scheduler=small_scheduler(num_blocks=200), policy=policy,
                                     seed=7), roofline(), workload).run()
        return json.dumps(build_report(result, len(workload)), allow_nan=False)

    first = report()
    assert first == report()
    scaling = json.loads(first)["scaling"]
    assert scaling["actions"] and scaling["timeline"][0][1:] == [2, 2]
    assert 1 <= scaling["mean_instances"] <= 4


def test_the_run_must_start_within_the_bounds():
    with pytest.raises(ValueError, match=r"starts with 5 instances, outside the autoscaling range 1\.\.4"):
        SimConfig(num_instances=5, policy=build_policy("llumnix", scaling=SCALING))


def test_an_order_to_an_instance_that_has_stopped_is_refused():
    workload = [wr(f"r{i}", 0.0, 40, 120) for i in range(4)]
    scaling = ScalingConfig(1, 2, scale_up_freeness=5.0, scale_down_freeness=20.0, sustain=0.0, cooldown=0.0,
                            interval=0.5)
    policy = build_policy("rr", scaling=scaling)  # no migration policy: the drain moves instance 1's requests
    sim = Simulator(SimConfig(num_instances=2, scheduler=small_scheduler(num_blocks=256), policy=policy),
                    ConstantLatency(0.01), workload + [wr("late", 3.0, 40, 10)])
    sim.schedule_migration(2.5, "r0", "0", "1")
    result = sim.run()
    assert result.instance_spans["1"].stop is not None and result.instance_spans["1"].stop < 2.5
    ((order, reason),) = sim.refused_orders
    assert order.dst_id == "1" and reason == "instance 1 is not up"
    # The only migrations are the drain's, off instance 1; the refused order moved nothing.
    assert all(m.src_id == "1" for m in result.migrations)
    assert all(r.instance_id == "0" for r in result.records if r.request_id == "late")
