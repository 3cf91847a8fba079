"""`shunter simulate` and `shunter bench sim` from the command line."""

import json

import pytest

from shunter.cli import main
from tests.sim.test_profiled import synthetic_profile
from tests.sim.test_workloads import FIXTURES

SMALL = ["simulate", "--trace", "azure2023_conv", "--max-requests", "60", "--instances", "2", "--quiet"]


def _error_line(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("shunter: error: ")
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--trace", "nope"], "azure2023_conv"),
    (["--hardware", "v100"], "a100-80gb"),
    (["--model", "gpt-9"], "llama-2-7b"),
    (["--dispatch", "freest"], "least-load"),
    (["--latency-model", "vidur"], "roofline"),
    (["--instances", "0"], "--instances"),
    (["--instances", "x"], "invalid int"),
    (["--rate", "-2"], "rate"),
    (["--rate-scale", "-1"], "rate_scale"),
    (["--start", "1e6"], "holds no requests"),
    (["--goodput"], "--ttft-slo"),
    (["--latency-model", "profiled"], "--profile"),
    (["--latency-model", "profiled", "--profile", "/nonexistent.json"], "does not exist"),
    (["--model", "llama-2-70b"], "-tpN"),
    (["--autoscale", "4:2"], "--autoscale 4:2: MIN must not exceed MAX"),
    (["--autoscale", "0:2"], "--autoscale 0:2: MIN must be at least 1"),
    (["--autoscale", "one:4"], "MIN:MAX, two whole numbers, got 'one:4'"),
    (["--autoscale", "1:2:3"], "got '1:2:3'"),
    (["--autoscale", "2"], "got '2'"),
    (["--autoscale", "2:4", "--instances", "5"], "--instances 5 lies outside --autoscale 2:4"),
    (["--autoscale", "1:4", "--startup-delay", "-1"], "--startup-delay must be >= 0 seconds, got -1.0"),
    (["--autoscale", "1:4", "--startup-delay", "nan"], "got nan"),
    (["--autoscale", "1:4", "--scale-up-freeness", "70"], "--scale-down-freeness (60) must exceed --scale-up-freeness (70)"),
    (["--autoscale", "1:4", "--scale-up-freeness", "x"], "invalid float value: 'x'"),
    (["--scale-down-freeness", "90"], "--scale-down-freeness needs --autoscale MIN:MAX"),
    (["--scaling-policy", "shunter"], "--scaling-policy needs --autoscale MIN:MAX"),
    (["--autoscale", "1:4", "--scaling-policy", "hunch"], "unknown scaling policy 'hunch'; choose from: freeness, shunter"),
    (["--policy", "fast"], "unknown policy bundle 'fast'; choose from: rr, infaas, llumnix, shunter"),
    (["--migration", "teleport"], "unknown migration policy 'teleport'; choose from: none, llumnix, shunter"),
    (["--link", "carrier"], "unknown link 'carrier'; choose from: pcie-gen4"),
    (["--selection", "oldest"], "unknown migration selection 'oldest'; choose from: shortest, longest"),
    (["--src-freeness", "50", "--dst-freeness", "10"], "destination freeness threshold (10.0) must be at least"),
    (["--src-freeness", "nan"], "src_freeness must be a finite number, got nan"),
    (["--max-migrations-per-instance", "0"], "must be a positive integer, got 0"),
    (["--control-interval", "-1"], "--control-interval must be >= 0 seconds, got -1.0"),
    (["--priority-headroom", "-3"], "--priority-headroom must be >= 0 blocks, got -3"),
    (["--autoscale", "1:4", "--goodput", "--ttft-slo", "1"], "drop --autoscale"),
    (["--pd", "0:2"], "--pd must be P:D with P, D >= 1 (e.g. 1:1), got '0:2'"),
    (["--pd", "x"], "got 'x'"),
    (["--pd", "1:1", "--autoscale", "1:3"], "--autoscale 1:3 with --pd 1:1: autoscaling is not P/D-aware"),
    (["--pd", "2:2", "--instances", "3"], "--instances 3 with --pd 2:2: P/D runs P + D = 4 instances"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    line = _error_line(capsys, ["simulate", *argv, "--quiet"])
    assert needle in line


def test_list_names_everything(capsys):
    assert main(["simulate", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("azure2023_conv", "mooncake_conversation", "a100-80gb", "h200", "llama-2-70b", "smollm2-135m",
                 "round-robin", "least-load", "roofline", "profiled", "freeness", "llumnix", "shunter", "nvlink",
                 "last-arrived", "policy bundles"):
        assert name in out


def test_clipped_prompts_are_reported_on_stderr_and_in_the_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["simulate", "--trace", str(FIXTURES / "mooncake_small.jsonl"), "--max-model-len", "601", "--quiet",
            "--json", str(out)]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shunter: note:")]
    assert notes == ["shunter: note: max_model_len 601: 3 of 4 prompts clipped to 600 tokens (1,200 prompt tokens "
                     "dropped); 3 outputs shortened to fit (57 output tokens dropped)"]
    assert json.loads(out.read_text())["config"]["clipping"] == {
        "max_model_len": 601, "num_prompts_clipped": 3, "num_prompt_tokens_clipped": 1200,
        "num_outputs_clipped": 3, "num_output_tokens_clipped": 57}


def test_nothing_clipped_says_nothing(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["simulate", "--trace", str(FIXTURES / "mooncake_small.jsonl"), "--quiet", "--json", str(out)]) == 0
    assert "note" not in capsys.readouterr().err
    assert json.loads(out.read_text())["config"]["clipping"]["num_prompts_clipped"] == 0


def test_run_writes_json_and_plot_and_is_deterministic(tmp_path, capsys):
    a, b, plot = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "p.png"
    assert main([*SMALL, "--json", str(a), "--plot", str(plot), "--ttft-slo", "2", "--tpot-slo", "0.1"]) == 0
    assert main([*SMALL, "--json", str(b), "--ttft-slo", "2", "--tpot-slo", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "SLO attainment" in out
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for r in (ra, rb):
        r.pop("simulation")
    assert ra == rb
    assert ra["requests"] == ra["completed"] == 60
    assert 0 <= ra["slo_attainment"] <= 1
    for key in ("ttft", "tpot", "e2e"):
        assert set(ra[key]) == {"mean", "p50", "p90", "p99"} and ra[key]["p50"] > 0
    assert plot.stat().st_size > 10_000


def test_step_by_step_flag_gives_the_same_report(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main([*SMALL, "--json", str(a)]) == 0
    assert main([*SMALL, "--json", str(b), "--no-fast-path", "--debug"]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for r in (ra, rb):
        r.pop("simulation")
        r["config"].pop("fast_path")
    assert ra == rb


def test_goodput_search_from_the_cli(tmp_path):
    out = tmp_path / "g.json"
    assert main([*SMALL, "--ttft-slo", "0.5", "--tpot-slo", "0.05", "--goodput", "--json", str(out)]) == 0
    g = json.loads(out.read_text())["goodput"]
    assert g["rate"] > 0 and g["rate_per_gpu"] == pytest.approx(g["rate"] / 2)
    assert g["slo_attainment"] >= 0.9
    assert len(g["searched"]) >= 3


def test_profiled_latency_and_mooncake_prefix_caching(tmp_path):
    profile = tmp_path / "p.json"
    synthetic_profile().save(profile)
    out = tmp_path / "m.json"
    assert main(["simulate", "--trace", "mooncake_conversation", "--max-requests", "30", "--latency-model",
                 "profiled", "--profile", str(profile), "--num-blocks", "4000", "--max-model-len", "32768",
                 "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["scheduler"]["enable_prefix_caching"] is True  # auto: the trace has prefix blocks
    assert report["config"]["latency_model"]["name"] == "profiled"
    assert report["completed"] + report["rejected"] == 30


def test_bench_sim_small(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "sim", "--requests", "200", "--instances", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "requests_per_s" in text
    # Vidur's and DistServe's figures are constants quoted from the issue: the output must say so on their line.
    (quoted,) = [line for line in text.splitlines() if "Vidur" in line]
    assert "DistServe" in quoted and "reference" in quoted and "not measured here" in quoted
    report = json.loads(out.read_text())
    assert report["requests_per_s"] > 0 and "not measured here" in report["reference_source"]


def test_autoscale_runs_reports_scaling_and_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    argv = ["simulate", "--trace", "azure2023_code", "--max-requests", "300", "--hardware", "a10", "--policy",
            "llumnix", "--autoscale", "1:4", "--startup-delay", "5", "--quiet"]
    assert main([*argv, "--json", str(a)]) == 0
    assert "autoscaling:" in capsys.readouterr().out
    assert main([*argv, "--json", str(b), "--no-fast-path"]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for r in (ra, rb):
        r.pop("simulation")
        r["config"].pop("fast_path")
    assert ra == rb
    assert ra["completed"] == 300 and ra["config"]["instances"] == 1 and ra["config"]["autoscale"] == "1:4"
    assert ra["config"]["policies"]["scaling"]["startup_delay"] == 5.0
    scaling = ra["scaling"]
    assert any(x["add"] for x in scaling["actions"]) and scaling["timeline"][0][1:] == [1, 1]
    assert ra["instance_seconds"] == pytest.approx(sum(i["seconds"] for i in ra["instances"]))
    assert len(ra["instances"]) > 1 and all(i["start"] is not None for i in ra["instances"])


def test_policy_bundle_migrates_and_the_report_says_which_policies_ran(tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["simulate", "--trace", "azure2023_conv", "--instances", "4", "--max-requests", "400", "--rate", "8",
            "--hardware", "a10", "--policy", "llumnix", "--dispatch", "shunter", "--link", "pcie-gen4", "--quiet",
            "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 400 and report["migrations"] > 0
    assert report["config"]["policies"]["dispatch"] == "shunter"  # the flag overrides the bundle's
    assert report["config"]["policies"]["migration"] == "llumnix"
    assert report["config"]["link"] == "pcie-gen4"
    assert main(argv) == 0
    assert json.loads(out.read_text())["migrations"] == report["migrations"]  # same seed, same run


def test_the_shunter_bundle_scales_with_the_shunter_scaling_policy_unless_told_otherwise(tmp_path):
    out = tmp_path / "run.json"
    base = ["simulate", "--trace", "azure2023_conv", "--max-requests", "200", "--rate", "4", "--hardware", "a10",
            "--autoscale", "1:4", "--instances", "2", "--quiet", "--json", str(out)]
    assert main([*base, "--policy", "shunter"]) == 0
    assert json.loads(out.read_text())["config"]["policies"]["scaling"]["policy"] == "shunter"
    assert main([*base, "--policy", "shunter", "--scaling-policy", "freeness"]) == 0
    assert json.loads(out.read_text())["config"]["policies"]["scaling"]["policy"] == "freeness"
    assert main([*base, "--policy", "llumnix"]) == 0
    assert json.loads(out.read_text())["config"]["policies"]["scaling"]["policy"] == "freeness"


def test_pd_runs_reports_roles_and_hand_offs_and_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    argv = ["simulate", "--trace", "azure2023_conv", "--max-requests", "60", "--pd", "1:2", "--quiet"]
    assert main([*argv, "--json", str(a)]) == 0
    assert "P/D 1:2:" in capsys.readouterr().out
    assert main([*argv, "--json", str(b), "--instances", "3"]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for r in (ra, rb):
        r.pop("simulation")
    assert ra == rb
    assert ra["completed"] == 60 and ra["config"]["pd"] == "1:2" and ra["config"]["instances"] == 3
    assert [i["role"] for i in ra["instances"]] == ["prefill", "decode", "decode"]
    pd = ra["pd"]
    assert (pd["prefill"], pd["decode"], pd["not_handed_off"]) == (1, 2, 0)
    assert pd["hand_offs"] > 50 and ra["migrations"] == pd["hand_offs"]
    # Requests finish where they decode: on the decode instances, but for those whose hand-off aborted
    # (they finished while their blocks copied) and one-token outputs.
    assert ra["instances"][0]["requests"] == 60 - pd["hand_offs"]
