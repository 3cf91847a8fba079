"""Prefill/decode disaggregation's rule (`cluster/disaggregation.py`) on hand-built clusters."""

from __future__ import annotations

import pytest

from shunter.cluster.bundles import PolicyConfig, build_policy
from shunter.cluster.disaggregation import DECODE, PREFILL, Disaggregation, HandOff, PDSplit, parse_pd
from shunter.cluster.instance import InProcessInstance
from shunter.cluster.migration import MigrationConfig, MigrationCoordinator, MigrationRefused
from shunter.cluster.scaling import ScalingConfig
from shunter.errors import CLIError
from tests.engine.helpers import assert_all_free, copy_plan, drain, step, tokens_of
from tests.factories import make_engine, make_request, reference_output


def pd_cluster(num_prefill=1, num_decode=2, dispatch="infaas", **engine):
    pd = Disaggregation(PDSplit(num_prefill, num_decode), PolicyConfig(dispatch=dispatch))
    instances = {}
    for i, role in enumerate(pd.split.roles()):
        instances[str(i)] = InProcessInstance(make_engine(str(i), **engine))
        pd.scheduler_for(role).add_instance(instances[str(i)])
    return pd, instances


def first_token(pd: Disaggregation, request, now: float = 0.0):
    """Dispatch `request` (to a prefill instance) and step that instance until the request has its first token."""
    src = pd.prefill.dispatch(request, now)
    while not request.output_token_ids:
        step(src.engine, now)
    return src


# ---- the split and its flag -----------------------------------------------------------------------
def test_a_split_lists_its_roles_prefill_first():
    split = PDSplit(2, 3)
    assert split.roles() == [PREFILL, PREFILL, DECODE, DECODE, DECODE]
    assert split.num_instances == 5 and str(split) == "2:3"


@pytest.mark.parametrize("p, d", [(0, 1), (1, 0), (-1, 2), (1.5, 1), (True, 1)])
def test_a_split_needs_a_whole_number_of_each_role(p, d):
    with pytest.raises(ValueError, match="at least one"):
        PDSplit(p, d)


@pytest.mark.parametrize("text, split", [("1:1", PDSplit(1, 1)), ("2:6", PDSplit(2, 6)), (" 3 : 1 ", PDSplit(3, 1))])
def test_parse_pd(text, split):
    assert parse_pd(text) == split
    assert parse_pd(text, instances=split.num_instances) == split
    assert parse_pd(None, instances=3, autoscale="1:4") is None


@pytest.mark.parametrize("text", ["0:2", "2:0", "x", "1", "1:2:3", "-1:2", "1.5:2", ""])
def test_parse_pd_names_a_bad_value(text):
    with pytest.raises(CLIError, match=f"--pd must be P:D with P, D >= 1 .*got {text!r}"):
        parse_pd(text)


def test_parse_pd_refuses_autoscaling_and_a_different_instance_count_naming_both_flags():
    with pytest.raises(CLIError, match="--autoscale 1:4 with --pd 1:1: autoscaling is not P/D-aware"):
        parse_pd("1:1", autoscale="1:4")
    with pytest.raises(CLIError, match=r"--instances 3 with --pd 2:2: P/D runs P \+ D = 4 instances"):
        parse_pd("2:2", instances=3)


def test_disaggregation_refuses_a_policy_that_scales():
    with pytest.raises(ValueError, match="not P/D-aware"):
        Disaggregation((1, 1), build_policy("llumnix", scaling=ScalingConfig(min_instances=1, max_instances=3)))


def test_each_role_has_its_scheduler():
    pd, instances = pd_cluster(2, 1)
    assert pd.split == PDSplit(2, 1)  # a plain (P, D) tuple is taken too
    assert [i.instance_id for i in pd.prefill.instances] == ["0", "1"]
    assert [i.instance_id for i in pd.decode.instances] == ["2"]
    assert pd.schedulers == (pd.prefill, pd.decode)
    with pytest.raises(ValueError, match="mixed"):
        pd.scheduler_for("mixed")


# ---- the hand-off ---------------------------------------------------------------------------------
def test_the_decode_policy_picks_the_destination_and_counts_the_request_incoming():
    pd, instances = pd_cluster(dispatch="infaas")
    pd.decode.assign(make_request(prompt_len=40, max_tokens=4), instances["1"])  # decode instance 1 is busier
    request = make_request(prompt_len=10, max_tokens=6)
    src = first_token(pd, request)
    assert src is instances["0"]
    started = []
    outcome = pd.hand_off(request, "0", 1.0, started.append)
    assert outcome == HandOff(dst=instances["2"])
    assert started == [instances["2"]]
    view = pd.decode.views["2"]
    assert view.num_waiting == 1 and view.num_pending_prefill_tokens == request.num_tokens


def test_only_a_request_on_a_prefill_instance_is_handed_off():
    pd, instances = pd_cluster()
    request = make_request(prompt_len=10, max_tokens=6)
    pd.decode.assign(request, instances["1"])
    step(instances["1"].engine, 0.0)
    started = []
    assert pd.hand_off(request, "1", 0.0, started.append) == HandOff()
    assert pd.hand_off(request, "nope", 0.0, started.append) == HandOff()
    assert started == []


def test_with_no_decode_instance_taking_work_the_request_stays():
    pd, instances = pd_cluster()
    pd.decode.drain("1")
    pd.decode.drain("2")
    request = make_request(prompt_len=10, max_tokens=6)
    first_token(pd, request)
    started = []
    outcome = pd.hand_off(request, "0", 0.0, started.append)
    assert outcome.dst is None
    assert "every instance is draining" in outcome.problem and "prefill instance 0" in outcome.problem
    assert started == []


def test_a_refused_order_leaves_the_request_and_the_decode_view_alone():
    pd, instances = pd_cluster()
    request = make_request(prompt_len=10, max_tokens=6)
    first_token(pd, request)
    before = dict(pd.decode.views)

    def refuse(dst):
        raise MigrationRefused("already migrating")

    outcome = pd.hand_off(request, "0", 0.0, refuse)
    assert outcome.dst is None and "refused: already migrating" in outcome.problem
    assert pd.decode.views == before


def test_a_handed_off_request_decodes_on_the_decode_instance_with_the_same_output():
    pd, instances = pd_cluster(num_decode=1)
    request = make_request(prompt_len=14, max_tokens=12)
    reference = reference_output(request.prompt_token_ids, 12)
    src = first_token(pd, request)
    coordinator = MigrationCoordinator(MigrationConfig(max_stages=1), src.engine.config.block_size)
    migrations = []
    outcome = pd.hand_off(request, "0", 0.0, lambda dst: migrations.append(
        coordinator.start(request.request_id, src, dst, 0.0)))
    (m,) = migrations
    plan = coordinator.advance(m, 0.0)  # stop-and-copy: suspended on the prefill instance at once
    assert plan.is_final and len(m.state.output_token_ids) == 1
    copy_plan(src.engine, outcome.dst.engine, plan)
    assert coordinator.commit(m, 0.1)
    tokens = request.output_token_ids[:1] + tokens_of(drain(outcome.dst.engine).get(request.request_id, []))
    assert tokens == reference
    assert_all_free(src.engine)
    assert_all_free(outcome.dst.engine)
