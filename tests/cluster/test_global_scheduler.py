"""Dispatch policies and the global scheduler over in-process instances."""

import pytest

from shunter.cluster.global_scheduler import GlobalScheduler
from shunter.cluster.instance import InProcessInstance, Instance
from shunter.cluster.load import LoadReport
from shunter.cluster.policies import DISPATCH, DispatchContext, least_load, round_robin
from tests.factories import make_engine, make_request, run_to_completion


def report(iid, used, total=100, waiting=()):
    return LoadReport(iid, 0.0, num_running=0, num_waiting=len(waiting), num_preempted=0, num_used_blocks=used,
                      num_free_blocks=total - used, num_total_blocks=total, waiting_block_demands=list(waiting))


def test_round_robin_cycles_blind_to_load():
    reports = [report("0", 90), report("1", 0), report("2", 50)]
    ctx = DispatchContext()
    picks = []
    for _ in range(6):
        picks.append(round_robin(reports, make_request(), ctx))
        ctx.num_dispatched += 1
    assert picks == [0, 1, 2, 0, 1, 2]


def test_least_load_counts_used_and_waiting_demand_relative_to_capacity():
    ctx = DispatchContext()
    # Instance 0 has few used blocks but a long queue; instance 2 is bigger.
    reports = [report("0", 10, waiting=[30, 30]), report("1", 40), report("2", 60, total=200)]
    assert least_load(reports, make_request(), ctx) == 2  # 0.30 < 0.40 < 0.70
    # Ties go to the lowest index.
    assert least_load([report("0", 5), report("1", 5)], make_request(), ctx) == 0


def test_in_process_instance_satisfies_protocol():
    inst = InProcessInstance(make_engine("a"))
    assert isinstance(inst, Instance)
    assert inst.instance_id == "a"


def test_global_scheduler_dispatches_to_least_loaded_and_requests_complete():
    instances = [InProcessInstance(make_engine(str(i))) for i in range(3)]
    gs = GlobalScheduler(instances, dispatch="least-load")
    big = make_request(prompt_len=100, max_tokens=4)
    assert gs.dispatch(big, 0.0) is instances[0]
    # Instance 0 now has a queued demand, so the next two go elsewhere.
    assert gs.dispatch(make_request(prompt_len=40), 0.0) is instances[1]
    assert gs.dispatch(make_request(prompt_len=40), 0.0) is instances[2]
    for inst in instances:
        out = run_to_completion(inst.engine)
        assert all(len(tokens) > 0 for tokens in out.values())
    assert gs.ctx.num_dispatched == 3


def test_global_scheduler_round_robin_and_membership():
    instances = [InProcessInstance(make_engine(str(i))) for i in range(2)]
    gs = GlobalScheduler(instances, dispatch="round-robin")
    picks = [gs.dispatch(make_request(), 0.0).instance_id for _ in range(4)]
    assert picks == ["0", "1", "0", "1"]
    with pytest.raises(ValueError, match="already in use"):
        gs.add_instance(InProcessInstance(make_engine("0")))
    gs.remove_instance("1")
    assert [i.instance_id for i in gs.instances] == ["0"]
    with pytest.raises(ValueError, match="no instance"):
        gs.remove_instance("1")


def test_unknown_dispatch_policy_lists_names():
    with pytest.raises(ValueError, match="round-robin, least-load"):
        GlobalScheduler([], dispatch="freest")


def test_dispatch_to_no_instance_is_an_error():
    with pytest.raises(ValueError, match="no instance"):
        GlobalScheduler([]).dispatch(make_request(), 0.0)


def test_a_request_that_cannot_fit_is_refused_and_not_counted():
    gs = GlobalScheduler([InProcessInstance(make_engine("0", num_blocks=4))])
    with pytest.raises(ValueError):
        gs.dispatch(make_request(prompt_len=100), 0.0)
    assert gs.ctx.num_dispatched == 0


def test_control_hooks_are_no_ops_for_now():
    gs = GlobalScheduler([InProcessInstance(make_engine("0"))])
    reports = gs.load_reports(1.0)
    assert gs.control_step(reports, 1.0) == []
    assert gs.scaling_decision(reports, 1.0) == 0

