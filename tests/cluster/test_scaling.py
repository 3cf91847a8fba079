"""The autoscaling policy on hand-built reports: sustain, cool-down, bounds, the choice of instance to drain."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.global_scheduler import GlobalScheduler
from shunter.cluster.instance import InProcessInstance
from shunter.cluster.load import LoadConfig
from shunter.cluster.policies import catalog
from shunter.cluster.scaling import (
    SCALING, ClusterView, ScalingAction, ScalingConfig, ScalingState, cluster_freeness, demand_blocks, demand_scaling,
    emptiest, freeness_scaling,
)
from tests.cluster.reports import report
from tests.factories import make_engine, make_request

NO_HEADROOM = LoadConfig()


def view(reports, draining=(), starting=0, now=0.0):
    return ClusterView(reports, [r.instance_id in draining for r in reports], starting, now)


def busy(iid, used=95, running=10, waiting=0, demand=0, total=100):
    """An instance with little room: (100 - 95) / 10 = 0.5 steps per request."""
    return report(iid, used=used, total=total, running=running, waiting=waiting, waiting_demand=demand)


def idle(iid, total=100):
    return report(iid, total=total)


def light(iid, running=1, used=5, total=100):
    return report(iid, used=used, total=total, running=running)


def decide(policy_cfg, reports, times, state=None, **kw):
    """The policy's actions at each time, over the same reports."""
    state = state if state is not None else ScalingState()
    return [freeness_scaling(view(reports, now=t, **kw), policy_cfg, NO_HEADROOM, state) for t in times], state


# ---- the cluster's freeness --------------------------------------------------------------------
def test_freeness_pools_blocks_and_requests_and_an_idle_instance_adds_capacity_not_infinity():
    a = report("0", used=60, total=100, running=4)
    assert cluster_freeness(view([a]), NO_HEADROOM) == (100 - 60) / 4
    # The idle instance's 100 blocks join the pool; its +∞ per-instance freeness does not swamp the mean.
    assert cluster_freeness(view([a, idle("1")]), NO_HEADROOM) == (200 - 60) / 4
    assert cluster_freeness(view([idle("0"), idle("1")]), NO_HEADROOM) == math.inf  # no request anywhere


def test_every_waiting_request_counts_as_demand_and_as_a_request():
    r = report("0", used=60, total=100, running=4, waiting=3, head=12, waiting_demand=40)
    assert cluster_freeness(view([r]), NO_HEADROOM) == (100 - 60 - 40) / (4 + 3)
    over = report("0", used=100, total=100, running=4, waiting=4, waiting_demand=100)
    assert cluster_freeness(view([over]), NO_HEADROOM) == (100 - 200) / 8  # negative: demand beyond capacity


def test_draining_load_stays_its_capacity_goes_and_starting_instances_count_at_the_mean_capacity():
    a, b = report("0", used=50, total=100, running=5), report("1", used=30, total=300, running=5)
    assert cluster_freeness(view([a, b], draining={"1"}), NO_HEADROOM) == (100 - 80) / 10
    assert cluster_freeness(view([a, b], starting=2), NO_HEADROOM) == (400 + 2 * 200 - 80) / 10
    assert cluster_freeness(view([a, b]), NO_HEADROOM, without=1) == (100 - 80) / 10


def test_priority_headroom_counts_as_usage():
    r = report("0", used=40, total=100, running=2, priorities={1: 2})
    assert cluster_freeness(view([r]), LoadConfig({1: 20})) == (100 - 60) / 2


@given(st.lists(st.tuples(st.integers(1, 500), st.integers(0, 500), st.integers(0, 40), st.integers(0, 40),
                          st.integers(0, 800), st.booleans()), min_size=1, max_size=6),
       st.integers(0, 4))
