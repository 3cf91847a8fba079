"""Each dispatch policy on constructed situations."""

from __future__ import annotations

import random

import pytest

from shunter.cluster.dispatch import DISPATCH, DispatchContext, PrefixIndex
from shunter.cluster.load import LoadConfig
from tests.cluster.reports import report
from tests.factories import make_request


def pick(name, reports, request=None, ctx=None):
    return DISPATCH.get(name)(reports, request or make_request(), ctx or DispatchContext())


def test_round_robin_cycles_blind_to_load_and_rr_is_its_alias():
    reports = [report("0", 90), report("1", 0), report("2", 50)]
    ctx = DispatchContext()
    picks = []
    for _ in range(6):
        picks.append(pick("rr", reports, ctx=ctx))
        ctx.num_dispatched += 1
    assert picks == [0, 1, 2, 0, 1, 2]


def test_random_is_seeded_and_covers_every_instance():
    reports = [report(str(i)) for i in range(4)]
    a = [pick("random", reports, ctx=DispatchContext(rng=random.Random(7))) for _ in range(1)]
    ctx1, ctx2 = DispatchContext(rng=random.Random(7)), DispatchContext(rng=random.Random(7))
    s1 = [pick("random", reports, ctx=ctx1) for _ in range(50)]
    s2 = [pick("random", reports, ctx=ctx2) for _ in range(50)]
    assert s1 == s2 and set(s1) == {0, 1, 2, 3} and a[0] == s1[0]


def test_least_requests_counts_running_and_waiting():
    reports = [report("0", running=3, waiting=2), report("1", running=4), report("2", running=1, waiting=3)]
    assert pick("least-requests", reports) == 1
    assert pick("least-requests", [report("0", running=2), report("1", running=2)]) == 0  # tie: lowest index


def test_queue_prefers_no_waiting_then_fewest_running():
    reports = [report("0", running=1, waiting=1), report("1", running=9), report("2", running=5)]
    assert pick("queue", reports) == 2


def test_infaas_counts_used_and_waiting_demand_relative_to_capacity():
    # Instance 0 has few used blocks but a long queue; instance 2 is bigger.
    reports = [report("0", 10, waiting=2, head=30, waiting_demand=60), report("1", 40), report("2", 60, total=200)]
    assert pick("infaas", reports) == 2  # 0.30 < 0.40 < 0.70
    assert pick("least-load", reports) == 2  # the old name is an alias
    assert pick("infaas", [report("0", 5), report("1", 5)]) == 0


def test_llumnix_picks_the_freest_and_headroom_steers_away_from_high_priority():
    a = report("0", used=50, running=5)  # F = 10
    b = report("1", used=40, running=2, priorities={1: 2})  # F = 30 without headroom
    assert pick("llumnix", [a, b]) == 1
    ctx = DispatchContext(load=LoadConfig({1: 50}))
    assert pick("llumnix", [a, b], ctx=ctx) == 0  # b: (100 - 90) / 2 = 5 < 10
    assert pick("llumnix", [a, report("2")]) == 1  # an idle instance is infinitely free


def test_power_of_two_takes_the_less_loaded_of_two_distinct_random_choices():
    reports = [report("0", 90), report("1", 10), report("2", 50), report("3", 70)]
    ctx = DispatchContext(rng=random.Random(3))
    seen = set()
    for _ in range(200):
        state = ctx.rng.getstate()
        a, b = ctx.rng.sample(range(4), 2)
        ctx.rng.setstate(state)
        choice = pick("power-of-two", reports, ctx=ctx)
        assert choice == min((a, b), key=lambda i: reports[i].num_used_blocks)
        seen.add(choice)
    assert 0 not in seen  # the most loaded never wins a pair
    assert pick("power-of-two", [report("0")]) == 0


def test_prefix_follows_the_longest_shared_prefix_unless_imbalanced():
    ctx = DispatchContext(prefix=PrefixIndex(block_tokens=4))
    shared = list(range(100, 116))
    reports = [report("0", 10, running=1), report("1", 50, running=1), report("2", 20, running=1)]
    first = make_request(prompt=shared + [1, 2])
    assert pick("prefix", reports, first, ctx) == 0  # nothing matches: least KV demand
    ctx.prefix.record("1", ctx.prefix.digests(make_request(prompt=shared)))
    # Instance 1 was sent all 4 blocks, instance 0 (the first request) also 4: equal match, less load wins.
    follower = make_request(prompt=shared + [3, 4, 5, 6])
    assert pick("prefix", reports, follower, ctx) == 0
    ctx.prefix.record("1", ctx.prefix.digests(make_request(prompt=shared + [7, 8, 9, 10])))
    longer = make_request(prompt=shared + [7, 8, 9, 10, 11])
    assert pick("prefix", reports, longer, ctx) == 1  # 5 blocks match on 1, only 4 on 0
    # Imbalanced beyond the threshold: plain least-load.
    hot = [report("0", 10, running=1), report("1", 50, running=40), report("2", 20, running=1)]
    assert pick("prefix", hot, make_request(prompt=shared + [3, 4, 5, 6, 9]), ctx) == 0


