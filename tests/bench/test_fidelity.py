"""The wall-clock replay driver on a fake engine and clock, the fidelity workload, and the CLI's bad input."""

from __future__ import annotations

import pytest

from shunter.bench.fidelity import (compare, latency_figures, make_workload, other_machine_warning, replay_spread,
                                    simulate, with_fresh_prompts)
from shunter.bench.replay import TimedRequest, replay
from shunter.cli import main
from shunter.engine import InstanceEngine
from shunter.sim.latency import ConstantLatency
from tests.factories import FakeExecutor, make_config

STEP = 0.125  # a power of two: every time below is exact in binary


class FakeClock:
    """Time moves only when the executor runs a step or the driver sleeps."""

    def __init__(self) -> None:
        self.now = 100.0  # not 0: the driver must work relative to its start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ClockedExecutor(FakeExecutor):
    """A FakeExecutor whose every step takes `step_time` on the fake clock."""

    def __init__(self, clock: FakeClock, block_size: int, step_time: float = STEP) -> None:
        super().__init__(block_size, step_time)
        self.clock = clock

    def execute(self, batch):
        self.clock.now += self.step_time
        return super().execute(batch)


def fake_engine(clock: FakeClock) -> InstanceEngine:
    config = make_config()
    return InstanceEngine(config, ClockedExecutor(clock, config.block_size))


def test_replay_stamps_ttft_and_tpot_by_hand():
    # A arrives at 0 (prompt 10, 3 tokens), B at 0.1875 (prompt 10, 2 tokens); 0.125 s per step.
    # step [0, .125): A prefill -> A token 1 at .125
    # step [.125, .25): A decode -> A token 2 at .25   (B arrived at .1875, waits for the next step)
    # step [.25, .375): A decode + B prefill -> A token 3 (done) and B token 1 at .375
    # step [.375, .5): B decode -> B token 2 (done) at .5
    # then nothing is left; C arrives at 1.0 (prompt 4, 1 token): the driver sleeps .5 s, one step.
    clock = FakeClock()
    requests = [TimedRequest("B", 0.1875, list(range(10)), 2), TimedRequest("A", 0.0, list(range(10, 20)), 3),
                TimedRequest("C", 1.0, [1, 2, 3, 4], 1)]
    result = replay(fake_engine(clock), requests, clock=clock, sleep=clock.sleep)
    a, b, c = result.records
    assert (a.request_id, a.arrival_time, a.first_token_time, a.finish_time) == ("A", 0.0, 0.125, 0.375)
    assert (a.ttft, a.tpot, a.num_output_tokens) == (0.125, 0.125, 3)
    assert (b.request_id, b.ttft, b.e2e, b.tpot, b.num_output_tokens) == ("B", 0.375 - 0.1875, 0.5 - 0.1875, 0.125, 2)
    assert (c.request_id, c.ttft, c.tpot, c.num_output_tokens) == ("C", 0.125, None, 1)
    assert clock.sleeps == [0.5]
    assert [s.seconds for s in result.steps] == [STEP] * 5
    assert [(s.prefill, s.num_decodes) for s in result.steps] == [
        ([(10, 10)], 0), ([], 1), ([(10, 10)], 1), ([], 1), ([(4, 4)], 0)]
    assert result.step_gaps == 0.0
    assert result.wall_seconds == 1.125
    assert result.busy_seconds == 5 * STEP


def test_replay_matches_the_simulator_on_the_same_steps():
    # With a constant step time the simulator and the replay must agree exactly.
    clock = FakeClock()
    workload = make_workload(12, rate=4.0, seed=3, vocab_size=1000, context=128)
    measured = replay(fake_engine(clock), workload.real, clock=clock, sleep=clock.sleep)
    from shunter.sim.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(scheduler=make_config(), control_interval=None), ConstantLatency(STEP), workload.sim).run()
    real_ids = [(r.request_id, r.ttft, r.e2e, r.num_output_tokens) for r in measured.records]
    sim_ids = [(r.request_id, r.ttft, r.e2e, r.num_output_tokens) for r in sim.records]
    assert len(real_ids) == len(sim_ids) == 12
    for (rid, ttft, e2e, n), (sid, sttft, se2e, sn) in zip(real_ids, sim_ids):
        assert (rid, n) == (sid, sn)
        assert ttft == pytest.approx(sttft, abs=1e-9) and e2e == pytest.approx(se2e, abs=1e-9)
    errors = compare(latency_figures(measured.records), latency_figures(sim.records))
    assert max(errors.values()) < 1e-9


def test_replay_rejects_duplicate_ids():
    clock = FakeClock()
    with pytest.raises(ValueError, match="unique"):
        replay(fake_engine(clock), [TimedRequest("x", 0, [1], 1), TimedRequest("x", 1, [1], 1)],
               clock=clock, sleep=clock.sleep)


def test_workload_is_seeded_and_fits_the_context():
    w1 = make_workload(50, rate=1.0, seed=7, vocab_size=49152)
    w2 = make_workload(50, rate=1.0, seed=7, vocab_size=49152)
    assert w1 == w2
    assert len(w1.sim) == len(w1.real) == 50
    for s, r in zip(w1.sim, w1.real):
        assert (s.request_id, s.arrival_time) == (r.request_id, r.arrival_time)
        assert len(r.prompt_token_ids) == s.num_prompt_tokens and r.max_tokens == s.num_output_tokens
        assert s.num_prompt_tokens + s.num_output_tokens <= 1024 and s.num_output_tokens >= 1
        assert all(100 <= t < 49152 for t in r.prompt_token_ids)
    assert make_workload(50, rate=1.0, seed=8, vocab_size=49152).real != w1.real


