"""Metrics, the JSON report and the goodput search."""

import math

import pytest

from shunter.sim.metrics import RequestRecord, slo_attainment, summarize
from shunter.sim.report import arrival_rate, build_report, format_summary, scale_arrivals, search_goodput
from tests.sim.builders import random_workload, simulate, wr


def record(rid, arrival, first, finish, n, ttft_slo=None, tpot_slo=None):
    return RequestRecord(rid, "0", arrival, first, finish, 10, n, ttft_slo=ttft_slo, tpot_slo=tpot_slo)


def test_request_metrics():
    r = record("a", 1.0, 1.5, 3.5, 5)
    assert (r.ttft, r.e2e, r.tpot) == (0.5, 2.5, 0.5)
    assert record("b", 0, 1, 1, 1).tpot is None


def test_slo_attainment_counts_both_objectives_and_unserved_requests():
    recs = [record("a", 0, 0.5, 2.5, 5, ttft_slo=1.0, tpot_slo=0.6),  # meets both
            record("b", 0, 1.5, 2.5, 5, ttft_slo=1.0, tpot_slo=0.6),  # misses TTFT
            record("c", 0, 0.5, 4.5, 5, ttft_slo=1.0, tpot_slo=0.6),  # misses TPOT
            record("d", 0, 0.5, 0.5, 1, ttft_slo=1.0, tpot_slo=0.6)]  # one token: TPOT n/a
    assert slo_attainment(recs) == 0.5
    assert slo_attainment(recs, num_unserved=4) == 0.25
    assert slo_attainment([record("x", 0, 1, 2, 2)]) is None


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["p50"] == 2.5 and s["p99"] == pytest.approx(3.97)
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_report_has_the_schema():
    workload = random_workload(0, 20, rate=10.0)
    _, result = simulate(workload, num_instances=2)
    report = build_report(result, len(workload), wall_seconds=0.5)
    for key in ("requests", "ttft", "tpot", "e2e", "slo_attainment", "preemptions", "migrations", "instance_seconds"):
        assert key in report
    for key in ("ttft", "tpot", "e2e"):
        assert set(report[key]) == {"mean", "p50", "p90", "p99"}
    assert report["requests"] == report["completed"] == 20
    assert report["instance_seconds"] == pytest.approx(2 * result.makespan)
    assert sum(i["requests"] for i in report["instances"]) == 20
    assert "TTFT" in format_summary(report)


def test_scale_arrivals_and_rate():
    workload = [wr("a", 0.0, 1, 1), wr("b", 2.0, 1, 1), wr("c", 4.0, 1, 1)]
    assert arrival_rate(workload) == 0.5
    assert [w.arrival_time for w in scale_arrivals(workload, 2.0)] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        arrival_rate(workload[:1])


@pytest.mark.parametrize("capacity", [0.3, 1.0, 1.7, 9.0])
def test_goodput_search_brackets_and_bisects(capacity):
    # Attainment falls past `capacity` (in rate-scale units).
    scale, tried = search_goodput(lambda s: 1.0 if s <= capacity else 0.5, rel_tol=0.01, max_runs=40)
    assert scale <= capacity and scale == pytest.approx(capacity, rel=0.011)
    assert all(a == (1.0 if s <= capacity else 0.5) for s, a in tried)


def test_goodput_search_gives_zero_when_nothing_passes():
    scale, tried = search_goodput(lambda s: 0.0)
    assert scale == 0.0 and len(tried) > 5
    assert not math.isnan(scale)