def test_prefix_digests_are_stable_and_chained():
    index = PrefixIndex(block_tokens=4)
    a = index.digests(make_request(prompt=[1, 2, 3, 4, 5, 6, 7, 8, 9]))
    b = index.digests(make_request(prompt=[1, 2, 3, 4, 5, 6, 7, 8]))
    c = index.digests(make_request(prompt=[0, 2, 3, 4, 5, 6, 7, 8]))
    assert len(a) == 2 and a == b  # only full blocks
    assert a[0] != c[0] and a[1] != c[1]  # a different first block changes every later digest
    # Stable across processes: BLAKE2b, not Python's salted hash().
    assert a[0].hex() == PrefixIndex(block_tokens=4).digests(make_request(prompt=[1, 2, 3, 4]))[0].hex()
    with pytest.raises(ValueError):
        PrefixIndex(block_tokens=0)


def test_prefix_index_forgets_least_recent_digests_beyond_capacity():
    index = PrefixIndex(block_tokens=1, capacity=3)
    index.record("0", index.digests(make_request(prompt=[1, 2, 3, 4])))
    assert index.match_length("0", index.digests(make_request(prompt=[1, 2, 3, 4]))) == 0  # [1] evicted
    assert len(index.instance_to_digests["0"]) == 3


def test_slo_picks_the_least_loaded_instance_that_meets_the_ttft_slo():
    ctx = DispatchContext(prefill_seconds=lambda n: n / 1000)  # 1,000 prefill tokens per second
    reports = [report("0", 10, pending=5000), report("1", 60, pending=100), report("2", 30, pending=800)]
    r = make_request(prompt_len=100)
    r.ttft_slo = 1.0
    assert pick("slo", reports, r, ctx) == 2  # 0.9 s meets the SLO with less KV demand than instance 1
    r.ttft_slo = 0.5
    assert pick("slo", reports, r, ctx) == 1  # only instance 1 (0.2 s) meets it
    r.ttft_slo = 0.01
    assert pick("slo", reports, r, ctx) == 1  # none meets it: the smallest predicted TTFT
    r.ttft_slo = None
    assert pick("slo", reports, r, ctx) == 1


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"choose from: round-robin \(rr\), random, .*infaas \(least-load\)"):
        DISPATCH.get("freest")


def test_shunter_dispatch_ranks_by_ttft_within_memory_then_prefers_the_smaller_batch():
    ctx = DispatchContext(prefill_seconds=lambda n: n / 1000, memory_reserve=0.2, ttft_slack=0.05)
    r = make_request(prompt_len=160)  # 10 blocks of 16
    reports = [
        report("0", used=10, running=2, pending=2000),   # fits, TTFT 2.16 s
        report("1", used=75, running=1, pending=0),      # TTFT 0.16 s but 75 + 10 > 80 % of 100 blocks
        report("2", used=30, running=9, pending=10),     # fits, TTFT 0.17 s
        report("3", used=40, running=4, pending=40),     # fits, TTFT 0.20 s: within the slack of 2, smaller batch
        report("4", used=20, running=1, pending=500),    # fits, TTFT 0.66 s: outside the slack
    ]
    for rep in reports:
        rep.block_size = 16
    assert pick("shunter", reports, r, ctx) == 3
    ctx.ttft_slack = 0.0
    assert pick("shunter", reports, r, ctx) == 2
    # Nothing leaves the reserve free: INFaaS++'s least KV demand.
    full = [report("0", used=90, running=1), report("1", used=85, running=5)]
    for rep in full:
        rep.block_size = 16
    assert pick("shunter", full, r, ctx) == 1


def test_prefix_weighs_the_match_against_the_prefill_queued_ahead():
    ctx = DispatchContext(prefix=PrefixIndex(block_tokens=4))
    shared = list(range(100, 116))
    ctx.prefix.record("1", ctx.prefix.digests(make_request(prompt=shared)))
    turn = make_request(prompt=shared + [1, 2, 3, 4])  # 20 tokens, 16 of them sent to instance 1 before
    # 10 tokens queued on 1, none on 0: 10 + 4 uncached on 1 is less than 20 on 0.
    assert pick("prefix", [report("0", 10), report("1", 10, pending=10)], turn, ctx) == 1
    # 30 queued on 1: its first token comes sooner on 0 even though 0 prefills the whole prompt.
    assert pick("prefix", [report("0", 10), report("1", 10, pending=30)], turn, ctx) == 0


def test_prefix_sends_a_new_prompt_where_no_prefill_is_queued_not_to_the_instance_that_just_emptied():
    # Instance 0 was just sent a prompt (queued, 12 tokens); instance 1 runs two requests past their prefill.
    reports = [report("0", 5, waiting=1, pending=12), report("1", 30, running=2)]
    assert pick("prefix", reports, make_request(prompt=list(range(40))), DispatchContext()) == 1
    assert pick("least-requests", reports, make_request(prompt=list(range(40)))) == 0  # by count alone: 0
