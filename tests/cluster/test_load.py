"""Virtual usage and freeness (Llumnix Alg. 1) on hand-built reports; the instance order is strict and total."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from shunter.cluster.load import LoadConfig, argmax, argmin, freest_first, freeness, least_free_first, virtual_usage
from tests.cluster.reports import report

NO_HEADROOM = LoadConfig()


def test_running_blocks_count_and_freeness_is_steps_left_per_running_request():
    r = report(used=60, total=100, running=4)
    assert virtual_usage(r, NO_HEADROOM) == 60
    assert freeness(r, NO_HEADROOM) == (100 - 60) / 4


def test_only_the_head_of_line_waiting_request_counts():
    r = report(used=60, total=100, running=4, waiting=3, head=12, waiting_demand=40)
    assert virtual_usage(r, NO_HEADROOM) == 60 + 12
    assert freeness(r, NO_HEADROOM) == (100 - 72) / 4


def test_priority_headroom_is_counted_once_per_priority_present():
    config = LoadConfig({1: 30, 2: 50})
    # Two priority-1 requests share one headroom of 30; priority 0 has none.
    r = report(used=40, total=100, running=5, priorities={0: 3, 1: 2})
    assert virtual_usage(r, config) == 40 + 30
    both = report(used=40, total=100, running=5, priorities={0: 1, 1: 2, 2: 2})
    assert virtual_usage(both, config) == 40 + 30 + 50
    assert freeness(both, config) == (100 - 120) / 5  # negative: over-committed by the headroom


def test_idle_instance_is_infinitely_free_and_draining_infinitely_used():
    idle = report(used=0, running=0, waiting=2, head=5)
    assert freeness(idle, NO_HEADROOM) == math.inf
    assert virtual_usage(idle, NO_HEADROOM, is_draining=True) == math.inf
    assert freeness(idle, NO_HEADROOM, is_draining=True) == -math.inf
    assert freeness(report(used=10, running=3), NO_HEADROOM, is_draining=True) == -math.inf


def test_reserved_blocks_count_as_used():
    # The engine counts blocks reserved for incoming migrations in num_used_blocks.
    r = report(used=50, total=100, running=2)
    r.num_reserved_blocks = 20
    assert virtual_usage(r, NO_HEADROOM) == 50


reports = st.builds(
    report, used=st.integers(0, 100), total=st.just(100), running=st.integers(0, 8), waiting=st.integers(0, 4),
    head=st.integers(0, 30), priorities=st.dictionaries(st.integers(0, 2), st.integers(1, 3), max_size=3))


@given(st.lists(reports, min_size=1, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8), st.randoms())
def test_instance_orders_are_strict_total_orders_with_ties_by_index(rs, draining, rnd):
    config = LoadConfig({1: 10, 2: 25})
    f = [freeness(r, config, d) for r, d in zip(rs, draining)]
    assert not any(math.isnan(x) for x in f)
    order = freest_first(f)
    assert sorted(order) == list(range(len(f)))  # a permutation: every instance exactly once
    for a, b in zip(order, order[1:]):  # strictly decreasing in (freeness, -index)
        assert f[a] > f[b] or (f[a] == f[b] and a < b)
    assert least_free_first(f) == sorted(range(len(f)), key=lambda i: (f[i], i))
    assert argmax(f) == order[0] and argmin(f) == least_free_first(f)[0]
    # The order does not depend on the order in which instances were listed (only on their index).
    perm = list(range(len(f)))
    rnd.shuffle(perm)
    assert sorted(perm, key=lambda i: (-f[i], i)) == order
