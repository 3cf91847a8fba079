"""Prefix caching "auto": the exact results of caching on, without its cost where they provably agree."""

import pytest

from shunter.sim.simulator import SimConfig, simulate
from tests.sim.builders import random_workload, roofline, small_scheduler, wr


def _run(workload, mode, **sched):
    config = SimConfig(num_instances=2, scheduler=small_scheduler(**sched))
    return simulate(config, roofline(), workload, prefix_caching=mode)


def test_without_preemption_auto_skips_caching_and_matches_on():
    workload = random_workload(11, 60, rate=10.0)
    auto, on, off = (_run(workload, mode) for mode in ("auto", "on", "off"))
    assert not auto.prefix_caching and on.prefix_caching
    assert auto.records == on.records == off.records


def test_with_preemption_auto_restarts_with_caching():
    workload = random_workload(12, 80, rate=200.0, max_prompt=60, max_output=120)
    seen = []
    config = SimConfig(num_instances=1, scheduler=small_scheduler(num_blocks=24, block_size=4))
    auto = simulate(config, roofline(), workload, prefix_caching="auto", progress=seen.append)
    on = simulate(config, roofline(), workload, prefix_caching="on")
    off = simulate(config, roofline(), workload, prefix_caching="off")
    assert auto.prefix_caching
    assert auto.records == on.records
    assert off.records != on.records  # here caching matters: preempted requests find their blocks again
    assert sum(r.num_preemptions for r in on.records) > 0
    assert sum(seen) == len(workload)  # the progress of the abandoned first attempt was taken back


def test_shared_prompts_use_caching():
    # The same request id twice (one after the other) means the same synthetic prompt: the second
    # hits the first's cached blocks, so "auto" must run with caching.
    workload = [wr("a", 0.0, 400, 5), wr("b", 0.0, 30, 5), wr("a", 5.0, 400, 5)]
    auto, on, off = (_run(workload, mode) for mode in ("auto", "on", "off"))
    assert auto.prefix_caching and auto.records == on.records
    assert on.records[2].ttft < off.records[2].ttft
    assert _run(random_workload(3, 20, rate=5.0, prefixes=True), "auto").prefix_caching  # prefix blocks: on


def test_bad_mode():
    with pytest.raises(ValueError, match="auto, on, off"):
        _run(random_workload(1, 2, rate=1.0), "sometimes")
