"""`shunter bench gateway`: the gateway in front of OpenAI servers, against a direct connection in the same run.

    shunter bench gateway --null [--requests 3000] [--concurrency 100]     # overhead, null backends
    shunter bench gateway --vllm [--vllm-python PY] [--num-prompts 40]    # two `vllm serve` backends

--null: two null OpenAI servers (`shunter.bench.null_openai_server`, each its
own process, answering at once) behind `shunter serve --backend ...` (its own
process), loaded by `shunter bench serve`'s client (aiohttp, this process):
one request at a time (latency), then `--concurrency` streams at once
(throughput). The baseline, in the same run, is the same client on the same
backends directly (the concurrent run split evenly over both). The figures are
the added latency (P50 through the gateway minus P50 direct) and requests/s,
each beside the direct figure.

--vllm: see `shunter.bench.gateway_vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from shunter.bench import processes
from shunter.errors import CLIError
from shunter.sim.cli import HelpFormatter

NULL_MODEL = "null-model"


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("gateway", help="the gateway (shunter serve --backend) vs direct connections",
                                    description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--null", action="store_true", help="overhead against null backends")
    mode.add_argument("--vllm", action="store_true", help="two vllm serve backends (vLLM's client; prefix vs rr)")
    p.add_argument("--requests", type=int, default=3000, help="--null: requests of the concurrent run")
    p.add_argument("--latency-requests", type=int, default=300, help="--null: one-at-a-time requests")
    p.add_argument("--concurrency", type=int, default=100, help="--null: streams at once in the throughput run")
    p.add_argument("--input-len", type=int, default=8, help="--null: prompt length in words")
    p.add_argument("--output-len", type=int, default=8, help="--null: tokens per request")
    p.add_argument("--dispatch", default="round-robin", help="--null: the gateway's dispatch policy")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the figures here")
    from shunter.bench import gateway_vllm

    gateway_vllm.add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.vllm:
        from shunter.bench import gateway_vllm

        result = gateway_vllm.run(args)
    else:
        result = run_null(args)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def run_null(args) -> dict:
    for name in ("requests", "latency_requests", "concurrency", "input_len", "output_len"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    from shunter.bench.serve_metrics import latency_stats
    from shunter.server.runner import free_port

    started = []
    try:
        urls = []
        for _ in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "shunter.bench.null_openai_server", "--port", str(port)]
            started.append(processes.start_until_healthy(cmd, port, 60, name="a null backend")[0])
            urls.append(f"http://127.0.0.1:{port}")
        started.append(start_gateway(urls, ["--dispatch", args.dispatch]))
        gateway_url = f"http://127.0.0.1:{started[-1].port}"
        runs = asyncio.run(_runs(gateway_url, urls, args))
    finally:
        for proc in started:
            processes.stop(proc)
    result = {
        "workload": {"input_words": args.input_len, "output_tokens": args.output_len,
                     "concurrency": args.concurrency, "backends": 2, "dispatch": args.dispatch},
        "gateway": {"latency_ms": latency_stats(runs["gateway"]["latency"]),
                    "requests_per_s": runs["gateway"]["rps"], "errors": runs["gateway"]["errors"]},
        "direct": {"latency_ms": latency_stats(runs["direct"]["latency"]),
                   "requests_per_s": runs["direct"]["rps"], "errors": runs["direct"]["errors"]},
    }
    result["added_latency_p50_ms"] = result["gateway"]["latency_ms"]["p50"] - result["direct"]["latency_ms"]["p50"]
    result["requests_per_s_ratio"] = result["gateway"]["requests_per_s"] / result["direct"]["requests_per_s"]
    _print_null(result)
    return result


def start_gateway(urls: list[str], flags: list[str], log=None):
    """`shunter serve --backend URL ...` in its own process; returns once /health answers (`.port` set)."""
    from shunter.server.runner import free_port
    import subprocess

    port = free_port()
    cmd = [sys.executable, "-m", "shunter", "serve", "--port", str(port), *flags]
    for url in urls:
        cmd += ["--backend", url]
    proc, _ = processes.start_until_healthy(cmd, port, 120, log=log or subprocess.DEVNULL, name="the gateway")
    proc.port = port
    return proc


async def _runs(gateway_url: str, urls: list[str], args) -> dict:
    from shunter.bench.serve_load import LoadConfig, run_load
    from shunter.bench.serve_workload import ServeRequest, random_prompt
    import numpy as np

    rng = np.random.default_rng(0)

    def requests(n: int) -> list[ServeRequest]:
        return [ServeRequest(f"r{i}", 0.0, random_prompt(args.input_len, rng), args.input_len, args.output_len)
                for i in range(n)]

    async def load(url: str, n: int, concurrency: int):
        return await run_load(LoadConfig(url, requests(n), model=NULL_MODEL, max_concurrency=concurrency,
                                         timeout_s=300))

    for url in (gateway_url, *urls):  # warm-up: connections, first-call costs
        await load(url, 50, 10)
    out = {}
    # Direct first, then through the gateway, each on the same backends with the same client.
    latency = await load(urls[0], args.latency_requests, 1)
    half = max(1, args.concurrency // 2)
    bursts = await asyncio.gather(*(load(u, args.requests // 2, half) for u in urls))
    out["direct"] = _figures(latency, bursts)
    latency = await load(gateway_url, args.latency_requests, 1)
    burst = await load(gateway_url, args.requests, args.concurrency)
    out["gateway"] = _figures(latency, [burst])
    return out


def _figures(latency, bursts) -> dict:
    done = sum(1 for b in bursts for r in b.records if r.is_success)
    return {"latency": [r.e2e for r in latency.records if r.is_success],
            "rps": done / max(b.duration_s for b in bursts),
            "errors": sum(not r.is_success for b in [latency, *bursts] for r in b.records)}


def _print_null(result: dict) -> None:
    from shunter.bench.frontend_bench import print_overhead

    w = result["workload"]
    print(f"shunter bench gateway --null: 2 null backends (own processes), dispatch {w['dispatch']}, "
          f"{w['input_words']} words in / {w['output_tokens']} tokens out, streamed")
    print_overhead(result, "gateway", "gateway")
