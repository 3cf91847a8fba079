"""The global scheduler over in-process instances: the dispatcher's view, draining, control ticks."""

from __future__ import annotations

import pytest

from shunter.cluster.bundles import BUNDLES, PolicyConfig, build_policy
from shunter.cluster.global_scheduler import GlobalScheduler, MigrationOrder
from shunter.cluster.instance import InProcessInstance
from shunter.cluster.migration_policy import MigrationPolicyConfig
from tests.engine.helpers import step
from tests.factories import make_engine, make_request, run_to_completion


def cluster(n=3, policy=None, **kw):
    instances = [InProcessInstance(make_engine(str(i), **kw)) for i in range(n)]
    return instances, GlobalScheduler(instances, policy or PolicyConfig(dispatch="infaas"))


def test_dispatch_reads_the_last_report_plus_what_it_dispatched_since():
    instances, gs = cluster()
    big = make_request(prompt_len=100, max_tokens=4)
    assert gs.dispatch(big, 0.0) is instances[0]
    # No new report came, yet the dispatcher counts the queued request: the next two go elsewhere.
    assert gs.views["0"].num_waiting == 1 and gs.views["0"].waiting_block_demand == 25
    assert gs.dispatch(make_request(prompt_len=40), 0.0) is instances[1]
    assert gs.dispatch(make_request(prompt_len=40), 0.0) is instances[2]
    for inst in instances:
        out = run_to_completion(inst.engine)
        assert all(len(tokens) > 0 for tokens in out.values())
    # Until a fresh report arrives, the view is stale by design; a report replaces it.
    assert gs.views["0"].num_waiting == 1
    gs.collect_reports(1.0)
    assert gs.views["0"].num_waiting == 0 and gs.views["0"].num_used_blocks == 0
    assert gs.num_dispatches == 3


def test_a_prefilled_request_leaves_the_views_queued_prefill():
    instances, gs = cluster(2)
    a, b = make_request(prompt_len=100), make_request(prompt_len=40)
    gs.assign(a, instances[0])
    gs.assign(b, instances[0])
    assert gs.views["0"].num_pending_prefill_tokens == 140
    gs.count_prefilled(a, "0")
    assert gs.views["0"].num_pending_prefill_tokens == 40
    gs.count_prefilled(a, "0")  # counted twice (a report came in between): never below zero
    gs.count_prefilled(b, "0")
    assert gs.views["0"].num_pending_prefill_tokens == 0
    gs.count_prefilled(b, "gone")  # an instance that left: nothing to do


def test_round_robin_and_membership():
    instances, gs = cluster(2, PolicyConfig(dispatch="rr"))
    assert [gs.dispatch(make_request(), 0.0).instance_id for _ in range(4)] == ["0", "1", "0", "1"]
    with pytest.raises(ValueError, match="already in use"):
        gs.add_instance(InProcessInstance(make_engine("1")))
    gs.remove_instance("0")
    assert [gs.dispatch(make_request(), 0.0).instance_id for _ in range(2)] == ["1", "1"]
    with pytest.raises(ValueError, match="no instance 'nope'"):
        gs.get_instance("nope")


def test_a_draining_instance_gets_no_new_work():
    instances, gs = cluster(3, PolicyConfig(dispatch="rr"))
    gs.drain("1")
    assert {gs.dispatch(make_request(), 0.0).instance_id for _ in range(6)} == {"0", "2"}
    gs.drain("0")
    gs.drain("2")
    with pytest.raises(ValueError, match="every instance is draining"):
        gs.dispatch(make_request(), 0.0)


def test_control_step_orders_the_shortest_running_request_from_the_least_free_to_the_freest():
    policy = build_policy("llumnix", src_freeness=8.0, dst_freeness=10.0)
    instances, gs = cluster(2, policy, num_blocks=24, max_num_seqs=8)
    a = instances[0]
    long_ = make_request(prompt_len=30, max_tokens=40)
    short = make_request(prompt_len=9, max_tokens=40)
    for r in (long_, short):
        a.add_request(r)
    for _ in range(3):
        step(a.engine)
    gs.collect_reports(0.0)  # instance 0: 11 of 24 blocks for 2 requests, F = 6.5; instance 1 idle
    orders = gs.control_step(0.0)
    assert orders == [MigrationOrder(short.request_id, "0", "1")]
    # With a migration in flight on the source, nothing more is ordered from it.
    assert gs.control_step(0.0, num_migrations=lambda iid: 1 if iid == "0" else 0) == []
    assert GlobalScheduler(instances, PolicyConfig(dispatch="rr")).control_step(0.0) == []  # no migration policy


def test_a_fixed_instance_takes_dispatches_but_no_request_ever_moves_to_or_from_it():
    policy = build_policy("llumnix", src_freeness=8.0, dst_freeness=10.0)
    a, fixed, b = (InProcessInstance(make_engine(str(i), num_blocks=24, max_num_seqs=8)) for i in range(3))
    gs = GlobalScheduler(policy=policy)
    gs.add_instance(a)
    gs.add_instance(fixed, movable=False)  # listed before b: the freest, and first among equals
    short = make_request(prompt_len=9, max_tokens=40)
    for r in (make_request(prompt_len=30, max_tokens=40), short):
        a.add_request(r)
    for _ in range(3):
        step(a.engine)
    gs.collect_reports(0.0)
    assert gs.control_step(0.0) == []  # instance 0's only destinations: the fixed one, left out, and none else
    gs.add_instance(b)
    gs.collect_reports(0.0)
    assert gs.control_step(0.0) == [MigrationOrder(short.request_id, "0", "2")]
    # Dispatch sees it like any other instance; a request that moves (a resume) never lands on it.
    rr = GlobalScheduler(policy=PolicyConfig(dispatch="rr"))
    rr.add_instance(fixed, movable=False)
    rr.add_instance(b)
    assert [rr.dispatch(make_request(), 0.0).instance_id for _ in range(2)] == ["1", "2"]
    assert {rr.select_instance(make_request(), 0.0, for_move=True).instance_id for _ in range(3)} == {"2"}
    rr.drain("2")
    with pytest.raises(ValueError, match="no instance a request can move to"):
        rr.select_instance(make_request(), 0.0, for_move=True)
    # Draining a fixed instance moves nothing off it either (it empties as its requests end).
    gs.drain("1")
    assert all(o.src_id != "1" and o.dst_id != "1" for o in gs.drain_step(0.0) + gs.control_step(0.0))


def test_bundles_and_overrides():
    assert set(BUNDLES.names()) >= {"rr", "infaas", "llumnix"}
    assert build_policy("rr").dispatch == "round-robin" and build_policy("rr").migration == "none"
    llumnix = build_policy("llumnix")
    assert (llumnix.dispatch, llumnix.migration) == ("llumnix", "llumnix")
    tuned = build_policy("llumnix", dispatch="slo", src_freeness=2.0, selection="longest")
    assert tuned.dispatch == "slo" and tuned.migration == "llumnix"
    assert tuned.migration_policy == MigrationPolicyConfig(src_freeness=2.0, selection="longest", move_waiting=False)
    assert build_policy("llumnix", dispatch=None).dispatch == "llumnix"  # None leaves the bundle's choice
    with pytest.raises(ValueError, match="unknown policy bundle 'fast'; choose from: rr, infaas, llumnix"):
        build_policy("fast")
    with pytest.raises(ValueError, match="unknown migration policy"):
        build_policy("rr", migration="teleport")
