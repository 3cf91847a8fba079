"""`shunter bench soak`: the CI version (2 minutes, Ray actors), and its checks on their own."""

from __future__ import annotations

import json

import pytest

from shunter.bench.soak_bench import SoakReport
from shunter.cli import main


@pytest.mark.slow
def test_two_minute_soak_with_aborts_migrations_and_a_killed_instance_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = main(["bench", "soak", "--minutes", "2", "--instances", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    assert result["ok"] and result["hung"] == 0 and result["malformed"] == 0
    assert result["leaked_blocks"] == 0 and result["leftover_requests"] == 0
    assert not any(kind.startswith("5") or kind == "stream-error" for kind in result["errors"]), result["errors"]
    # Every fault really happened: clients hung up, requests moved, an instance died and was replaced.
    assert result["completed"] > 1000 and result["client_aborts"] > 50
    assert result["migrations"].get("committed", 0) > 20
    assert result["killed"] is not None and result["instance_failures"] == 1 and result["restarts"] == 1
    assert result["memory_flat"] and "frontend" in result["rss_mb"]
    assert sum(1 for name in result["rss_mb"] if name.startswith("instance")) == 4  # 3 + the replacement
    assert "soak passed" in capsys.readouterr().out


def test_the_report_fails_on_any_leak_hang_malformed_output_5xx_or_growing_memory():
    assert SoakReport(completed=10).ok
    for bad in (dict(leaked_blocks=1), dict(hung=1), dict(malformed=1), dict(leftover_requests=1),
                dict(errors={"500": 1}), dict(rss_mb={"frontend": {"start": 100.0, "end": 130.0}})):
        assert not SoakReport(completed=10, **bad).ok, bad
    assert SoakReport(errors={"429": 3}, rss_mb={"frontend": {"start": 100.0, "end": 110.0}}).ok


@pytest.mark.parametrize("argv, named", [
    (["--minutes", "11"], "--minutes"), (["--minutes", "0"], "--minutes"), (["--instances", "1"], "--instances"),
    (["--rate", "0"], "--rate"), (["--abort-fraction", "2"], "--abort-fraction"), (["--kill-at", "-1"], "--kill-at"),
])
def test_bad_arguments_are_one_line_naming_the_flag(argv, named, capsys):
    assert main(["bench", "soak", *argv]) != 0
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
