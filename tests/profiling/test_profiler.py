"""`shunter profile`: the grid driver on a fake engine with a known cost, the file it writes, the command."""

from __future__ import annotations

import sys

import pytest

from shunter.cli import main
from shunter.engine import InstanceEngine
from shunter.profiling.machine import runqueue_wait_seconds
from shunter.profiling.profiler import QUICK_GRID, MachineBusyError, ProfileGrid, Profiler, engine_scheduler_config
from shunter.profiling.report import fit_summary, format_report
from shunter.sim.latency import build_latency_model, summarize_batch
from shunter.sim.profiled import FEATURES, Profile, ProfiledLatency, step_features
from tests.factories import FakeExecutor

# A made-up engine: seconds = a linear function of every fitted feature (profiled.FEATURES).
TRUE_COEFFICIENTS = dict(zip(FEATURES, (0.02, 3e-4, 2e-8, 2e-3, 1e-5, 5e-5, 3e-7)))
METADATA = {"hardware": "cpu", "model": "smollm2-135m", "dtype": "bfloat16", "threads": 2,
            "block_size": 16, "num_blocks": 4096}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LinearCostExecutor(FakeExecutor):
    """Advances a fake clock by the made-up engine's cost of each batch."""

    def __init__(self, clock: FakeClock, block_size: int) -> None:
        super().__init__(block_size)
        self.clock = clock

    def execute(self, batch):
        features = step_features(*summarize_batch(batch))
        self.clock.now += sum(TRUE_COEFFICIENTS[f] * x for f, x in zip(FEATURES, features))
        return super().execute(batch)


def fake_profile(grid: ProfileGrid = QUICK_GRID, **kw):
    clock = FakeClock()
    config = engine_scheduler_config(8192)
    engine = InstanceEngine(config, LinearCostExecutor(clock, config.block_size))
    ticks = []
    kw.setdefault("wait_seconds", lambda: 0.0)
    profiler = Profiler(engine, 1000, grid, clock=clock, progress=ticks.append, **kw)
    points = profiler.run()
    return profiler, points, len(ticks), engine


def test_grid_points_are_the_steps_asked_for():
    profiler, points, num_ticks, engine = fake_profile()
    assert num_ticks == profiler.num_units()
    kinds = [p.kind for p in points]
    g = QUICK_GRID
    assert kinds.count("decode") == len(g.decode_batch_sizes) * len(g.decode_contexts)
    assert kinds.count("prefill") == len(g.prefill_chunks) * len(g.prefill_offsets)
    assert kinds.count("mixed") == len(g.mixed_batch_sizes) * len(g.mixed_chunks) * len(g.decode_contexts)
    for p in points:
        assert len(p.samples) == g.repeats
        s = p.step
        if p.kind == "decode":
            assert not s.prefill and s.num_decodes in g.decode_batch_sizes
        elif p.kind == "mixed":
            assert len(s.prefill) == 1 and s.prefill[0][0] in g.mixed_chunks and s.num_decodes in g.mixed_batch_sizes
        else:
            (n, context), = s.prefill
            assert s.num_decodes == 0 and n in g.prefill_chunks and context - n in g.prefill_offsets
    assert profiler.held_out  # the fill steps, mixed prefill + decodes
    assert not engine.has_unfinished_requests
    engine.check_invariants()


def test_rounds_pool_the_samples_of_each_point():
    clock = FakeClock()
    config = engine_scheduler_config(8192)
    engine = InstanceEngine(config, LinearCostExecutor(clock, config.block_size))
    ticks = []
    profiler = Profiler(engine, 1000, QUICK_GRID, clock=clock, progress=ticks.append, wait_seconds=lambda: 0.0)
    points = profiler.run(rounds=2)
    assert len(ticks) == profiler.num_units(2)
    _, single, _, _ = fake_profile()
    assert [p.label for p in points] == [p.label for p in single]
    assert all(len(p.samples) == 2 * QUICK_GRID.repeats for p in points)
    for p in points:
        assert p.step.seconds == pytest.approx(sum(p.samples) / len(p.samples))


def test_fit_recovers_a_linear_engine(tmp_path):
    profiler, points, _, _ = fake_profile()
    profile = Profile(dict(METADATA), [p.step for p in points])
    path = tmp_path / "profile.json"
    profile.save(path)
    model = build_latency_model("profiled", profile=str(path))
    assert isinstance(model, ProfiledLatency)
    for name, value in TRUE_COEFFICIENTS.items():
        assert model.coefficients[name] == pytest.approx(value, rel=0.05, abs=1e-9)
    assert model.fit_error < 0.01
    summary = fit_summary(model, points, profiler.held_out)
    assert summary["grid_max_error"] < 0.01 and summary["held_out_mean_error"] < 0.01
    report = format_report(model, points, profiler.held_out)
    assert "held-out fill steps" in report and "decode" in report


