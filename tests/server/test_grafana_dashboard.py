"""The Grafana dashboard in docs/grafana reads only metrics a real server exposes, so it cannot drift from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL, client

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "shunter-dashboard.json"
DATASOURCE = "${DS_PROMETHEUS}"
# A metric name in PromQL: Shunter's own start `shunter_`, the vLLM-named ones `vllm:`.
METRIC_NAME = re.compile(r"(?<![\w:])(?:vllm:|shunter_)[A-Za-z0-9_:]+")
# The sample names each metric type shows (prometheus_client also shows `_created` for counters and histograms).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def referenced_names(dashboard: dict) -> set[str]:
    """Every metric sample name in a panel query or a template variable's query."""
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for q in queries for name in METRIC_NAME.findall(q)}


def sample_and_declared_names(metrics_text: str) -> tuple[set[str], set[str]]:
    """The sample names a /metrics page shows, and those its declared families show once they have samples."""
    samples, declared = set(), set()
    for family in text_string_to_metric_families(metrics_text):
        samples |= {s.name for s in family.samples}
        declared |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ())}
    return samples, declared


def test_every_panel_has_a_title_the_prometheus_variable_and_a_unique_id():
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    assert len(panels) == 10
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["title"].strip()
        assert panel["type"] == "timeseries"
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == DATASOURCE for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("model_name", "engine"):
        assert variables[name]["multi"] and variables[name]["query"].startswith("label_values(")


def test_latency_panels_take_quantiles_of_bucket_rates_by_le():
    for panel in load_dashboard()["panels"]:
        for target in panel["targets"]:
            if "histogram_quantile" in target["expr"]:
                assert re.search(r"sum by \(le\) \(rate\([\w:]+_bucket\{[^}]*\}\[1m\]\)\)", target["expr"]), target


def test_every_metric_the_dashboard_reads_is_exposed_by_a_real_server(start_server):
    referenced = referenced_names(load_dashboard())
    assert {"vllm:time_to_first_token_seconds_bucket", "shunter_dispatches_total", "shunter_instances"} <= referenced
    server = start_server(instances=2)
    # One request, so the histograms and the per-instance counters have samples to show.
    client(server).completions.create(model=MODEL, prompt="Say hello", max_tokens=4)
    # And one refused request, for the rejection counter.
    assert httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ""}).status_code == 400
    samples, declared = sample_and_declared_names(httpx.get(server.url + "/metrics").text)
    assert referenced <= samples, f"no such samples in /metrics: {referenced - samples}"
    assert referenced <= declared, f"not declared in /metrics: {referenced - declared}"
