"""The Llumnix experiment harness: load search, tables, CLI input (tiny runs; the figures are a benchmark)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from shunter.cli import main
from shunter.experiment import llumnix
from shunter.experiment.report import render_markdown


def _result(ttfts, unfinished=()):
    return SimpleNamespace(records=[SimpleNamespace(ttft=t) for t in ttfts], unfinished=list(unfinished))


def test_over_capacity_means_the_typical_request_queues():
    assert not llumnix.is_over_capacity(_result([0.2, 0.25, 0.3, 9.0]), unloaded_ttft_p50=0.2)
    assert llumnix.is_over_capacity(_result([0.2, 0.4, 0.5, 9.0]), unloaded_ttft_p50=0.2)
    assert llumnix.is_over_capacity(_result([0.2], unfinished=["x"]), unloaded_ttft_p50=0.2)
    assert llumnix.is_over_capacity(_result([]), unloaded_ttft_p50=0.2)


def test_a_tiny_run_finds_a_load_round_robin_keeps_up_with_and_runs_every_policy():
    sizes = llumnix.Sizes(num_requests=150, search_steps=2, goodput_runs=2)
    scenario = dataclasses.replace(llumnix.SCENARIOS[2], sweep=True)  # ShareGPT lengths, Poisson
    ticks = []
    out = llumnix.run_experiment(sizes, seed=1, tick=lambda: ticks.append(1), scenarios=(scenario,))
    entry = out["scenarios"][scenario.key]
    tried = entry["load_search"]
    assert entry["rate"] > 0 and any(t["over_capacity"] for t in tried)
    # The chosen rate is the highest one tried that round robin kept up with.
    assert entry["rate"] == max(t["rate"] for t in tried if not t["over_capacity"])
    assert all(t["rate"] < entry["rate"] or t["over_capacity"] or t["rate"] == entry["rate"] for t in tried)
    assert set(entry["policies"]) == set(llumnix.POLICIES)
    for row in entry["policies"].values():
        assert row["completed"] == row["requests"] == 150
    assert len(ticks) <= llumnix.plan_size(sizes, (scenario,))
    assert [p["rate"] for p in entry["sweep"]] == [entry["rate"] * f for f in llumnix.SWEEP_FRACTIONS]
    assert all(set(p["policies"]) == set(llumnix.POLICIES) for p in entry["sweep"])
    text = render_markdown(out)
    assert scenario.title in text and "| Shunter |" in text and "Llumnix vs round robin P99 TTFT" in text
    assert "The same at lower loads" in text


def test_same_seed_same_figures():
    sizes = llumnix.Sizes(num_requests=120, search_steps=1, goodput_runs=2)
    scenario = (llumnix.SCENARIOS[1],)
    assert llumnix.run_experiment(sizes, seed=3, scenarios=scenario) == llumnix.run_experiment(sizes, seed=3,
                                                                                               scenarios=scenario)


@pytest.mark.parametrize("argv,message", [
    (["--scenario", "mars"], "unknown scenario 'mars'; choose from: azure-conv"),
    (["--requests", "5"], "--requests must be at least 100, got 5"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["experiment", "llumnix", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
