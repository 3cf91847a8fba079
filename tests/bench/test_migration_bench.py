"""`shunter bench migration`, small: Ray-actor instances of the real model, two short lengths."""

from __future__ import annotations

import json
import os

import pytest

from shunter.cli import main

pytestmark = pytest.mark.slow


def test_migration_bench_reports_every_figure_per_length(tmp_path, capsys):
    import ray

    out = tmp_path / "migration.json"
    cores = os.sched_getaffinity(0)
    try:
        assert main(["bench", "migration", "--lengths", "64,300", "--others", "1", "--repeats", "2",
                     "--json", str(out)]) == 0
    finally:
        ray.shutdown()
    # The bench pins itself beside the destination while it runs, and lets go afterwards.
    assert os.sched_getaffinity(0) == cores
    r = json.loads(out.read_text())
    assert r["source_cores"] and r["other_cores"]
    assert r["lengths"] == [64, 300]
    for key in ("downtime_ms", "blocking_copy_ms", "recompute_ms", "decode_step_ms", "source_slowdown"):
        assert len(r[key]) == 2
    assert all(x > 0 for x in r["downtime_ms"] + r["blocking_copy_ms"] + r["recompute_ms"] + r["decode_step_ms"])
    # A live migration copies in stages; its last stage is small.
    assert all(stages >= 2 for stages in r["stages"])
    assert all(blocks[-1] <= 2 for blocks in r["blocks_per_stage"])
    # The three channels measured side by side; the source's own steps give its slowdown.
    for channel in ("object_store", "torch_distributed"):
        for key in ("downtime_ms", "blocking_copy_ms", "source_slowdown", "source_slowdown_control"):
            assert len(r[channel][key]) == 2
        assert all(x > 0 for x in r[channel]["downtime_ms"] + r[channel]["blocking_copy_ms"])
    assert all(x is not None and x > 0 for x in r["source_slowdown"] + r["object_store"]["source_slowdown"]
               + r["torch_distributed"]["source_slowdown"])
    printed = capsys.readouterr().out
    assert "recompute/downtime" in printed and "channel object-store" in printed
    assert "channel torch-distributed" in printed
