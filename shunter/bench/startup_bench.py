"""`shunter bench startup`: how long `LLM()` takes to be ready, cold and warm, in one run.

Each load runs in a fresh Python process, as a user's would, and is timed
from before `from shunter import LLM` (imports included) to `LLM()` returning.
Cold: the converted-weights cache is empty (a fresh temporary directory), so
the GGUF file is parsed and dequantized as every load did before the cache,
and then written to the cache. Warm: the same again, reading the cached
directory. Both include building the executor and its KV cache; the run also
times filling a KV cache of the same size with `torch.zeros`, the cost the
calloc'd allocation avoids.
"""

from __future__ import annotations

import argparse

from shunter.sim.cli import HelpFormatter

TARGET_WARM_SECONDS = 5.0  # serving issue: LLM() ready in <= 5 s warm
TARGET_SERVE_SECONDS = 30.0  # serving issue: `shunter serve --instances 2` healthy in <= 30 s


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("startup", help="LLM() start-up time, cold (GGUF) vs warm (converted cache)",
                                    formatter_class=HelpFormatter)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--warm-runs", type=int, default=3, help="warm loads; the best is reported")
    p.add_argument("--no-serve", dest="serve", action="store_false",
                   help="skip timing `shunter serve --instances 2` until /health answers")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the figures here")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time

    import torch

    if args.warm_runs < 1:
        raise ValueError(f"--warm-runs must be at least 1, got {args.warm_runs}")
    script = ("import time; t = time.perf_counter(); from shunter import LLM; llm = LLM(dtype=%r); "
              "print(time.perf_counter() - t, tuple(llm.executor.kv_cache.shape), str(llm.executor.kv_cache.dtype))"
              % args.dtype)

    def load(cache: str) -> tuple[float, tuple, str]:
        env = dict(os.environ, SHUNTER_CONVERTED_DIR=cache)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        seconds, rest = out.stdout.strip().split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        return float(seconds), tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype

    with tempfile.TemporaryDirectory(prefix="shunter-startup-") as cache:
        cold, kv_shape, kv_dtype_name = load(cache)
        warm = min(load(cache)[0] for _ in range(args.warm_runs))
        serve = time_serve_until_healthy(cache, args.dtype) if args.serve else None
    kv_dtype = getattr(torch, kv_dtype_name.removeprefix("torch."))
    t0 = time.perf_counter()
    filled = torch.zeros(kv_shape, dtype=kv_dtype)
    fill = time.perf_counter() - t0
    gib = filled.numel() * filled.element_size() / 2**30
    del filled
    print(f"shunter bench startup: LLM() of the built-in model, dtype {args.dtype} -> {kv_dtype}, "
          f"KV cache {gib:.1f} GiB")
    print(f"  warm {warm:.2f} s (best of {args.warm_runs}; converted cache; fresh process, imports included)   cold {cold:.2f} s "
          f"(GGUF parsed and converted)   ratio x{cold / warm:.1f}   target <= {TARGET_WARM_SECONDS:g} s")
    print(f"  filling the same KV cache with torch.zeros: {fill:.2f} s (avoided: calloc'd pages)")
    if serve is not None:
        print(f"  shunter serve --instances 2 (Ray actors, warm cache): healthy after {serve:.1f} s "
              f"(process start to /health 200; target <= {TARGET_SERVE_SECONDS:g} s)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"warm_seconds": warm, "cold_seconds": cold, "kv_fill_seconds": fill, "kv_gib": gib,
                       "dtype": str(kv_dtype), "serve_healthy_seconds": serve}, f, indent=1)
            f.write("\n")
    return 0


def time_serve_until_healthy(cache: str, dtype: str, timeout: float = 180.0) -> float:
    """Seconds from starting `shunter serve --instances 2` to its first 200 on /health (then it is stopped)."""
    import os
    import sys

    from shunter.bench import processes
    from shunter.server.runner import free_port

    port = free_port()
    env = dict(os.environ, SHUNTER_CONVERTED_DIR=cache)
    proc, seconds = processes.start_until_healthy(
        [sys.executable, "-m", "shunter", "serve", "--instances", "2", "--dtype", dtype, "--port", str(port)],
        port, timeout, env, name="shunter serve")
    processes.stop(proc)
    return seconds
