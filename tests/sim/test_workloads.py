"""Workloads: built-in traces, windows and rate scaling, clipping, prefix sharing, generators, errors."""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from shunter.sim.workloads import (Clipping, WorkloadRequest, WorkloadSpec, generate_arrivals, list_traces,
                                   load_workload, load_workload_with_clipping, parse_lengths, prompt_token_ids)

FIXTURES = Path(__file__).parent / "fixtures"

# name: (rows, first prompt, first output, span of the raw trace in s, mean prompt length), from traces/README.md
BUILTIN = {
    "azure2023_conv": (19_366, 374, 44, 3501.7, 1154.7),
    "azure2023_code": (8_819, 4808, 10, 3435.9, 2047.8),
    "mooncake_conversation": (12_031, 6758, 500, 3537.0, 12035.1),
    "mooncake_synthetic": (3_993, 40160, 6, 1022.0, 15325.5),
    "sharegpt": (30_731, 74, 918, None, 2340.0),
}

_cache: dict[str, list[WorkloadRequest]] = {}


def full(name: str) -> list[WorkloadRequest]:
    """A built-in trace loaded whole (once per test session)."""
    if name not in _cache:
        _cache[name] = load_workload(WorkloadSpec(name))
    return _cache[name]


def times(requests: list[WorkloadRequest]) -> np.ndarray:
    return np.array([r.arrival_time for r in requests])


def mean_rate(requests: list[WorkloadRequest]) -> float:
    t = times(requests)
    return (len(t) - 1) / (t[-1] - t[0])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def synthetic(**kw) -> WorkloadSpec:
    defaults = dict(prompt_lengths="fixed:100", output_lengths="fixed:10", num_requests=4000, rate=5.0)
    return WorkloadSpec("synthetic", **{**defaults, **kw})


# ---- built-in traces ------------------------------------------------------------------------

def test_list_traces_names_the_builtins():
    assert list_traces() == [*BUILTIN, "synthetic"]


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_trace_loads_whole(name):
    rows, prompt, output, span, prompt_mean = BUILTIN[name]
    requests = full(name)
    assert len(requests) == rows
    first = requests[0]
    assert (first.request_id, first.num_prompt_tokens, first.num_output_tokens) == (f"{name}-0", prompt, output)
    t = times(requests)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert np.mean([r.num_prompt_tokens for r in requests]) == pytest.approx(prompt_mean, abs=0.1)
    if span is not None and name != "mooncake_conversation":  # its buckets are spread past the last stamp
        assert t[-1] == pytest.approx(span, abs=0.1)
    assert all(r.priority == 0 and r.ttft_slo is None for r in requests[:100])


def test_mooncake_first_row_has_its_hash_ids():
    assert full("mooncake_conversation")[0].prefix_block_ids == tuple(range(14))
    assert full("mooncake_synthetic")[0].prefix_block_ids == tuple(range(79))
    assert full("azure2023_conv")[0].prefix_block_ids is None


def test_mooncake_conversation_buckets_are_spread_over_3_s():
    raw = times(load_workload(WorkloadSpec("mooncake_conversation", spread_buckets=False)))
    spread = times(full("mooncake_conversation"))
    assert len(np.unique(raw)) == 1180
    assert raw[-1] == pytest.approx(3536.999)
    assert np.all(spread >= raw) and np.all(spread < raw + 3.0)
    assert np.all(np.diff(spread) > 0)  # no two requests at once any more


# ---- window, count, rate --------------------------------------------------------------------

def test_window_selects_and_shifts_to_zero():
    whole = full("azure2023_conv")
    t = times(whole)
    expected = [r.request_id for r, ti in zip(whole, t) if 600 <= ti < 900]
    window = load_workload(WorkloadSpec("azure2023_conv", start=600, duration=300))
    assert [r.request_id for r in window] == expected
    tw = times(window)
    assert tw[0] == 0.0 and tw[-1] < 300 and np.all(np.diff(tw) >= 0)
    offset = t[[r.request_id for r in whole].index(expected[0])]
    assert tw == pytest.approx(t[(t >= 600) & (t < 900)] - offset)


