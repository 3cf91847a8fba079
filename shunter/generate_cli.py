"""`shunter generate "PROMPT"`: chat-template a prompt and stream the answer to the terminal."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate an answer to a prompt with the built-in (or a local) model")
    p.add_argument("prompt", help="the user message (the model's chat template is applied)")
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    from shunter.request import SamplingParams

    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    # Validate cheap things before the model loads.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    from shunter.llm import LLM

    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    for piece in llm.stream_chat(messages, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