def test_freeness_is_never_nan_and_starting_instances_never_lower_it(rows, num_starting):
    reports = [report(str(i), used=min(u, t), total=t, running=r, waiting=w, waiting_demand=d)
               for i, (t, u, r, w, d, _) in enumerate(rows)]
    draining = {str(i) for i, row in enumerate(rows) if row[5]}
    f = cluster_freeness(view(reports, draining), NO_HEADROOM)
    assert not math.isnan(f)
    assert cluster_freeness(view(reports, draining, starting=num_starting), NO_HEADROOM) >= f
    for i in range(len(reports)):
        assert cluster_freeness(view(reports, draining), NO_HEADROOM, without=i) <= f


# ---- the policy --------------------------------------------------------------------------------
CFG = ScalingConfig(min_instances=1, max_instances=8, scale_up_freeness=10.0, scale_down_freeness=60.0, sustain=5.0,
                    cooldown=20.0)


def test_scales_up_only_after_the_freeness_stays_low_for_sustain_seconds():
    actions, state = decide(CFG, [busy("0"), busy("1")], [0.0, 1.0, 2.0, 3.0, 4.0, 4.5])
    assert all(a.is_noop for a in actions)
    assert state.up_since == 0.0
    (a,), _ = decide(CFG, [busy("0"), busy("1")], [5.0], state)
    assert a.num_add > 0 and a.drain_id is None and a.freeness == pytest.approx(0.5)


def test_a_blip_inside_the_band_restarts_the_streak():
    state = ScalingState()
    low, mid = [busy("0")], [report("0", used=70, total=100, running=2)]  # F = 15: between the thresholds
    decide(CFG, low, [0.0, 1.0, 2.0, 3.0], state)
    decide(CFG, mid, [4.0], state)
    assert state.up_since is None
    actions, _ = decide(CFG, low, [5.0, 6.0, 9.0], state)
    assert all(a.is_noop for a in actions)
    (a,), _ = decide(CFG, low, [10.0], state)
    assert a.num_add > 0


def test_adds_the_fewest_instances_that_lift_the_freeness_to_the_threshold():
    reports = [busy("0", waiting=10, demand=300), busy("1")]
    (a,), _ = decide(ScalingConfig(1, 64, sustain=0.0), reports, [0.0])
    k = a.num_add
    assert k > 1
    assert cluster_freeness(view(reports, starting=k), NO_HEADROOM) >= 10.0
    assert cluster_freeness(view(reports, starting=k - 1), NO_HEADROOM) < 10.0


def test_max_counts_serving_starting_and_draining_instances():
    reports = [busy("0", waiting=10, demand=300), busy("1"), busy("2")]
    cfg = ScalingConfig(1, 6, sustain=0.0)
    (a,), _ = decide(cfg, reports, [0.0])
    assert a.num_add == 3  # wants more, room for 3
    (a,), _ = decide(cfg, reports, [0.0], starting=2)
    assert a.num_add == 1
    (a,), _ = decide(cfg, reports, [0.0], starting=2, draining={"2"})
    assert a.num_add == 1  # a draining instance still holds its GPU
    (a,), _ = decide(cfg, reports, [0.0], starting=3)
    assert a.is_noop


def test_scales_down_by_draining_the_emptiest_instance_the_newest_among_equals():
    reports = [light("0", running=3, total=1000), light("1", running=1, total=1000),
               light("2", running=2, total=1000), light("3", running=1, total=1000)]
    assert emptiest(view(reports)) == 3
    assert emptiest(view(reports, draining={"3"})) == 1
    actions, _ = decide(CFG, reports, [0.0, 4.0, 5.0])
    assert [a.drain_id for a in actions] == [None, None, "3"]
    assert all(a.num_add == 0 for a in actions)
    waiting = [light("0", running=1), report("1", total=100, waiting=1, waiting_demand=1), light("2", running=2)]
    assert emptiest(view(waiting)) == 1  # waiting requests count as much as running ones


def test_scale_down_asks_about_the_cluster_without_the_instance():
    # Each instance alone: F = (100 - 20) / 1 = 80 > 60. Both pooled: (200 - 40) / 2 = 80. Without one:
    # (100 - 40) / 2 = 30 < 60, so draining one would leave the cluster too full: keep both.
    reports = [light("0", used=20), light("1", used=20)]
    assert cluster_freeness(view(reports), NO_HEADROOM) == 80.0
    actions, state = decide(CFG, reports, [0.0, 10.0, 20.0])
    assert all(a.is_noop for a in actions) and state.down_since is None


