"""The fast path (lazy instances, bulk decode runs) gives exactly the step-by-step results."""

import copy
import random

import pytest

from shunter.cluster.bundles import PolicyConfig
from shunter.request import RequestStatus
from shunter.sim.latency import ConstantLatency, summarize_batch
from shunter.sim.profiled import ProfiledLatency
from tests.factories import make_request, make_scheduler
from tests.sim.builders import engine_state, random_workload, roofline, small_scheduler


def _run_both(workload, latency, migrations=(), **config):
    out = []
    for fast in (True, False):
        from shunter.sim.simulator import SimConfig, Simulator

        config.setdefault("scheduler", small_scheduler())
        sim = Simulator(SimConfig(fast_path=fast, **config), latency, workload)
        for args in migrations:
            sim.schedule_migration(*args)
        result = sim.run()
        out.append((sim, result))
    return out


def _assert_same(a, b):
    (sim1, r1), (sim2, r2) = a, b
    assert r1.records == r2.records  # every time stamp bit for bit, counters, instance of finish
    assert r1.rejected == r2.rejected
    assert r1.instance_num_steps == r2.instance_num_steps
    assert r1.instance_busy_time == r2.instance_busy_time
    assert r1.load_samples == r2.load_samples
    assert [m.to_json() for m in r1.migrations] == [m.to_json() for m in r2.migrations]
    assert engine_state(sim1) == engine_state(sim2)  # free-list order, prefix-cache index, ref counts


