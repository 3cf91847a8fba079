"""The cluster side of `shunter bench fidelity --instances N`: the serving frontend replays a timed workload."""

from __future__ import annotations

import asyncio

import pytest

from shunter.bench.cluster_replay import replay_cluster
from shunter.bench.fidelity import make_workload, simulate
from shunter.bench.replay import TimedRequest
from shunter.cluster.bundles import build_policy
from shunter.runtime.handles import LocalInstance
from shunter.runtime.spec import InstanceSpec
from shunter.server.frontend import Frontend
from tests.factories import make_engine


def fake_frontend(policy: str = "rr") -> Frontend:
    def make_handle(instance_id: str, spec: InstanceSpec) -> LocalInstance:
        return LocalInstance(instance_id, spec, engine=make_engine(instance_id, num_blocks=256, step_time=0.0))

    return Frontend(make_handle, InstanceSpec(executor="null", block_size=4, report_interval=0.02),
                    build_policy(policy), "m", eos_token_id=None, control_interval=0.02)


def test_replay_cluster_times_every_request_from_its_scheduled_arrival():
    requests = [TimedRequest(f"r{i}", 0.05 * i, list(range(10 + i, 30 + i)), 5 + i) for i in range(6)]

    async def run():
        frontend = fake_frontend()
        await frontend.start(2)
        try:
            return await replay_cluster(frontend, requests)
        finally:
            await frontend.shutdown()

    result = asyncio.run(run())
    assert [r.request_id for r in result.records] == [f"r{i}" for i in range(6)]
    for r, tr in zip(result.records, requests):
        assert r.num_output_tokens == tr.max_tokens
        assert r.arrival_time == tr.arrival_time
        assert 0 < r.first_token_time - r.arrival_time < 2  # stamped against the scheduled arrival
        assert r.finish_time >= r.first_token_time
    assert result.dispatches == {"0": 3, "1": 3}  # round robin over the two instances
    assert result.wall_seconds >= 0.25


def test_replay_cluster_refuses_duplicate_ids():
    requests = [TimedRequest("a", 0.0, [1, 2, 3], 2), TimedRequest("a", 0.1, [1, 2, 3], 2)]
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(replay_cluster(fake_frontend(), requests))


def test_the_simulated_cluster_runs_the_named_policy_on_every_instance():
    from shunter.sim.latency import build_latency_model

    workload = make_workload(40, 4.0, 0, vocab_size=49152)
    latency = build_latency_model("roofline", hardware="a100-80gb", model="llama-2-7b")
    result = simulate(workload, latency, 2048, num_instances=2, policy="llumnix", kv_bytes_per_block=1 << 20)
    assert len(result.records) == 40
    assert {r.instance_id for r in result.records} == {"0", "1"}


def test_calibration_scales_the_latency_model_to_the_runtimes_steps_in_total():
    from shunter.bench.fidelity import calibrated
    from shunter.sim.profiled import ProfiledLatency, ProfileStep

    model = ProfiledLatency({"intercept": 0.01, "prefill_tokens": 1e-4, "prefill_attention_pairs": 0.0,
                             "prefill_chunks": 0.0, "prefill_cached_tokens": 0.0, "num_decodes": 1e-3,
                             "sum_decode_context": 1e-6})
    steps = [ProfileStep([], 4, 400, 0.02), ProfileStep([(100, 0)], 0, 0, 0.03)]
    predicted = sum(model.step_time(s.prefill, s.num_decodes, s.sum_decode_context) for s in steps)
    scaled, scale = calibrated(model, steps)
    assert scale == pytest.approx(0.05 / predicted)
    assert sum(scaled.step_time(s.prefill, s.num_decodes, s.sum_decode_context) for s in steps) == pytest.approx(0.05)
    assert model.coefficients["intercept"] == 0.01  # the original is left alone