def test_max_requests_keeps_the_first_of_the_window():
    window = load_workload(WorkloadSpec("azure2023_code", start=100, max_requests=50))
    assert len(window) == 50 and window[0].arrival_time == 0.0


def test_rate_rescales_a_trace_exactly():
    requests = load_workload(WorkloadSpec("azure2023_conv", rate=10.0))
    assert mean_rate(requests) == pytest.approx(10.0)
    assert [r.num_prompt_tokens for r in requests[:50]] == [r.num_prompt_tokens for r in full("azure2023_conv")[:50]]


def test_rate_scale_divides_arrival_times():
    scaled = load_workload(WorkloadSpec("mooncake_synthetic", rate_scale=2.0))
    assert times(scaled) == pytest.approx(times(full("mooncake_synthetic")) / 2)


def test_sharegpt_gets_poisson_arrivals_at_the_rate():
    assert mean_rate(full("sharegpt")) == pytest.approx(1.0, rel=0.03)
    requests = load_workload(WorkloadSpec("sharegpt", rate=5.0, max_requests=5000))
    assert mean_rate(requests) == pytest.approx(5.0, rel=0.05)


# ---- lengths ------------------------------------------------------------------------------

def test_max_model_len_clips_prompts_outputs_and_blocks():
    whole = full("mooncake_conversation")
    clipped = load_workload(WorkloadSpec("mooncake_conversation", max_model_len=2048))
    for before, after in zip(whole, clipped):
        assert after.num_prompt_tokens == min(before.num_prompt_tokens, 2047)
        assert after.num_output_tokens == min(before.num_output_tokens, 2048 - after.num_prompt_tokens)
        assert after.num_output_tokens >= 1
        assert after.prefix_block_ids == before.prefix_block_ids[:math.ceil(after.num_prompt_tokens / 512)]


def test_clipping_leaves_short_requests_alone():
    whole = full("azure2023_conv")
    clipped, clipping = load_workload_with_clipping(WorkloadSpec("azure2023_conv", max_model_len=20_000))
    assert clipped == whole
    assert clipping == Clipping(max_model_len=20_000) and clipping.is_empty and clipping.summary(len(whole)) is None


def test_clipping_counts_what_it_cut():
    # Prompts 1200, 1100, 700, 300 and outputs 10, 20, 30, 40 into 601 tokens: three prompts lose
    # 600 + 500 + 100 tokens, and their outputs keep the one token left (9 + 19 + 29 dropped).
    requests, clipping = load_workload_with_clipping(WorkloadSpec(str(FIXTURES / "mooncake_small.jsonl"),
                                                                  max_model_len=601))
    assert [r.num_prompt_tokens for r in requests] == [600, 600, 600, 300]
    assert clipping == Clipping(max_model_len=601, num_prompts_clipped=3, num_prompt_tokens_clipped=1200,
                                num_outputs_clipped=3, num_output_tokens_clipped=57)
    assert clipping.summary(4) == ("max_model_len 601: 3 of 4 prompts clipped to 600 tokens (1,200 prompt tokens "
                                   "dropped); 3 outputs shortened to fit (57 output tokens dropped)")


def test_clipping_counts_match_the_lengths_on_a_real_trace():
    whole = full("mooncake_conversation")[:2000]
    clipped, clipping = load_workload_with_clipping(WorkloadSpec("mooncake_conversation", max_model_len=4096,
                                                                 max_requests=2000))
    prompt_cut = [b.num_prompt_tokens - a.num_prompt_tokens for b, a in zip(whole, clipped)]
    output_cut = [b.num_output_tokens - a.num_output_tokens for b, a in zip(whole, clipped)]
    assert clipping.num_prompts_clipped == sum(1 for c in prompt_cut if c) > len(whole) / 2
    assert clipping.num_prompt_tokens_clipped == sum(prompt_cut)
    assert clipping.num_outputs_clipped == sum(1 for c in output_cut if c)
    assert clipping.num_output_tokens_clipped == sum(output_cut)


