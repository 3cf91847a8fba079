"""Autoscaling in serving: the cluster's scaling policy starts instances under load and drains them after."""

from __future__ import annotations

import httpx
import pytest

from shunter.cluster.bundles import build_policy
from shunter.cluster.scaling import ScalingConfig
from shunter.runtime.handles import InstanceState, LocalInstance
from shunter.runtime.spec import InstanceSpec
from shunter.server.frontend import Frontend
from shunter.server.runner import wait_until
from tests.server.conftest import engine_requests, used_blocks
from tests.server.test_live_migration import complete_all


def states(server) -> list[tuple[str, str]]:
    return [(i["id"], i["state"]) for i in httpx.get(server.url + "/admin/instances").json()["instances"]]


def test_load_adds_an_instance_and_the_lull_after_drains_and_stops_one(start_fake_server, monkeypatch):
    forgotten = []  # (instance, the peer it is told is gone): gloo links to it are dropped
    monkeypatch.setattr(LocalInstance, "forget_peer", lambda self, peer: forgotten.append((self.instance_id, peer)))
    scaling = ScalingConfig(min_instances=1, max_instances=2, policy="freeness", sustain=0.1, cooldown=0.3,
                            interval=0.05, startup_delay=0.0)
    server = start_fake_server(instances=1, num_blocks=64, step_time=0.01, scaling=scaling)
    prompts = [[400 + i] * (12 + i) for i in range(8)]
    references, _ = complete_all(start_fake_server(instances=1, num_blocks=512, step_time=0.0), prompts, 30)
    results, threads = complete_all(server, prompts, 30, wait=False)
    # Eight requests crowd one small instance: its freeness drops below the scale-up threshold.
    assert wait_until(lambda: ("1", "ready") in states(server), 10), states(server)
    for t in threads:
        t.join(60)
    assert results == references
    # Idle: the cluster's freeness without one instance is high, so one is drained, emptied and stopped.
    assert wait_until(lambda: sum(s == "ready" for _, s in states(server)) == 1
                      and any(s == "stopped" for _, s in states(server)), 15), states(server)
    assert server.frontend.scaling_actions[0][1] == 1
    assert engine_requests(server) == 0 and used_blocks(server) == 0
    stopped = [i for i, s in states(server) if s == "stopped"]
    gone = server.frontend.handles[stopped[0]]
    assert gone.state is InstanceState.STOPPED
    # Stopped only once empty: its engine (loop ended) holds no request and no block.
    assert not gone.loop.engine.scheduler.requests and gone.loop.engine.scheduler.block_manager.num_used_blocks == 0
    assert forgotten == [(next(i for i, s in states(server) if s == "ready"), stopped[0])]


def test_a_frontend_refuses_autoscaling_with_pd():
    # The scaling policy reads one scheduler and adds mixed instances: not P/D-aware, so refused outright.
    policy = build_policy("llumnix", scaling=ScalingConfig(min_instances=2, max_instances=4))
    with pytest.raises(ValueError, match="not P/D-aware"):
        Frontend(lambda *_: None, InstanceSpec(executor="null"), policy, "m", None, pd=(1, 1))
