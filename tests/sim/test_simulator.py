"""The event loop on hand-computable scenarios, determinism, and agreement with the real engine path."""

import itertools

import pytest

from shunter.config import SchedulerConfig
from shunter.engine import InstanceEngine
from shunter.request import Request, SamplingParams
from shunter.sim.events import Arrival, ControlTick, EventQueue, StepEnd, StepStart
from shunter.sim.latency import ConstantLatency
from shunter.sim.simulator import SimConfig, Simulator
from shunter.sim.workloads import prompt_token_ids
from tests.factories import FakeExecutor
from tests.sim.builders import engine_state, random_workload, roofline, simulate, small_scheduler, wr

STEP = 0.125  # a power of two: every time below is exact in binary


@pytest.mark.parametrize("fast_path", [True, False])
def test_hand_computed_ttft_tpot_e2e(fast_path):
    # A arrives at 0 (prompt 10, 3 tokens), B at 0.1875 (prompt 10, 2 tokens); 0.125 s per step.
    # step [0, .125): A prefill -> A token 1 at .125
    # step [.125, .25): A decode -> A token 2 at .25   (B arrived at .1875, waits for the next step)
    # step [.25, .375): A decode + B prefill -> A token 3 (done) and B token 1 at .375
    # step [.375, .5): B decode -> B token 2 (done) at .5
    _, result = simulate([wr("A", 0.0, 10, 3), wr("B", 0.1875, 10, 2)], ConstantLatency(STEP), fast_path=fast_path)
    a, b = result.records
    assert (a.request_id, a.ttft, a.e2e, a.tpot) == ("A", 0.125, 0.375, 0.125)
    assert (b.request_id, b.ttft, b.e2e, b.tpot) == ("B", 0.375 - 0.1875, 0.5 - 0.1875, 0.125)
    assert a.num_output_tokens == 3 and b.num_output_tokens == 2
    assert result.instance_num_steps == {"0": 4}
    assert result.makespan == 0.5
    assert result.instance_seconds == 0.5


@pytest.mark.parametrize("fast_path", [True, False])
def test_arrival_at_a_step_boundary_joins_that_step(fast_path):
    # B arrives exactly when A's first step ends: the step starting then includes it.
    _, result = simulate([wr("A", 0.0, 10, 2), wr("B", STEP, 10, 1)], ConstantLatency(STEP), fast_path=fast_path)
    a, b = result.records
    assert b.ttft == STEP and b.finish_time == 2 * STEP
    assert a.finish_time == 2 * STEP


def test_chunked_prefill_and_idle_gaps():
    # 40-token prompt with a 16-token budget: 3 prefill steps; the instance idles until C arrives.
    sched = small_scheduler(max_num_batched_tokens=16)
    _, result = simulate([wr("A", 0.0, 40, 1), wr("C", 10.0, 5, 1)], ConstantLatency(STEP), scheduler=sched)
    a, c = result.records
    assert a.ttft == 3 * STEP and a.tpot is None
    assert c.ttft == STEP and c.finish_time == 10.0 + STEP
    assert result.instance_busy_time["0"] == 4 * STEP


def test_outputs_are_exactly_the_workload_lengths_and_nothing_leaks():
    workload = random_workload(1, 40, rate=20.0)
    sim, result = simulate(workload, roofline(), num_instances=2, debug=True)
    lengths = {w.request_id: w.num_output_tokens for w in workload}
    assert {r.request_id: r.num_output_tokens for r in result.records} == lengths
    for inst in sim.instances:
        bm = inst.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        assert not inst.scheduler.requests
    assert not result.unfinished and not result.rejected


def test_requests_that_cannot_fit_are_rejected_not_fatal():
    sched = small_scheduler(num_blocks=8, block_size=16, max_model_len=4096)
    _, result = simulate([wr("big", 0.0, 500, 5), wr("ok", 0.0, 20, 5)], scheduler=sched)
    assert [r.request_id for r in result.records] == ["ok"]
    assert list(result.rejected) == ["big"] and "KV blocks" in result.rejected["big"]


def test_same_seed_same_results_and_event_order():
    workload = random_workload(7, 60, rate=30.0, prefixes=True)
    runs = [simulate(workload, roofline(), num_instances=3, control_interval=0.05) for _ in range(2)]
    (sim1, r1), (sim2, r2) = runs
    assert r1.records == r2.records
    assert r1.load_samples == r2.load_samples
    assert r1.num_events == r2.num_events
    assert engine_state(sim1) == engine_state(sim2)


def test_event_queue_orders_by_time_then_kind_then_sequence():
    q = EventQueue(itertools.count())
    events = [StepStart(1.0, None), Arrival(1.0, 0), StepEnd(1.0, None, None, None), ControlTick(0.5),
              Arrival(1.0, 1)]
    for e in events:
        q.push(e)
    order = [q.pop() for _ in range(len(events))]
    assert [type(e).__name__ for e in order] == ["ControlTick", "StepEnd", "Arrival", "Arrival", "StepStart"]
    assert [e.index for e in order if isinstance(e, Arrival)] == [0, 1]


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="instances"):
        SimConfig(num_instances=0)
    with pytest.raises(ValueError, match="control_interval"):
        SimConfig(control_interval=0)


def test_simulator_schedules_the_same_batches_as_the_engine_driven_by_hand():
    """The simulator adds no scheduling of its own: stepping an InstanceEngine with the
    test FakeExecutor (real tokens) over the same arrivals gives the same batches."""
    workload = random_workload(3, 25, rate=40.0, max_prompt=120, max_output=30)
    sched = small_scheduler(num_blocks=48, block_size=8, max_num_batched_tokens=64, max_num_seqs=8)

    sim = Simulator(SimConfig(scheduler=sched, fast_path=False), ConstantLatency(STEP), workload)
    sim_batches = []
    execute = sim.instances[0].executor.execute
    sim.instances[0].executor.execute = lambda batch: (sim_batches.append(_shape(batch)), execute(batch))[1]
    result = sim.run()

    engine = InstanceEngine(sched, FakeExecutor(sched.block_size, step_time=STEP))
    engine_batches = []
    pending = list(workload)
    now = 0.0
    while pending or engine.has_unfinished_requests:
        while pending and pending[0].arrival_time <= now:
            w = pending.pop(0)
            engine.add_request(Request(w.request_id, prompt_token_ids(w), SamplingParams(
                temperature=0, max_tokens=w.num_output_tokens, ignore_eos=True), arrival_time=w.arrival_time,
                priority=w.priority))
        batch, out = engine.begin_step(now)
        if batch.is_empty:
            now = pending[0].arrival_time
            continue
        engine_batches.append(_shape(batch))
        now += STEP
        engine.end_step(batch, out, now)
    assert sim_batches == engine_batches
    assert any(preempted for _, _, preempted in sim_batches)  # the scenario exercises preemption
    assert len(result.records) == len(workload)


def _shape(batch):
    return (batch.now, [(s.request.request_id, s.num_new_tokens, s.start_position) for s in batch.scheduled],
            list(batch.preempted_request_ids))


def test_progress_counts_every_request():
    workload = random_workload(2, 30, rate=50.0)
    seen = []
    Simulator(SimConfig(scheduler=small_scheduler()), ConstantLatency(0.01), workload, progress=seen.append).run()
    assert sum(seen) == 30


def test_a_simulator_runs_once():
    sim = Simulator(SimConfig(scheduler=SchedulerConfig()), ConstantLatency(0.01), [wr("a", 0, 4, 2)])
    sim.run()
    with pytest.raises(RuntimeError):
        sim.run()