def test_never_below_min_serving_and_never_while_instances_start():
    reports = [idle("0"), idle("1"), idle("2")]
    cfg = ScalingConfig(2, 8, sustain=0.0, cooldown=0.0)
    (a,), _ = decide(cfg, reports, [0.0])
    assert a.drain_id == "2"
    (a,), _ = decide(cfg, reports, [0.0], draining={"2"})
    assert a.is_noop  # two serving, min two
    (a,), _ = decide(cfg, reports, [0.0], starting=1)
    assert a.is_noop
    (a,), _ = decide(ScalingConfig(1, 1, sustain=0.0), [idle("0")], [0.0])
    assert a.is_noop


def test_cooldown_after_an_action_and_the_streak_starts_afresh():
    cfg = ScalingConfig(1, 8, sustain=2.0, cooldown=10.0)
    state = ScalingState()
    low = [busy("0")]
    actions, _ = decide(cfg, low, [0.0, 1.0, 2.0], state)
    assert [a.num_add > 0 for a in actions] == [False, False, True]
    assert state.last_action_time == 2.0 and state.up_since is None
    # Still low: the streak restarts at 3 and is long enough at 5, but the cool-down holds until 12.
    actions, _ = decide(cfg, low, [3.0, 5.0, 8.0, 11.9], state)
    assert all(a.is_noop for a in actions)
    (a,), _ = decide(cfg, low, [12.0], state)
    assert a.num_add > 0
    # The cool-down holds a scale-down too.
    actions, _ = decide(cfg, [idle("0"), idle("1")], [13.0, 16.0, 21.9, 22.0], state)
    assert [a.drain_id for a in actions] == [None, None, None, "1"]


def test_config_is_validated_with_the_values_named():
    with pytest.raises(ValueError, match=r"min_instances \(3\) must not exceed max_instances \(2\)"):
        ScalingConfig(3, 2)
    with pytest.raises(ValueError, match="min_instances must be a positive integer, got 0"):
        ScalingConfig(0, 2)
    with pytest.raises(ValueError, match="max_instances must be a positive integer, got 2.5"):
        ScalingConfig(1, 2.5)
    with pytest.raises(ValueError, match=r"scale-down freeness \(10.0\) must exceed the scale-up freeness \(10.0\)"):
        ScalingConfig(1, 2, scale_up_freeness=10.0, scale_down_freeness=10.0)
    with pytest.raises(ValueError, match="startup_delay must be >= 0 seconds, got -1"):
        ScalingConfig(1, 2, startup_delay=-1)
    with pytest.raises(ValueError, match="sustain must be >= 0 seconds, got nan"):
        ScalingConfig(1, 2, sustain=float("nan"))
    with pytest.raises(ValueError, match="interval must be > 0 seconds, got 0"):
        ScalingConfig(1, 2, interval=0)
    with pytest.raises(ValueError, match="unknown scaling policy 'magic'; choose from: freeness"):
        ScalingConfig(1, 2, policy="magic")
    assert ScalingConfig(2, 4).contains(2) and not ScalingConfig(2, 4).contains(5)


def test_registered_and_listed():
    assert SCALING.get("freeness") is freeness_scaling
    assert SCALING.get("shunter") is demand_scaling
    assert catalog()["scaling"] is SCALING


# ---- the demand policy (`shunter`) ---------------------------------------------------------------
DEMAND = ScalingConfig(1, 8, policy="shunter", target_usage=0.5, scale_down_window=60.0, cooldown=10.0)


def demand_decide(cfg, reports, times, state=None, **kw):
    state = state if state is not None else ScalingState()
    return [demand_scaling(view(reports, now=t, **kw), cfg, NO_HEADROOM, state) for t in times], state


def test_demand_counts_used_waiting_and_headroom_blocks_on_every_instance():
    a = report("0", used=60, total=100, running=2, waiting=1, waiting_demand=15, priorities={1: 1})
    b = report("1", used=30, total=100, running=1)
    assert demand_blocks(view([a, b], draining={"1"}), LoadConfig({1: 20})) == 60 + 15 + 20 + 30