def test_no_max_model_len_clips_nothing():
    _, clipping = load_workload_with_clipping(WorkloadSpec(str(FIXTURES / "mooncake_small.jsonl")))
    assert clipping == Clipping() and clipping.is_empty


# ---- prompt token ids ---------------------------------------------------------------------

def test_prefix_blocks_are_shared_exactly_and_cut_at_the_prompt_length():
    requests = load_workload(WorkloadSpec(str(FIXTURES / "mooncake_small.jsonl")))
    a, b, c, d = (prompt_token_ids(r) for r in requests)
    assert [len(x) for x in (a, b, c, d)] == [1200, 1100, 700, 300]
    assert common_prefix(a, b) == 1024  # hash_ids [0, 1, 2] vs [0, 1, 3]
    assert common_prefix(a, c) == 512  # [0, 1, 2] vs [0, 4]
    assert common_prefix(a, d) == common_prefix(c, d) == 0  # d has no hash_ids
    assert a[1024:] == [2] * 176  # the partial last block


def test_prefix_sharing_on_the_real_trace():
    r0, r1 = full("mooncake_conversation")[:2]
    assert r0.prefix_block_ids[:1] == r1.prefix_block_ids[:1] and r0.prefix_block_ids[1] != r1.prefix_block_ids[1]
    assert common_prefix(prompt_token_ids(r0), prompt_token_ids(r1)) == 512


def test_clipped_prompt_keeps_sharing_within_its_length():
    a, b, *_ = load_workload(WorkloadSpec(str(FIXTURES / "mooncake_small.jsonl"), max_model_len=601))
    assert a.prefix_block_ids == b.prefix_block_ids == (0, 1)
    assert prompt_token_ids(a) == prompt_token_ids(b) == [0] * 512 + [1] * 88


def test_requests_without_prefix_blocks_share_nothing():
    a, b = full("azure2023_conv")[:2]
    ta, tb = prompt_token_ids(a), prompt_token_ids(b)
    assert len(ta) == a.num_prompt_tokens and len(set(ta)) == 1
    assert common_prefix(ta, tb) == 0
    assert prompt_token_ids(a) == ta  # deterministic


# ---- synthetic ------------------------------------------------------------------------------

def inter_arrival_cv(requests: list[WorkloadRequest]) -> float:
    gaps = np.diff(times(requests))
    return float(np.std(gaps) / np.mean(gaps))


def test_poisson_arrivals_have_the_rate_and_cv_1():
    requests = load_workload(synthetic())
    assert len(requests) == 4000 and requests[0].arrival_time == 0.0
    assert mean_rate(requests) == pytest.approx(5.0, rel=0.05)
    assert inter_arrival_cv(requests) == pytest.approx(1.0, rel=0.05)


def test_gamma_arrivals_have_the_rate_and_cv():
    requests = load_workload(synthetic(arrival="gamma", cv=2.0, seed=1))
    assert mean_rate(requests) == pytest.approx(5.0, rel=0.1)
    assert inter_arrival_cv(requests) == pytest.approx(2.0, rel=0.1)


def test_generate_arrivals_gamma_cv_below_one_is_regular():
    t = generate_arrivals(3000, 2.0, np.random.default_rng(0), "gamma", cv=0.5)
    gaps = np.diff(t)
    assert np.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(0.5, rel=0.1)


def test_fixed_and_uniform_lengths():
    requests = load_workload(synthetic(prompt_lengths="fixed:128", output_lengths="uniform:10-20"))
    assert {r.num_prompt_tokens for r in requests} == {128}
    outputs = [r.num_output_tokens for r in requests]
    assert set(outputs) == set(range(10, 21))
    assert np.mean(outputs) == pytest.approx(15, abs=0.3)


