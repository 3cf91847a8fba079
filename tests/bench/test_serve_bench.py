"""`shunter bench serve` against the null OpenAI server on loopback: counts, errors, the deadline, the URL wall."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import pytest

# The load generator and the null server need these; the core installation does not.
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from shunter.bench.null_openai_server import NullServer, NullServerConfig
from shunter.bench.serve_load import (
    LoadConfig, ServeRecord, check_loopback_url, parse_sse_line, read_stream, run_load,
)
from shunter.bench.serve_metrics import LATENCY_METRICS, p50_ratios, summarize
from shunter.bench.serve_workload import ServeRequest, ServeWorkload, baseline_requests, build_requests
from shunter.cli import main
from shunter.errors import CLIError


@pytest.fixture(scope="module")
def server():
    with NullServer(NullServerConfig(token_delay_s=0.0005)) as s:
        yield s


@pytest.fixture(scope="module")
def failing_server():
    with NullServer(NullServerConfig(statuses=(200, 200, 500, 400))) as s:
        yield s


def make_requests(n: int = 24, input_len: int = 12, output_len: int = 8, **kw) -> list[ServeRequest]:
    return build_requests(ServeWorkload(num_requests=n, input_len=input_len, output_len=output_len, **kw))[0]


def run(url: str, requests, **kw):
    return asyncio.run(run_load(LoadConfig(url, requests, **kw)))


# ---- against the null server ---------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_request_completes_with_the_tokens_it_asked_for(server, endpoint):
    requests = make_requests(range_ratio=0.5, rate=400.0)
    result = run(server.url, requests, endpoint=endpoint, max_concurrency=6)
    assert result.model == "null-model"  # found through GET /v1/models
    assert [r.request_id for r in result.records] == [r.request_id for r in requests]
    for request, record in zip(requests, result.records):
        assert record.is_success, record
        assert record.has_usage
        assert record.num_output_tokens == request.max_tokens
        assert record.num_prompt_tokens == request.num_prompt_tokens  # the null server counts words
        assert len(record.itls) == request.max_tokens - 1  # one chunk per token
        assert 0 < record.ttft <= record.e2e
    summary = summarize(result.records, result.duration_s)
    assert summary["num_completed"] == len(requests) and summary["errors_by_kind"] == {}
    assert summary["num_output_tokens"] == sum(r.max_tokens for r in requests)


def test_a_turn_is_sent_only_after_its_previous_turn_and_before_later_requests(server):
    # Two conversations (a0 -> a1 -> a2, b0 -> b1) and two single requests, two at a time.
    ids = [("a0", None), ("b0", None), ("a1", "a0"), ("c", None), ("a2", "a1"), ("b1", "b0"), ("d", None)]
    requests = [ServeRequest(i, 0.0, "some words here", 3, 16, after=after) for i, after in ids]
    result = run(server.url, requests, max_concurrency=2)
    records = {r.request_id: r for r in result.records}
    assert all(r.is_success for r in result.records)
    for i, after in ids:
        if after is not None:
            assert records[i].send_time >= records[after].send_time + records[after].e2e - 1e-3
    # Nothing is ever sent while a listed-earlier request that was ready waits: a1 goes before c.
    assert records["a1"].send_time <= records["c"].send_time + 1e-3 or \
        records["a0"].send_time + records["a0"].e2e > records["c"].send_time
    assert max(sum(1 for r in result.records if r.send_time <= t.send_time < r.send_time + r.e2e)
               for t in result.records) <= 2


def test_percentiles_are_ordered(server):
    result = run(server.url, make_requests(n=30, output_len=6), max_concurrency=8)
    summary = summarize(result.records, result.duration_s)
    for name in LATENCY_METRICS:
        stats = summary[f"{name}_ms"]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (name, stats)
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
    assert summary["output_throughput"] == pytest.approx(summary["num_output_tokens"] / result.duration_s)


def test_errors_are_counted_by_kind_with_the_servers_message(failing_server):
    result = run(failing_server.url, make_requests(n=8), max_concurrency=1, model="null-model")
    summary = summarize(result.records, result.duration_s)
    assert summary["num_completed"] == 4
    assert summary["errors_by_kind"] == {"http_400": 2, "http_500": 2}
    failed = [r for r in result.records if not r.is_success]
    assert {r.http_status for r in failed} == {400, 500}
    assert all("failed on purpose" in r.error for r in failed)


def test_a_wrong_model_name_is_an_http_error_not_a_crash(server):
    result = run(server.url, make_requests(n=2), model="no-such-model")
    assert [r.error_kind for r in result.records] == ["http_404", "http_404"]
    assert "no-such-model" in result.records[0].error


def test_the_deadline_stops_a_run_against_a_server_that_never_answers():
    with NullServer(NullServerConfig(hang=True)) as hung:
        requests = make_requests(n=4) + [ServeRequest("late", 60.0, "never sent", 2, 4)]
        t0 = time.perf_counter()
        result = run(hung.url, requests, model="null-model", timeout_s=0.4)
        elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert [r.error_kind for r in result.records] == ["timeout"] * 5
    assert result.records[-1].send_time is None  # arrived after the deadline: counted, never sent
    assert summarize(result.records, result.duration_s)["errors_by_kind"] == {"timeout": 5}


def test_a_server_that_is_not_there_is_a_connection_error():
    with NullServer() as gone:
        url = gone.url
    result = run(url, make_requests(n=2), model="m", timeout_s=5)
    assert [r.error_kind for r in result.records] == ["connection", "connection"]


def test_null_server_answers_without_streaming(server):
    body = {"model": "null-model", "prompt": "one two three", "max_tokens": 5}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, trust_env=False).json()
    assert len(answer["choices"][0]["text"].split()) == 5
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    bad = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 0}, trust_env=False)
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]


# ---- the command ---------------------------------------------------------------------------------
def test_the_command_prints_figures_and_the_baseline_ratio_and_writes_json_and_plot(server, tmp_path, capsys):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    argv = ["bench", "serve", "--url", server.url, "--requests", "12", "--rate", "200", "--input-len", "16",
            "--output-len", "6", "--max-concurrency", "4", "--json", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for text in ("requests 12", "completed 12", "TTFT", "TPOT", "ITL", "E2E", "under load / unloaded, P50: TTFT x"):
        assert text in printed
    report = json.loads(out.read_text())
    assert report["summary"]["num_completed"] == 12 and len(report["records"]) == 12
    assert len(report["baseline"]["records"]) == 5 and report["p50_ratios_to_baseline"]["ttft"] > 0
    assert plot.stat().st_size > 0


def test_the_command_replays_a_trace_all_at_once_without_baseline(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--url", server.url, "--trace", "azure2023_code", "--rate", "inf", "--requests", "6",
            "--max-model-len", "256", "--endpoint", "chat", "--no-baseline", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["baseline"] is None and report["workload"]["rate"] == "inf"
    assert all(r["num_prompt_tokens"] + r["num_output_tokens"] <= 256 for r in report["records"])
    assert "max_model_len 256:" in capsys.readouterr().out  # what clipping cut is reported


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com:8000", "http://[2001:db8::1]:8000",
                                 "ftp://127.0.0.1/", "127.0.0.1:8000"])
def test_a_non_loopback_url_is_refused_naming_it(url, capsys):
    with pytest.raises(CLIError, match=re.escape(url)):
        check_loopback_url(url)
    assert main(["bench", "serve", "--url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "Traceback" not in err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.8.9.10", "http://localhost:1/",
                                 "https://[::1]:8443"])
def test_loopback_urls_are_accepted(url):
    check_loopback_url(url)


@pytest.mark.parametrize("argv, named", [
    (["--requests", "0"], "--requests"),
    (["--trace", "azure2023_conv", "--input-len", "5"], "--input-len"),
    (["--time-scale", "0.5"], "--time-scale"),
    (["--trace", "no-such-trace"], "azure2023_conv"),
    (["--rate", "-1"], "rate"),
])
def test_bad_options_are_one_line(argv, named, capsys):
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err


# ---- pure parts ----------------------------------------------------------------------------------
def record(i: int, ttft: float, e2e: float, num_output_tokens: int, itls=(), error_kind=None) -> ServeRecord:
    r = ServeRecord(f"r{i}", 0.0, 10, num_output_tokens, send_time=0.0, ttft=ttft, e2e=e2e, itls=list(itls),
                    num_output_tokens=num_output_tokens, has_usage=True)
    if error_kind:
        r.e2e = None
        r.fail(error_kind, "boom")
    return r


def test_summarize_gives_exact_percentiles_of_hand_made_records():
    # TTFT 1..101 ms; 11 output tokens 10 ms apart, so TPOT = ITL = 10 ms; E2E = TTFT + 100 ms.
    records = [record(i, i / 1000, i / 1000 + 0.1, 11, itls=[0.01] * 10) for i in range(1, 102)]
    records += [record(200, 0, 0, 1, error_kind="http_500"), record(201, 0, 0, 1, error_kind="timeout"),
                record(202, 0, 0, 1, error_kind="timeout")]
    summary = summarize(records, duration_s=10.0)
    assert summary["ttft_ms"] == pytest.approx({"mean": 51.0, "p50": 51.0, "p90": 91.0, "p99": 100.0})
    assert summary["e2e_ms"] == pytest.approx({"mean": 151.0, "p50": 151.0, "p90": 191.0, "p99": 200.0})
    assert summary["tpot_ms"] == pytest.approx({"mean": 10.0, "p50": 10.0, "p90": 10.0, "p99": 10.0})
    assert summary["itl_ms"]["p99"] == pytest.approx(10.0)
    assert (summary["num_requests"], summary["num_completed"], summary["num_errors"]) == (104, 101, 3)
    assert summary["errors_by_kind"] == {"http_500": 1, "timeout": 2}
    assert summary["request_throughput"] == pytest.approx(10.1)
    assert summary["output_throughput"] == pytest.approx(111.1)
    assert summary["total_token_throughput"] == pytest.approx(212.1)


def test_summarize_of_nothing_successful_has_no_latencies():
    summary = summarize([record(0, 0, 0, 1, error_kind="timeout")])
    assert summary["num_completed"] == 0 and summary["request_throughput"] is None
    assert summary["ttft_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert p50_ratios(summary, summary) == {"ttft": None, "tpot": None}


def test_a_one_token_request_has_no_tpot():
    assert record(0, 0.01, 0.01, 1).tpot is None
    assert record(0, 0.01, 0.05, 5).tpot == pytest.approx(0.01)


def test_sse_lines():
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1} and parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") is not None and not isinstance(parse_sse_line("data: [DONE]"), dict)
    with pytest.raises(ValueError):
        parse_sse_line("data: {not json")


def test_workload_is_seeded_and_bounded():
    a = make_requests(n=20, rate=5.0, seed=3)
    assert a == make_requests(n=20, rate=5.0, seed=3)
    assert a != make_requests(n=20, rate=5.0, seed=4)
    assert all(len(r.prompt.split()) == r.num_prompt_tokens == 12 for r in a)
    assert a[0].arrival_time == 0 and all(x.arrival_time <= y.arrival_time for x, y in zip(a, a[1:]))
    assert 2.0 < a[-1].arrival_time < 8.0  # 19 Poisson gaps at 5 req/s: about 3.8 s
    assert all(r.arrival_time == 0 for r in make_requests(n=5, rate=math.inf))
    base = baseline_requests(a, 3, seed=3)
    assert [r.num_prompt_tokens for r in base] == [12] * 3 and all(b.prompt != r.prompt for b, r in zip(base, a))


def test_a_trace_replays_its_scaled_clock_clipped_to_max_model_len():
    own = build_requests(ServeWorkload(num_requests=8, trace="azure2023_conv"))[0]
    fast = build_requests(ServeWorkload(num_requests=8, trace="azure2023_conv", time_scale=0.5))[0]
    assert [f.arrival_time for f in fast] == pytest.approx([o.arrival_time / 2 for o in own])
    clipped, clipping = build_requests(ServeWorkload(num_requests=50, trace="mooncake_conversation", max_model_len=600))
    assert clipping.num_prompts_clipped > 0
    assert all(r.num_prompt_tokens + r.max_tokens <= 600 for r in clipped)


def read(lines: list[str], endpoint: str = "completions") -> ServeRecord:
    async def stream():
        for line in lines:
            yield line

    r = ServeRecord("r", 0.0, 3, 4)
    asyncio.run(read_stream(stream(), r, time.perf_counter(), endpoint))
    return r


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text}]})


@pytest.mark.parametrize("lines, kind", [
    ([chunk(" a"), 'data: {"error": {"message": "engine died", "code": 500}}', "data: [DONE]"], "stream_error"),
    ([chunk(" a"), "data: {oops"], "stream_error"),
    ([chunk(" a"), chunk(" b")], "incomplete"),
    ([chunk(""), "data: [DONE]"], "empty"),
])
def test_a_broken_stream_is_that_requests_error(lines, kind):
    r = read(lines)
    assert not r.is_success and r.error_kind == kind


def test_without_usage_the_chunks_with_text_are_counted():
    r = read(["", chunk(" a"), ": comment", chunk(""), chunk(" b"), chunk(" c"), "data: [DONE]"])
    assert r.is_success and not r.has_usage
    assert r.num_output_tokens == 3 and len(r.itls) == 2 and r.num_prompt_tokens == 3
