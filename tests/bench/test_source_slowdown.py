"""The migration bench's source slowdown: the source's steps during a migration against the same batch outside it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shunter.bench.migration_bench import source_slowdown
from shunter.sim.profiled import ProfileStep


def step(ended_at: float, seconds: float, num_decodes: int, prefill=()) -> ProfileStep:
    return ProfileStep(list(prefill), num_decodes, 100 * num_decodes, seconds, ended_at)


def test_steps_during_the_migration_are_compared_with_the_same_batch_outside_it():
    m = SimpleNamespace(start_time=10.0, end_time=12.0)
    steps = [
        step(1.0, 9.0, 4),  # before `since`: another run's steps count for nothing
        step(5.0, 0.040, 4), step(6.0, 0.040, 4), step(7.0, 0.2, 4, prefill=[(64, 0)]),
        step(8.5, 0.042, 4),  # the control window (8, 10]: +5 % against the 40 ms before it
        step(11.0, 0.044, 4),  # during, with the request: +10 % against 40 ms
        step(11.9, 0.021, 3),  # during, after the suspension: +5 % against 20 ms
        step(13.0, 0.020, 3), step(14.0, 0.020, 3),
    ]
    during, control = source_slowdown(steps, m, num_decodes=4, since=2.0)
    assert during == pytest.approx((1.10 + 1.05) / 2)
    assert control == pytest.approx(1.05)


def test_no_steps_on_a_side_means_no_figure():
    m = SimpleNamespace(start_time=10.0, end_time=12.0)
    assert source_slowdown([step(5.0, 0.04, 4), step(13.0, 0.02, 3)], m, 4, since=0.0) == (None, None)