def test_zipf_lengths_follow_the_bounded_zipf_pmf():
    rng = np.random.default_rng(0)
    samples = parse_lengths("zipf:1.2:1-1000").sample(rng, 20_000)
    assert samples.min() >= 1 and samples.max() <= 1000
    pmf = np.arange(1, 1001, dtype=float) ** -1.2
    pmf /= pmf.sum()
    counts = np.bincount(samples, minlength=1001)[1:]
    for k in (1, 2, 3, 10):
        assert counts[k - 1] / len(samples) == pytest.approx(pmf[k - 1], rel=0.1)
    shifted = parse_lengths("zipf:1.2:100-1099").sample(np.random.default_rng(0), 20_000)
    assert np.array_equal(shifted, samples + 99)  # LO shifts the ranks


def test_priority_fraction_and_slos():
    requests = load_workload(synthetic(num_requests=1000, priority_fraction=0.25, ttft_slo=2.0, tpot_slo=0.1))
    assert sum(r.priority for r in requests) == 250 and {r.priority for r in requests} == {0, 1}
    assert {(r.ttft_slo, r.tpot_slo) for r in requests} == {(2.0, 0.1)}
    other = load_workload(synthetic(num_requests=1000, priority_fraction=0.25, seed=7))
    assert [r.priority for r in other] != [r.priority for r in requests]


def test_same_seed_same_workload():
    spec = dict(prompt_lengths="zipf:1.0:1-4000", output_lengths="uniform:1-500", arrival="gamma", cv=3.0,
                priority_fraction=0.1, num_requests=500)
    assert load_workload(synthetic(**spec)) == load_workload(synthetic(**spec))
    assert load_workload(synthetic(**spec)) != load_workload(synthetic(seed=1, **spec))
    sharegpt = WorkloadSpec("sharegpt", max_requests=200, seed=3)
    assert load_workload(sharegpt) == load_workload(sharegpt)


# ---- user files ---------------------------------------------------------------------------

def test_user_files_in_each_format(tmp_path):
    lengths = load_workload(WorkloadSpec(str(FIXTURES / "lengths_small.csv"), arrival="gamma", cv=2.0))
    assert [(r.request_id, r.num_prompt_tokens, r.num_output_tokens) for r in lengths] == [
        ("lengths_small-0", 10, 20), ("lengths_small-1", 40, 10)]
    gz = tmp_path / "mine.jsonl.gz"
    with open(FIXTURES / "mooncake_small.jsonl", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    mooncake = load_workload(WorkloadSpec(gz))
    assert [r.arrival_time for r in mooncake] == [0.0, 0.0, 1.5, 4.0]  # no bucket spreading for user files
    assert mooncake[3].prefix_block_ids is None and mooncake[0].request_id == "mine-0"
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                     "2023-11-16 23:59:59.5000000,5,6\r\n2023-11-17 00:00:00.2500000,7,8\r\n")
    assert [r.arrival_time for r in load_workload(WorkloadSpec(str(azure)))] == [0.0, 0.75]


