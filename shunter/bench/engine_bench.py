"""`shunter bench engine`: Shunter's engine vs Hugging Face `generate` on the same requests.

Requests take their prompt and output lengths from the ShareGPT length trace
(a seeded sample), scaled so the longest request of the whole trace fits
`--context` tokens. Prompts are random (seeded) token ids of those lengths.
Every request runs to its own `max_tokens` (`ignore_eos`). Hugging Face runs
the same requests in left-padded batches of 16, as an HF user would: each
batch generates until its longest request is done (with EOS suppressed) and
only each request's own tokens count as output. Both use the same weights,
dtype and thread count, in the same process, one after the other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

HF_BATCH_SIZE = 16
# For reference only (not measured here): vLLM's CPU build on this machine class.
VLLM_CPU_PEER_TOK_S = 850


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def register(subparsers) -> None:
    p = subparsers.add_parser("engine", help="Shunter engine vs HF generate, output tokens/s")
    p.add_argument("--requests", type=int, default=64, help="number of requests (default 64)")
    p.add_argument("--context", type=int, default=1024,
                   help="the trace's longest request is scaled to this many tokens (default 1024)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 where the CPU has native bfloat16 (AVX512-BF16/AMX) or on CUDA, else float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both engines (default 2)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="Shunter's batch size limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="Shunter's per-step token budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="measure only Shunter (no ratio)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.set_defaults(func=run)


def make_requests(n: int, context: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    """A seeded sample of ShareGPT lengths, scaled into `context`, with random prompt tokens."""
    import numpy as np

    from shunter.sim.workloads.traces import read_trace

    trace = read_trace("sharegpt")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(trace), size=n, replace=False)
    scale = context / float((trace.num_prompt_tokens + trace.num_output_tokens).max())
    requests = []
    for row in rows:
        prompt_len = max(1, int(round(trace.num_prompt_tokens[row] * scale)))
        output_len = max(1, int(round(trace.num_output_tokens[row] * scale)))
        # Low ids are special tokens in most vocabularies; keep prompts to ordinary ones.
        prompt = rng.integers(100, vocab_size, size=prompt_len).tolist()
        requests.append(BenchRequest(prompt, output_len))
    return requests


def run_shunter(llm, requests: list[BenchRequest]) -> tuple[float, int]:
    """Seconds and output tokens for all requests at once through Shunter's engine."""
    from shunter.request import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outputs)
    expected = sum(r.max_tokens for r in requests)
    if produced != expected:
        raise RuntimeError(f"Shunter produced {produced} output tokens, expected {expected}")
    return elapsed, produced


def run_hf(hf_model, requests: list[BenchRequest], pad_token_id: int) -> tuple[float, int]:
    """Seconds and useful output tokens for HF `generate` in left-padded batches of 16."""
    import torch

    start = time.perf_counter()
    useful = 0
    with torch.inference_mode():
        for i in range(0, len(requests), HF_BATCH_SIZE):
            batch = requests[i:i + HF_BATCH_SIZE]
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, r in enumerate(batch):
                n = len(r.prompt_token_ids)
                ids[j, width - n:] = torch.tensor(r.prompt_token_ids)
                mask[j, width - n:] = 1
            new_tokens = max(r.max_tokens for r in batch)
            hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
            useful += sum(r.max_tokens for r in batch)
    return time.perf_counter() - start, useful


def run(args) -> int:
    if args.requests <= 0:
        raise ValueError(f"--requests must be positive, got {args.requests}")
    if args.context < 16:
        raise ValueError(f"--context must be at least 16 tokens, got {args.context}")
    if args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    import torch

    from shunter.llm import LLM
    from shunter.model.loader import load_hf_model, resolve_dtype, resolve_source

    torch.set_num_threads(args.threads)
    llm = LLM(dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads)
    if args.context >= llm.model_config.max_model_len:
        raise ValueError(f"--context {args.context} must be below the model's context of {llm.model_config.max_model_len}")
    requests = make_requests(args.requests, args.context, llm.model_config.vocab_size, args.seed)
    total_prompt = sum(len(r.prompt_token_ids) for r in requests)
    total_output = sum(r.max_tokens for r in requests)
    print(f"{len(requests)} requests, {total_prompt} prompt + {total_output} output tokens, dtype {llm.dtype}, "
          f"{args.threads} threads")

    # A short warm-up so one-time costs (allocator, kernels) are not billed to either side.
    llm.generate([requests[0].prompt_token_ids[:8]], _warmup_params())
    shunter_s, shunter_tokens = run_shunter(llm, requests)
    shunter_tok_s = shunter_tokens / shunter_s
    print(f"shunter: {shunter_tokens} output tokens in {shunter_s:.1f} s = {shunter_tok_s:.1f} tok/s")
    result = {"shunter_output_tok_s": shunter_tok_s, "dtype": str(llm.dtype).removeprefix("torch."),
              "requests": len(requests), "context": args.context, "threads": args.threads}
    if not args.skip_hf:
        del llm  # free the KV cache before loading HF's copy of the weights
        hf_model = load_hf_model(resolve_source(None), resolve_dtype(args.dtype, torch.device("cpu")))
        hf_model.eval()
        run_hf(hf_model, [BenchRequest(requests[0].prompt_token_ids[:8], 4)], pad_token_id=hf_model.config.pad_token_id or 0)
        hf_s, hf_tokens = run_hf(hf_model, requests, pad_token_id=hf_model.config.pad_token_id or 0)
        hf_tok_s = hf_tokens / hf_s
        ratio = shunter_tok_s / hf_tok_s
        print(f"hf generate (batches of {HF_BATCH_SIZE}): {hf_tokens} output tokens in {hf_s:.1f} s = {hf_tok_s:.1f} tok/s")
        print(f"ratio shunter / hf: {ratio:.2f}x   (reference, not measured here: vLLM CPU ~{VLLM_CPU_PEER_TOK_S} tok/s, "
              f"ratio {shunter_tok_s / VLLM_CPU_PEER_TOK_S:.2f})")
        result.update(hf_output_tok_s=hf_tok_s, ratio=ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _warmup_params():
    from shunter.request import SamplingParams

    return SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
