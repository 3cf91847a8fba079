"""`shunter bench frontend` end to end, small: a null-engine server in its own process vs direct calls."""

from __future__ import annotations

import json

from shunter.cli import main


def test_frontend_bench_measures_both_sides_without_errors(tmp_path, capsys):
    out = tmp_path / "frontend.json"
    assert main(["bench", "frontend", "--requests", "60", "--latency-requests", "20", "--concurrency", "10",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["http"]["errors"] == 0
    http, direct = result["http"], result["direct"]
    assert http["requests_per_s"] > 0 and direct["requests_per_s"] > 0
    # Going through HTTP can only add to a direct call of the same engines.
    assert http["latency_ms"]["p50"] > direct["latency_ms"]["p50"]
    assert result["added_latency_p50_ms"] == http["latency_ms"]["p50"] - direct["latency_ms"]["p50"]
    printed = capsys.readouterr().out
    assert "added latency P50" in printed and "req/s" in printed
