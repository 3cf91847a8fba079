"""Migration pairing and request selection."""

from __future__ import annotations

import pytest

from shunter.cluster.load import LoadConfig
from shunter.cluster.migration_policy import (
    MIGRATION, MIGRATION_SELECTION, InstanceLoad, MigrationPolicyConfig,
)
from shunter.engine.scheduler import MigrationCandidate
from tests.cluster.reports import report

CFG = MigrationPolicyConfig(src_freeness=5, dst_freeness=20)


def loads(*reports, draining=(), busy=()):
    return [InstanceLoad(r, i in draining, 1 if i in busy else 0) for i, r in enumerate(reports)]


def pairs(xs, cfg=CFG, load=LoadConfig(), policy="llumnix"):
    return [(p.src, p.dst) for p in MIGRATION.get(policy)(xs, cfg, load)]


def test_least_free_sources_pair_with_freest_destinations():
    xs = loads(report("0", 96, running=4),   # F = 1: source
               report("1", 20, running=2),   # F = 40: destination
               report("2", 98, running=1),   # F = 2: source
               report("3", 50, running=2),   # F = 25: destination
               report("4", 80, running=2))   # F = 10: neither
    assert pairs(xs) == [(0, 1), (2, 3)]


def test_queued_requests_make_a_source_and_draining_always_does():
    xs = loads(report("0", 10, running=1, waiting=2, head=3), report("1", 0), report("2", 50, running=1))
    assert pairs(xs) == [(0, 1)]  # F = 87 but it queues work: send the queue away
    assert pairs(xs, MigrationPolicyConfig(5, 20, move_waiting=False)) == []
    drained = loads(report("0", 10, running=1), report("1", 0), report("2", 50, running=1), draining={0})
    assert pairs(drained) == [(0, 1)]
    # A draining instance is never a destination.
    assert pairs(loads(report("0", 96, running=4), report("1", 0), draining={1})) == []


def test_instances_at_their_migration_limit_sit_out():
    xs = loads(report("0", 96, running=4), report("1", 0), report("2", 10, running=1), busy={1})
    assert pairs(xs) == [(0, 2)]
    assert pairs(loads(report("0", 96, running=4), report("1", 0), busy={0})) == []


def test_a_source_with_nothing_movable_is_skipped():
    # All its running requests are already migrating.
    xs = loads(report("0", 96, running=2, migrating=2), report("1", 0))
    assert pairs(xs) == []


def test_high_priority_headroom_turns_an_instance_into_a_source():
    xs = loads(report("0", 40, running=2, priorities={1: 1, 0: 1}), report("1", 0))
    assert pairs(xs) == []
    assert pairs(xs, load=LoadConfig({1: 55})) == [(0, 1)]  # F = (100 - 95) / 2 = 2.5 < 5


def test_none_never_migrates():
    assert MIGRATION.get("none")(loads(report("0", 99, running=9), report("1", 0)), CFG, LoadConfig()) == []


def cand(rid, blocks, arrival=0.0, priority=0, waiting=False):
    return MigrationCandidate(rid, priority, arrival, blocks * 16, blocks, waiting)


@pytest.mark.parametrize("name,expected", [("shortest", "small"), ("longest", "big"), ("last-arrived", "late")])
def test_selection_rules(name, expected):
    cands = [cand("big", 40, 1.0), cand("small", 3, 2.0), cand("late", 10, 5.0), cand("vip", 1, 9.0, priority=1)]
    assert MIGRATION_SELECTION.get(name)(cands, True).request_id == expected


def test_waiting_requests_go_first_when_allowed_and_high_priority_never_moves():
    cands = [cand("run", 3), cand("q1", 0, 1.0, waiting=True), cand("q2", 0, 2.0, waiting=True)]
    pick = MIGRATION_SELECTION.get("shortest")
    assert pick(cands, True).request_id == "q1"  # head of line first
    assert pick(cands, False).request_id == "run"
    assert pick([cand("vip", 1, priority=2), cand("vq", 0, priority=1, waiting=True)], True) is None


def test_config_validation():
    with pytest.raises(ValueError, match="destination freeness"):
        MigrationPolicyConfig(src_freeness=10, dst_freeness=5)
    with pytest.raises(ValueError, match="positive integer"):
        MigrationPolicyConfig(max_per_instance=0)
    with pytest.raises(ValueError, match="unknown migration selection 'nope'; choose from: shortest"):
        MigrationPolicyConfig(selection="nope")