def test_scales_up_at_once_by_the_whole_shortfall_counting_starting_instances():
    # 150 blocks of demand over 100-block instances at 50 % usage: 3 needed.
    reports = [busy("0", used=80), light("1", used=70)]
    (action,), _ = demand_decide(DEMAND, reports, [0.0])
    assert action.num_add == 1
    (action,), _ = demand_decide(DEMAND, [busy("0", used=100, waiting=2, demand=200), light("1", used=100)], [0.0])
    assert action.num_add == 6  # 400 blocks: 8 needed, 2 serve
    (action,), _ = demand_decide(DEMAND, reports, [0.0], starting=1)
    assert action.is_noop  # the one starting covers it


def test_scale_up_stops_at_max_provisioned_draining_included():
    reports = [busy("0", used=100, waiting=2, demand=200), light("1", used=100), idle("2")]
    (action,), _ = demand_decide(ScalingConfig(1, 5, policy="shunter", target_usage=0.5), reports, [0.0],
                                 draining={"2"}, starting=1)
    assert action.num_add == 1


def test_drains_only_after_a_whole_window_below_the_fleet_one_per_cooldown():
    reports = [light("0", used=10), light("1", used=10), idle("2"), idle("3")]  # 20 blocks: 1 needed, 4 serve
    actions, state = demand_decide(DEMAND, reports, [0.0, 30.0, 59.0, 60.0, 65.0, 70.0])
    assert [a.drain_id for a in actions] == [None, None, None, "3", None, "3"]  # the same view: still "3"


def test_a_peak_inside_the_window_keeps_the_fleet():
    cfg = dataclasses.replace(DEMAND, max_instances=4)
    quiet = [light("0", used=10), light("1", used=10), idle("2"), idle("3")]
    loud = [busy("0", used=100), busy("1", used=100), idle("2"), idle("3")]  # 200 blocks: all 4 needed
    state = ScalingState()
    demand_decide(cfg, loud, [0.0], state)
    actions, _ = demand_decide(cfg, quiet, [30.0, 60.0, 61.0], state)
    assert [a.drain_id for a in actions] == [None, None, "3"]  # the peak at 0 leaves the window after 60


def test_never_drains_below_min_nor_while_instances_start():
    reports = [light("0", used=1), idle("1")]
    actions, _ = demand_decide(dataclasses.replace(DEMAND, min_instances=2), reports, [0.0, 100.0])
    assert all(a.is_noop for a in actions)
    actions, _ = demand_decide(DEMAND, reports, [0.0, 100.0], starting=1)
    assert all(a.is_noop for a in actions)


def test_demand_config_is_validated():
    with pytest.raises(ValueError, match="target_usage must lie in"):
        ScalingConfig(policy="shunter", target_usage=1.5)
    with pytest.raises(ValueError, match="scale_down_window must be >= 0"):
        ScalingConfig(policy="shunter", scale_down_window=-1.0)


# ---- through the global scheduler ------------------------------------------------------------------
def test_the_global_scheduler_decides_from_its_view_and_the_driver_carries_it_out():
    instances = [InProcessInstance(make_engine(str(i), num_blocks=256)) for i in range(3)]
    policy = PolicyConfig(dispatch="rr", scaling=ScalingConfig(1, 3, sustain=0.0, cooldown=0.0))
    gs = GlobalScheduler(instances, policy)
    gs.dispatch(make_request(prompt_len=20), 0.0)  # to "0"; the others are idle
    action = gs.scaling_step(1.0)
    assert action == ScalingAction(drain_id="2", freeness=action.freeness)  # the newest idle instance
    gs.drain("2")
    assert gs.scaling_step(2.0).drain_id == "1"
    gs.drain("1")
    assert gs.scaling_step(3.0).is_noop  # one serving: the minimum
    assert GlobalScheduler(instances, PolicyConfig()).scaling_step(0.0).is_noop  # no scaling configured
