"""The gateway's Prometheus metrics: serving mode's, under the same names, plus backend errors and cache hits.

Per backend (label `engine`, the backend's id): dispatches, the scraped load
gauges, TTFT / inter-token latency / E2E as observed at the gateway (a streamed
response's chunks), token counts from the backends' `usage`, and
`shunter_backend_errors` by kind (connect, disconnect, timeout, status_5xx).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shunter.engine import LoadReport
from shunter.server.metrics import ServerMetrics


class GatewayMetrics(ServerMetrics):
    """`ServerMetrics` labelled by each request's model, plus what only a gateway has.

    `model_name` labels what the own instances of a mixed server observe (a gateway has none)."""

    def __init__(self, model_name: str = "") -> None:
        super().__init__(model_name)
        r = self.registry
        self.backend_errors = Counter("shunter_backend_errors", "Failed backend calls, by backend and kind.",
                                      ["engine", "kind"], registry=r)
        self.retries = Counter("shunter_backend_retries", "Non-streamed requests retried on another backend.",
                               ["engine"], registry=r)
        self.prefix_hit_rate = Gauge("shunter_backend_prefix_cache_hit_rate",
                                     "The backend's prefix-cache hits over queries since the gateway started "
                                     "(from its own counters; SGLang's own hit-rate gauge).", ["engine"], registry=r)
        self._first_counters: dict[str, tuple[float, float]] = {}

    def observe_backend(self, backend, report: LoadReport) -> None:
        """A backend's scrape: its load gauges and its prefix-cache hit rate."""
        self.observe_report(report, model=backend.models[0])
        scraped = backend.scraped
        if scraped is None:
            return
        if scraped.prefix_hits is not None and scraped.prefix_queries is not None:
            hits0, queries0 = self._first_counters.setdefault(backend.instance_id,
                                                              (scraped.prefix_hits, scraped.prefix_queries))
            if scraped.prefix_queries < queries0:  # the server restarted: its counters began again
                hits0, queries0 = self._first_counters[backend.instance_id] = (0.0, 0.0)
            queries = scraped.prefix_queries - queries0
            if queries > 0:
                self.prefix_hit_rate.labels(backend.instance_id).set((scraped.prefix_hits - hits0) / queries)
        elif scraped.prefix_hit_rate is not None:
            self.prefix_hit_rate.labels(backend.instance_id).set(scraped.prefix_hit_rate)

    def forget_backend(self, backend) -> None:
        self.forget_instance(backend.instance_id, model=backend.models[0])
        try:
            self.prefix_hit_rate.remove(backend.instance_id)
        except KeyError:
            pass