def test_unsorted_file_is_sorted_by_arrival_keeping_row_ids(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text('{"timestamp": 9000, "input_length": 5, "output_length": 1, "hash_ids": [7]}\n\n'
                    '{"timestamp": 2000, "input_length": 6, "output_length": 2, "hash_ids": [8]}\n')
    requests = load_workload(WorkloadSpec(str(path)))
    assert [(r.request_id, r.arrival_time, r.prefix_block_ids) for r in requests] == [
        ("late-1", 0.0, (8,)), ("late-0", 7.0, (7,))]


# ---- errors -------------------------------------------------------------------------------

def test_unknown_trace_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown trace 'azure'.*azure2023_conv, azure2023_code.*synthetic"):
        WorkloadSpec("azure")


def test_missing_file():
    with pytest.raises(ValueError, match="nope.csv does not exist"):
        load_workload(WorkloadSpec("./nope.csv"))


def test_missing_column_names_file_and_column():
    with pytest.raises(ValueError, match=r"azure_missing_column\.csv lacks column\(s\) GeneratedTokens"):
        load_workload(WorkloadSpec(str(FIXTURES / "azure_missing_column.csv")))


def test_missing_key_names_file_and_key():
    with pytest.raises(ValueError, match=r"mooncake_missing_key\.jsonl lacks key\(s\) output_length"):
        load_workload(WorkloadSpec(str(FIXTURES / "mooncake_missing_key.jsonl")))


@pytest.mark.parametrize("fixture, line", [("azure_bad_row.csv", 4), ("mooncake_bad_row.jsonl", 3)])
def test_bad_row_names_file_and_line(fixture, line):
    with pytest.raises(ValueError, match=rf"{fixture}, line {line}: cannot parse row"):
        load_workload(WorkloadSpec(str(FIXTURES / fixture)))


@pytest.mark.parametrize("kw, message", [
    (dict(rate=-1.0), "rate must be a finite number > 0"),
    (dict(rate=0), "rate must be"),
    (dict(rate_scale=0), "rate_scale must be a finite number > 0"),
    (dict(rate_scale=-2.0), "rate_scale must be"),
    (dict(rate=2.0, rate_scale=2.0), "either rate or rate_scale"),
    (dict(duration=0), "duration must be a finite number > 0"),
    (dict(duration=-5.0), "duration must be"),
    (dict(start=-1.0), "start must be"),
    (dict(max_requests=0), "max_requests must be an integer >= 1"),
    (dict(max_model_len=1), "max_model_len must be an integer >= 2"),
    (dict(priority_fraction=1.5), "priority_fraction must be in"),
    (dict(ttft_slo=0), "ttft_slo must be"),
    (dict(arrival="gamma", cv=2.0), "has its own arrival times"),
    (dict(prompt_lengths="fixed:10"), "prompt_lengths applies only to trace 'synthetic'"),
])
def test_bad_spec_values(kw, message):
    with pytest.raises(ValueError, match=message):
        WorkloadSpec("azure2023_conv", **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(arrival="uniform"), "arrival must be one of poisson, gamma"),
    (dict(arrival="gamma"), "needs cv"),
    (dict(cv=2.0), "cv applies only to arrival 'gamma'"),
    (dict(prompt_lengths=None), "needs prompt_lengths"),
    (dict(num_requests=0), "num_requests must be"),
])
def test_bad_synthetic_spec_values(kw, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**kw)


@pytest.mark.parametrize("text", ["fixed", "fixed:0", "fixed:-3", "fixed:1.5", "uniform:20-10", "uniform:5",
                                  "uniform:1-2-3", "zipf:1.0:1", "zipf:-1:1-10", "zipf:nan:1-10", "zipf:x:1-10",
                                  "gauss:1-10", "uniform:1-20000000", ""])
def test_bad_length_spec_names_the_value(text):
    with pytest.raises(ValueError, match=f"bad length spec '{text}'"):
        synthetic(output_lengths=text)


def test_window_past_the_end_gives_the_span():
    with pytest.raises(ValueError, match=r"holds no requests; its 19366 requests arrive from 0 to 3501\.7 s"):
        load_workload(WorkloadSpec("azure2023_conv", start=4000))


def test_window_inside_an_idle_gap_gives_the_span():
    # azure2023_code is idle for 217 s from 2855.8 s on.
    message = r"window \[2860, 2960\) s of trace azure2023_code holds no requests.*3435\.9 s"
    with pytest.raises(ValueError, match=message):
        load_workload(WorkloadSpec("azure2023_code", start=2860, duration=100))


def test_rate_needs_two_requests():
    with pytest.raises(ValueError, match="cannot rescale to rate 2"):
        load_workload(WorkloadSpec("azure2023_conv", max_requests=1, rate=2.0))