@pytest.mark.parametrize("seed", range(12))
def test_fast_path_equals_step_by_step(seed):
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    num_blocks = rng.choice([24, 64, 400])
    sched = small_scheduler(num_blocks=num_blocks, block_size=block_size,
                            max_num_batched_tokens=rng.choice([32, 256, 2048]), max_num_seqs=rng.choice([3, 64]),
                            max_model_len=1024, enable_prefix_caching=rng.random() < 0.7)
    workload = random_workload(seed, 50, rate=rng.choice([5.0, 40.0, 200.0]),
                               max_prompt=min(300, num_blocks * block_size // 2), max_output=rng.choice([20, 300]),
                               prefixes=rng.random() < 0.5)
    latency = rng.choice([roofline(), ConstantLatency(0.01)])
    fast, slow = _run_both(workload, latency, num_instances=rng.choice([1, 3]), scheduler=sched,
                           policy=PolicyConfig(dispatch=rng.choice(["round-robin", "least-load"])),
                           control_interval=rng.choice([None, 0.03, 0.5]))
    _assert_same(fast, slow)
    assert len(fast[1].records) + len(fast[1].rejected) == len(workload)


def test_fast_path_equals_step_by_step_under_heavy_preemption():
    sched = small_scheduler(num_blocks=30, block_size=4, max_num_batched_tokens=64, max_num_seqs=16)
    workload = random_workload(5, 60, rate=100.0, max_prompt=40, max_output=80)
    fast, slow = _run_both(workload, roofline(), num_instances=2, scheduler=sched)
    _assert_same(fast, slow)
    assert sum(r.num_preemptions for r in fast[1].records) > 20
    assert sum(r.recomputed_tokens for r in fast[1].records) > 0


def test_fast_path_equals_step_by_step_with_migrations_and_debug():
    workload = random_workload(9, 30, rate=20.0, max_output=150)
    migrations = [(0.3, "r2", "0", "1"), (0.5, "r5", "1", "0"), (0.9, "r9", "0", "1"), (1.1, "r14", "1", "0")]
    fast, slow = _run_both(workload, roofline(), migrations, num_instances=2, policy=PolicyConfig(dispatch="round-robin"), debug=True,
                           control_interval=0.1)
    _assert_same(fast, slow)
    assert any(m.outcome == "committed" for m in fast[1].migrations)


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_equals_step_by_step_with_policies_and_migration_policy(seed):
    """Every dispatch policy and the Llumnix migration policy, invariants checked after every step."""
    from shunter.cluster.bundles import build_policy
    from shunter.cluster.dispatch import DISPATCH

    rng = random.Random(100 + seed)
    sched = small_scheduler(num_blocks=rng.choice([40, 120]), block_size=16, max_num_batched_tokens=256,
                            max_num_seqs=rng.choice([4, 32]), max_model_len=1024)
    workload = random_workload(seed, 60, rate=rng.choice([20.0, 80.0]), max_prompt=250, max_output=200,
                               prefixes=rng.random() < 0.5)
    policy = build_policy("llumnix", dispatch=DISPATCH.names()[seed % len(DISPATCH)],
                          src_freeness=rng.choice([2.0, 8.0]), dst_freeness=rng.choice([10.0, 30.0]),
                          selection=rng.choice(["shortest", "longest", "last-arrived"]),
                          move_waiting=rng.random() < 0.5)
    fast, slow = _run_both(workload, roofline(), num_instances=3, scheduler=sched, policy=policy, debug=True,
                           control_interval=rng.choice([0.02, 0.1]), seed=seed)
    _assert_same(fast, slow)
    records = fast[1].records
    assert len(records) + len(fast[1].rejected) == len(workload)
    assert all(r.num_output_tokens == w.num_output_tokens for r, w in
               zip(records, sorted((w for w in workload if w.request_id not in fast[1].rejected),
                                   key=lambda w: (w.arrival_time, w.request_id))))
    for sim, _ in (fast, slow):
        for inst in sim.instances:
            bm = inst.scheduler.block_manager
            assert bm.num_free_blocks == bm.num_blocks and not inst.scheduler.incoming


def test_the_migration_policy_migrates_in_the_simulator():
    from shunter.cluster.bundles import build_policy

    sched = small_scheduler(num_blocks=60, block_size=16, max_num_batched_tokens=256, max_num_seqs=32)
    workload = random_workload(3, 80, rate=60.0, max_prompt=250, max_output=200)
    fast, slow = _run_both(workload, roofline(), num_instances=3, scheduler=sched, debug=True,
                           policy=build_policy("llumnix", dispatch="round-robin", src_freeness=4.0, dst_freeness=8.0),
                           control_interval=0.05)
    _assert_same(fast, slow)
    committed = [m for m in fast[1].migrations if m.outcome == "committed"]
    assert committed and all(m.downtime is not None and m.downtime >= 0 for m in committed)
    assert sum(r.num_migrations for r in fast[1].records) == len(committed)


def test_profiled_latency_takes_the_generic_decode_path():
    model = ProfiledLatency({"intercept": 2e-3, "prefill_tokens": 1e-5, "prefill_attention_pairs": 1e-9,
                             "prefill_chunks": 5e-4, "prefill_cached_tokens": 2e-6, "num_decodes": 1e-4,
                             "sum_decode_context": 1e-7})
    fast, slow = _run_both(random_workload(4, 40, rate=30.0), model, num_instances=2)
    _assert_same(fast, slow)


@pytest.mark.parametrize("latency", [roofline(), ConstantLatency(0.003)])
def test_bulk_decode_times_are_bit_identical_to_single_steps(latency):
    for size, context in [(1, 1), (3, 700), (64, 90_000), (200, 400_000)]:
        singles = [latency.decode_time(size, context + i * size) for i in range(50)]
        assert latency.decode_times(size, context, 50) == singles
        assert singles == [latency.step_time((), size, context + i * size) for i in range(50)]
        t, ends = 1.25, []
        for d in singles:
            t = t + d
            ends.append(t)
        assert latency.decode_step_ends(1.25, size, context, 50, float("inf")) == ends
        until = ends[20]
        assert latency.decode_step_ends(1.25, size, context, 50, until) == ends[:21]  # ends exactly at `until`
        assert latency.decode_step_ends(1.25, size, context, 50, until - 1e-9) == ends[:21]  # last one in flight


@pytest.mark.parametrize("max_steps", [None, 300])
def test_memoised_decode_durations_match_single_steps_as_the_windows_grow(monkeypatch, max_steps):
    if max_steps is not None:  # narrow windows: steps beyond them are computed, not looked up
        monkeypatch.setattr("shunter.sim.latency.MEMO_MAX_STEPS", max_steps)
        monkeypatch.setattr("shunter.sim.latency.MEMO_FILL_STEPS", 7)
    memo, plain = roofline(), roofline()
    rng = random.Random(3)
    for _ in range(600):  # small batches hit the memo (growing windows at both ends), larger ones do not
        size = rng.choice([1, 2, 5, 16, 17, 64])
        context, n = rng.randint(size, size * 1000), rng.randint(0, 40)
        assert memo.decode_times(size, context, n) == [plain.decode_time(size, context + i * size) for i in range(n)]


# ---- Scheduler.run_decode_steps against schedule()/update() directly ----------------------------
def _decoding_scheduler(**kw):
    sched = make_scheduler(**kw)
    for k, (p, m) in enumerate([(5, 25), (9, 7), (3, 25)]):
        sched.add_request(make_request(prompt=[k * 100 + i for i in range(p)], max_tokens=m, request_id=f"q{k}",
                                       arrival_time=float(k), ignore_eos=True))
    from shunter.engine import ExecOutput

    batch = sched.schedule(0.0)  # prefill all three
    sched.update(batch, ExecOutput([0] * len(batch.scheduled), 0.1), 0.1)
    return sched


def _step_by_step(sched, now, until, step_time):
    """Plain schedule()/update() steps; returns (time, in-flight batch, the scheduler as it was
    before the first step that had to preempt, if any)."""
    from shunter.engine import ExecOutput

    while sched.running and now < until and sched.can_run_decodes():
        before = copy.deepcopy(sched)
        batch = sched.schedule(now)
        if batch.preempted_request_ids:
            return now, None, before
        _, n, s = summarize_batch(batch)
        end = now + step_time(n, s)
        if end > until:
            return now, batch, None
        sched.update(batch, ExecOutput([0] * len(batch.scheduled), end - now), end)
        now = end
    return now, None, None


def _snapshot(sched):
    bm = sched.block_manager
    return ([(r.request_id, r.num_computed_tokens, list(r.output_token_ids), r.last_token_time, r.status)
             for r in sched.requests.values()], list(bm.free_block_ids), dict(bm.hash_to_block_id),
            {k: list(v) for k, v in bm.req_to_block_ids.items()})


@pytest.mark.parametrize("until", [0.1, 0.35, 0.1 + 13 * 0.05, 0.1 + 13 * 0.05 + 1e-9, 10.0])
def test_run_decode_steps_matches_schedule_update(until):
    latency = ConstantLatency(0.05)
    a, b = _decoding_scheduler(num_blocks=40), _decoding_scheduler(num_blocks=40)
    run = a.run_decode_steps(0.1, until, latency.decode_step_ends, 0)
    now, in_flight, _ = _step_by_step(b, 0.1, until, latency.decode_time)
    assert run.time == now
    assert (run.in_flight is None) == (in_flight is None)
    if in_flight is not None:
        assert [r.request_id for r in run.in_flight] == [s.request.request_id for s in in_flight.scheduled]
    assert _snapshot(a) == _snapshot(b)
    assert [r.status for r in run.finished] == [RequestStatus.FINISHED_LENGTH] * len(run.finished)


def test_run_decode_steps_stops_where_schedule_must_preempt():
    # 3 requests, 4-token blocks and few blocks: growth runs out before they finish.
    a, b = _decoding_scheduler(num_blocks=9), _decoding_scheduler(num_blocks=9)
    latency = ConstantLatency(0.05)
    run = a.run_decode_steps(0.1, 100.0, latency.decode_step_ends, 0)
    assert run.is_blocked and run.in_flight is None
    now, _, before_preemption = _step_by_step(b, 0.1, 100.0, latency.decode_time)
    # The step-by-step scheduler had to preempt at `now`; the run stopped just before that step.
    assert before_preemption is not None
    assert run.time == now
    assert _snapshot(a) == _snapshot(before_preemption)
    assert a.schedule(run.time).preempted_request_ids


def test_run_decode_steps_honours_max_steps():
    sched = _decoding_scheduler()
    run = sched.run_decode_steps(0.1, 100.0, ConstantLatency(0.5).decode_step_ends, 0, max_steps=3)
    assert run.num_steps == 3 and run.time == 0.1 + 0.5 + 0.5 + 0.5
