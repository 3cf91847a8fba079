"""`shunter bench frontend`: what the HTTP frontend and token path add, with instances that do no model work.

    shunter bench frontend [--requests 3000] [--concurrency 100] [--output-len 8] [--runtime local|ray]

A `shunter serve --null-engine` server (its own process; instances whose
executor emits each token instantly) is loaded by the same client as
`shunter bench serve`, twice: one request at a time (latency) and
`--concurrency` streams at once (throughput). The baseline, measured in the
same run, is a direct call of the same null engines in this process: the same
engine loops, requests submitted as token ids and awaited through the same
step messages, no HTTP, no tokenizer, no frontend. The figures are the added
latency (P50 over HTTP minus P50 direct, one at a time) and requests/s at the
given concurrency, each beside the direct figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from shunter.bench import processes
from shunter.errors import CLIError
from shunter.sim.cli import HelpFormatter

TARGET_ADDED_P50_MS = 1.0
TARGET_REQUESTS_PER_S = 1000.0


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("frontend", help="HTTP frontend overhead with null-engine instances vs direct calls",
                                    description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="requests of the concurrent run")
    p.add_argument("--latency-requests", type=int, default=300, help="one-at-a-time requests of the latency run")
    p.add_argument("--concurrency", type=int, default=100, help="streams at once in the throughput run")
    p.add_argument("--input-len", type=int, default=8, help="prompt length in words")
    p.add_argument("--output-len", type=int, default=8, help="tokens per request")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--runtime", default="local", choices=["local", "ray"],
                   help="the null instances as threads of the server (local) or as Ray actors (ray)")
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the figures here")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    for name in ("requests", "latency_requests", "concurrency", "input_len", "output_len", "instances"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    from shunter.bench.serve_metrics import latency_stats
    from shunter.server.runner import free_port

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(port, args)
    try:
        http = asyncio.run(_http_runs(url, args))
    finally:
        processes.stop(server)
    direct = asyncio.run(_direct_runs(args))
    result = {
        "workload": {"input_words": args.input_len, "output_tokens": args.output_len,
                     "concurrency": args.concurrency, "instances": args.instances, "runtime": args.runtime},
        "http": {"latency_ms": latency_stats(http["latency"]), "requests_per_s": http["rps"],
                 "errors": http["errors"]},
        "direct": {"latency_ms": latency_stats(direct["latency"]), "requests_per_s": direct["rps"]},
    }
    added = result["http"]["latency_ms"]["p50"] - result["direct"]["latency_ms"]["p50"]
    result["added_latency_p50_ms"] = added
    result["requests_per_s_ratio"] = http["rps"] / direct["rps"]
    _print(result)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _start_server(port: int, args) -> subprocess.Popen:
    """`shunter serve --null-engine` in its own process; returns once /health answers."""
    cmd = [sys.executable, "-m", "shunter", "serve", "--null-engine", "--port", str(port),
           "--instances", str(args.instances), "--runtime", args.runtime, "--policy", "rr"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc, _ = processes.start_until_healthy(cmd, port, 120, env, name="the null-engine server")
    return proc


async def _http_runs(url: str, args) -> dict:
    from shunter.bench.serve_load import LoadConfig, run_load
    from shunter.bench.serve_workload import ServeRequest, random_prompt
    import numpy as np

    rng = np.random.default_rng(0)

    def requests(n: int) -> list[ServeRequest]:
        return [ServeRequest(f"r{i}", 0.0, random_prompt(args.input_len, rng), args.input_len, args.output_len)
                for i in range(n)]

    await run_load(LoadConfig(url, requests(50), max_concurrency=10, timeout_s=60))  # warm-up
    latency = await run_load(LoadConfig(url, requests(args.latency_requests), max_concurrency=1, timeout_s=300))
    burst = await run_load(LoadConfig(url, requests(args.requests), max_concurrency=args.concurrency, timeout_s=300))
    done = [r for r in burst.records if r.is_success]
    return {"latency": [r.e2e for r in latency.records if r.is_success],
            "rps": len(done) / burst.duration_s,
            "errors": sum(not r.is_success for r in latency.records + burst.records)}


async def _direct_runs(args) -> dict:
    """The same null engines driven directly: submit token ids, await the closing delta."""
    from shunter.model.loader import load_tokenizer_and_context, prepare_checkpoint
    from shunter.request import Request, SamplingParams
    from shunter.runtime.handles import LocalInstance
    from shunter.runtime.spec import InstanceSpec
    from shunter.server.cli import NULL_ENGINE_TEXT

    tokenizer, _ = load_tokenizer_and_context(prepare_checkpoint(None))
    spec = InstanceSpec(executor="null", null_token_ids=tokenizer.encode(NULL_ENGINE_TEXT, add_special_tokens=False))
    handles = [LocalInstance(str(i), spec) for i in range(args.instances)]
    for h in handles:
        await h.start()
    waiting: dict[str, asyncio.Future] = {}

    async def pump(handle: LocalInstance) -> None:
        seq = 0
        while True:
            for message in await handle.poll(seq, 1.0):
                seq = message.seq
                for delta in message.deltas:
                    if delta.is_finished and delta.request_id in waiting:
                        waiting.pop(delta.request_id).set_result(None)

    pumps = [asyncio.create_task(pump(h)) for h in handles]
    prompt = tokenizer.encode(" ".join(["word"] * args.input_len))
    counter = iter(range(10**9))

    async def one() -> float:
        i = next(counter)
        start = time.perf_counter()
        request = Request(f"d{i}", list(prompt), SamplingParams(max_tokens=args.output_len, ignore_eos=True),
                          arrival_time=time.monotonic())
        done = waiting[request.request_id] = asyncio.get_running_loop().create_future()
        handles[i % len(handles)].add_request(request)
        await done
        return time.perf_counter() - start

    async def run(n: int, concurrency: int) -> tuple[list[float], float]:
        slots = asyncio.Semaphore(concurrency)

        async def bounded() -> float:
            async with slots:
                return await one()

        start = time.perf_counter()
        latencies = await asyncio.gather(*(bounded() for _ in range(n)))
        return list(latencies), time.perf_counter() - start

    try:
        await run(50, 10)  # warm-up
        latency, _ = await run(args.latency_requests, 1)
        _, elapsed = await run(args.requests, args.concurrency)
    finally:
        for task in pumps:
            task.cancel()
        for h in handles:
            await h.shutdown()
    return {"latency": latency, "rps": args.requests / elapsed}


def _print(result: dict) -> None:
    w = result["workload"]
    print(f"shunter bench frontend: null-engine instances ({w['instances']}, {w['runtime']}), "
          f"{w['input_words']} words in / {w['output_tokens']} tokens out, streamed")
    print_overhead(result, "http", "HTTP")


def print_overhead(result: dict, side: str, label: str) -> None:
    """The latency and throughput lines of an overhead result: `result[side]` beside `result["direct"]`."""
    h, d = result[side], result["direct"]
    print(f"  one at a time, E2E (ms):   {label} P50 {h['latency_ms']['p50']:.3f}  P99 {h['latency_ms']['p99']:.3f}   "
          f"direct P50 {d['latency_ms']['p50']:.3f}  P99 {d['latency_ms']['p99']:.3f}")
    added = result["added_latency_p50_ms"]
    print(f"  added latency P50: {added:.3f} ms (target < {TARGET_ADDED_P50_MS:g} ms: "
          f"{'met' if added < TARGET_ADDED_P50_MS else 'NOT met'})")
    rps = h["requests_per_s"]
    print(f"  {result['workload']['concurrency']} streams at once: {label} {rps:,.0f} req/s   "
          f"direct {d['requests_per_s']:,.0f} req/s   "
          f"ratio {result['requests_per_s_ratio']:.2f} (target >= {TARGET_REQUESTS_PER_S:,.0f} req/s: "
          f"{'met' if rps >= TARGET_REQUESTS_PER_S else 'NOT met'})")
    if h["errors"] or d.get("errors"):
        print(f"  errors: {label} {h['errors']}, direct {d.get('errors', 0)}")
