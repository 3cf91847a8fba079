"""Prefill/decode disaggregation in the simulator: the cluster's hand-off rule through the migration state machine."""

from __future__ import annotations

import json

import pytest

from shunter.cluster.bundles import build_policy
from shunter.cluster.disaggregation import DECODE, PREFILL, PDSplit
from shunter.cluster.migration import MigrationConfig
from shunter.cluster.scaling import ScalingConfig
from shunter.sim.report import build_report
from shunter.sim.simulator import SimConfig, Simulator
from tests.sim.builders import engine_state, random_workload, roofline, small_scheduler, wr

# Copies that take a few decode steps (1 MiB blocks over 1 GB/s): live hand-offs decode on the prefill side meanwhile.
SLOW_LINK = dict(kv_bytes_per_block=2**20, bandwidth_bytes_per_s=1e9)


def run_pd(workload, split=PDSplit(2, 2), migration=None, fast_path=True, policy="llumnix", record_tokens=False,
           **config):
    config.setdefault("scheduler", small_scheduler(num_blocks=512))
    sim = Simulator(SimConfig(num_instances=split.num_instances, pd=split, fast_path=fast_path,
                              policy=build_policy(policy), migration=migration or MigrationConfig(**SLOW_LINK),
                              **config), roofline(), workload)
    produced = {}  # request id -> [(output index, instance id)], from every step's deltas
    if record_tokens:
        for inst in sim.instances:
            def end_step(batch, result, now, inst=inst, inner=inst.engine.end_step):
                deltas = inner(batch, result, now)
                for d in deltas:
                    for k in range(len(d.new_token_ids)):
                        produced.setdefault(d.request_id, []).append((d.output_index + k, inst.instance_id))
                return deltas
            inst.engine.end_step = end_step
    return sim, sim.run(), produced


def workload():
    # Outputs of one token finish with their first token on the prefill instance: never handed off.
    return random_workload(3, 120, rate=30.0, max_prompt=600, max_output=150) + [wr("one", 0.5, 40, 1)]


def assert_nothing_leaked(sim):
    for inst in sim.instances:
        inst.engine.check_invariants()
        bm = inst.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks, inst
        assert not inst.scheduler.requests and not inst.scheduler.incoming, inst
    assert not sim.coordinator.active


@pytest.mark.parametrize("max_stages", [8, 1])
def test_every_request_prefills_on_a_prefill_instance_and_decodes_on_a_decode_instance(max_stages):
    wl = workload()
    # Step by step, so every token comes out of an `end_step`; debug: the engines' invariants after every step.
    sim, result, produced = run_pd(wl, migration=MigrationConfig(max_stages=max_stages, **SLOW_LINK), fast_path=False,
                                   debug=True, record_tokens=True)
    roles = result.instance_roles
    assert roles == {"0": PREFILL, "1": PREFILL, "2": DECODE, "3": DECODE}
    assert len(result.records) == len(wl) and not result.rejected and not result.unfinished
    hand_off = {m.request_id: m for m in result.hand_offs}
    assert not result.hand_off_problems
    for record in result.records:
        placed = produced[record.request_id]
        assert [index for index, _ in placed] == list(range(record.num_output_tokens))  # each token once, in order
        assert roles[placed[0][1]] == PREFILL  # the first token
        if record.num_output_tokens == 1:
            assert record.request_id not in hand_off and roles[record.instance_id] == PREFILL
            continue
        m = hand_off[record.request_id]
        if m.outcome == "aborted":  # it finished on the prefill instance while its blocks were copying
            assert "finished" in m.abort_reason and {roles[i] for _, i in placed} == {PREFILL}
            continue
        assert m.outcome == "committed" and roles[m.dst_id] == DECODE and record.instance_id == m.dst_id
        # What the prefill instance decoded while the blocks copied travelled with the request; the rest is
        # the decode instance's. A stop-and-copy hand-off leaves the prefill instance nothing but the first token.
        on_prefill = len(m.state.output_token_ids)
        assert placed == [(i, m.src_id) for i in range(on_prefill)] + [
            (i, m.dst_id) for i in range(on_prefill, record.num_output_tokens)]
        if max_stages == 1:
            assert on_prefill == 1
    committed = [m for m in result.hand_offs if m.outcome == "committed"]
    assert len(committed) >= len(wl) - 10
    if max_stages > 1:
        assert any(len(m.state.output_token_ids) > 1 for m in committed)  # live: decodes went on during the copy
    assert {roles[m.dst_id] for m in committed} == {DECODE} and len({m.dst_id for m in committed}) == 2
    assert_nothing_leaked(sim)


def _report(result, n):
    report = build_report(result, n, config={"pd": "2:2"})
    report.pop("simulation")  # how many events the run took: the fast path takes fewer
    return json.dumps(report, sort_keys=True)


def test_same_seed_same_json_and_the_fast_path_agrees():
    wl = workload()
    (sim1, r1, _), (sim2, r2, _), (sim3, r3, _) = (run_pd(wl), run_pd(wl), run_pd(wl, fast_path=False))
    assert _report(r1, len(wl)) == _report(r2, len(wl)) == _report(r3, len(wl))
    assert r1.records == r3.records and r1.instance_num_steps == r3.instance_num_steps
    assert [m.to_json() for m in r1.migrations] == [m.to_json() for m in r3.migrations]
    assert engine_state(sim1) == engine_state(sim3)
    report = json.loads(_report(r1, len(wl)))
    assert report["pd"]["prefill"] == 2 and report["pd"]["decode"] == 2
    assert report["pd"]["hand_offs"] + report["pd"]["hand_offs_aborted"] == len(wl) - 1
    assert [i["role"] for i in report["instances"]] == [PREFILL, PREFILL, DECODE, DECODE]
    for sim in (sim1, sim3):
        assert_nothing_leaked(sim)


def test_without_control_ticks_the_hand_off_reads_fresh_decode_reports():
    wl = workload()
    sim, result, _ = run_pd(wl, control_interval=None, policy="infaas")
    assert len(result.records) == len(wl)
    assert {m.dst_id for m in result.hand_offs} == {"2", "3"}
    assert_nothing_leaked(sim)


def test_pd_config_is_checked():
    with pytest.raises(ValueError, match="P/D 2:2 runs 4 instances, not 3"):
        SimConfig(num_instances=3, pd=PDSplit(2, 2))
    config = SimConfig(num_instances=2, pd=PDSplit(1, 1),
                       policy=build_policy("llumnix", scaling=ScalingConfig(min_instances=1, max_instances=3)))
    with pytest.raises(ValueError, match="not P/D-aware"):
        Simulator(config, roofline(), workload())
