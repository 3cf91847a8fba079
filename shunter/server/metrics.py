"""Prometheus metrics of the server, under vLLM's names so existing dashboards and alerts read them.

Per-instance gauges come from the load reports the instances push; latency
histograms and token counters are observed in the frontend, where the client's
experience is (TTFT counts from the request's arrival at the frontend). Each
server owns its registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import collections
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shunter.engine import LoadReport
from shunter.runtime.handles import InstanceState

# vLLM's buckets, so histograms line up with a vLLM fleet's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
MIGRATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Every metric of one server; label `engine` (the instance id, vLLM's label name) on the per-instance ones.

    Not `instance`: Prometheus sets that label to the scrape target and would
    rename ours to `exported_instance`.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name", "engine"]
        self.running = Gauge("vllm:num_requests_running", "Requests running on the instance (last report).",
                             labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting on the instance (last report).",
                             labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage of the instance, 1 = full (last report).",
                              labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival at the frontend to first token.",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival at the frontend to the last token.",
                             labels, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.dispatches = Counter("shunter_dispatches", "Requests dispatched, by policy and instance.",
                                  ["policy", "engine"], registry=r)
        self.rejected = Counter("shunter_requests_rejected", "Requests answered with an error status, by status.",
                                ["status"], registry=r)
        self.instances = Gauge("shunter_instances", "Instances by state.", ["state"], registry=r)
        self._states_by_kind: dict[str, collections.Counter] = {}
        self.migrations = Counter("shunter_migrations", "Live migrations, by source, destination and outcome.",
                                  ["src", "dst", "outcome"], registry=r)
        self.migration_downtime = Histogram("shunter_migration_downtime_seconds",
                                            "Time a migrated request made no progress (the final stage).",
                                            buckets=MIGRATION_BUCKETS, registry=r)
        self.instance_failures = Counter("shunter_instance_failures", "Instances found dead.", registry=r)
        self.resumes = Counter("shunter_request_resumes",
                               "Requests re-prefilled on a healthy instance after theirs died.", registry=r)
        self.restarts = Counter("shunter_instance_restarts", "Instances started in place of dead ones "
                                "(--restart-failed).", registry=r)

    def observe_report(self, report: LoadReport, model: str | None = None) -> None:
        """The instance's gauges from its report; `model` labels them when it is not the server's model (gateway)."""
        labels = (model or self.model_name, report.instance_id)
        self.running.labels(*labels).set(report.num_running)
        self.waiting.labels(*labels).set(report.num_waiting)
        self.kv_usage.labels(*labels).set(report.block_usage)

    def observe_tokens(self, instance_id: str, num_tokens: int, gap: float | None, ttft: float | None,
                       model: str | None = None) -> None:
        """`num_tokens` new tokens; `ttft` if they are the first, else `gap` since the previous ones."""
        labels = (model or self.model_name, instance_id)
        self.generation_tokens.labels(*labels).inc(num_tokens)
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
        elif gap is not None:
            self.itl.labels(*labels).observe(gap)

    def observe_finish(self, instance_id: str, num_prompt_tokens: int, e2e: float, reason: str,
                       model: str | None = None) -> None:
        labels = (model or self.model_name, instance_id)
        self.prompt_tokens.labels(*labels).inc(num_prompt_tokens)
        self.e2e.labels(*labels).observe(e2e)
        self.success.labels(*labels, reason).inc()

    def observe_migration(self, src: str, dst: str, outcome: str, downtime: float | None) -> None:
        self.migrations.labels(src, dst, outcome).inc()
        if downtime is not None:
            self.migration_downtime.observe(downtime)

    def count_instances(self, kind: str, states: Iterable[InstanceState]) -> None:
        """`shunter_instances` by state, from the states of every instance of `kind` (a server with own
        instances and remote backends counts each kind where it keeps them; the gauge is their sum)."""
        self._states_by_kind[kind] = collections.Counter(s.value for s in states)
        for state in InstanceState:
            self.instances.labels(state.value).set(sum(c[state.value] for c in self._states_by_kind.values()))

    def forget_instance(self, instance_id: str, model: str | None = None) -> None:
        for gauge in (self.running, self.waiting, self.kv_usage):
            try:
                gauge.remove(model or self.model_name, instance_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
