"""The migration bench's source slowdown: the source's steps during a migration against the same batch outside it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shunter.bench.migration_bench import source_step_ratios
from shunter.sim.profiled import ProfileStep


def step(ended_at: float, seconds: float, num_decodes: int, prefill=()) -> ProfileStep:
    return ProfileStep(list(prefill), num_decodes, 100 * num_decodes, seconds, ended_at)


def test_steps_during_the_migration_are_compared_with_the_mean_step_of_the_same_batch_outside_it():
    m = SimpleNamespace(start_time=10.0, end_time=12.0)
    steps = [
        step(1.0, 9.0, 4),  # before `since`: another run's steps count for nothing
        # Same-batch steps before the control window: mean 40 ms (the median, 36 ms, would read a
        # slowdown into ordinary steps).
        step(5.0, 0.036, 4), step(6.0, 0.036, 4), step(6.5, 0.048, 4), step(7.0, 0.2, 4, prefill=[(64, 0)]),
        step(8.5, 0.040, 4),  # the control window (8, 10]: as usual
        step(11.0, 0.044, 4),  # during, with the request: +10 % against 40 ms
        step(11.9, 0.021, 3),  # during, after the suspension: +5 % against the 20 ms after it
        step(13.0, 0.019, 3), step(14.0, 0.021, 3),
    ]
    during, control = source_step_ratios(steps, m, num_decodes=4, since=2.0)
    assert during == pytest.approx([1.10, 1.05])
    assert control == pytest.approx([1.0])


def test_no_steps_in_a_window_means_no_ratios():
    m = SimpleNamespace(start_time=10.0, end_time=12.0)
    assert source_step_ratios([step(5.0, 0.04, 4), step(13.0, 0.02, 3)], m, 4, since=0.0) == ([], [])