def test_a_repeated_replay_has_the_same_requests_with_other_prompt_tokens():
    w = make_workload(30, rate=1.0, seed=7, vocab_size=49152)
    again = with_fresh_prompts(w, 2001, 49152)
    assert again.sim == w.sim and again == with_fresh_prompts(w, 2001, 49152)
    for a, b in zip(w.real, again.real):
        assert (a.request_id, a.arrival_time, a.max_tokens) == (b.request_id, b.arrival_time, b.max_tokens)
        assert len(a.prompt_token_ids) == len(b.prompt_token_ids) and all(100 <= t < 49152 for t in b.prompt_token_ids)
    # No prompt of the first replay is a prefix-cache hit for the next (the first block already differs).
    assert all(a.prompt_token_ids[:16] != b.prompt_token_ids[:16] for a, b in zip(w.real, again.real)
               if len(a.prompt_token_ids) >= 16)


def test_replay_spread_is_how_far_real_runs_are_from_each_other_and_the_simulator_from_their_median():
    def figures(ttft99: float, tpot99: float) -> dict:
        return {"ttft_p50": 0.3, "ttft_p99": ttft99, "tpot_p50": 0.035, "tpot_p99": tpot99}

    runs = [figures(5.0, 0.090), figures(7.0, 0.080), figures(6.0, 0.100)]
    spread = replay_spread(runs, figures(6.3, 0.081))
    assert spread["real_median"]["ttft_p99"] == 6.0 and spread["real_median"]["tpot_p99"] == 0.090
    assert spread["real_spread"]["ttft_p99"] == pytest.approx(2.0 / 6.0)
    assert spread["real_spread"]["tpot_p99"] == pytest.approx(0.020 / 0.090)
    assert spread["real_spread"]["ttft_p50"] == 0.0
    assert spread["errors_vs_median"]["ttft_p99_err"] == pytest.approx(0.05)
    assert spread["errors_vs_median"]["tpot_p99_err"] == pytest.approx(0.1)
    assert [r["errors"]["ttft_p99_err"] for r in spread["runs"]] == pytest.approx([0.26, 0.1, 0.05])


def test_simulate_serves_every_request():
    workload = make_workload(20, rate=2.0, seed=0, vocab_size=1000)
    result = simulate(workload, ConstantLatency(0.05), max_model_len=8192)
    assert len(result.records) == 20


@pytest.mark.parametrize("argv, named", [
    (["bench", "fidelity", "--requests", "0"], "--requests"),
    (["bench", "fidelity", "--rate", "-1"], "--rate"),
    (["bench", "fidelity", "--rate", "0"], "--rate"),
    (["bench", "fidelity", "--profile", "/nonexistent/profile.json"], "/nonexistent/profile.json"),
    (["bench", "fidelity", "--threads", "0"], "--threads"),
    (["bench", "fidelity", "--profile", "x.json", "--save-profile", "p.json"], "--save-profile"),
    (["bench", "fidelity", "--profile", "packaged", "--quick-profile"], "--quick-profile"),
    (["bench", "fidelity", "--profile-rounds", "0"], "--profile-rounds"),
    (["bench", "fidelity", "--json", "/nonexistent/dir/out.json"], "/nonexistent/dir/out.json"),
    (["bench", "fidelity", "--wait-idle", "-5"], "--wait-idle"),
    (["bench", "fidelity", "--instances", "2", "--replays", "0"], "--replays"),
    (["bench", "fidelity", "--replays", "2"], "--replays 2 applies with --instances > 1"),
])
def test_bad_input_is_one_line(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("shunter: error:") and named in err


def test_a_malformed_number_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "fidelity", "--rate", "fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rate" in err


def test_a_bad_profile_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert main(["bench", "fidelity", "--profile", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a Shunter profile" in err


def test_a_profile_from_another_cpu_is_flagged():
    assert other_machine_warning({"cpu": "Intel Xeon"}, "Intel Xeon") is None
    assert other_machine_warning({}, "Intel Xeon") is None  # an older profile that does not say
    warning = other_machine_warning({"cpu": "AMD EPYC"}, "Intel Xeon")
    assert "AMD EPYC" in warning and "Intel Xeon" in warning


def test_co_running_splits_steps_by_whether_another_instance_stepped_meanwhile():
    from shunter.bench.fidelity import co_running
    from shunter.sim.profiled import ProfileStep

    class Flat:  # predicts 1 s for every step
        def step_time(self, prefill, num_decodes, sum_decode_context):
            return 1.0

    def step(end: float, seconds: float) -> ProfileStep:
        return ProfileStep([], 1, 10, seconds, end)

    # Instance a: a step in [0, 1] alone, and a 1.2 s step in [2, 3.2] that b's [2.5, 3.5] covers by 0.7 s.
    # Instance b: its [2.5, 3.5] step is covered by a's for 0.7 s of 1 s; its [5, 6] step runs alone.
    out = co_running(Flat(), {"a": [step(1.0, 1.0), step(3.2, 1.2)], "b": [step(3.5, 1.0), step(6.0, 1.0)]})
    assert out["co_running"] == {"steps": 2, "real_over_predicted": pytest.approx(2.2 / 2.0)}
    assert out["alone"] == {"steps": 2, "real_over_predicted": pytest.approx(1.0)}
    # Steps covered for less than half their length count as alone (0.3 s of 1 s each here).
    out = co_running(Flat(), {"a": [step(1.0, 1.0)], "b": [step(1.7, 1.0)]})
    assert out["co_running"]["steps"] == 0 and out["alone"]["steps"] == 2