class ContendedMeter:
    """Reports, per call, seconds waited for a CPU: the steps listed in `contended` waited a whole second."""

    def __init__(self, contended) -> None:
        self.contended = set(contended)
        self.calls = 0
        self.total = 0.0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0 and self.calls // 2 in self.contended:  # the read after step k
            self.total += 1.0
        return self.total


def test_contended_steps_are_measured_again():
    meter = ContendedMeter(())
    _, ref_points, _, _ = fake_profile(wait_seconds=meter)
    num_steps = meter.calls // 2
    contended = range(num_steps // 3, num_steps // 3 + 5)
    pauses = []
    profiler, points, _, _ = fake_profile(wait_seconds=ContendedMeter(contended), pause=lambda: pauses.append(1))
    assert 1 <= profiler.num_discarded <= 5 and len(pauses) == profiler.num_discarded
    assert [(p.kind, p.label) for p in points] == [(p.kind, p.label) for p in ref_points]
    assert all(len(p.samples) == QUICK_GRID.repeats for p in points)


def test_a_machine_that_stays_busy_is_refused():
    with pytest.raises(MachineBusyError, match="idle"):
        fake_profile(wait_seconds=ContendedMeter(range(10_000)), pause=lambda: None, max_retries=3)


def write_schedstat(task_dir, tid: str, text: str | None) -> None:
    (task_dir / tid).mkdir(parents=True)
    if text is not None:
        (task_dir / tid / "schedstat").write_text(text)


def test_runqueue_wait_sums_the_second_schedstat_field_of_every_thread(tmp_path):
    write_schedstat(tmp_path, "101", "8123456789 2500000000 731\n")
    write_schedstat(tmp_path, "102", "17 500000000 3\n")
    write_schedstat(tmp_path, "103", "garbage\n")  # malformed: skipped
    write_schedstat(tmp_path, "104", "12 not-a-number 1\n")
    write_schedstat(tmp_path, "105", None)  # a thread that ended between the listing and the read
    assert runqueue_wait_seconds(tmp_path) == pytest.approx(3.0)


def test_runqueue_wait_is_unknown_without_a_readable_schedstat(tmp_path):
    assert runqueue_wait_seconds(tmp_path / "missing") is None  # not Linux
    write_schedstat(tmp_path, "101", "")
    write_schedstat(tmp_path, "102", None)
    assert runqueue_wait_seconds(tmp_path) is None  # nothing read is not "no wait"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="schedstat is Linux's")
def test_runqueue_wait_of_this_process_is_read_on_linux():
    waited = runqueue_wait_seconds()
    assert isinstance(waited, float) and waited >= 0


@pytest.mark.parametrize("grid, named", [
    (ProfileGrid(repeats=0), "repeats"),
    (ProfileGrid(decode_batch_sizes=(1, 128)), "max_num_seqs"),
    (ProfileGrid(prefill_chunks=(0,)), "prefill chunks"),
    (ProfileGrid(prefill_offsets=(100,)), "multiples of the block size"),
    (ProfileGrid(mixed_batch_sizes=(64,)), "one more request"),
    (ProfileGrid(mixed_batch_sizes=(32,), mixed_chunks=(500,)), "budget"),
])
def test_grid_outside_the_engine_limits_is_refused(grid, named):
    with pytest.raises(ValueError, match=named):
        grid.check(engine_scheduler_config(8192))


@pytest.mark.parametrize("argv, named", [
    (["profile", "--threads", "0"], "--threads"),
    (["profile", "--wait-idle", "-1"], "--wait-idle"),
    (["profile", "--rounds", "0"], "--rounds"),
    (["profile", "--dtype", "float16"], "--dtype"),
    (["profile", "--json", "/nonexistent/dir/p.json"], "/nonexistent/dir"),
])
def test_bad_input_is_one_line(argv, named, capsys):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own checks (choices, types) exit from parse_args
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("shunter: error:") and named in err


@pytest.mark.slow
def test_quick_profile_of_the_real_engine(tmp_path, capsys):
    path = tmp_path / "quick.json"
    assert main(["profile", "--quick", "--threads", "2", "--json", str(path), "--quiet"]) == 0
    model = ProfiledLatency.from_path(path)
    meta = model.metadata
    assert meta["threads"] == 2 and meta["model"] == "smollm2-135m" and meta["grid"]["repeats"] == QUICK_GRID.repeats
    assert len(Profile.load(path).steps) == 20
    out = capsys.readouterr().out
    assert "relative error" in out and "wrote" in out
