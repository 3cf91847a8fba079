"""When a drained instance stops (`cluster/drain.py`), on hand-built clusters."""

from __future__ import annotations

import pytest

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.drain import stop_if_drained
from shunter.cluster.global_scheduler import GlobalScheduler
from shunter.cluster.instance import InProcessInstance
from shunter.cluster.migration import MigrationConfig, MigrationCoordinator
from tests.engine.helpers import copy_plan, step
from tests.factories import make_engine, make_request


def cluster(n=2):
    instances = [InProcessInstance(make_engine(str(i))) for i in range(n)]
    return instances, GlobalScheduler(instances, PolicyConfig(dispatch="rr"))


def test_an_instance_that_is_not_draining_never_stops():
    _, gs = cluster()
    assert not stop_if_drained(gs, "0", has_requests=False, num_migrations=0)
    assert [i.instance_id for i in gs.instances] == ["0", "1"]


@pytest.mark.parametrize("still_needed", [
    dict(has_requests=True, num_migrations=0),
    dict(has_requests=False, num_migrations=1),
    dict(has_requests=False, num_migrations=0, is_stepping=True),
])
def test_a_drained_instance_still_needed_stays(still_needed):
    _, gs = cluster()
    gs.drain("0")
    assert not stop_if_drained(gs, "0", **still_needed)
    assert "0" in gs.views and "0" in gs.draining


def test_a_drained_empty_instance_leaves_the_scheduler_once():
    _, gs = cluster()
    gs.drain("0")
    assert stop_if_drained(gs, "0", has_requests=False, num_migrations=0, is_stepping=False)
    assert [i.instance_id for i in gs.instances] == ["1"] and "0" not in gs.views and not gs.draining
    assert not stop_if_drained(gs, "0", has_requests=False, num_migrations=0)  # already gone: nothing happens


def test_a_drained_instance_stops_only_after_its_request_migrated_away():
    instances, gs = cluster()
    src, dst = instances
    request = make_request(prompt_len=12, max_tokens=20)
    gs.assign(request, src)
    for t in range(3):
        step(src.engine, float(t))  # prefill, then decodes: it runs on the source
    gs.drain("0")
    coordinator = MigrationCoordinator(MigrationConfig(max_stages=1), src.engine.config.block_size)

    def stops() -> bool:
        return stop_if_drained(gs, "0", has_requests=src.has_unfinished_requests,
                               num_migrations=coordinator.num_active("0"))

    assert not stops()
    m = coordinator.start(request.request_id, src, dst, 3.0)
    plan = coordinator.advance(m, 3.0)
    assert plan.is_final
    assert not stops()  # suspended on the source for the final copy: still its request
    copy_plan(src.engine, dst.engine, plan)
    assert coordinator.commit(m, 3.1)
    assert not src.has_unfinished_requests and coordinator.num_active("0") == 0
    assert stops()
    assert [i.instance_id for i in gs.instances] == ["1"]
