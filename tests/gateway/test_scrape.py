"""Backend load from Prometheus text (vLLM's and SGLang's names) -> LoadReport. No server, no model."""

from __future__ import annotations

from shunter.gateway.scrape import DEFAULT_NUM_BLOCKS, load_report, parse_metrics

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smol"} 3.0
vllm:num_requests_waiting{engine="0",model_name="smol"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="smol"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="smol"} 400.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="2000",prefix_caching_hash_algo="sha256"} 1.0
process_cpu_seconds_total 12.5
"""

SGLANG = """\
sglang:num_running_reqs{model_name="qwen"} 4.0
sglang:num_queue_reqs{model_name="qwen"} 1.0
sglang:token_usage{model_name="qwen"} 0.5
sglang:cache_hit_rate{model_name="qwen"} 0.3
sglang:max_total_num_tokens{model_name="qwen"} 32000.0
"""


def test_vllm_metrics():
    s = parse_metrics(VLLM)
    assert (s.source, s.num_running, s.num_waiting, s.kv_usage) == ("vllm", 3, 2, 0.25)
    assert (s.num_total_blocks, s.block_size, s.prefix_hits, s.prefix_queries) == (2000, 16, 400.0, 1000.0)


def test_sglang_metrics():
    s = parse_metrics(SGLANG)
    assert (s.source, s.num_running, s.num_waiting, s.kv_usage, s.prefix_hit_rate) == ("sglang", 4, 1, 0.5, 0.3)
    assert s.num_total_blocks == 2000  # 32,000 tokens in 16-token blocks


def test_engines_of_one_server_are_summed():
    text = VLLM + 'vllm:num_requests_running{engine="1",model_name="smol"} 4.0\n'
    assert parse_metrics(text).num_running == 7


def test_other_metrics_are_not_a_load():
    assert parse_metrics("process_cpu_seconds_total 1.0\n# nothing else\n") is None


def test_load_report_sizes_waiting_requests_by_the_gateways_requests_in_flight():
    r = load_report("0", parse_metrics(VLLM), 5.0, [160, 320])  # mean 240 tokens: 15 blocks each
    assert (r.num_running, r.num_waiting, r.num_total_blocks, r.num_used_blocks, r.block_size) == (3, 2, 2000, 500, 16)
    assert (r.head_block_demand, r.waiting_block_demand, r.num_pending_prefill_tokens) == (15, 30, 480)
    assert r.num_free_blocks == 1500


def test_without_metrics_the_load_is_what_the_gateway_has_in_flight():
    r = load_report("0", None, 5.0, [16, 40])
    assert (r.num_running, r.num_waiting, r.num_total_blocks, r.num_used_blocks) == (2, 0, DEFAULT_NUM_BLOCKS, 4)
