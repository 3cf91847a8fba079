"""The command line turns bad input into one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shunter.cli import build_parser, main


@pytest.mark.parametrize("argv, named", [
    (["generate", ""], "prompt is empty"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--top-k", "-5"], "top_k"),
    (["generate", "hi", "--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
    (["bench", "engine", "--requests", "0"], "--requests"),
    (["serve", "--instances", "0"], "--instances"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--policy", "fastest"], "fastest"),
    (["serve", "--dispatch", "magic"], "magic"),
    (["serve", "--report-interval", "0"], "--report-interval"),
    (["serve", "--migration-copy-rate", "-1"], "--migration-copy-rate must be a number of GB/s >= 0 (0: unpaced), got -1.0"),
    (["serve", "--migration-copy-rate", "nan"], "--migration-copy-rate must be a number of GB/s >= 0"),
    (["serve", "--kv-channel", "pigeon"], "pigeon"),
    (["serve", "--pd", "2:0"], "--pd"),
    (["serve", "--pd", "x"], "--pd must be P:D with P, D >= 1 (e.g. 1:1), got 'x'"),
    (["serve", "--pd", "1:1", "--autoscale", "1:3"], "--autoscale 1:3 with --pd 1:1: autoscaling is not P/D-aware"),
    (["serve", "--pd", "2:2", "--instances", "3"], "--instances 3 with --pd 2:2"),
    (["serve", "--autoscale", "3:1"], "--autoscale"),
    (["serve", "--autoscale", "1:3", "--scaling-policy", "magic"], "magic"),
    (["serve", "--migration", "teleport"], "teleport"),
    (["serve", "--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
    # Backends alone (a gateway), or beside --instances N of Shunter's own (a mixed server).
    (["serve", "--backend", "http://127.0.0.1:9", "--model", "x"], "--instances N"),
    (["serve", "--backend", "http://127.0.0.1:9", "--migration", "llumnix"], "--instances N"),
    (["serve", "--instances", "1", "--backend", "http://127.0.0.1:9", "--pd", "1:1"], "--pd"),
    (["serve", "--instances", "1", "--backend", "http://127.0.0.1:9", "--autoscale", "1:2"], "--autoscale"),
    (["serve", "--instances", "1", "--backend", "ftp://x"], "ftp://x"),
    (["serve", "--instances", "1", "--backend", "http://127.0.0.1:9", "--backend-timeout", "0"], "--backend-timeout"),
    (["serve", "--allow-missing-backends"], "--allow-missing-backends"),
    (["bench", "frontend", "--concurrency", "0"], "--concurrency"),
    (["bench", "vllm", "--vllm-python", "/nope/python", "--vllm-cli", "x", "--vllm-model", "y"], "/nope/python"),
])
def test_bad_input_is_one_line(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("shunter: error:") and named in err
    assert "Traceback" not in err


def test_unreadable_weights_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shunter: error:" in err


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "shunter", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("generate", "bench"):
        assert command in out


def test_every_model_command_defaults_to_dtype_auto():
    """A host without native bfloat16 runs it emulated, ~10x slower: no command may assume it."""
    parser = build_parser()
    for argv in (["generate", "hi"], ["bench", "engine"], ["profile", "--json", "x.json"]):
        assert parser.parse_args(argv).dtype == "auto", argv


def test_bench_startup_rejects_a_bad_run_count(capsys):
    assert main(["bench", "startup", "--warm-runs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--warm-runs must be at least 1, got 0" in err and "Traceback" not in err
